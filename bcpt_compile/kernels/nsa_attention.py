"""Triton kernels for sparse causal attention that read only the keys a query may see.

Two masks, one kernel body:

* **selected blocks** (NSA / DynNSA): key block ``kb`` (keys ``kb*BS .. kb*BS+BS-1``) is
  visible to a query when ``kb`` is among the first ``count`` entries of the query's row
  of ``block_idx`` (int32, ``(B, H_kv, NQ, K_max)``, straight from a top-k), optionally
  intersected with causality (``j <= i``). ``NQ`` rows are per query block of
  ``query_block`` tokens (``query_block = 1``: per token, as native-sparse-attention does).
  Negative indices are padding and ignored; valid entries should be distinct (top-k's are): a
  duplicate is attended twice, as a gathered-KV spelling would. With ``OWN`` each query tile
  also sees its own key block causally, as one more step after its entries (NSA's fine branch:
  selected blocks whole, the own block up to the query).
* **sliding window**: key ``j`` is visible to query ``i`` when ``0 <= i - j < window``.
  The key tiles are an arithmetic range, so no index table exists.

Layout: q ``(B, H, T, D)``, k and v ``(B, H_kv, T, D)``, ``H = G * H_kv`` (GQA). A program
owns a tile of ``QB`` query tokens times ``GH`` query heads of one KV group, flattened
head-major into ``QB * GH`` rows, so every K/V tile it loads serves all of those heads;
when ``QB * G`` rows fit one tile (per-token selection, ``QB = 1``) one program serves the
whole group. Online softmax in float32 with exp2; the forward saves the natural-log
log-sum-exp per row.

Rows that see no key at all (empty selection, or a count of 0) produce output **0**
and ``lse = +inf`` (so the backward's ``exp(s - lse)`` is 0 there and their gradients are
0). Eager softmax over all ``-inf`` is NaN, and over a finite ``-big`` fill is a uniform
average of all values; both are artefacts of the dense spelling, not attention.

Backward, two kernels, both deterministic (no atomics):

* ``_bwd_kernel`` (query-centric, same loop as the forward) recomputes P from the saved
  lse and writes dq. For 16-bit inputs it first recomputes ``delta = rowsum(P * dP)``
  over the same keys, because ``rowsum(dO * O)`` with a bf16-rounded O costs about 2x
  in dq accuracy (``EXACT_DELTA_16BIT``).
* ``_bwd_dkv_kernel`` (key-centric) owns one key tile of one KV head and walks the query
  tiles that see it, summing over all heads of the group: an arithmetic range for the
  window, and for selected blocks the key block's slice of the inverse (CSR) selection
  table that ``inverse_table`` builds on the device (stable sort, no sync), then (``OWN``)
  the query tiles inside the block. It runs key-major (``S^T = K Q^T``), as FlashAttention's
  dk/dv loop does: the key tile fills the MMA's M side and no register tensor is
  transposed into a dot (a Hopper miscompile, see the kernel).

An atomic-add dk/dv variant of ``_bwd_kernel`` is kept for debugging (``extra["atomic"]``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tile_gemm import dot_precision as _dot_precision
from .tile_gemm import mma

MODE_SELECTED = 0
MODE_WINDOW = 1
DKV_WARPS = 4  # the key-centric backward's warps on a GPU (4 measured 1.4x faster than 8 on an H200)
_LOG2E = 1.4426950408889634


@triton.jit
def _key_block(it, n_tab, m0, idx_row_ptr, sik, T, NKB, window,
               MODE: tl.constexpr, BLOCK_N: tl.constexpr, OWN: tl.constexpr):
    """Key-tile number of loop step ``it``, whether it is a real tile, and whether it is the
    query tile's own block (OWN: the step after the ``n_tab`` table entries, seen causally)."""
    if MODE == 0:
        if OWN:
            own = it >= n_tab
            kb = tl.load(idx_row_ptr + it * sik, mask=it < n_tab, other=0)
            ok = own | ((kb >= 0) & (kb < NKB))
            kb = tl.where(own, m0 // BLOCK_N, tl.where(ok, kb, 0))
        else:
            own = False
            kb = tl.load(idx_row_ptr + it * sik)
            ok = (kb >= 0) & (kb < NKB)
            kb = tl.where(ok, kb, 0)
    else:
        own = False
        kb = tl.maximum(m0 - window + 1, 0) // BLOCK_N + it
        ok = kb >= 0
    return kb, ok, own


@triton.jit
def _num_steps(m0, cnt_ptr, KMAX, T, window, MODE: tl.constexpr, QB: tl.constexpr, BLOCK_N: tl.constexpr):
    if MODE == 0:
        n = tl.minimum(tl.load(cnt_ptr), KMAX)
        n = tl.maximum(n, 0)
    else:
        first = tl.maximum(m0 - window + 1, 0) // BLOCK_N
        last = (tl.minimum(m0 + QB, T) + BLOCK_N - 1) // BLOCK_N
        n = last - first
    return n


@triton.jit
def _visible(ti, kj, row_ok, ok, own, T, window, MODE: tl.constexpr, CAUSAL: tl.constexpr, OWN: tl.constexpr):
    """Which (query ``ti``, key ``kj``) pairs are visible. ``ti``/``row_ok`` and ``kj`` come
    pre-broadcast (``t[:, None], offs_n[None, :]`` or the transpose), so the query-major and the
    key-major loops share one rule."""
    vis = row_ok & (kj < T) & ok
    if CAUSAL:
        vis = vis & (kj <= ti)
    elif OWN:
        vis = vis & ((kj <= ti) | ~own)
    if MODE == 1:
        vis = vis & (ti - kj < window)
    return vis


@triton.jit
def _probs(q, k, v, do, lse2, qk_scale, t, row_ok, offs_n, ok, own, T, window, MODE: tl.constexpr,
           CAUSAL: tl.constexpr, OWN: tl.constexpr, PRECISION: tl.constexpr):
    """(P, dP = dO V^T), rows x keys, P recomputed from the saved lse (``lse2``, exp2 domain):
    one spelling for the dq kernel's delta and dq loops, so both use the same P."""
    s = mma(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), tl.float32), PRECISION) * qk_scale
    vis = _visible(t[:, None], offs_n[None, :], row_ok[:, None], ok, own, T, window, MODE, CAUSAL, OWN)
    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = mma(do, tl.trans(v), tl.zeros((q.shape[0], k.shape[0]), tl.float32), PRECISION)
    return p, dp


