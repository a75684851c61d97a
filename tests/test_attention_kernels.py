"""NSA selected-block and sliding-window kernels against float64 dense references (interpreter).

Outputs are poisoned with NaN before the kernels write them, so a tile the kernel forgets
shows up; inputs are random; sizes are chosen so T is not a multiple of the block.
"""

import math

import pytest
import torch

pytestmark = __import__("pytest").mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")  # triton 3.6 interpreter

from bcpt_compile.kernels import nsa_attention as K
from bcpt_compile.lowering.attention import (
    block_mask_to_indices,
    reference_attention,
    selected_visibility,
    window_visibility,
)

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the reference's largest entry (floored: a window of 1 has dq = 0 exactly)."""
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()


def _inputs(B, H, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, h, T, D, generator=g).to(dtype) for h in (H, Hkv, Hkv, H))
    return q, k, v, do


def _table(B, Hkv, nq, nkb, kmax, seed=0, empty_rows=()):
    """Distinct random blocks per row (as top-k gives), random valid counts, -1 padding in the tail."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.stack([torch.randperm(nkb, generator=g)[:kmax] for _ in range(B * Hkv * nq)]).view(B, Hkv, nq, kmax)
    cnt = torch.randint(1, kmax + 1, (B, Hkv, nq), generator=g)
    for r in empty_rows:
        cnt[..., r] = 0
    pad = torch.arange(kmax) >= cnt[..., None]
    idx = torch.where(pad & (torch.rand(idx.shape, generator=g) < 0.5), -1, idx)
    return idx.int().contiguous(), cnt.int().contiguous()


def _poisoned_fwd(mode, q, k, v, idx, cnt, qb, bn, causal, window, scale):
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
    K._launch(True, mode, q, k, v, idx, cnt, qb, bn, causal, window, scale, {"o": o, "lse": lse})
    return o, lse


def _poisoned_bwd(mode, do, q, k, v, o, lse, idx, cnt, qb, bn, causal, window, scale, atomic=False):
    """Key-centric dk/dv (default) write every element: poisoned; the atomic fallback accumulates into zeros."""
    dq = torch.full_like(q, float("nan"))
    if atomic:
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (k, v))
    else:
        dk, dv = (torch.full_like(t, float("nan")) for t in (k, v))
    exact = q.dtype != torch.float32  # 16-bit: the dq kernel recomputes delta (poisoned here)
    delta = torch.full(lse.shape, float("nan")) if exact else (do.double() * o.double()).sum(-1).float().contiguous()
    K._launch(False, mode, q, k, v, idx, cnt, qb, bn, causal, window, scale,
              {"do": do, "lse": lse.contiguous(), "delta": delta, "dq": dq, "dk": dk, "dv": dv, "atomic": atomic,
               "exact_delta": exact})
    return dq, dk, dv


def _reference(q, k, v, do, vis, scale):
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    out, lse = reference_attention(qq, kk, vv, vis, scale)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do.double())
    return out.detach(), lse.double(), dq, dk, dv


def _check_all(got, ref, dtype):
    o, lse, dq, dk, dv = got
    ro, rlse, rdq, rdk, rdv = ref
    tol = TOL[dtype]
    for name, t in (("out", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN-poisoned) entries"
    assert _rel(o, ro) <= tol, ("out", _rel(o, ro))
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isinf(lse), ~fin), "lse must be +inf exactly on rows that see nothing"
    assert (lse.double()[fin] - rlse[fin]).abs().max() <= 10 * tol
    for name, a, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert _rel(a, r) <= tol, (name, _rel(a, r))


@pytest.mark.parametrize(
    "B,H,Hkv,T,D,qb,causal,dtype",
    [
        (1, 2, 2, 50, 32, 16, True, torch.float32),    # MHA, per-query-block table
        (2, 4, 1, 41, 16, 16, True, torch.float32),    # GQA 4:1, one program per group
        (1, 4, 2, 70, 32, 1, True, torch.float32),     # per-token table (native-sparse-attention)
        (1, 2, 1, 45, 16, 16, False, torch.float32),   # non-causal selection
        (1, 4, 2, 50, 32, 16, True, torch.bfloat16),
        (1, 4, 4, 40, 16, 1, True, torch.float16),
    ],
)
def test_selected_attention_matches_float64(B, H, Hkv, T, D, qb, causal, dtype):
    bs = 16
    nkb = math.ceil(T / bs)
    nq = math.ceil(T / qb)
    q, k, v, do = _inputs(B, H, Hkv, T, D, dtype)
    idx, cnt = _table(B, Hkv, nq, nkb, kmax=min(3, nkb))
    scale = D ** -0.5
    o, lse = _poisoned_fwd(K.MODE_SELECTED, q, k, v, idx, cnt, qb, bs, causal, 0, scale)
    dq, dk, dv = _poisoned_bwd(K.MODE_SELECTED, do, q, k, v, o, lse, idx, cnt, qb, bs, causal, 0, scale)
    vis = selected_visibility(idx, cnt, T, bs, qb, causal)
    _check_all((o, lse, dq, dk.to(dtype), dv.to(dtype)), _reference(q, k, v, do, vis, scale), dtype)


def test_atomic_dkv_fallback_matches_float64():
    q, k, v, do = _inputs(1, 4, 2, 50, 16, torch.float32, seed=11)
    idx, cnt = _table(1, 2, 4, 4, kmax=3, seed=11)
    o, lse = _poisoned_fwd(K.MODE_SELECTED, q, k, v, idx, cnt, 16, 16, True, 0, 0.25)
    dq, dk, dv = _poisoned_bwd(K.MODE_SELECTED, do, q, k, v, o, lse, idx, cnt, 16, 16, True, 0, 0.25, atomic=True)
    ref = _reference(q, k, v, do, selected_visibility(idx, cnt, 50, 16, 16, True), 0.25)
    _check_all((o, lse, dq, dk, dv), ref, torch.float32)


def test_inverse_table_lists_each_selection_once_in_query_order():
    idx, cnt = _table(2, 3, 5, 6, kmax=4, seed=13)
    off, rows = K.inverse_table(idx, cnt, 6)
    for bh in range(6):
        b, h = divmod(bh, 3)
        for kb in range(6):
            got = rows[bh, off[bh, kb]: off[bh, kb + 1]].tolist()
            want = [r for r in range(5) if kb in idx[b, h, r, : cnt[b, h, r]].tolist()]
            assert got == want, (bh, kb, got, want)


def test_selected_attention_head_dim_64_and_128():
    for D in (64, 128):
        q, k, v, do = _inputs(1, 2, 1, 33, D, torch.float32, seed=D)
        idx, cnt = _table(1, 1, 3, 3, kmax=2, seed=D)
        o, lse = K.selected_attention_fwd(q, k, v, idx, cnt, 16, 16, True, 0.1)
        dq, dk, dv = K.selected_attention_bwd(do, q, k, v, o, lse, idx, cnt, 16, 16, True, 0.1)
        ref = _reference(q, k, v, do, selected_visibility(idx, cnt, 33, 16, 16, True), 0.1)
        _check_all((o, lse, dq, dk, dv), ref, torch.float32)


def test_rows_that_see_nothing_give_zero_output_and_zero_gradients():
    T, bs = 40, 16
    q, k, v, do = _inputs(1, 2, 1, T, 16, torch.float32, seed=3)
    idx, cnt = _table(1, 1, 3, 3, kmax=3, seed=3, empty_rows=(1,))
    # query block 0 selecting only a future block: empty under causality too
    idx[0, 0, 0] = torch.tensor([2, -1, -1], dtype=torch.int32)
    cnt[0, 0, 0] = 1
    o, lse = _poisoned_fwd(K.MODE_SELECTED, q, k, v, idx, cnt, 16, bs, True, 0, 0.25)
    dq, dk, dv = _poisoned_bwd(K.MODE_SELECTED, do, q, k, v, o, lse, idx, cnt, 16, bs, True, 0, 0.25)
    empty = torch.zeros(T, dtype=torch.bool)
    empty[:32] = True  # query blocks 0 and 1
    assert torch.equal(o[:, :, empty], torch.zeros_like(o[:, :, empty]))
    assert torch.isinf(lse[:, :, empty]).all() and (lse[:, :, empty] > 0).all()
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    _check_all((o, lse, dq, dk, dv), _reference(q, k, v, do, selected_visibility(idx, cnt, T, bs, 16, True), 0.25),
               torch.float32)


@pytest.mark.parametrize(
    "H,Hkv,T,D,window,dtype",
    [
        (2, 2, 50, 32, 7, torch.float32),
        (4, 1, 67, 16, 20, torch.float32),   # GQA, window spans two key tiles
        (2, 1, 40, 16, 1, torch.float32),    # diagonal only
        (2, 2, 45, 16, 100, torch.float32),  # window wider than T: plain causal
        (4, 2, 50, 32, 16, torch.bfloat16),
        (2, 1, 50, 16, 9, torch.float16),
    ],
)
def test_sliding_window_matches_float64(H, Hkv, T, D, window, dtype):
    q, k, v, do = _inputs(1, H, Hkv, T, D, dtype, seed=window)
    scale = D ** -0.5
    o, lse = _poisoned_fwd(K.MODE_WINDOW, q, k, v, None, None, 16, 16, True, window, scale)
    dq, dk, dv = _poisoned_bwd(K.MODE_WINDOW, do, q, k, v, o, lse, None, None, 16, 16, True, window, scale)
    ref = _reference(q, k, v, do, window_visibility(T, window, "cpu"), scale)
    _check_all((o, lse, dq, dk.to(dtype), dv.to(dtype)), ref, dtype)


def test_block_mask_to_indices_is_the_same_selection():
    g = torch.Generator().manual_seed(5)
    bm = torch.rand(2, 3, 4, 5, generator=g) < 0.4
    idx, cnt = block_mask_to_indices(bm, 2, 3)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert torch.equal(cnt, bm.sum(-1).int())
    back = torch.zeros_like(bm)
    for b, h, r in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        back[b, h, r, idx[b, h, r, : cnt[b, h, r]].long()] = True
    assert torch.equal(back, bm)


def test_custom_ops_pass_opcheck():
    from bcpt_compile.lowering import attention  # noqa: F401

    q, k, v, _ = _inputs(1, 2, 1, 33, 16, torch.float32, seed=7)
    for t in (q, k, v):
        t.requires_grad_(True)
    idx, cnt = _table(1, 1, 3, 3, kmax=2, seed=7)
    torch.library.opcheck(torch.ops.bcpt.nsa_selected_attention.default, (q, k, v, idx, cnt, 16, 16, True, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.bcpt.sliding_window_attention.default, (q, k, v, 9, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_custom_op_autograd_matches_reference_on_plain_cpu(monkeypatch):
    """The plain-CPU reference path (no interpreter) gives the same gradients as the kernels."""
    from bcpt_compile.lowering import attention as A

    q, k, v, do = _inputs(1, 4, 2, 37, 16, torch.float32, seed=9)
    idx, cnt = _table(1, 2, 3, 3, kmax=2, seed=9)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(A, "_use_kernels", lambda t, kernels=kernels: kernels)
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = torch.ops.bcpt.nsa_selected_attention(qq, kk, vv, idx, cnt, 16, 16, True, 0.25)[0]
        out2 = torch.ops.bcpt.sliding_window_attention(qq, kk, vv, 11, 0.25)[0]
        (out * do).sum().add((out2 * do).sum()).backward()
        results.append((out.detach(), out2.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*results):
        assert _rel(a, b.double()) <= 1e-5
