"""SBL on a real GPU (skipped elsewhere; run with TRITON_INTERPRET=0).

The CUDA path differs from the interpreter's in one way: the ops are ``triton_op``s whose
kernels AOTAutograd traces into the graph, so Inductor launches them. These tests check
that it does, and that outputs and gradients still equal eager.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import bcpt_compile  # noqa: F401

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and TRITON_INTERPRET=0",
)


def sbl(x, w, b, s):
    return (F.linear(x, w) + b) * torch.relu(s - 0.3)


def _inputs(dtype, M=700, K=192, N=520, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, generator=g, device="cuda", dtype=dtype)
    w = torch.randn(N, K, generator=g, device="cuda", dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, device="cuda", dtype=dtype)
    # a quarter of the 128x128 tiles active, relu ~half dense inside them
    tiles = torch.rand(-(-M // 128), -(-N // 128), generator=g, device="cuda") < 0.25
    keep = tiles.repeat_interleave(128, 0)[:M].repeat_interleave(128, 1)[:, :N]
    s = torch.where(keep, torch.randn(M, N, generator=g, device="cuda", dtype=dtype), -1.0)
    return [t.requires_grad_() for t in (x, w, b, s)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_inductor_matches_eager(dtype, tol, reorder):
    args = _inputs(dtype)
    ref = sbl(*args)
    dy = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, args, dy)
    torch._dynamo.reset()
    fn = torch.compile(sbl, backend="bcpt", options={"sbl_reorder": reorder})
    out = fn(*args)
    got_g = torch.autograd.grad(out, args, dy)
    assert _rel(out, ref) <= tol
    for name, a, b in zip("x w b s".split(), got_g, ref_g):
        assert _rel(a, b) <= tol, name


def test_inductor_launches_the_kernels_itself():
    """No opaque bcpt op is left in Inductor's code: it calls the Triton kernels directly."""
    from torch._inductor.utils import run_and_get_code

    args = _inputs(torch.bfloat16)
    torch._dynamo.reset()
    fn = torch.compile(sbl, backend="bcpt")
    out, codes = run_and_get_code(lambda: fn(*args).sum().backward())
    code = "\n".join(codes)
    for kernel in ("_tile_bits_kernel", "_sddmm_forward_kernel", "_dense_forward_kernel", "_sddmm_backward_kernel",
                   "_dx_kernel", "_dw_kernel"):
        assert kernel in code, kernel
    assert "_compact_kernel" not in code  # the backward kernel's spare programs build the lists
    assert "torch.ops.bcpt" not in code


def test_reduce_overhead_replays_with_a_new_mask():
    torch._dynamo.reset()
    fn = torch.compile(sbl, backend="bcpt", mode="reduce-overhead")
    for seed in range(3):
        args = [t.detach() for t in _inputs(torch.bfloat16, seed=seed)]
        ref = sbl(*args)
        for _ in range(2):
            out = fn(*args)
        assert _rel(out, ref) <= 1e-2


@pytest.mark.parametrize("graphs", [False, True], ids=["launched", "cuda-graph"])
@pytest.mark.parametrize("M,K,N", [(700, 192, 520), (333, 136, 1000)])
def test_dense_forward_with_tensor_descriptors_matches_eager(M, K, N, graphs):
    """crossover 0: every forward takes the dense kernel, which on Hopper loads x and W
    through device-side descriptors (global scratch from Triton's allocator, launched by
    Triton's own launcher), also inside a CUDA graph."""
    from bcpt_compile.kernels import sbl_block_gemm as bg

    args = _inputs(torch.bfloat16, M=M, K=K, N=N)
    assert not torch.cuda.get_device_capability() >= (9, 0) or bg._dense_tma((args[0], args[1]), _no_perm_bcat(args[3]))
    ref = sbl(*args)
    dy = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, args, dy)
    torch._dynamo.reset()
    # reduce-overhead's Inductor options (torch.compile takes a mode or options, not both)
    fn = torch.compile(sbl, backend="bcpt", options={"density_crossover": 0.0,
                                                     "inductor_options": {"triton.cudagraphs": graphs}})
    for _ in range(3 if graphs else 1):
        out = fn(*args)
        got_g = torch.autograd.grad(out, args, dy)
        assert _rel(out, ref) <= 1e-2
        for name, a, b in zip("x w b s".split(), got_g, ref_g):
            assert _rel(a, b) <= 1e-2, name


@pytest.mark.parametrize("M,K,N", [(700, 192, 520), (333, 136, 1000), (333, 136, 1001)])
def test_dense_backward_with_tensor_descriptors_matches_eager(M, K, N):
    """crossover 0: dx and dW run their dense loops, which on Hopper load G', W and x through
    device-side descriptors; with N = 1001 the rows of G' are not 16-byte aligned, and they take
    pointer loads (the forward still uses descriptors)."""
    from bcpt_compile.kernels import sbl_block_gemm as bg

    args = _inputs(torch.bfloat16, M=M, K=K, N=N)
    g = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")  # G', as the backward allocates it
    bcat = _no_perm_bcat(args[3])
    tma = torch.cuda.get_device_capability() >= (9, 0) and N % 8 == 0
    assert bg._dense_tma((g, args[1]), bcat) == tma and bg._dense_tma((g, args[0]), bcat) == tma
    ref = sbl(*args)
    dy = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, args, dy)
    torch._dynamo.reset()
    fn = torch.compile(sbl, backend="bcpt", options={"density_crossover": 0.0})
    out = fn(*args)
    got_g = torch.autograd.grad(out, args, dy)
    assert _rel(out, ref) <= 1e-2
    for name, a, b in zip("x w b s".split(), got_g, ref_g):
        assert _rel(a, b) <= 1e-2, name


def _no_perm_bcat(gate):
    from bcpt_compile.kernels.bcat_cluster import empty_bcat

    return empty_bcat(gate.detach(), 128)