@triton.jit
def _probs_t(q, k, v, do, lse2, qk_scale, t, row_ok, offs_n, own, T, window, MODE: tl.constexpr,
             CAUSAL: tl.constexpr, OWN: tl.constexpr, PRECISION: tl.constexpr):
    """(P^T, dP^T), keys x rows, for the key-centric dk/dv loop: the key tile is the MMA's M
    side (64 rows, a full Hopper wgmma, where a per-token tile of 16 query rows is not), and
    P^T, dS^T come out of the accumulator already as the left operand of dV += P^T dO,
    dK += dS^T Q: no register tensor is transposed (see ``_bwd_dkv_kernel``)."""
    sT = mma(k, tl.trans(q), tl.zeros((k.shape[0], q.shape[0]), tl.float32), PRECISION) * qk_scale
    vis = _visible(t[None, :], offs_n[:, None], row_ok[None, :], True, own, T, window, MODE, CAUSAL, OWN)
    pT = tl.where(vis, tl.exp2(sT - lse2[None, :]), 0.0)
    dpT = mma(v, tl.trans(do), tl.zeros((k.shape[0], q.shape[0]), tl.float32), PRECISION)
    return pT, dpT


@triton.jit
def _rows(pid_q, pid_h, hkv, T, G, QB: tl.constexpr, GH: tl.constexpr):
    r = tl.arange(0, QB * GH)
    t = pid_q * QB + r % QB
    g = pid_h * GH + r // QB
    row_ok = (t < T) & (g < G)
    h = hkv * G + tl.where(g < G, g, 0)
    return t, h, row_ok


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, cnt_ptr,
    T, G, HKV, KMAX, NKB, window, qk_scale,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    sob, soh, sot, sod, slb, slh, slt,
    sib, sih, siq, sik, scb, sch, scq,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, QB: tl.constexpr, GH: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    OWN: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_h = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // HKV).to(tl.int64)
    hkv = bh % HKV
    t, h, row_ok = _rows(pid_q, pid_h, hkv, T, G, QB, GH)
    t64 = t.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h64[:, None] * sqh + t64[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m0 = pid_q * QB
    idx_row = idx_ptr + b * sib + hkv.to(tl.int64) * sih + pid_q.to(tl.int64) * siq
    cnt = cnt_ptr + b * scb + hkv.to(tl.int64) * sch + pid_q.to(tl.int64) * scq
    n_tab = _num_steps(m0, cnt, KMAX, T, window, MODE, QB, BLOCK_N)
    n_steps = n_tab + OWN
    k_base = k_ptr + b * skb + hkv.to(tl.int64) * skh
    v_base = v_ptr + b * svb + hkv.to(tl.int64) * svh

    m_i = tl.full((QB * GH,), float("-inf"), tl.float32)
    l_i = tl.zeros((QB * GH,), tl.float32)
    acc = tl.zeros((QB * GH, BLOCK_D), tl.float32)
    for it in range(0, n_steps):
        kb, ok, own = _key_block(it, n_tab, m0, idx_row, sik, T, NKB, window, MODE, BLOCK_N, OWN)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)
        kv_mask = (offs_n[:, None] < T) & d_ok[None, :]
        k = tl.load(k_base + n64[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n64[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), tl.zeros((QB * GH, BLOCK_N), tl.float32), PRECISION) * qk_scale
        vis = _visible(t[:, None], offs_n[None, :], row_ok[:, None], ok, own, T, window, MODE, CAUSAL, OWN)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PRECISION == "upcast":
            acc = mma(p, v, acc, PRECISION)
        else:
            acc = mma(p.to(v.dtype), v, acc, PRECISION)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    out = tl.where(has[:, None], out, 0.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("inf"))
    tl.store(o_ptr + b * sob + h64[:, None] * soh + t64[:, None] * sot + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b * slb + h64 * slh + t64 * slt, lse, mask=row_ok)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, idx_ptr, cnt_ptr,
    T, G, HKV, KMAX, NKB, window, qk_scale, sm_scale,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    sdob, sdoh, sdot, sdod, slb, slh, slt,
    sdqb, sdqh, sdqt, sdqd, sdkb, sdkh, sdkt, sdkd,
    sib, sih, siq, sik, scb, sch, scq,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, QB: tl.constexpr, GH: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_DKV: tl.constexpr, EXACT_DELTA: tl.constexpr, OWN: tl.constexpr,
):
    """dq, stored per program; with ATOMIC_DKV also dk, dv (float32) by atomic adds (debug/fallback)."""
    pid_q = tl.program_id(0)
    pid_h = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // HKV).to(tl.int64)
    hkv = bh % HKV
    t, h, row_ok = _rows(pid_q, pid_h, hkv, T, G, QB, GH)
    t64 = t.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rmask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h64[:, None] * sqh + t64[:, None] * sqt + offs_d[None, :] * sqd,
                mask=rmask, other=0.0)
    do = tl.load(do_ptr + b * sdob + h64[:, None] * sdoh + t64[:, None] * sdot + offs_d[None, :] * sdod,
                 mask=rmask, other=0.0)
    # lse is natural-log; exp2 domain here. Rows outside the tile read +inf: P = 0.
    lse2 = tl.load(lse_ptr + b * slb + h64 * slh + t64 * slt, mask=row_ok, other=float("inf")) * 1.4426950408889634
    m0 = pid_q * QB
    idx_row = idx_ptr + b * sib + hkv.to(tl.int64) * sih + pid_q.to(tl.int64) * siq
    cnt = cnt_ptr + b * scb + hkv.to(tl.int64) * sch + pid_q.to(tl.int64) * scq
    n_tab = _num_steps(m0, cnt, KMAX, T, window, MODE, QB, BLOCK_N)
    n_steps = n_tab + OWN
    k_base = k_ptr + b * skb + hkv.to(tl.int64) * skh
    v_base = v_ptr + b * svb + hkv.to(tl.int64) * svh
    dk_base = dk_ptr + b * sdkb + hkv.to(tl.int64) * sdkh
    dv_base = dv_ptr + b * sdkb + hkv.to(tl.int64) * sdkh
    delta_ptrs = delta_ptr + b * slb + h64 * slh + t64 * slt
    if EXACT_DELTA:
        # delta = rowsum(P * dP) = dO . O with O unrounded: a 16-bit O would put its
        # rounding error (~2^-8 relative) straight into dS = P (dP - delta)
        delta = tl.zeros((QB * GH,), tl.float32)
        for it in range(0, n_steps):
            kb, ok, own = _key_block(it, n_tab, m0, idx_row, sik, T, NKB, window, MODE, BLOCK_N, OWN)
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            n64 = offs_n.to(tl.int64)
            kv_mask = (offs_n[:, None] < T) & d_ok[None, :]
            k = tl.load(k_base + n64[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + n64[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
            p, dp = _probs(q, k, v, do, lse2, qk_scale, t, row_ok, offs_n, ok, own, T, window, MODE, CAUSAL,
                           OWN, PRECISION)
            delta += tl.sum(p * dp, 1)
        tl.store(delta_ptrs, delta, mask=row_ok)
    else:
        delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)

    dq = tl.zeros((QB * GH, BLOCK_D), tl.float32)
    for it in range(0, n_steps):
        kb, ok, own = _key_block(it, n_tab, m0, idx_row, sik, T, NKB, window, MODE, BLOCK_N, OWN)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)
        kv_mask = (offs_n[:, None] < T) & d_ok[None, :]
        k = tl.load(k_base + n64[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n64[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        p, dp = _probs(q, k, v, do, lse2, qk_scale, t, row_ok, offs_n, ok, own, T, window, MODE, CAUSAL, OWN,
                       PRECISION)
        ds = p * (dp - delta[:, None])
        if PRECISION == "upcast":
            dq = mma(ds, k, dq, PRECISION)
        else:
            dq = mma(ds.to(k.dtype), k, dq, PRECISION)
        if ATOMIC_DKV:  # debug only: transposed products from shared memory, dk^T += q^T dS
            if PRECISION == "upcast":
                dv_c = mma(tl.trans(do), p, tl.zeros((BLOCK_D, BLOCK_N), tl.float32), PRECISION)
                dk_c = mma(tl.trans(q), ds, tl.zeros((BLOCK_D, BLOCK_N), tl.float32), PRECISION)
            else:
                dv_c = mma(tl.trans(do), p.to(do.dtype), tl.zeros((BLOCK_D, BLOCK_N), tl.float32), PRECISION)
                dk_c = mma(tl.trans(q), ds.to(q.dtype), tl.zeros((BLOCK_D, BLOCK_N), tl.float32), PRECISION)
            upd = (offs_n[None, :] < T) & d_ok[:, None] & ok
            tl.atomic_add(dv_base + n64[None, :] * sdkt + offs_d[:, None] * sdkd, dv_c, mask=upd)
            tl.atomic_add(dk_base + n64[None, :] * sdkt + offs_d[:, None] * sdkd, dk_c * sm_scale, mask=upd)
    tl.store(dq_ptr + b * sdqb + h64[:, None] * sdqh + t64[:, None] * sdqt + offs_d[None, :] * sdqd,
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, off_ptr, rows_ptr,
    item_seg_ptr, seg_first_ptr, seg_chunks_ptr, seg_slot_ptr, ws_ptr,
    T, G, HKV, NKB, NQT, n_seg, window, chunk, qk_scale, sm_scale,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    sdob, sdoh, sdot, sdod, slb, slh, slt,
    sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd,
    s_off_bh, s_rows_bh,
    MODE: tl.constexpr, CAUSAL: tl.constexpr, QB: tl.constexpr, GH: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    OWN: tl.constexpr, SPLIT: tl.constexpr,
):
    """dk, dv of one key tile, summed over the query tiles that see it and all heads of its group.

    With SPLIT, a program owns one work item: a chunk of at most ``chunk`` steps of one key
    tile's list (``dkv_work_split``), so that the key blocks that many queries select (the
    early ones, under causal top-k) do not serialise the backward. A tile with one chunk
    stores dk, dv; the chunks of a longer tile store float32 partials that
    ``_dkv_reduce_kernel`` sums in chunk order (deterministic).

    The query tiles are an arithmetic range (window) or this key block's slice of the
    inverse (CSR) selection table, sorted by query tile, then (OWN) the query tiles inside
    this block, which see it causally: a deterministic order, no atomics.

    Key-major, as FlashAttention's dk/dv loop: S^T = K Q^T puts the key tile on the MMA's M
    side, and ``dV += P^T dO``, ``dK += dS^T Q`` take P^T and dS^T from the accumulator as
    they are. Never transpose a register tensor into a dot here: ``tl.dot(tl.trans(ds), q)``
    feeds a ``#linear``-layout register operand to a Hopper wgmma, which Triton 3.4 to 3.7.0
    miscompile on sm_90 for some tile shapes (fla-org/flash-linear-attention#640): that was
    the per-token dk at relative error 2.2e-1 on the H100 while the interpreter was exact.
    A test compiles this kernel for sm_90 and checks its wgmma operands.
    """
    if SPLIT:
        seg = tl.load(item_seg_ptr + tl.program_id(0))  # (batch x KV head) * NKB + key tile
        live = seg < n_seg  # items past the last one have nothing to do
        seg = tl.where(live, seg, 0)
        part = tl.program_id(0) - tl.load(seg_first_ptr + seg)
        n_parts = tl.where(live, tl.load(seg_chunks_ptr + seg), 0)
    else:
        seg = tl.program_id(0)
        part = 0
        n_parts = 1
    kb = seg % NKB
    bh = seg // NKB
    b = (bh // HKV).to(tl.int64)
    hkv = bh % HKV
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n64 = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n[:, None] < T) & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + hkv.to(tl.int64) * skh + n64[:, None] * skt + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * svb + hkv.to(tl.int64) * svh + n64[:, None] * svt + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0)
    own0 = (kb * BLOCK_N) // QB  # first query tile inside this key block
    if MODE == 0:
        start = tl.load(off_ptr + bh.to(tl.int64) * s_off_bh + kb)
        n_csr = tl.load(off_ptr + bh.to(tl.int64) * s_off_bh + kb + 1) - start
        n_tiles = n_csr
        if OWN:
            n_tiles += tl.minimum(BLOCK_N // QB, NQT - own0)
    else:
        start = own0
        n_csr = 0
        last = tl.minimum(kb * BLOCK_N + BLOCK_N - 1 + window - 1, T - 1) // QB
        n_tiles = last - start + 1
    lo = part * chunk
    hi = tl.minimum(lo + chunk, tl.where(n_parts > 0, n_tiles, 0)) if SPLIT else n_tiles
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for it in range(lo, hi):
        own = False
        if MODE == 0:
            if OWN:
                own = it >= n_csr
                qt = tl.load(rows_ptr + bh.to(tl.int64) * s_rows_bh + start + it, mask=it < n_csr, other=0)
                qt = tl.where(own, own0 + it - n_csr, qt)
            else:
                qt = tl.load(rows_ptr + bh.to(tl.int64) * s_rows_bh + start + it)
        else:
            qt = start + it
        for hg in range(0, tl.cdiv(G, GH)):
            t, h, row_ok = _rows(qt, hg, hkv, T, G, QB, GH)
            t64 = t.to(tl.int64)
            h64 = h.to(tl.int64)
            rmask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * sqb + h64[:, None] * sqh + t64[:, None] * sqt + offs_d[None, :] * sqd,
                        mask=rmask, other=0.0)
            do = tl.load(do_ptr + b * sdob + h64[:, None] * sdoh + t64[:, None] * sdot + offs_d[None, :] * sdod,
                         mask=rmask, other=0.0)
            lse2 = tl.load(lse_ptr + b * slb + h64 * slh + t64 * slt, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_ptr + b * slb + h64 * slh + t64 * slt, mask=row_ok, other=0.0)
            pT, dpT = _probs_t(q, k, v, do, lse2, qk_scale, t, row_ok, offs_n, own, T, window, MODE,
                               CAUSAL, OWN, PRECISION)
            dsT = pT * (dpT - delta[None, :])
            if PRECISION == "upcast":
                dv = mma(pT, do, dv, PRECISION)
                dk = mma(dsT, q, dk, PRECISION)
            else:
                dv = mma(pT.to(do.dtype), do, dv, PRECISION)
                dk = mma(dsT.to(q.dtype), q, dk, PRECISION)
    dk = dk * sm_scale
    if n_parts == 1:
        tl.store(dk_ptr + b * sdkb + hkv.to(tl.int64) * sdkh + n64[:, None] * sdkt + offs_d[None, :] * sdkd,
                 dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + b * sdvb + hkv.to(tl.int64) * sdvh + n64[:, None] * sdvt + offs_d[None, :] * sdvd,
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    elif n_parts > 1:
        slot = (tl.load(seg_slot_ptr + seg) + part).to(tl.int64)
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(ws_ptr + slot * (2 * BLOCK_N * BLOCK_D) + tile, dk)
        tl.store(ws_ptr + slot * (2 * BLOCK_N * BLOCK_D) + BLOCK_N * BLOCK_D + tile, dv)


@triton.jit
def _dkv_reduce_kernel(
    ws_ptr, dk_ptr, dv_ptr, seg_chunks_ptr, seg_slot_ptr,
    T, HKV, NKB, sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv of a key tile whose list was split: its chunks' float32 partials summed in order."""
    seg = tl.program_id(0)
    n_parts = tl.load(seg_chunks_ptr + seg)
    if n_parts > 1:
        kb = seg % NKB
        bh = seg // NKB
        b = (bh // HKV).to(tl.int64)
        hkv = (bh % HKV).to(tl.int64)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n64 = offs_n.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_D + offs_d[None, :]
        base = ws_ptr + tl.load(seg_slot_ptr + seg).to(tl.int64) * (2 * BLOCK_N * BLOCK_D)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for c in range(0, n_parts):
            dk += tl.load(base + c * (2 * BLOCK_N * BLOCK_D) + tile)
            dv += tl.load(base + c * (2 * BLOCK_N * BLOCK_D) + BLOCK_N * BLOCK_D + tile)
        tl.store(dk_ptr + b * sdkb + hkv * sdkh + n64[:, None] * sdkt + offs_d[None, :] * sdkd,
                 dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + b * sdvb + hkv * sdvh + n64[:, None] * sdvt + offs_d[None, :] * sdvd,
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------- launchers

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("bcpt attention: q, k, v must be 4-D (B, H, T, D)")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"bcpt attention: k, v must be (B, H_kv, T, D) = ({B}, ?, {T}, {D}); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"bcpt attention: query heads {H} are not a multiple of KV heads {Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"bcpt attention: q, k, v must share one of float32/bfloat16/float16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    return B, H, Hkv, T, D


def _tiling(QB: int, G: int, D: int, cuda: bool) -> tuple[int, int]:
    """(GH, num_warps): heads per program so that QB * GH rows fill a tile of >= 16 rows."""
    max_rows = (128 if D <= 64 else 64) if cuda else 64
    gh = 1
    while gh < G and QB * gh * 2 <= max_rows:
        gh *= 2
    while QB * gh < 16:
        gh *= 2  # tl.dot needs 16 rows; the extra heads are masked off
    rows = QB * gh
    return gh, (8 if rows >= 128 else 4)


def _launch(kernel_fwd: bool, mode: int, q, k, v, idx, cnt, QB: int, block_n: int, causal: bool, window: int,
            scale: float, extra: dict):
    B, H, Hkv, T, D = _check(q, k, v)
    G = H // Hkv
    cuda = q.is_cuda
    GH, warps = _tiling(QB, G, D, cuda)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    NQT = triton.cdiv(T, QB)
    grid = (NQT, triton.cdiv(G, GH), B * Hkv)
    if idx is None:  # window mode: dummy table
        idx = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=q.device)
        cnt = torch.zeros((1, 1, 1), dtype=torch.int32, device=q.device)
        kmax, nkb = 0, 0
    else:
        kmax, nkb = idx.shape[-1], triton.cdiv(T, block_n)
    own = bool(extra.get("own", False))
    if own and (mode != MODE_SELECTED or QB > block_n):
        raise ValueError("bcpt attention: own_block needs selected blocks and query_block <= block_size")
    meta = dict(MODE=mode, CAUSAL=causal, QB=QB, GH=GH, BLOCK_N=block_n, D=D, BLOCK_D=BLOCK_D,
                PRECISION=_dot_precision(q), OWN=int(own), num_warps=warps, num_stages=2 if cuda else 1)
    common = (T, G, Hkv, kmax, nkb, int(window))
    if kernel_fwd:
        o, lse = extra["o"], extra["lse"]
        _fwd_kernel[grid](
            q, k, v, o, lse, idx, cnt, *common, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(),
            *idx.stride(), *cnt.stride(), **meta)
    else:
        do, lse, delta, dq, dk, dv = (extra[n] for n in ("do", "lse", "delta", "dq", "dk", "dv"))
        atomic = bool(extra.get("atomic", False))
        _bwd_kernel[grid](
            q, k, v, do, lse, delta, dq, dk, dv, idx, cnt, *common, scale * _LOG2E, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(),
            *dq.stride(), *dk.stride(), *idx.stride(), *cnt.stride(), ATOMIC_DKV=atomic,
            EXACT_DELTA=bool(extra.get("exact_delta", False)), **meta)
        if not atomic:
            _launch_dkv(mode, q, k, v, do, lse, delta, dk, dv, idx, cnt, QB, block_n, window, scale, meta)


def _launch_dkv(mode, q, k, v, do, lse, delta, dk, dv, idx, cnt, QB, block_n, window, scale, meta):
    (B, H, T, D), Hkv = q.shape, k.shape[1]  # checked by _launch
    nkb, nqt = triton.cdiv(T, block_n), triton.cdiv(T, QB)
    split = mode == MODE_SELECTED
    if split:
        own = bool(meta["OWN"])
        off, rows = inverse_table(idx, cnt, nkb)
        steps = idx.numel() + B * Hkv * nqt * own
        chunk = _dkv_chunk(steps, q.device)
        item_seg, seg_first, seg_chunks, seg_slot, n_items, n_slots = dkv_work_split(
            off, nqt, block_n, QB, own, steps, chunk)
    else:  # the window's key tiles all see about the same number of query tiles: no split
        off = rows = torch.zeros((1, 1), dtype=torch.int32, device=q.device)
        item_seg = seg_first = seg_chunks = seg_slot = off.view(-1)
        chunk, n_items, n_slots = 0, B * Hkv * nkb, 0
    ws = torch.empty((max(n_slots, 1), 2, block_n, meta["BLOCK_D"]), dtype=torch.float32, device=q.device)
    # the dk and dv accumulators (BLOCK_N x D fp32 each) live in registers for the whole program
    meta2 = dict(meta, num_warps=DKV_WARPS if q.is_cuda else 4, SPLIT=split)
    _bwd_dkv_kernel[(n_items,)](
        q, k, v, do, lse, delta, dk, dv, off, rows, item_seg, seg_first, seg_chunks, seg_slot, ws,
        T, H // Hkv, Hkv, nkb, nqt, B * Hkv * nkb, int(window), chunk, scale * _LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(),
        *dk.stride(), *dv.stride(), off.stride(0), rows.stride(0), **meta2)
    if split:
        _dkv_reduce_kernel[(B * Hkv * nkb,)](
            ws, dk, dv, seg_chunks, seg_slot, T, Hkv, nkb, *dk.stride(), *dv.stride(),
            BLOCK_N=block_n, D=D, BLOCK_D=meta["BLOCK_D"], num_warps=4)


#: Smallest chunk of a key tile's query list that one dk/dv program walks (GPU; the
#: interpreter uses 16, so that small tests split lists too).
DKV_CHUNK_MIN = 256


def _dkv_chunk(steps: int, device: torch.device) -> int:
    """Chunk length that gives about two work items per SM in all (a static bound from the
    table's size, not its contents): enough programs to balance the skew, few float32
    partials (at most about 4 x SMs tiles of workspace)."""
    if device.type != "cuda":
        return 16
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(DKV_CHUNK_MIN, triton.next_power_of_2(triton.cdiv(steps, 2 * sms)))


def dkv_work_split(off: torch.Tensor, nqt: int, block_n: int, QB: int, own: bool, steps: int, chunk: int):
    """Work items of the dk/dv backward, built on the device without a sync (fixed shapes).

    Segment ``s = (batch x KV head) * NKB + key tile`` has ``n`` steps (its CSR entries, plus
    its own query tiles with ``own``) and ``max(1, ceil(n / chunk))`` chunks; ``steps`` bounds
    the total of n statically. Returns ``(item_seg, seg_first, seg_chunks, seg_slot, n_items,
    n_slots)``: item i works on chunk ``i - seg_first[seg]`` of segment ``seg = item_seg[i]``
    (the segment count, past the last item: such programs leave at once); a split segment's
    partials go to workspace slots ``seg_slot[seg] + chunk``. ``n_items`` and ``n_slots``
    are static bounds: a split segment has n > chunk, so its ceil(n / chunk) <= 2n / chunk.
    """
    nkb = off.shape[1] - 2
    n = (off[:, 1:nkb + 1] - off[:, :nkb]).long()
    if own:
        first_tile = torch.arange(nkb, device=off.device) * block_n // QB
        n = n + (nqt - first_tile).clamp(max=block_n // QB)
    chunks = ((n.reshape(-1) + chunk - 1) // chunk).clamp_min(1)
    ends = torch.cumsum(chunks, 0)
    n_items = chunks.numel() + triton.cdiv(steps, chunk)
    item_seg = torch.searchsorted(ends, torch.arange(n_items, device=off.device), right=True)
    split = torch.where(chunks > 1, chunks, 0)
    as32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return (as32(item_seg), as32(ends - chunks), as32(chunks), as32(torch.cumsum(split, 0) - split),
            n_items, 2 * triton.cdiv(steps, chunk))


def inverse_table(idx: torch.Tensor, cnt: torch.Tensor, nkb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (batch x KV head, key block): which query rows selected it, as CSR (offsets, rows).

    Built on the device without a sync: a stable sort of the valid entries by key block
    (invalid entries go to a trailing bucket that no program reads), bucket sizes by
    scatter_add, offsets by cumsum. Rows come out ascending within a block, so the
    backward's accumulation order is fixed.
    """
    B, Hkv, NQ, K = idx.shape
    valid = (torch.arange(K, device=idx.device) < cnt[..., None]) & (idx >= 0) & (idx < nkb)
    key = torch.where(valid, idx, nkb).reshape(B * Hkv, NQ * K).long()
    order = torch.sort(key, dim=-1, stable=True).indices
    rows = (order // K).to(torch.int32).contiguous()
    sizes = torch.zeros((B * Hkv, nkb + 1), dtype=torch.int64, device=idx.device)
    sizes.scatter_add_(1, key, torch.ones_like(key))
    off = torch.zeros((B * Hkv, nkb + 2), dtype=torch.int32, device=idx.device)
    off[:, 1:] = sizes.cumsum(1)
    return off, rows


def _validate_table(q, idx, cnt, query_block: int, block_size: int, own_block: bool = False) -> None:
    B, H, T, _ = q.shape
    if idx.dim() != 4 or cnt.dim() != 3 or tuple(idx.shape[:3]) != tuple(cnt.shape):
        raise ValueError(f"bcpt.nsa_selected_attention: block_idx must be (B, H_kv, NQ, K) and counts (B, H_kv, NQ); "
                         f"got {tuple(idx.shape)} and {tuple(cnt.shape)}")
    if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
        raise ValueError("bcpt.nsa_selected_attention: block_idx and counts must be int32")
    if idx.shape[2] != triton.cdiv(T, query_block):
        raise ValueError(f"bcpt.nsa_selected_attention: {idx.shape[2]} index rows for T={T} and query_block="
                         f"{query_block} (expected {triton.cdiv(T, query_block)})")
    for name, val in (("block_size", block_size), ("query_block", query_block)):
        if val < 1 or val & (val - 1):
            raise ValueError(f"bcpt.nsa_selected_attention: {name} must be a power of two, got {val}")
    if block_size < 16:
        raise ValueError(f"bcpt.nsa_selected_attention: block_size must be >= 16, got {block_size}")
    if own_block and query_block > block_size:
        raise ValueError(f"bcpt.nsa_selected_attention: own_block needs query_block <= block_size, got "
                         f"{query_block} > {block_size}")


def selected_attention_fwd(q, k, v, block_idx, counts, block_size: int, query_block: int, causal: bool, scale: float,
                           own_block: bool = False):
    """(out, lse): out like q, lse float32 (B, H, T) natural log (+inf on rows that see nothing).

    ``own_block``: each query tile also sees its own key block causally, as one more step
    after its table entries (NSA's block-causal diagonal); table entries stay as ``causal`` says.
    """
    _validate_table(q, block_idx, counts, query_block, block_size, own_block)
    B, H, T, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if q.numel() and T:
        _launch(True, MODE_SELECTED, q, k, v, block_idx, counts, query_block, block_size, causal, 0, scale,
                {"o": o, "lse": lse, "own": own_block})
    return o, lse


#: Recompute delta = rowsum(dO * O) from P and dP for 16-bit inputs (one more pass over the
#: selected keys in the dq kernel, two extra dots per block) instead of reading the rounded O.
#: With it, bf16 gradients are as accurate as eager's; without it dq can be ~2x worse.
EXACT_DELTA_16BIT = True


def _backward(mode, do, q, k, v, o, lse, idx, cnt, QB, block_n, causal, window, scale, own=False):
    do = do.to(q.dtype)  # tl.dot wants both operands in one dtype
    exact = EXACT_DELTA_16BIT and q.dtype in (torch.float16, torch.bfloat16)
    if exact:
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # written by the dq kernel
    else:
        delta = (do.float() * o.float()).sum(-1)  # (B, H, T) like lse
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() and q.shape[2]:
        lse_c = lse.contiguous()
        _launch(False, mode, q, k, v, idx, cnt, QB, block_n, causal, window, scale,
                {"do": do, "lse": lse_c, "delta": delta.view(lse_c.shape).contiguous(), "dq": dq, "dk": dk, "dv": dv,
                 "exact_delta": exact, "own": own})
    else:
        dq.zero_()
        dk.zero_()
        dv.zero_()
    return dq, dk, dv


def selected_attention_bwd(do, q, k, v, o, lse, block_idx, counts, block_size: int, query_block: int,
                           causal: bool, scale: float, own_block: bool = False):
    _validate_table(q, block_idx, counts, query_block, block_size, own_block)
    return _backward(MODE_SELECTED, do, q, k, v, o, lse, block_idx, counts, query_block, block_size, causal, 0, scale,
                     own_block)


def _window_tiles(q) -> tuple[int, int]:
    """(QB, BLOCK_N) for the window kernel: 64 x 64 on a GPU, 16 x 16 under the interpreter."""
    return (64, 64) if q.is_cuda else (16, 16)


def sliding_window_fwd(q, k, v, window: int, scale: float):
    if window < 1:
        raise ValueError(f"bcpt.sliding_window_attention: window must be >= 1, got {window}")
    B, H, T, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if q.numel() and T:
        QB, BN = _window_tiles(q)
        _launch(True, MODE_WINDOW, q, k, v, None, None, QB, BN, True, window, scale, {"o": o, "lse": lse})
    return o, lse


def sliding_window_bwd(do, q, k, v, o, lse, window: int, scale: float):
    QB, BN = _window_tiles(q)
    return _backward(MODE_WINDOW, do, q, k, v, o, lse, None, None, QB, BN, True, window, scale)
