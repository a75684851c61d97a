"""DeepEmbed Triton kernels under the interpreter, against float64 references."""

import pytest
import torch

from bcpt_compile.kernels.deepembed import (
    out_scale_backward,
    out_scale_forward,
    rowmix_backward,
    rowmix_forward,
    segment_sum_rows,
)


def _out_ref(h, w, b, table, idx):
    z = h.double() @ w.double().t() + (b.double() if b is not None else 0)
    return z * table.double()[idx.long()], z


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_out_forward_matches_float64(dtype, bias):
    g = torch.Generator().manual_seed(1)
    M, K, N, V = 37, 24, 40, 11  # nothing a multiple of the 16-wide interpreter tiles
    h = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    table = torch.randn(V, N, generator=g).to(dtype)
    idx = torch.randint(0, V, (M,), generator=g)
    y, z = out_scale_forward(h, w, b, table, idx, dtype)
    y64, z64 = _out_ref(h, w, b, table, idx)
    if dtype == torch.float32:
        assert _err(y, y64) < 1e-4 * y64.abs().max().item()
        assert _err(z, z64) < 1e-4 * z64.abs().max().item()
    else:
        # one bf16 rounding of an fp32-accumulated result: within one ulp (2^-7 relative; the
        # interpreter's fp32 -> bf16 cast truncates, the GPU's rounds to nearest)
        assert ((y.double() - y64).abs() <= 2 ** -7 * y64.abs() + 1e-4).all()


def test_out_forward_reads_only_indexed_rows_and_strided_inputs():
    g = torch.Generator().manual_seed(2)
    M, K, N, V = 20, 18, 24, 9
    h = torch.randn(K, M, generator=g).t()  # non-contiguous
    w = torch.randn(N, K, generator=g)
    table = torch.randn(V, N, generator=g)
    idx = torch.tensor([0, 2, 4, 6] * 5, dtype=torch.int32)
    table[1::2] = float("nan")  # rows never indexed: must not reach the output
    y, z = out_scale_forward(h, w, None, table, idx, torch.float32)
    assert torch.isfinite(y).all() and torch.isfinite(z).all()
    y64, _ = _out_ref(h, w, None, table, idx)
    assert _err(y, y64) < 1e-4 * y64.abs().max().item()


def test_out_backward_matches_float64_and_is_row_sparse():
    g = torch.Generator().manual_seed(3)
    M, N, V = 45, 40, 13
    z = torch.randn(M, N, generator=g)
    table = torch.randn(V, N, generator=g)
    idx = torch.randint(0, 6, (M,), generator=g)  # rows 6.. never used, heavy repeats
    dy = torch.randn(M, N, generator=g)
    gh, dt = out_scale_backward(dy, z, table, idx, True, True)
    gh64 = dy.double() * table.double()[idx]
    dt64 = torch.zeros(V, N, dtype=torch.float64).index_add_(0, idx, dy.double() * z.double())
    assert _err(gh, gh64) < 1e-6 * gh64.abs().max().item()
    assert _err(dt, dt64) < 1e-5 * dt64.abs().max().item()
    assert (dt[6:] == 0).all() and (dt[:6].abs().sum(1) > 0).all()
    gh2, dt2 = out_scale_backward(dy, z, table, idx, True, True)
    assert torch.equal(dt, dt2) and torch.equal(gh, gh2)  # deterministic, bit for bit


