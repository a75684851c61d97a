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


def _poisoned_fwd(mode, q, k, v, idx, cnt, qb, bn, causal, window, scale, own=False):
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
    K._launch(True, mode, q, k, v, idx, cnt, qb, bn, causal, window, scale, {"o": o, "lse": lse, "own": own})
    return o, lse


def _poisoned_bwd(mode, do, q, k, v, o, lse, idx, cnt, qb, bn, causal, window, scale, atomic=False, own=False):
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
               "exact_delta": exact, "own": own})
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


@pytest.mark.parametrize(
    "H,Hkv,T,qb,causal,dtype",
    [
        (4, 2, 70, 1, False, torch.float32),   # NSA's fine branch: entries whole, own block causal
        (4, 2, 70, 1, True, torch.float32),    # entries causal too
        (2, 1, 45, 16, False, torch.float32),  # per query block
        (16, 1, 50, 1, False, torch.bfloat16),  # 16 heads of one token in a tile, as in NSA
    ],
)
def test_own_block_is_one_more_causal_step(H, Hkv, T, qb, causal, dtype):
    """``own_block``: after its table entries each query also sees its own key block, causally.
    Random tables list the own block too in some rows: it is then seen twice (whole, then
    causally), as NSA's gather spelling does; the reference counts multiplicity."""
    bs = 16
    q, k, v, do = _inputs(1, H, Hkv, T, 32, dtype, seed=H)
    idx, cnt = _table(1, Hkv, math.ceil(T / qb), math.ceil(T / bs), kmax=3, seed=H)
    vis = selected_visibility(idx, cnt, T, bs, qb, causal, own_block=True)
    assert (vis > 1).any(), "the test must include rows that list their own block"
    o, lse = _poisoned_fwd(K.MODE_SELECTED, q, k, v, idx, cnt, qb, bs, causal, 0, 0.2, own=True)
    dq, dk, dv = _poisoned_bwd(K.MODE_SELECTED, do, q, k, v, o, lse, idx, cnt, qb, bs, causal, 0, 0.2, own=True)
    _check_all((o, lse, dq, dk.to(dtype), dv.to(dtype)), _reference(q, k, v, do, vis, 0.2), dtype)


def test_duplicate_entries_are_attended_twice_by_kernels_and_reference():
    """A block listed twice counts twice (a gathered-KV spelling attends both copies)."""
    q, k, v, do = _inputs(1, 2, 1, 40, 16, torch.float32, seed=21)
    idx = torch.tensor([[0, 0, -1], [1, 0, 1], [2, 2, 2]], dtype=torch.int32).view(1, 1, 3, 3)
    cnt = torch.tensor([3, 3, 2], dtype=torch.int32).view(1, 1, 3)
    vis = selected_visibility(idx, cnt, 40, 16, 16, False)
    assert vis[0, 0, 0, 0] == 2 and vis[0, 0, 20, 16] == 2 and vis[0, 0, 20, 0] == 1 and vis[0, 0, 39, 32] == 2
    o, lse = _poisoned_fwd(K.MODE_SELECTED, q, k, v, idx, cnt, 16, 16, False, 0, 0.25)
    dq, dk, dv = _poisoned_bwd(K.MODE_SELECTED, do, q, k, v, o, lse, idx, cnt, 16, 16, False, 0, 0.25)
    _check_all((o, lse, dq, dk, dv), _reference(q, k, v, do, vis, 0.25), torch.float32)


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


