"""DeepEmbed kernels: a per-token table row scales a GEMM's output or a low-rank mix.

Output scale (RWKV-8 demo), ``y = (h V^T + b) * T[idx]``:

* ``_out_forward_kernel``: one program per output tile; the gather of ``T[idx[rows]]`` and
  the multiply run in the GEMM epilogue, so the (tokens x d) embedding never exists in
  memory. The unscaled product ``z`` is written as well, because the backward needs it
  for the table's gradient and writing it here is cheaper than a second GEMM later.
  On CUDA the first call per shape times it against cuBLAS for ``z`` plus
  ``_scale_rows_kernel`` (``y = z * T[idx]``, one elementwise pass) and keeps the faster.
* ``_gh_kernel``: elementwise ``gh = dy * T[idx]`` (feeds the two dense GEMMs dh = gh V,
  dV = gh^T h, which stay on cuBLAS).

Hidden scale (RWKV-7 DeepEmbed), ``b[t] = a[t] @ S[idx[t]].view(r, r)``:

* ``_rowmix_forward_kernel`` / ``_rowmix_dx_kernel`` gather each token's r x r matrix from
  its table row without ever materialising the (tokens x r x r) gather.

Table gradients are row-sparse. ``plan_segment_sum`` sums the per-token contributions of
each distinct row in a fixed order, from a *row plan* (below) built once per ``idx`` and
shared by every layer. ``_tile_segment_sum_kernel`` cuts the plan's sorted token order into
tiles of BT tokens (one program per tile and column slab, the same work whatever the row
lengths: token ids follow a Zipf law, so one row can hold 10 % of the tokens while most hold
one) and runs a segmented scan down each tile; rows inside a tile are stored at once, and
``_tile_fixup_kernel`` adds up the fp32 pieces of the rows that cross tiles, in tile order.
The per-token contribution is computed on the fly (``dy * z`` for the output scale, the
outer product ``a (x) db`` for the hidden scale), so no (tokens x d) fp32 buffer is written.
Deterministic (bitwise reproducible), no atomics, no host sync.

Host tables: ``_gather_rows_kernel`` copies a plan's distinct rows from a table in pinned
host memory straight into device memory (zero-copy: the kernel reads the host pages over
PCIe through their mapped device address), sized by the plan's device-side count, so no
host sync is needed to learn how many rows to copy. ``_row_update_kernel`` applies an SGD or
SparseAdam row update to the host table (and its host optimizer state) the same way.

Row plan layout (built by ``bcpt_compile.runtime.plan``), one int64 tensor of 4M + 2:
``[U | uniq (M) | inv (M) | order (M) | starts (M + 1)]``: U distinct rows; ``uniq`` the
distinct rows ascending (padded past U with the largest); ``inv[t]`` token t's slot
(``uniq[inv[t]] == idx[t]``); ``order`` the tokens sorted stably by row; slot u's tokens are
``order[starts[u]:starts[u + 1]]`` (``starts[u] = M`` for u >= U).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launchable, traced
from .tile_gemm import dot_precision as _dot_precision
from .tile_gemm import grouped_tile
from .tile_gemm import mma
from .tile_gemm import xwt_tile


@triton.jit
def _wrap_rows(ids, V, WRAP: tl.constexpr):
    """``weight[idx]`` rules: a negative index counts from the end (the range is checked elsewhere)."""
    ids = ids.to(tl.int64)
    if WRAP:
        ids = tl.where(ids < 0, ids + V, ids)
    return ids


@triton.jit
def _out_forward_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, idx_ptr, y_ptr, z_ptr,
    M, N, K, V,
    stride_hm, stride_hk, stride_wn, stride_wk, stride_tv, stride_tn,
    stride_ym, stride_yn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, WRAP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    Mt = tl.cdiv(M, BM)
    Nt = tl.cdiv(N, BN)
    tile_m, tile_n = grouped_tile(tl.program_id(0), Mt, Nt, GROUP_M)
    offs_m = tile_m * BM + tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    acc = xwt_tile(h_ptr, w_ptr, b_ptr, rows, offs_n.to(tl.int64), offs_m, offs_n, M, N, K,
                   stride_hm, stride_hk, stride_wn, stride_wk, HAS_BIAS, BM, BN, BK, PRECISION, EVEN_K)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_Z:
        z = acc.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + rows[:, None] * stride_zm + offs_n[None, :] * stride_zn, z, mask=inside)
    ids = _wrap_rows(tl.load(idx_ptr + offs_m, mask=offs_m < M, other=0), V, WRAP)
    e = tl.load(t_ptr + ids[:, None] * stride_tv + offs_n[None, :] * stride_tn, mask=inside, other=0.0)
    y = acc * e.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _scale_rows_kernel(
    z_ptr, t_ptr, idx_ptr, y_ptr,
    M, N, V,
    stride_zm, stride_zn, stride_tv, stride_tn, stride_ym, stride_yn,
    WRAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """y = z * T[idx] (the epilogue of the cuBLAS variant of the forward)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ids = _wrap_rows(tl.load(idx_ptr + offs_m, mask=offs_m < M, other=0), V, WRAP)
    z = tl.load(z_ptr + rows[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=inside, other=0.0)
    e = tl.load(t_ptr + ids[:, None] * stride_tv + offs_n[None, :] * stride_tn, mask=inside, other=0.0)
    y = z.to(tl.float32) * e.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gh_kernel(
    dy_ptr, t_ptr, idx_ptr, gh_ptr,
    M, N, V,
    stride_dym, stride_dyn, stride_tv, stride_tn,
    WRAP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """gh = dy * T[idx], rounded to gh's dtype as eager's mul backward rounds."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=inside, other=0.0)
    ids = _wrap_rows(tl.load(idx_ptr + offs_m, mask=offs_m < M, other=0), V, WRAP)
    e = tl.load(t_ptr + ids[:, None] * stride_tv + offs_n[None, :] * stride_tn, mask=inside, other=0.0)
    tl.store(gh_ptr + rows[:, None] * N + offs_n[None, :], (dy.to(tl.float32) * e.to(tl.float32)).to(gh_ptr.dtype.element_ty),
             mask=inside)


@triton.jit
def _token_values(a_ptr, b_ptr, t, live, cols, in_w, R,
                  stride_am, stride_ak, stride_bm, stride_bk, MODE: tl.constexpr):
    """v[t, cols] in float32 for a block of tokens t (rows masked by ``live``, zeros there).

    v = a[t] (MODE 0), a[t] * b[t] (MODE 1), or the flattened outer product
    a[t, c // R] * b[t, c % R] (MODE 2).
    """
    if MODE == 2:
        ka = (cols // R).to(tl.int64)
        kb = (cols % R).to(tl.int64)
    else:
        ka = cols.to(tl.int64)
        kb = ka
    m2 = live[:, None] & in_w[None, :]
    v = tl.load(a_ptr + t[:, None] * stride_am + ka[None, :] * stride_ak, mask=m2, other=0.0).to(tl.float32)
    if MODE != 0:
        v2 = tl.load(b_ptr + t[:, None] * stride_bm + kb[None, :] * stride_bk, mask=m2, other=0.0)
        v = v * v2.to(tl.float32)
    return v


@triton.jit
def _slot_dest(plan_ptr, slot, live, DEST_UNIQ: tl.constexpr):
    """The output row of slots: uniq[slot] (a dense table) or the slot itself (a slot-indexed buffer)."""
    if DEST_UNIQ:
        return tl.load(plan_ptr + 1 + slot, mask=live, other=0)
    return slot


@triton.jit
def _row_walk_segment_sum_kernel(
    a_ptr, b_ptr, plan_ptr, out_ptr,
    M, W, R,
    stride_am, stride_ak, stride_bm, stride_bk, stride_om,
    MODE: tl.constexpr, DEST_UNIQ: tl.constexpr, ZERO_TAIL: tl.constexpr,
    BT: tl.constexpr, BW: tl.constexpr,
):
    """plan_segment_sum, one program per (slot u, column slab) walking u's tokens BT at a time.

    Kept to compare against the tile kernels: a frequent row makes one program walk all its
    tokens, and the M - U programs of unused slots launch only to exit.
    """
    u = tl.program_id(0)
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    in_w = cols < W
    count = tl.load(plan_ptr)
    if u < count:
        s = tl.load(plan_ptr + 1 + 3 * M + u)
        e = tl.load(plan_ptr + 2 + 3 * M + u)
        acc = tl.zeros((BW,), dtype=tl.float32)
        for k in range(s, e, BT):
            offs = k + tl.arange(0, BT)
            live = offs < e
            t = tl.load(plan_ptr + 1 + 2 * M + offs, mask=live, other=0)
            acc += tl.sum(_token_values(a_ptr, b_ptr, t, live, cols, in_w, R,
                                        stride_am, stride_ak, stride_bm, stride_bk, MODE), axis=0)
        dest = _slot_dest(plan_ptr, u.to(tl.int64), True, DEST_UNIQ)
        tl.store(out_ptr + dest * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=in_w)
    elif ZERO_TAIL:
        tl.store(out_ptr + u.to(tl.int64) * stride_om + cols, tl.zeros((BW,), dtype=out_ptr.dtype.element_ty), mask=in_w)


@triton.jit
def _restart_at_head(seen_a, sum_a, head_b, sum_b):
    """Segmented-sum combine (a is the earlier position): a row's running sum restarts at its first token."""
    return seen_a | head_b, tl.where(head_b, sum_b, sum_a + sum_b)


@triton.jit
def _sorted_slot(plan_ptr, M, pos, live):
    """The slot of sorted position pos, inv[order[pos]]; -1 where not live (a row boundary)."""
    t = tl.load(plan_ptr + 1 + 2 * M + pos, mask=live, other=0)
    return tl.load(plan_ptr + 1 + M + t, mask=live, other=-1)


@triton.jit
def _pick_row(tile, at):
    """tile[i] for the one i with at[i], a BW vector. Exact (x + -0.0 == x, bit for bit), and it stays
    in the scan's layout, where a masked store of the whole tile would convert it through shared memory."""
    return tl.sum(tl.where(at[:, None], tile, -0.0), axis=0)


@triton.jit
def _tile_segment_sum_kernel(
    a_ptr, b_ptr, plan_ptr, out_ptr, part_ptr,
    M, W, R,
    stride_am, stride_ak, stride_bm, stride_bk, stride_om,
    MODE: tl.constexpr, DEST_UNIQ: tl.constexpr, ZERO_TAIL: tl.constexpr,
    BT: tl.constexpr, BW: tl.constexpr,
):
    """Per-row sums over one tile of BT consecutive positions of the sorted token order.

    Every program has the same work whatever the row lengths. A segmented scan down the tile
    gives each row's sum at its last token: a row lying wholly in the tile is stored to out;
    the piece of the row that enters the tile from before (part[tile, 0]) or runs on past it
    (part[tile, 1]) is left for ``_tile_fixup_kernel``. With ZERO_TAIL, rows pos >= U of a
    slot-indexed out are zeroed here, BT of them per tile.
    """
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    in_w = cols < W
    pos = tile * BT + tl.arange(0, BT)
    live = pos < M
    t = tl.load(plan_ptr + 1 + 2 * M + pos, mask=live, other=0)
    slot = tl.load(plan_ptr + 1 + M + t, mask=live, other=-1)
    head = live & (slot != _sorted_slot(plan_ptr, M, pos - 1, live & (pos > 0)))
    tail = live & (slot != _sorted_slot(plan_ptr, M, pos + 1, pos + 1 < M))
    v = _token_values(a_ptr, b_ptr, t, live, cols, in_w, R, stride_am, stride_ak, stride_bm, stride_bk, MODE)
    _, acc = tl.associative_scan((tl.broadcast_to(head[:, None], (BT, BW)), v), 0, _restart_at_head)
    begun = tl.cumsum(head.to(tl.int32), 0) > 0  # this position's row starts inside the tile
    last = pos == tl.minimum(tile * BT + BT, M) - 1
    whole = begun & tail
    enters = ~begun & (tail | last)  # the end of the piece of a row begun before the tile (at most one)
    leaves = begun & last & ~tail  # the last position, its row running on past the tile (at most one)
    dest = _slot_dest(plan_ptr, slot, live, DEST_UNIQ)
    tl.store(out_ptr + dest[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=whole[:, None] & in_w[None, :])
    part = part_ptr + tile.to(tl.int64) * 2 * W + cols
    tl.store(part, _pick_row(acc, enters), mask=in_w & (tl.max(enters.to(tl.int32), 0) > 0))
    tl.store(part + W, _pick_row(acc, leaves), mask=in_w & (tl.max(leaves.to(tl.int32), 0) > 0))
    if ZERO_TAIL:
        unused = live & (pos >= tl.load(plan_ptr))
        tl.store(out_ptr + pos.to(tl.int64)[:, None] * stride_om + cols[None, :],
                 tl.zeros((BT, BW), dtype=out_ptr.dtype.element_ty), mask=unused[:, None] & in_w[None, :])


@triton.jit
def _tile_fixup_kernel(
    plan_ptr, part_ptr, out_ptr,
    M, W, stride_om,
    DEST_UNIQ: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, BJ: tl.constexpr,
):
    """out[dest] of each row crossing a tile boundary: its tile partials summed in tile order.

    The program of the tile where such a row ends does it: part[home, 1] (the tile it starts
    in), then part[j, 0] for the later tiles up to this one, BJ tiles per step.
    """
    tile = tl.program_id(0)
    first = tile * BT
    slot = _sorted_slot(plan_ptr, M, first, True)
    start = tl.load(plan_ptr + 1 + 3 * M + slot)
    end = tl.load(plan_ptr + 2 + 3 * M + slot)
    if (start < first) & (end <= first + BT):
        cols = tl.program_id(1) * BW + tl.arange(0, BW)
        in_w = cols < W
        home = start // BT
        acc = tl.load(part_ptr + home * 2 * W + W + cols, mask=in_w, other=0.0)
        for j in range(home + 1, tile + 1, BJ):
            tiles = j + tl.arange(0, BJ)
            m2 = (tiles <= tile)[:, None] & in_w[None, :]
            acc += tl.sum(tl.load(part_ptr + tiles[:, None] * 2 * W + cols[None, :], mask=m2, other=-0.0), axis=0)
        dest = _slot_dest(plan_ptr, slot, True, DEST_UNIQ)
        tl.store(out_ptr + dest * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=in_w)


@triton.jit
def _rowmix_forward_kernel(
    a_ptr, t_ptr, idx_ptr, b_ptr,
    M, R, V, stride_am, stride_ar, stride_tv, stride_tw, stride_bm, stride_br,
    WRAP: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BR)
    rows = offs_m.to(tl.int64)
    in_m = offs_m < M
    ids = _wrap_rows(tl.load(idx_ptr + offs_m, mask=in_m, other=0), V, WRAP)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    inside = in_m[:, None] & (offs_j[None, :] < R)
    for i in range(R):
        a_i = tl.load(a_ptr + rows * stride_am + i * stride_ar, mask=in_m, other=0.0).to(tl.float32)
        e = tl.load(t_ptr + ids[:, None] * stride_tv + (i * R + offs_j[None, :]) * stride_tw, mask=inside, other=0.0)
        acc += a_i[:, None] * e.to(tl.float32)
    tl.store(b_ptr + rows[:, None] * stride_bm + offs_j[None, :] * stride_br, acc.to(b_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rowmix_dx_kernel(
    db_ptr, t_ptr, idx_ptr, da_ptr,
    M, R, V, stride_dbm, stride_dbr, stride_tv, stride_tw,
    WRAP: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BR)
    rows = offs_m.to(tl.int64)
    in_m = offs_m < M
    inside = in_m[:, None] & (offs_j[None, :] < R)
    ids = _wrap_rows(tl.load(idx_ptr + offs_m, mask=in_m, other=0), V, WRAP)
    db = tl.load(db_ptr + rows[:, None] * stride_dbm + offs_j[None, :] * stride_dbr, mask=inside, other=0.0)
    db = db.to(tl.float32)
    for i in range(R):
        e = tl.load(t_ptr + ids[:, None] * stride_tv + (i * R + offs_j[None, :]) * stride_tw, mask=inside, other=0.0)
        da_i = tl.sum(db * e.to(tl.float32), axis=1)
        tl.store(da_ptr + rows * R + i, da_i.to(da_ptr.dtype.element_ty), mask=in_m)


@triton.jit
def _host_row_tile(plan_ptr, t, count, W, w_blocks, BS: tl.constexpr, BW: tl.constexpr):
    """Tile t of a host-row walk: (slots, the rows they hold, columns, in-bounds mask)."""
    slots = (t // w_blocks) * BS + tl.arange(0, BS)
    cols = (t % w_blocks) * BW + tl.arange(0, BW)
    live = slots < count
    ids = tl.load(plan_ptr + 1 + slots, mask=live, other=0)
    return slots, ids, cols, live[:, None] & (cols[None, :] < W)


@triton.jit
def _gather_rows_kernel(
    t_ptr, plan_ptr, rows_ptr, stats_ptr,
    W, stride_tv, stride_tw, stride_rm, row_bytes,
    PROGRAMS: tl.constexpr, BS: tl.constexpr, BW: tl.constexpr,
):
    """rows[s] = table[uniq[s]] for the plan's first U slots; the table may be pinned host memory.

    Persistent, with a few programs: a read over PCIe spends its time waiting, so a whole-grid
    launch would hold every SM for the copy's duration and stall the compute stream; PROGRAMS
    programs keep enough reads in flight to fill the link and leave the other SMs to compute."""
    count = tl.load(plan_ptr)
    w_blocks = tl.cdiv(W, BW)
    for t in range(tl.program_id(0), tl.cdiv(count, BS) * w_blocks, PROGRAMS):
        slots, ids, cols, m2 = _host_row_tile(plan_ptr, t, count, W, w_blocks, BS, BW)
        v = tl.load(t_ptr + ids[:, None] * stride_tv + cols[None, :] * stride_tw, mask=m2, other=0.0)
        tl.store(rows_ptr + slots.to(tl.int64)[:, None] * stride_rm + cols[None, :], v, mask=m2)
    if tl.program_id(0) == 0:  # device-side counters: rows requested, rows copied, bytes
        tl.atomic_add(stats_ptr, count)
        tl.atomic_add(stats_ptr + 1, count)
        tl.atomic_add(stats_ptr + 2, count * row_bytes)


@triton.jit
def _row_update_kernel(
    t_ptr, g_ptr, plan_ptr, m_ptr, v_ptr, step_ptr, stats_ptr,
    W, stride_tv, stride_gm, stride_sv,
    lr, beta1, beta2, eps, log_beta1, log_beta2,
    ADAM: tl.constexpr, PROGRAMS: tl.constexpr, BS: tl.constexpr, BW: tl.constexpr,
):
    """table[uniq[s]] -= update(grad[s]) for the plan's first U slots (SGD, or SparseAdam's rule
    with moments m, v kept per table row). Reads and writes the table in place, wherever it
    lives; persistent with a few programs, as the gather."""
    count = tl.load(plan_ptr)
    w_blocks = tl.cdiv(W, BW)
    if ADAM:
        t_step = tl.load(step_ptr).to(tl.float32) + 1.0
        bc1 = 1.0 - tl.exp(t_step * log_beta1)
        bc2 = 1.0 - tl.exp(t_step * log_beta2)
        step_size = lr * tl.sqrt(bc2) / bc1
    for t in range(tl.program_id(0), tl.cdiv(count, BS) * w_blocks, PROGRAMS):
        slots, ids, cols, m2 = _host_row_tile(plan_ptr, t, count, W, w_blocks, BS, BW)
        g = tl.load(g_ptr + slots.to(tl.int64)[:, None] * stride_gm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        w_ptrs = t_ptr + ids[:, None] * stride_tv + cols[None, :]
        w = tl.load(w_ptrs, mask=m2, other=0.0).to(tl.float32)
        if ADAM:
            s_off = ids[:, None] * stride_sv + cols[None, :]
            m = tl.load(m_ptr + s_off, mask=m2, other=0.0)
            v = tl.load(v_ptr + s_off, mask=m2, other=0.0)
            m = m + (g - m) * (1.0 - beta1)
            v = v + (g * g - v) * (1.0 - beta2)
            tl.store(m_ptr + s_off, m, mask=m2)
            tl.store(v_ptr + s_off, v, mask=m2)
            w = w - step_size * (m / (tl.sqrt(v) + eps))
        else:
            w = w - lr * g
        tl.store(w_ptrs, w.to(t_ptr.dtype.element_ty), mask=m2)
    if tl.program_id(0) == 0:
        tl.atomic_add(stats_ptr, count)  # rows updated


# ------------------------------------------------------------------ launch helpers

def _out_config(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1}
    return {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


# GEMM tiles tried on CUDA (once per (M, N, K)); the fixed config above is the fallback
_CUDA_GEMM_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
]
_autotune_ok = [True]
_TUNED: dict = {}


def _even_k(meta: dict) -> bool:
    return meta["K"] % meta["BK"] == 0


def _launch_gemm(kernel, M: int, N: int, device: torch.device, args: tuple, kwargs: dict) -> None:
    """Launch a tiled epilogue GEMM: autotuned on CUDA, the fixed config elsewhere or on failure.

    ``EVEN_K`` (no mask on the K loop, so loads pipeline) is derived from each config's BK.
    """
    if traced(args[0]):  # inside a traced op: the config the eager autotuning picked, launched by Inductor
        tuned = _TUNED.get(kernel)
        best = getattr(tuned, "best_config", None) if tuned is not None else None
        cfg = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages} if best else _out_config(device)
        launchable(kernel, args[0])[(triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)](
            *args, **kwargs, **cfg, EVEN_K=args[9] % cfg["BK"] == 0)
        return
    if device.type == "cuda" and _autotune_ok[0]:
        tuned = _TUNED.get(kernel)
        if tuned is None:
            tuned = _TUNED[kernel] = triton.autotune(configs=_CUDA_GEMM_CONFIGS, key=["M", "N", "K"])(
                triton.heuristics({"EVEN_K": _even_k})(kernel))
        try:
            tuned[lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)](*args, **kwargs)
            return
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - depends on the GPU / Triton build
            import warnings

            warnings.warn(f"bcpt.deepembed: autotuning failed ({type(exc).__name__}: {exc}); using a fixed tile")
            _autotune_ok[0] = False
    cfg = _out_config(device)
    K = args[9]  # both epilogue GEMMs take (ptrs x 7, M, N, K, ...)
    kernel[(triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)](
        *args, **kwargs, **cfg, EVEN_K=K % cfg["BK"] == 0)


def _ew_blocks(t: torch.Tensor) -> tuple[int, int]:
    return (64, 128) if t.is_cuda else (16, 16)


# ------------------------------------------------------------------ output scale

# forward variant per (M, N, K, dtypes, bias, device): "fused" (Triton GEMM + epilogue) or
# "split" (cuBLAS GEMM, then _scale_rows_kernel); decided on CUDA by timing both once
_FORWARD_CHOICE: dict = {}


def _forward_impl(key, fused, split) -> str:
    forced = os.environ.get("BCPT_DEEPEMBED_FORWARD", "")
    if forced in ("fused", "split"):
        return forced
    choice = _FORWARD_CHOICE.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_current_stream_capturing():
        return "fused"  # no timing inside a CUDA graph capture; decided on a later eager call
    try:
        from triton.testing import do_bench

        t_fused = do_bench(fused, warmup=5, rep=25)
        t_split = do_bench(split, warmup=5, rep=25)
        choice = "fused" if t_fused <= t_split else "split"
    except Exception:  # noqa: BLE001  # pragma: no cover - timing is an optimisation only
        choice = "fused"
    _FORWARD_CHOICE[key] = choice
    return choice


def _forward_impl_traced(key, h: torch.Tensor, weight: torch.Tensor, bias, table: torch.Tensor,
                         out_dtype: torch.dtype) -> str:
    """The forward variant for a traced op: its shapes are timed on real tensors of the same
    sizes and dtypes, once (escaping the tracing modes), and that eager run leaves the
    autotuned tile for ``_launch_gemm``'s traced launch. Symbolic sizes take cuBLAS ("split")."""
    forced = os.environ.get("BCPT_DEEPEMBED_FORWARD", "")
    if forced in ("fused", "split"):
        choice = forced
    elif not all(isinstance(d, int) for d in (*h.shape, *weight.shape)):
        return "split"
    else:
        choice = _FORWARD_CHOICE.get(key)
    if choice == "split" or h.device.type != "cuda":  # nothing to time or tune
        return choice or "fused"
    from torch.utils._python_dispatch import _disable_current_modes

    M, K = h.shape
    N = weight.shape[0]
    with _disable_current_modes(), torch.no_grad():
        dev = torch.device("cuda", h.device.index if h.device.index is not None else torch.cuda.current_device())
        rows = min(table.shape[0], M)
        real_h = torch.randn((M, K), dtype=h.dtype, device=dev)
        real_w = torch.randn((N, K), dtype=weight.dtype, device=dev)
        real_b = torch.randn((N,), dtype=bias.dtype, device=dev) if bias is not None else None
        real_t = torch.randn((rows, N), dtype=table.dtype, device=dev)
        idx = torch.randint(0, rows, (M,), device=dev)
        # times both once, or (fused) re-runs the autotuner's pick for these sizes
        out_scale_forward(real_h, real_w, real_b, real_t, idx, out_dtype, impl=choice)
    return choice if choice is not None else _FORWARD_CHOICE[key]


def out_scale_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor,
                      idx: torch.Tensor, out_dtype: torch.dtype, store_z: bool = True, wrap: bool = False,
                      impl: str | None = None):
    """(y, z) with z = h W^T + b (in h's dtype, or None) and y = z * table[idx].

    h: (M, K); idx: (M,) in range (negatives allowed with ``wrap``, as ``weight[idx]``).
    ``impl``: "fused" or "split"; default: "fused" off CUDA, the faster one on CUDA.
    """
    M, K = h.shape
    N = weight.shape[0]
    V = table.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=h.device)
    if M == 0 or N == 0:
        return y, (torch.empty((M, N), dtype=h.dtype, device=h.device) if store_z else None)
    if K == 0:
        z = (bias.expand(M, N) if bias is not None else torch.zeros((M, N), dtype=h.dtype, device=h.device)).contiguous()
        rows = torch.where(idx < 0, idx + V, idx) if wrap else idx
        y.copy_(z * table[rows])
        return y, (z if store_z else None)

    def fused():
        z = torch.empty((M, N), dtype=h.dtype, device=h.device) if store_z else None
        zz = z if z is not None else y
        _launch_gemm(_out_forward_kernel, M, N, h.device, (
            h, weight, bias if bias is not None else h, table, idx, y, zz,
            M, N, K, V,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), table.stride(0), table.stride(1),
            y.stride(0), y.stride(1), zz.stride(0), zz.stride(1),
        ), {"HAS_BIAS": bias is not None, "STORE_Z": z is not None, "WRAP": wrap, "GROUP_M": 8,
            "PRECISION": _dot_precision(h)})
        return z

    def split():
        z = torch.nn.functional.linear(h, weight, bias)
        BM, BN = _ew_blocks(h)
        launchable(_scale_rows_kernel, h)[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            z, table, idx, y, M, N, V, z.stride(0), z.stride(1), table.stride(0), table.stride(1),
            y.stride(0), y.stride(1), WRAP=wrap, BM=BM, BN=BN, num_warps=4)
        return z if store_z else None

    key = (M, N, K, h.dtype, table.dtype, out_dtype, bias is not None, h.device)
    if impl is None:
        if traced(h):
            impl = _forward_impl_traced(key, h, weight, bias, table, out_dtype)
        elif h.is_cuda:
            impl = _forward_impl(key, fused, split)
        else:
            impl = "fused"
    z = fused() if impl == "fused" else split()
    return y, z


# plan_segment_sum's launch parameters per device type (benchmarks/profile_deepembed_grad.py sweeps
# them). impl "tiles": _tile_segment_sum_kernel over tiles of BT sorted tokens x BW columns, then
# _tile_fixup_kernel for the rows crossing tiles (BJ tile partials per step); "rows": the per-row
# walk, BT tokens per step, kept to compare.
SEGMENT_SUM_LAUNCH = {
    "cuda": {"impl": "tiles", "BT": 128, "BW": 64, "BJ": 16, "num_warps": 4},  # best of 11 on an H200
    "cpu": {"impl": "tiles", "BT": 4, "BW": 16, "BJ": 2, "num_warps": 1},
}


def plan_segment_sum(a: torch.Tensor, b: torch.Tensor | None, plan: torch.Tensor, out: torch.Tensor, mode: int,
                     r: int = 1, dest_uniq: bool = True, zero_tail: bool = False) -> torch.Tensor:
    """Row-sparse table gradient from a row plan (see the module docstring); returns ``out``.

    mode 0: out[dest(u)] = sum of a[t]; mode 1: of a[t] * b[t]; mode 2: of the flattened
    outer products a[t] (x) b[t] (r x r). dest(u) = uniq[u] (``dest_uniq``) or u. Rows no
    slot names are left alone, or zeroed (``zero_tail``, slot-indexed ``out`` of M rows).
    Deterministic: each row is summed in a fixed order, no atomics.
    """
    M = (plan.numel() - 2) // 4
    W = out.shape[1]
    if M == 0 or W == 0:
        return out
    bb = b if b is not None else a
    cfg = SEGMENT_SUM_LAUNCH["cuda" if out.is_cuda else "cpu"]
    BT, BW = cfg["BT"], cfg["BW"]
    args = (M, W, r, a.stride(0), a.stride(1), bb.stride(0), bb.stride(1), out.stride(0))
    flags = {"MODE": mode, "DEST_UNIQ": dest_uniq, "ZERO_TAIL": zero_tail, "BT": BT, "BW": BW}
    slabs = triton.cdiv(W, BW)
    if cfg["impl"] == "rows":
        launchable(_row_walk_segment_sum_kernel, out)[(M, slabs)](a, bb, plan, out, *args, **flags,
                                                                 num_warps=cfg["num_warps"])
        return out
    tiles = triton.cdiv(M, BT)
    part = torch.empty((tiles, 2, W), dtype=torch.float32, device=out.device)
    launchable(_tile_segment_sum_kernel, out)[(tiles, slabs)](a, bb, plan, out, part, *args, **flags,
                                                             num_warps=cfg["num_warps"])
    if tiles > 1:
        launchable(_tile_fixup_kernel, out)[(tiles, slabs)](
            plan, part, out, M, W, out.stride(0), DEST_UNIQ=dest_uniq, BT=BT, BW=BW, BJ=cfg["BJ"],
            num_warps=cfg["num_warps"])
    return out


def segment_sum_rows(vals: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[u] = sum of vals[t] over tokens t with idx[t] == u, in token order; other rows untouched.

    vals: (M, W) float, idx: (M,) int in range, out: (V, W), zeroed by the caller.
    """
    from ..runtime.plan import build_plan

    return plan_segment_sum(vals, None, build_plan(idx.reshape(-1).to(torch.int64)), out, 0)


def _table_grad(table: torch.Tensor, slots: bool) -> torch.Tensor:
    # a dense table gets eager's dense gradient (zeros off idx); a slot-indexed row buffer
    # (host tables) is written whole by the kernel (zeros past the distinct count)
    if slots:
        return torch.empty_like(table, memory_format=torch.contiguous_format)
    return torch.zeros_like(table, memory_format=torch.contiguous_format)


def out_scale_backward(grad: torch.Tensor, z: torch.Tensor, table: torch.Tensor, idx: torch.Tensor,
                       plan: torch.Tensor, need_gh: bool, need_table: bool, slots: bool = False, wrap: bool = False):
    """(gh, dtable): gh = dy * table[idx] in z's dtype; dtable row-sparse from the plan.

    ``slots``: table is a slot-indexed row buffer (row u holds the plan's uniq[u]); else the
    table itself, whose gradient is dense with zeros off idx.
    """
    M, N = grad.shape
    gh = dtable = None
    if need_gh:
        gh = torch.empty((M, N), dtype=z.dtype, device=grad.device)
        if M and N:
            BM, BN = _ew_blocks(grad)
            launchable(_gh_kernel, grad)[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
                grad, table, idx, gh, M, N, table.shape[0], grad.stride(0), grad.stride(1),
                table.stride(0), table.stride(1), WRAP=wrap, BM=BM, BN=BN, num_warps=4)
    if need_table:
        dtable = _table_grad(table, slots)
        plan_segment_sum(grad, z, plan, dtable, 1, dest_uniq=not slots, zero_tail=slots)
    return gh, dtable


def rowmix_forward(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, r: int, out_dtype: torch.dtype,
                   wrap: bool = False) -> torch.Tensor:
    """b[t] = a[t] @ table[idx[t]].view(r, r). a: (M, r)."""
    M = a.shape[0]
    b = torch.empty((M, r), dtype=out_dtype, device=a.device)
    if M == 0 or r == 0:
        return b.zero_()
    BM = 64 if a.is_cuda else 16
    _rowmix_forward_kernel[(triton.cdiv(M, BM),)](
        a, table, idx, b, M, r, table.shape[0], a.stride(0), a.stride(1), table.stride(0), table.stride(1),
        b.stride(0), b.stride(1), WRAP=wrap, BM=BM, BR=triton.next_power_of_2(r), num_warps=4,
    )
    return b


def rowmix_backward(grad: torch.Tensor, a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, r: int,
                    plan: torch.Tensor, need_a: bool, need_table: bool, slots: bool = False, wrap: bool = False):
    """(da, dtable) of b = rowmix(a, table, idx); dtable row-sparse from the plan (outer products
    a[t] (x) db[t] summed per row, computed in the kernel)."""
    M = a.shape[0]
    da = dtable = None
    if need_a:
        da = torch.empty((M, r), dtype=a.dtype, device=a.device)
        if M and r:
            BM = 64 if a.is_cuda else 16
            _rowmix_dx_kernel[(triton.cdiv(M, BM),)](
                grad, table, idx, da, M, r, table.shape[0], grad.stride(0), grad.stride(1),
                table.stride(0), table.stride(1), WRAP=wrap, BM=BM, BR=triton.next_power_of_2(r), num_warps=4,
            )
        else:
            da.zero_()
    if need_table:
        dtable = _table_grad(table, slots)
        plan_segment_sum(a, grad, plan, dtable, 2, r=r, dest_uniq=not slots, zero_tail=slots)
    return da, dtable


# ------------------------------------------------------------------ host-table rows

#: Host-row kernels' launch config on CUDA: few persistent programs, wide rows per step.
HOST_ROWS_CUDA = {"programs": 16, "BS": 8, "BW": 1024, "num_warps": 4}


def _host_rows_config(t: torch.Tensor, W: int) -> dict:
    cfg = dict(HOST_ROWS_CUDA) if t.is_cuda else {"programs": 3, "BS": 4, "BW": 16, "num_warps": 1}
    cfg["BW"] = min(cfg["BW"], triton.next_power_of_2(W))
    return cfg


def gather_rows_into(table: torch.Tensor, plan: torch.Tensor, rows: torch.Tensor, stats: torch.Tensor) -> None:
    """rows[:U] = table[uniq[:U]] (U and uniq read from the plan on the device); adds
    (U, U, U * row bytes) to the int64 ``stats`` counters. ``table`` may be pinned host memory."""
    M, W = rows.shape
    if M == 0 or W == 0:
        return
    cfg = _host_rows_config(rows, W)
    grid = (cfg["programs"],)  # fixed: the live slots are counted on the device
    _gather_rows_kernel[grid](
        table, plan, rows, stats, W, table.stride(0), table.stride(1), rows.stride(0),
        W * table.element_size(), PROGRAMS=grid[0], BS=cfg["BS"], BW=cfg["BW"], num_warps=cfg["num_warps"],
    )


def row_update(table: torch.Tensor, grad_rows: torch.Tensor, plan: torch.Tensor, *, lr: float, adam: bool,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               exp_avg: torch.Tensor | None = None, exp_avg_sq: torch.Tensor | None = None,
               step: torch.Tensor | None = None, stats: torch.Tensor | None = None) -> None:
    """In place: table[uniq[s]] -= SGD / SparseAdam update of grad_rows[s], for the plan's U slots.

    ``exp_avg`` / ``exp_avg_sq`` (float32, table-shaped) and ``step`` (1-element int64, read
    here; the caller increments it after) are the Adam state; U is added to ``stats[0]``.
    """
    import math

    M, W = grad_rows.shape
    if M == 0 or W == 0:
        return
    cfg = _host_rows_config(grad_rows, W)
    grid = (cfg["programs"],)  # fixed: the live slots are counted on the device
    b1, b2 = betas
    m = exp_avg if adam else table
    v = exp_avg_sq if adam else table
    if stats is None:
        stats = torch.zeros(1, dtype=torch.int64, device=grad_rows.device)
    _row_update_kernel[grid](
        table, grad_rows, plan, m, v, step if adam else plan, stats, W, table.stride(0), grad_rows.stride(0),
        m.stride(0) if adam else 0, float(lr), float(b1), float(b2), float(eps),
        math.log(b1) if b1 > 0 else float("-inf"), math.log(b2) if b2 > 0 else float("-inf"),
        ADAM=adam, PROGRAMS=grid[0], BS=cfg["BS"], BW=cfg["BW"], num_warps=cfg["num_warps"],
    )


# ------------------------------------------------------------------ hidden producer

@triton.jit
def _scale_tile(b_ptr, s2_ptr, s0_ptr, rows, offs_m, offs_n, M, N, R,
                stride_bm, stride_br, stride_s2r, stride_s2n,
                HAS_S0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                PRECISION: tl.constexpr):
    """(b @ s2 + s0)[rows, offs_n] in float32; r is padded to BR >= 16 for the dot."""
    offs_r = tl.arange(0, BR)
    bt = tl.load(b_ptr + rows[:, None] * stride_bm + offs_r[None, :] * stride_br,
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
    st = tl.load(s2_ptr + offs_r[:, None] * stride_s2r + offs_n[None, :] * stride_s2n,
                 mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    c = mma(bt, st, tl.zeros((BM, BN), dtype=tl.float32), PRECISION)
    if HAS_S0:
        c += tl.load(s0_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return c


@triton.jit
def _hidden_forward_kernel(
    x_ptr, w_ptr, b_ptr, s2_ptr, s0_ptr, k_ptr, u_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bm, stride_br, stride_s2r, stride_s2n,
    HAS_S0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    Mt = tl.cdiv(M, BM)
    Nt = tl.cdiv(N, BN)
    tile_m, tile_n = grouped_tile(tl.program_id(0), Mt, Nt, GROUP_M)
    offs_m = tile_m * BM + tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    acc = xwt_tile(x_ptr, w_ptr, w_ptr, rows, offs_n.to(tl.int64), offs_m, offs_n, M, N, K,
                   stride_xm, stride_xk, stride_wn, stride_wk, False, BM, BN, BK, PRECISION, EVEN_K)
    c = _scale_tile(b_ptr, s2_ptr, s0_ptr, rows, offs_m, offs_n, M, N, R,
                    stride_bm, stride_br, stride_s2r, stride_s2n, HAS_S0, BM, BN, BR, PRECISION)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    relu = tl.where((acc > 0) | (acc != acc), acc, 0.0)  # noqa: PLR0124  relu keeps NaN, as torch.relu does
    out = rows[:, None] * N + offs_n[None, :]
    tl.store(u_ptr + out, acc.to(u_ptr.dtype.element_ty), mask=inside)
    tl.store(k_ptr + out, (relu * relu * c).to(k_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _hidden_backward_kernel(
    dk_ptr, u_ptr, b_ptr, s2_ptr, s0_ptr, du_ptr, dc_ptr,
    M, N, R,
    stride_dkm, stride_dkn, stride_bm, stride_br, stride_s2r, stride_s2n,
    HAS_S0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = rows[:, None] * N + offs_n[None, :]
    u = tl.load(u_ptr + out, mask=inside, other=0.0).to(tl.float32)
    dk = tl.load(dk_ptr + rows[:, None] * stride_dkm + offs_n[None, :] * stride_dkn, mask=inside, other=0.0)
    dk = dk.to(tl.float32)
    c = _scale_tile(b_ptr, s2_ptr, s0_ptr, rows, offs_m, offs_n, M, N, R,
                    stride_bm, stride_br, stride_s2r, stride_s2n, HAS_S0, BM, BN, BR, PRECISION)
    relu = tl.where(u > 0, u, 0.0)
    tl.store(dc_ptr + out, (dk * relu * relu).to(dc_ptr.dtype.element_ty), mask=inside)
    tl.store(du_ptr + out, (dk * c * 2.0 * relu).to(du_ptr.dtype.element_ty), mask=inside)


def hidden_forward(x, weight, b, s2, s0):
    """(k, u): u = x W^T, k = relu(u)^2 * (b @ s2 + s0). x: (M, K), W: (N, K), b: (M, r), s2: (r, N)."""
    M, K = x.shape
    N, R = weight.shape[0], b.shape[1]
    k = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return k, u
    _launch_gemm(_hidden_forward_kernel, M, N, x.device, (
        x, weight, b, s2, s0 if s0 is not None else s2, k, u, M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), b.stride(0), b.stride(1),
        s2.stride(0), s2.stride(1),
    ), {"HAS_S0": s0 is not None, "BR": max(16, triton.next_power_of_2(R)), "GROUP_M": 8,
        "PRECISION": _dot_precision(x)})
    return k, u


def hidden_backward(grad, u, b, s2, s0):
    """(du, dc): du = dk * c * 2 relu(u) and dc = dk * relu(u)^2, in u's dtype, c recomputed."""
    M, N = u.shape
    R = b.shape[1]
    du = torch.empty_like(u)
    dc = torch.empty_like(u)
    if M and N:
        BM, BN = (64, 128) if u.is_cuda else (16, 16)
        _hidden_backward_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            grad, u, b, s2, s0 if s0 is not None else s2, du, dc, M, N, R,
            grad.stride(0), grad.stride(1), b.stride(0), b.stride(1), s2.stride(0), s2.stride(1),
            HAS_S0=s0 is not None, BM=BM, BN=BN, BR=max(16, triton.next_power_of_2(R)),
            PRECISION=_dot_precision(u), num_warps=4,
        )
    return du, dc