def test_segment_sum_writes_exactly_the_indexed_rows():
    g = torch.Generator().manual_seed(4)
    M, W, V = 33, 20, 12
    vals = torch.randn(M, W, generator=g)
    idx = torch.randint(0, V, (M,), generator=g)
    idx[idx == 5] = 4  # make sure some row is absent
    out = torch.full((V, W), float("nan"))
    segment_sum_rows(vals, idx, out)
    used = torch.zeros(V, dtype=torch.bool)
    used[idx] = True
    ref = torch.zeros(V, W, dtype=torch.float64).index_add_(0, idx, vals.double())
    assert torch.isnan(out[~used]).all()
    assert _err(out[used], ref[used]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowmix_forward_backward_match_float64(dtype):
    g = torch.Generator().manual_seed(5)
    M, r, V = 29, 5, 9
    a = torch.randn(M, r, generator=g).to(dtype)
    table = torch.randn(V, r * r, generator=g).to(dtype)
    idx = torch.randint(0, V, (M,), generator=g)
    a64 = a.double().requires_grad_()
    rows = table.double()[idx].view(M, r, r).requires_grad_()
    b64 = (a64.unsqueeze(1) @ rows).squeeze(1)
    db = torch.randn(M, r, generator=g).to(dtype)
    b64.backward(db.double())
    dt64 = torch.zeros(V, r * r, dtype=torch.float64).index_add_(0, idx, rows.grad.reshape(M, -1))
    b = rowmix_forward(a, table, idx, r, dtype)
    da, dt = rowmix_backward(db, a, table, idx, r, True, True)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert _err(b, b64.detach()) < tol * b64.abs().max().item()
    assert _err(da, a64.grad) < tol * a64.grad.abs().max().item()
    assert _err(dt, dt64) < tol * dt64.abs().max().item()
    unused = torch.ones(V, dtype=torch.bool)
    unused[idx] = False
    assert (dt[unused] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_s0", [True, False])
def test_hidden_producer_matches_float64(dtype, with_s0):
    from bcpt_compile.kernels.deepembed import hidden_backward, hidden_forward

    g = torch.Generator().manual_seed(6)
    M, K, N, R = 37, 24, 40, 5  # R < 16: the scale's dot pads r
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(M, R, generator=g).to(dtype)
    s2 = torch.randn(R, N, generator=g).to(dtype)
    s0 = torch.randn(N, generator=g).to(dtype) if with_s0 else None
    k, u = hidden_forward(x, w, b, s2, s0)
    u64 = x.double() @ w.double().t()
    c64 = b.double() @ s2.double() + (s0.double() if with_s0 else 0)
    k64 = torch.relu(u64) ** 2 * c64
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert ((k.double() - k64).abs() <= tol * k64.abs() + tol * 1e-2 * k64.abs().max()).all()
    assert _err(u, u64) < tol * u64.abs().max().item()
    dk = torch.randn(M, N, generator=g).to(dtype)
    du, dc = hidden_backward(dk, u, b, s2, s0)
    relu = torch.relu(u.double())  # from the saved (rounded) u, as the op's backward sees it
    du64, dc64 = dk.double() * c64 * 2 * relu, dk.double() * relu * relu
    assert _err(du, du64) < tol * du64.abs().max().item()
    assert _err(dc, dc64) < tol * dc64.abs().max().item()
    assert (du[u <= 0] == 0).all()  # relu's gradient is exactly zero off its support


@pytest.mark.parametrize("counts", [[17, 1, 4], [4, 8], [1], [3, 3, 3, 33]])
def test_segment_sum_long_runs_and_block_edges(counts):
    # runs longer than, equal to and ending on the kernel's token block (4 under the interpreter)
    g = torch.Generator().manual_seed(sum(counts))
    ids = torch.cat([torch.full((c,), 2 * i + 1) for i, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    vals = torch.randn(ids.numel(), 20, generator=g)
    out = torch.zeros(2 * len(counts) + 1, 20)
    segment_sum_rows(vals, ids, out)
    ref = torch.zeros(out.shape, dtype=torch.float64).index_add_(0, ids, vals.double())
    assert _err(out, ref) < 1e-5
    assert (out[0::2] == 0).all()


def test_every_output_element_is_written(monkeypatch):
    """Outputs come from torch.empty; poisoned with NaN, any element a kernel skips shows up."""
    from bcpt_compile.kernels.deepembed import hidden_backward, hidden_forward

    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2 ** 30))

    g = torch.Generator().manual_seed(8)
    M, K, N, V, r = 19, 18, 21, 7, 3
    h, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    table, idx = torch.randn(V, N, generator=g), torch.randint(0, V, (M,), generator=g)
    t2, a = torch.randn(V, r * r, generator=g), torch.randn(M, r, generator=g)
    s2, b = torch.randn(r, N, generator=g), torch.randn(M, r, generator=g)
    dy = torch.randn(M, N, generator=g)
    monkeypatch.setattr(torch, "empty", poisoned)
    y, z = out_scale_forward(h, w, None, table, idx, torch.float32)
    gh, dt = out_scale_backward(dy, z, table, idx, True, True)
    bm = rowmix_forward(a, t2, idx, r, torch.float32)
    da, dt2 = rowmix_backward(dy[:, :r].contiguous(), a, t2, idx, r, True, True)
    k, u = hidden_forward(h, w, b, s2, None)
    du, dc = hidden_backward(dy, u, b, s2, None)
    monkeypatch.setattr(torch, "empty", real_empty)
    for name, t in dict(y=y, z=z, gh=gh, dt=dt, bm=bm, da=da, dt2=dt2, k=k, u=u, du=du, dc=dc).items():
        assert torch.isfinite(t).all(), name
    torch.testing.assert_close(y, (h @ w.t()) * table[idx], rtol=1e-4, atol=1e-4)


_HOPPER_CHILD = r'''
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bcpt_compile.kernels import deepembed as de

INT_PTRS = {"idx_ptr": "*i64", "sorted_ptr": "*i64", "order_ptr": "*i64"}
FP32_PTRS = {"ge_ptr", "vals_ptr"}

def sig(kernel, constexprs, fp):
    out = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            out[name] = "constexpr"
        elif name.endswith("_ptr"):
            out[name] = INT_PTRS.get(name) or ("*fp32" if name in FP32_PTRS else fp)
        else:
            out[name] = "i32"
    return out

GEMM = dict(BM=128, BN=128, BK=64, GROUP_M=8)
CASES = [
    (de._out_forward_kernel, dict(GEMM, HAS_BIAS=True, STORE_Z=True)),
    (de._out_backward_kernel, dict(NEED_GH=True, NEED_GE=True, BM=64, BN=128)),
    (de._segment_sum_kernel, dict(BT=32, BW=128)),
    (de._rowmix_forward_kernel, dict(BM=64, BR=32)),
    (de._rowmix_dx_kernel, dict(BM=64, BR=32)),
    (de._hidden_forward_kernel, dict(GEMM, HAS_S0=True, BR=32)),
    (de._hidden_backward_kernel, dict(HAS_S0=False, BM=64, BN=128, BR=16)),
]
failures = []
for kernel, cx in CASES:
    for fp in ("*bf16", "*fp32"):
        c = dict(cx)
        if "PRECISION" in inspect.signature(kernel.fn).parameters:
            c["PRECISION"] = "ieee" if fp == "*fp32" else "tf32"
        try:
            src = ASTSource(fn=kernel, signature=sig(kernel, c, fp), constexprs=c)
            done = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
            assert done.asm["cubin"]
        except Exception as exc:
            failures.append(f"{kernel.fn.__name__} {fp}: {type(exc).__name__}: {exc}")
print("\n".join(failures) or f"compiled {2 * len(CASES)} kernels")
sys.exit(1 if failures else 0)
'''


def test_kernels_compile_for_hopper():
    """The interpreter accepts code ptxas rejects; compile every kernel to an sm_90 cubin."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _HOPPER_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "compiled 14 kernels" in out.stdout