@pytest.mark.parametrize("own", [False, True])
def test_dkv_work_split_covers_every_step_once(own):
    """Each key tile's steps (CSR entries, plus its own query tiles) are cut into chunks that the
    work items cover exactly once, in order; only split tiles get workspace slots, disjoint."""
    idx, cnt = _table(2, 3, 40, 5, kmax=3, seed=17)
    off, _ = K.inverse_table(idx, cnt, 5)
    nqt, bn, qb, chunk = 40, 16, 2, 3
    steps = idx.numel() + 6 * nqt * own
    item_seg, first, chunks, slot, n_items, n_slots = K.dkv_work_split(off, nqt, bn, qb, own, steps, chunk)
    assert item_seg.dtype == torch.int32 and item_seg.numel() == n_items
    seen = {}
    for item, seg in enumerate(item_seg.tolist()):
        if seg >= 30:
            continue
        seen.setdefault(seg, []).append(item - int(first[seg]))
    used = set()
    for seg in range(30):
        bh, kb = divmod(seg, 5)
        n = int(off[bh, kb + 1] - off[bh, kb]) + (min(bn // qb, nqt - kb * bn // qb) if own else 0)
        assert seen[seg] == list(range(max(1, math.ceil(n / chunk)))), (seg, n, seen[seg])
        assert int(chunks[seg]) == len(seen[seg])
        if chunks[seg] > 1:
            mine = set(range(int(slot[seg]), int(slot[seg]) + int(chunks[seg])))
            assert not mine & used and max(mine) < n_slots
            used |= mine


@pytest.mark.parametrize("own", [False, True])
def test_split_dkv_with_one_step_per_chunk_matches_float64(monkeypatch, own):
    """Every key tile's list cut into one-step chunks: all of dk, dv goes through the float32
    partials and the ordered reduction."""
    monkeypatch.setattr(K, "_dkv_chunk", lambda steps, device: 1)
    q, k, v, do = _inputs(1, 4, 2, 45, 16, torch.float32, seed=5)
    idx, cnt = _table(1, 2, 3, 3, kmax=3, seed=5)
    o, lse = _poisoned_fwd(K.MODE_SELECTED, q, k, v, idx, cnt, 16, 16, not own, 0, 0.25, own=own)
    dq, dk, dv = _poisoned_bwd(K.MODE_SELECTED, do, q, k, v, o, lse, idx, cnt, 16, 16, not own, 0, 0.25, own=own)
    vis = selected_visibility(idx, cnt, 45, 16, 16, not own, own_block=own)
    _check_all((o, lse, dq, dk, dv), _reference(q, k, v, do, vis, 0.25), torch.float32)


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
    tok_idx, tok_cnt = _table(1, 2, 37, 3, kmax=2, seed=10)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(A, "_use_kernels", lambda t, kernels=kernels: kernels)
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = torch.ops.bcpt.nsa_selected_attention(qq, kk, vv, idx, cnt, 16, 16, True, 0.25)[0]
        out2 = torch.ops.bcpt.sliding_window_attention(qq, kk, vv, 11, 0.25)[0]
        out3 = torch.ops.bcpt.nsa_selected_attention(qq, kk, vv, tok_idx, tok_cnt, 16, 1, False, 0.25, True)[0]
        (out * do).sum().add((out2 * do).sum()).add((out3 * do).sum()).backward()
        results.append((out.detach(), out2.detach(), out3.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*results):
        assert _rel(a, b.double()) <= 1e-5


def test_per_token_backward_self_check_refuses_a_wrong_dk(monkeypatch):
    """The per-token backward checks itself once per configuration before its first use on a
    GPU (its dk failed on the H100): a wrong dk raises instead of passing silently."""
    from bcpt_compile.lowering import attention as A

    q, k, _, _ = _inputs(1, 2, 1, 8, 16, torch.float32)
    monkeypatch.setattr(A, "_PER_TOKEN_CHECKED", {})
    A._check_per_token_backward(q, k, 16, False, True)  # the real kernels: passes
    assert max(A._PER_TOKEN_CHECKED.values()) <= 1e-5
    good = K.selected_attention_bwd

    def wrong_dk(*args, **kwargs):
        dq, dk, dv = good(*args, **kwargs)
        return dq, dk * 1.2, dv

    monkeypatch.setattr(K, "selected_attention_bwd", wrong_dk)
    monkeypatch.setattr(A, "_PER_TOKEN_CHECKED", {})
    with pytest.raises(NotImplementedError, match="self-check"):
        A._check_per_token_backward(q, k, 16, False, True)


@pytest.mark.skipif(not torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("own_block", [False, True])
def test_cuda_per_token_backward_at_the_failing_h100_size(own_block):
    """The H100 failure: per-token selection, bf16, T 8192, H 16, Hkv 1, D 128, 16 blocks of 64,
    dk relative error 2.2e-1 with the transposed-register wgmma dk (fixed in _bwd_dkv_kernel).
    Reference: float32 autograd, one head at a time."""
    T, H, D, bs, topk = 8192, 16, 128, 64, 16
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn((1, h, T, D), generator=g, device=dev, dtype=torch.bfloat16) for h in (H, 1, 1, H))
    qb = torch.arange(T, device=dev) // bs
    imp = torch.rand((1, 1, T, T // bs), generator=g, device=dev)
    imp = imp.masked_fill(torch.arange(T // bs, device=dev) > qb[:, None], float("-inf"))
    imp.scatter_(-1, qb.view(1, 1, T, 1), 2.0)
    top = imp.topk(topk, dim=-1)
    idx = torch.where(torch.isinf(top.values), -1, top.indices).int().contiguous()
    if own_block:
        idx = torch.where(idx == qb.view(1, 1, T, 1), -1, idx).contiguous()
    cnt = torch.full((1, 1, T), topk, dtype=torch.int32, device=dev)
    scale = D ** -0.5
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = torch.ops.bcpt.nsa_selected_attention(qq, kk, vv, idx, cnt, bs, 1, not own_block, scale, own_block)[0]
    out.backward(do)
    vis = selected_visibility(idx, cnt, T, bs, 1, not own_block, own_block)
    kf, vf = (t.float().requires_grad_(True) for t in (k, v))
    errs = {"out": 0.0, "dq": 0.0}
    for h in range(H):
        qh = q[:, h:h + 1].float().requires_grad_(True)
        ref = reference_attention(qh, kf, vf, vis, scale)[0]
        ref.backward(do[:, h:h + 1].float())
        for name, got, want in (("out", out[:, h:h + 1], ref), ("dq", qq.grad[:, h:h + 1], qh.grad)):
            errs[name] = max(errs[name], ((got.float() - want).abs().max() / want.abs().max()).item())
    for name, got, want in (("dk", kk.grad, kf.grad), ("dv", vv.grad, vf.grad)):
        errs[name] = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert all(e <= 1e-2 for e in errs.values()), errs


_HOPPER_CHILD = r'''
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bcpt_compile.kernels import nsa_attention as K

INT_PTRS = ("idx_ptr", "cnt_ptr", "off_ptr", "rows_ptr", "item_seg_ptr", "seg_first_ptr", "seg_chunks_ptr",
            "seg_slot_ptr")

def compile_(kernel, constexprs, warps, fp):
    params = inspect.signature(kernel.fn).parameters
    constexprs = {k: v for k, v in constexprs.items() if k in params}
    sig = {n: "constexpr" if n in constexprs else
           ("*fp32" if n in ("lse_ptr", "delta_ptr", "ws_ptr") else "*i32" if n in INT_PTRS
            else fp) if n.endswith("_ptr") else "fp32" if n in ("qk_scale", "sm_scale") else "i32" for n in params}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})

token = dict(MODE=0, CAUSAL=True, QB=1, GH=16, BLOCK_N=64, D=128, BLOCK_D=128, PRECISION="tf32", OWN=0,
             ATOMIC_DKV=False, EXACT_DELTA=True, SPLIT=True)
cases = {"fwd": (K._fwd_kernel, dict(token, CAUSAL=False, OWN=1), 4),
         "dq": (K._bwd_kernel, dict(token, CAUSAL=False, OWN=1), 4),
         "dkv_token": (K._bwd_dkv_kernel, token, 8),
         "dkv_token_own": (K._bwd_dkv_kernel, dict(token, CAUSAL=False, OWN=1), 8),
         "dkv_block": (K._bwd_dkv_kernel, dict(token, QB=64, GH=1), 8),
         "dkv_window": (K._bwd_dkv_kernel, dict(token, MODE=1, QB=64, GH=1, SPLIT=False), 8),
         "dkv_reduce": (K._dkv_reduce_kernel, token, 4)}
out = {name: [l for l in compile_(k, c, w, "*bf16").asm["ttgir"].splitlines() if "warp_group_dot " in l or "tt.trans" in l]
       for name, (k, c, w) in cases.items()}
print(json.dumps(out))
'''


def test_kernels_compile_for_hopper_and_dkv_transposes_no_register_tensor():
    """Compile for sm_90 with Triton's bundled ptxas (no GPU needed). The per-token dk that
    failed on the H100 was ``tl.dot(tl.trans(dS), q)``: a register tensor transposed from the
    MMA layout into ``#linear`` and fed to a register-operand wgmma (the pattern Triton 3.4 to
    3.7.0 miscompile on Hopper). The key-major dk/dv loop must run all four products (S^T,
    dP^T, dV, dK) as wgmma, with no ``tt.trans`` of a register tensor; its register operands
    (P^T, dS^T) come straight from an accumulator, as in FlashAttention."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _HOPPER_CHILD], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ir = json.loads(out.stdout.strip().splitlines()[-1])
    for name, lines in ir.items():
        if not name.startswith("dkv") or name == "dkv_reduce":
            continue
        dots = [line for line in lines if "warp_group_dot " in line]
        assert len(dots) == 4, (name, lines)
        assert not any("tt.trans" in line for line in lines), (name, "register transpose", lines)
        for line in dots:  # the key tile is the M side: 64 rows
            assert "-> tensor<64x" in line, (name, line)
