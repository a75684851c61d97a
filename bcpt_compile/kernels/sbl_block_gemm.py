"""Block-sparse GEMMs for ``y = (x W^T + b) * R`` over BCAT tiles, forward and backward.

R = where(keep, s, 0) with keep = mask, or s > threshold (NaN kept, as relu keeps it).

* forward: ``bcat_cluster._tile_bits_kernel`` finds the active tiles (BCAT bits, count and
  a list) and zero-fills the inactive ones at full bandwidth; then ``_sddmm_forward_kernel``,
  persistent, walks the list: a K-loop GEMM per tile with the gate applied in the
  epilogue, and, when the gate will need a gradient, the product x W^T + b saved on those
  tiles. Past the density crossover ``_dense_forward_kernel`` does the same over wide
  tiles in grouped order, as a dense GEMM.
* backward, ``_sddmm_backward_kernel``: per active tile, G' = dy * R (kept in a scratch
  buffer in tile space) and, when s needs a gradient, ds = dy * (x W^T + b) on keep, from
  the saved product (or a recomputed SDDMM without it); it zero-fills ds's other tiles,
  and spare programs build the block lists of the two kernels below.
* ``_dx_kernel`` walks each row tile's active column tiles (dx = G' W),
  ``_dw_kernel`` each column tile's active row tiles (dW = G'^T x, db = colsum G').
In the backward, once the active count reaches the density crossover (a device-side
test), every tile counts as active and the same kernels run as dense GEMMs (their operands
loaded through tensor descriptors on Hopper, as the dense forward's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch.fx.experimental.symbolic_shapes import guard_or_false

from . import ensure_triton_allocator, launchable
from .bcat_cluster import (BCAT, compact_tile_lists, mark_active_tiles, new_block_lists, original_index, tile_word,
                           zero_fill_tile)
from .tile_gemm import dot_precision, grouped_tile, mma, xwt_tile


@triton.jit
def _gate_keep(s, m_ptrs, inside, threshold, HAS_MASK: tl.constexpr, KEEP_NAN: tl.constexpr):
    if HAS_MASK:
        keep = tl.load(m_ptrs, mask=inside, other=0) != 0
    elif KEEP_NAN:
        keep = (s > threshold) | (s != s)
    else:
        keep = s > threshold
    return keep & inside


@triton.jit
def _tile_is_active(state_ptr, tile_m, tile_n, n_words):
    word = tl.load(tile_word(state_ptr, tile_m, tile_n, n_words))
    return ((word >> (tile_n % 32)) & 1) != 0


@triton.jit
def _tile_is_computed(state_ptr, tile_m, tile_n, n_words, dense_min):
    """Active tile, or every tile once the active count reaches the density crossover."""
    return _tile_is_active(state_ptr, tile_m, tile_n, n_words) | (tl.load(state_ptr) >= dense_min)


@triton.jit
def _sddmm_forward_kernel(
    x_ptr, w_ptr, b_ptr, s_ptr, m_ptr, y_ptr, z_ptr, perm_ptr, col_perm_ptr, state_ptr, list_ptr,
    M, N, K, Mt, Nt, n_words, dense_min, threshold,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
    stride_mm, stride_mn, stride_ym, stride_yn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr,
    SAVE_Z: tl.constexpr, PROGRAMS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Persistent: PROGRAMS programs walk the list of active tiles (its length is the BCAT
    count, read on the device), so no program is spent on an inactive tile and the grid
    does not depend on the data. Past the density crossover it does nothing:
    ``_dense_forward_kernel``, launched after it, runs instead."""
    count = tl.load(state_ptr)
    for t in range(tl.program_id(0), tl.where(count >= dense_min, 0, count), PROGRAMS):
        tile = tl.load(list_ptr + t)
        tile_m = tile // Nt
        tile_n = tile % Nt
        offs_m = tile_m * BM + tl.arange(0, BM)
        offs_n = tile_n * BN + tl.arange(0, BN)
        _forward_tile(x_ptr, w_ptr, b_ptr, s_ptr, m_ptr, y_ptr, z_ptr, perm_ptr, col_perm_ptr, offs_m, offs_n,
                      M, N, K, threshold, stride_xm, stride_xk, stride_wn, stride_wk,
                      stride_sm, stride_sn, stride_mm, stride_mn, stride_ym, stride_yn, stride_zm, stride_zn,
                      HAS_BIAS, HAS_MASK, HAS_PERM, HAS_COL_PERM, SAVE_Z, BM, BN, BK, PRECISION, EVEN_K)


@triton.jit
def _dense_index(perm_ptr, offs, limit, HAS_PERM: tl.constexpr, INT64: tl.constexpr):
    """Tile-space offsets -> indices into the user's tensors; past the edge, index 0 (the
    values are never stored), so that only the contracted dim needs load masks."""
    safe = tl.where(offs < limit, offs, 0)
    if HAS_PERM:
        safe = tl.load(perm_ptr + safe)
    return safe.to(tl.int64) if INT64 else safe


@triton.jit
def _dense_forward_kernel(
    x_ptr, w_ptr, b_ptr, s_ptr, m_ptr, y_ptr, z_ptr, perm_ptr, col_perm_ptr, state_ptr,
    M, N, K, Mt, n_words, dense_min, threshold,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
    stride_mm, stride_mn, stride_ym, stride_yn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr,
    SAVE_Z: tl.constexpr, PROGRAMS: tl.constexpr, INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPAN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
):
    """Past the density crossover (else it returns at once): a persistent dense GEMM over
    output tiles of BM x (SPAN * BN), SPAN BCAT tiles side by side, in grouped order.

    Wide tiles are what Hopper's wgmma needs to approach cuBLAS: for 8192x8192x2048 bf16
    on the H200, pointer loads take 0.46-0.47 ms with 128x256 tiles and 8 warps, 0.51-0.63
    with 128x128, cuBLAS 0.37 (benchmarks/sweep_dense_gemm.py). Offsets are 32-bit unless
    a tensor passes 2**31 elements (INT64). Columns of inactive BCAT tiles are written as
    zeros, as the bits kernel wrote them.

    TMA (Hopper, no permutations, 16-byte aligned rows): x and W tiles arrive through
    device-side tensor descriptors, which zero-fill past the edges; 0.489 against 0.561 ms
    with pointer loads in benchmarks/sweep_dense_gemm.py (H200)."""
    if tl.load(state_ptr) < dense_min:
        return
    tl.static_assert(SPAN == 2, "the epilogue splits the wide tile in two")
    WIDE: tl.constexpr = SPAN * BN
    Nw = tl.cdiv(N, WIDE)
    if TMA:  # one descriptor pair per program, built before the tile loop
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[WIDE, BK])
    for t in range(tl.program_id(0), Mt * Nw, PROGRAMS):
        tile_m, tile_w = grouped_tile(t, Mt, Nw, GROUP_M)
        offs_m = tile_m * BM + tl.arange(0, BM)
        offs_n = tile_w * WIDE + tl.arange(0, WIDE)
        rows = _dense_index(perm_ptr, offs_m, M, HAS_PERM, INT64)
        cols = _dense_index(col_perm_ptr, offs_n, N, HAS_COL_PERM, INT64)
        acc = tl.zeros((BM, WIDE), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if TMA:
                a = x_desc.load([tile_m * BM, k * BK])
                b = w_desc.load([tile_w * WIDE, k * BK]).T
            else:
                offs_k = k * BK + tl.arange(0, BK)
                x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
                w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
                if EVEN_K:
                    a = tl.load(x_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    a = tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0)
                    b = tl.load(w_ptrs, mask=offs_k[:, None] < K, other=0.0)
            acc = mma(a, b, acc, PRECISION)
        # the epilogue in two BM x BN halves: a whole 128x256 one spills (tutorial 09's subtiling)
        left, right = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
        _dense_epilogue(left, b_ptr, s_ptr, m_ptr, y_ptr, z_ptr, col_perm_ptr, state_ptr, rows, offs_m,
                        tile_m, 2 * tile_w, M, N, n_words, threshold, stride_sm, stride_sn, stride_mm, stride_mn,
                        stride_ym, stride_yn, stride_zm, stride_zn, HAS_BIAS, HAS_MASK, HAS_COL_PERM, SAVE_Z,
                        INT64, BN)
        _dense_epilogue(right, b_ptr, s_ptr, m_ptr, y_ptr, z_ptr, col_perm_ptr, state_ptr, rows, offs_m,
                        tile_m, 2 * tile_w + 1, M, N, n_words, threshold, stride_sm, stride_sn, stride_mm,
                        stride_mn, stride_ym, stride_yn, stride_zm, stride_zn, HAS_BIAS, HAS_MASK, HAS_COL_PERM,
                        SAVE_Z, INT64, BN)


@triton.jit
def _dense_epilogue(acc, b_ptr, s_ptr, m_ptr, y_ptr, z_ptr, col_perm_ptr, state_ptr, rows, offs_m, tile_m, tile_n,
                    M, N, n_words, threshold, stride_sm, stride_sn, stride_mm, stride_mn,
                    stride_ym, stride_yn, stride_zm, stride_zn,
                    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COL_PERM: tl.constexpr,
                    SAVE_Z: tl.constexpr, INT64: tl.constexpr, BN: tl.constexpr):
    """Bias, saved product and gate on BCAT tile (tile_m, tile_n); zeros if it is inactive.

    Columns are indexed from the bare offsets (masked), not clamped ones: a clamp hides
    their contiguity, and uncoalesced epilogue stores made the kernel 6x slower (H200)."""
    offs_n = tile_n * BN + tl.arange(0, BN)
    cols = original_index(col_perm_ptr, offs_n, N, HAS_COL_PERM)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SAVE_Z:
        tl.store(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn,
                 acc.to(z_ptr.dtype.element_ty), mask=inside)
    s = tl.load(s_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=inside, other=0.0)
    keep = _gate_keep(s, m_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn,
                      inside, threshold, HAS_MASK, True)
    y = acc * tl.where(keep, s.to(tl.float32), 0.0)
    if not _tile_is_active(state_ptr, tile_m, tile_n, n_words):
        y = tl.zeros_like(y)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _forward_tile(x_ptr, w_ptr, b_ptr, s_ptr, m_ptr, y_ptr, z_ptr, perm_ptr, col_perm_ptr, offs_m, offs_n,
                  M, N, K, threshold, stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
                  stride_mm, stride_mn, stride_ym, stride_yn, stride_zm, stride_zn,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr,
                  HAS_COL_PERM: tl.constexpr, SAVE_Z: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """y (and z) on the tile offs_m x offs_n (tile space)."""
    rows = original_index(perm_ptr, offs_m, M, HAS_PERM)
    cols = original_index(col_perm_ptr, offs_n, N, HAS_COL_PERM)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    z = xwt_tile(x_ptr, w_ptr, b_ptr, rows, cols, offs_m, offs_n, M, N, K,
                 stride_xm, stride_xk, stride_wn, stride_wk, HAS_BIAS, BM, BN, BK, PRECISION, EVEN_K)
    if SAVE_Z:  # for the gate's gradient, rounded like the linear output eager saves
        tl.store(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn,
                 z.to(z_ptr.dtype.element_ty), mask=inside)
    s = tl.load(s_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=inside, other=0.0)
    keep = _gate_keep(s, m_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn,
                      inside, threshold, HAS_MASK, True)
    r = tl.where(keep, s.to(tl.float32), 0.0)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             (z * r).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _sddmm_backward_kernel(
    x_ptr, w_ptr, b_ptr, s_ptr, m_ptr, dy_ptr, z_ptr, g_ptr, ds_ptr, perm_ptr, col_perm_ptr, state_ptr,
    row_counts_ptr, row_cols_ptr, col_counts_ptr, col_rows_ptr,
    M, N, K, Mt, Nt, n_words, dense_min, threshold,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
    stride_mm, stride_mn, stride_dym, stride_dyn, stride_zm, stride_zn, stride_dsm, stride_dsn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr,
    NEED_DS: tl.constexpr, HAS_Z: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, CHUNK: tl.constexpr,
    TILES: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Programs past the Mt * Nt tiles build the dx and dW kernels' block lists (one launch
    fewer: the host, not the GPU, bounds a compiled step at 10 % density)."""
    pid = tl.program_id(0)
    if pid >= Mt * Nt:
        compact_tile_lists(pid - Mt * Nt, state_ptr, row_counts_ptr, row_cols_ptr, col_counts_ptr, col_rows_ptr,
                           Mt, Nt, n_words, TILES)
        return
    tile_m, tile_n = grouped_tile(pid, Mt, Nt, GROUP_M)
    offs_m = tile_m * BM + tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    rows = original_index(perm_ptr, offs_m, M, HAS_PERM)
    cols = original_index(col_perm_ptr, offs_n, N, HAS_COL_PERM)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    active = _tile_is_computed(state_ptr, tile_m, tile_n, n_words, dense_min)
    if active:
        s = tl.load(s_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=inside, other=0.0)
        m_ptrs = m_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=inside, other=0.0)
        dy = dy.to(tl.float32)
        keep = _gate_keep(s, m_ptrs, inside, threshold, HAS_MASK, True)
        g = dy * tl.where(keep, s.to(tl.float32), 0.0)
        # G' lives in tile space (row offs_m), contiguous (M, N)
        tl.store(g_ptr + offs_m[:, None] * N + offs_n[None, :], g.to(g_ptr.dtype.element_ty), mask=inside)
        if NEED_DS:
            ds_ptrs = ds_ptr + rows[:, None] * stride_dsm + cols[None, :] * stride_dsn
        if NEED_DS and HAS_Z:  # the forward saved the product
            z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=inside, other=0.0)
            strict = _gate_keep(s, m_ptrs, inside, threshold, HAS_MASK, False)
            tl.store(ds_ptrs, tl.where(strict, dy * z.to(tl.float32), 0.0).to(ds_ptr.dtype.element_ty), mask=inside)
        elif NEED_DS:  # recompute it: a second SDDMM over the active tiles
            z = xwt_tile(x_ptr, w_ptr, b_ptr, rows, cols, offs_m, offs_n, M, N, K,
                          stride_xm, stride_xk, stride_wn, stride_wk, HAS_BIAS, BM, BN, BK, PRECISION, EVEN_K)
            strict = _gate_keep(s, m_ptrs, inside, threshold, HAS_MASK, False)
            tl.store(ds_ptrs, tl.where(strict, dy * z, 0.0).to(ds_ptr.dtype.element_ty), mask=inside)
    elif NEED_DS:
        zero_fill_tile(ds_ptr, perm_ptr, col_perm_ptr, tile_m, tile_n, M, N, stride_dsm, stride_dsn,
                       HAS_PERM, HAS_COL_PERM, BM, BN, CHUNK)


@triton.jit
def _dx_kernel(
    g_ptr, w_ptr, dx_ptr, perm_ptr, col_perm_ptr, counts_ptr, cols_ptr, state_ptr,
    M, N, K, Nt, dense_min,
    stride_wn, stride_wk, stride_dxm, stride_dxk,
    HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    BC: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
):
    """EVEN (every dim a multiple of its tile): loads without masks, which pipeline best.

    Axis 0 of the grid is the K block, so concurrent programs share a few row tiles of G'
    (read from HBM once) and all of W (which stays in L2). Past the density crossover the
    loop walks every column BC at a time with no list: 64-deep steps keep three pipeline
    stages beside the 128x256 output tile, and no indirect load stalls the pipeline
    (full density on the H200: 0.47 ms, was 0.59; cuBLAS 0.38). There, with TMA (as in
    ``_dense_forward_kernel``: Hopper, no permutations, aligned rows), G' and W arrive
    through tensor descriptors, which zero-fill past the edges."""
    tile_m = tl.program_id(1)
    pid_k = tl.program_id(0)
    offs_m = tile_m * BM + tl.arange(0, BM)
    offs_k = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    if tl.load(state_ptr) >= dense_min:  # every column, no list: no indirect load in the loop
        if TMA:  # G' is contiguous (M, N), in tile space = user indexing (no permutations)
            g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BC])
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BC, BK])
            for j in range(0, tl.cdiv(N, BC)):
                acc = mma(g_desc.load([tile_m * BM, j * BC]), w_desc.load([j * BC, pid_k * BK]), acc, PRECISION)
        else:
            for j in range(0, tl.cdiv(N, BC)):
                acc = _dx_step(acc, g_ptr, w_ptr, col_perm_ptr, offs_m, j * BC + tl.arange(0, BC), offs_k, M, N, K,
                               stride_wn, stride_wk, HAS_COL_PERM, PRECISION, EVEN)
    else:
        for i in range(0, tl.load(counts_ptr + tile_m)):  # whole blocks: fewer indirect loads
            offs_n = tl.load(cols_ptr + tile_m * Nt + i) * BN + tl.arange(0, BN)
            acc = _dx_step(acc, g_ptr, w_ptr, col_perm_ptr, offs_m, offs_n, offs_k, M, N, K,
                           stride_wn, stride_wk, HAS_COL_PERM, PRECISION, EVEN)
    rows = original_index(perm_ptr, offs_m, M, HAS_PERM)
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _dx_step(acc, g_ptr, w_ptr, col_perm_ptr, offs_m, offs_n, offs_k, M, N, K, stride_wn, stride_wk,
             HAS_COL_PERM: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr):
    w_rows = original_index(col_perm_ptr, offs_n, N, HAS_COL_PERM)
    g_ptrs = g_ptr + offs_m[:, None] * N + offs_n[None, :]
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
    if EVEN:
        g = tl.load(g_ptrs)
        w = tl.load(w_ptrs)
    else:
        g = tl.load(g_ptrs, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
    return mma(g, w, acc, PRECISION)


@triton.jit
def _dw_step(acc, db, g_ptr, x_ptr, perm_ptr, offs_m, offs_n, offs_k, M, N, K, stride_xm, stride_xk,
             HAS_PERM: tl.constexpr, NEED_DB: tl.constexpr, PRECISION: tl.constexpr, EVEN: tl.constexpr):
    rows = original_index(perm_ptr, offs_m, M, HAS_PERM)
    g_ptrs = g_ptr + offs_m[:, None] * N + offs_n[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    if EVEN:
        g = tl.load(g_ptrs)
        x = tl.load(x_ptrs)
    else:
        g = tl.load(g_ptrs, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
    acc = mma(tl.trans(g), x, acc, PRECISION)
    if NEED_DB:
        db += tl.sum(g.to(tl.float32), axis=0)
    return acc, db


@triton.jit
def _dw_kernel(
    g_ptr, x_ptr, dw_ptr, db_ptr, perm_ptr, col_perm_ptr, counts_ptr, rows_ptr, state_ptr,
    M, N, K, Mt, dense_min,
    stride_xm, stride_xk, stride_dwn, stride_dwk,
    HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr, NEED_DB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr,
    EVEN: tl.constexpr, TMA: tl.constexpr,
):
    """EVEN (every dim a multiple of its tile): loads without masks, which pipeline best.
    K blocks on grid axis 0 and BC-deep contraction steps, and TMA past the density
    crossover, as in ``_dx_kernel``."""
    tile_n = tl.program_id(1)
    pid_k = tl.program_id(0)
    offs_n = tile_n * BN + tl.arange(0, BN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    db = tl.zeros((BN,), dtype=tl.float32)
    if tl.load(state_ptr) >= dense_min:  # every row, no list: no indirect load in the loop
        if TMA:  # G' is contiguous (M, N), in tile space = user indexing (no permutations)
            g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[N, 1], block_shape=[BC, BN])
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BC, BK])
            for j in range(0, tl.cdiv(M, BC)):
                g = g_desc.load([j * BC, tile_n * BN])
                acc = mma(g.T, x_desc.load([j * BC, pid_k * BK]), acc, PRECISION)
                if NEED_DB:  # rows past M are zero-filled
                    db += tl.sum(g.to(tl.float32), axis=0)
        else:
            for j in range(0, tl.cdiv(M, BC)):
                acc, db = _dw_step(acc, db, g_ptr, x_ptr, perm_ptr, j * BC + tl.arange(0, BC), offs_n, offs_k,
                                   M, N, K, stride_xm, stride_xk, HAS_PERM, NEED_DB, PRECISION, EVEN)
    else:
        for i in range(0, tl.load(counts_ptr + tile_n)):  # whole blocks: fewer indirect loads
            offs_m = tl.load(rows_ptr + tile_n * Mt + i) * BM + tl.arange(0, BM)
            acc, db = _dw_step(acc, db, g_ptr, x_ptr, perm_ptr, offs_m, offs_n, offs_k, M, N, K,
                               stride_xm, stride_xk, HAS_PERM, NEED_DB, PRECISION, EVEN)
    cols = original_index(col_perm_ptr, offs_n, N, HAS_COL_PERM)
    tl.store(dw_ptr + cols[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
             acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if NEED_DB:
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=(offs_n < N) & (pid_k == 0))


# Unused pointer arguments are passed as None (a constexpr to Triton), never as a
# placeholder tensor: Inductor's mutation analysis follows every pointer that reaches a
# store address through a helper call, and would copy (and write back) the placeholder.


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output (and G') comes from here: the kernels must write all of it (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


#: Per-kernel launch settings on CUDA, keyed by kernel family ("sddmm" the forward GEMM
#: over the active-tile list, "dense" the forward past the density crossover,
#: "sddmm_backward", "dx", "dW"); benchmarks/sweep_sbl_gemm.py, sweep_dense_gemm.py and
#: bench_sbl.py sweep them. The list walk's BK 64 / 4 warps / 3 stages fits two programs
#: per SM, which hides the loads best on 128x128 tiles (1.25x over BK 128 at 10 %); the
#: dense forward, dx and dW run 128x256 output tiles with 8 warps (two warpgroups) and
#: 64-deep contraction steps (BK, BC), the shape that takes Triton within 4-12 % of cuBLAS.
CUDA_CONFIGS = {
    "sddmm": {"BK": 64, "num_warps": 4, "num_stages": 3},
    "dense": {"BK": 64, "num_warps": 8, "num_stages": 3},
    "sddmm_backward": {"BK": 128, "num_warps": 8, "num_stages": 3},
    "dx": {"BK": 256, "BC": 64, "num_warps": 8, "num_stages": 3},
    "dw": {"BK": 256, "BC": 64, "num_warps": 8, "num_stages": 3},
}

#: Output tile width of the dense forward, in BCAT tiles.
DENSE_SPAN = 2


def _launch_config(kind: str, block: int, device: torch.device) -> dict:
    if device.type != "cuda":  # the interpreter: small steps, so the tests' small blocks still loop
        cfg = {"BK": 16, "num_warps": 4, "num_stages": 1}
        if kind in ("dx", "dw"):
            cfg["BC"] = min(16, block)
        return cfg
    cfg = dict(CUDA_CONFIGS[kind])
    if "BC" in cfg:
        cfg["BC"] = min(cfg["BC"], block)
    if block < 128:
        cfg["num_warps"] = min(cfg["num_warps"], 4)
    return cfg


def _persistent_programs(device: torch.device) -> int:
    """Two resident programs per SM for the persistent forward GEMM (a few on CPU)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def sddmm_forward(x, weight, bias, gate, mask, threshold: float, bcat: BCAT, out_dtype,
                  save_product: bool = False):
    """(y, z): y = (x W^T + b) * R on the tiles where R has a nonzero, zeros elsewhere, and
    with ``save_product`` z = x W^T + b on the active tiles (else None) for the backward.

    x: (M, K), W: (N, K), gate: (M, N). Three launches: the bits kernel sets ``bcat``'s
    bits (zeroed by the caller; kept for the backward), lists the active tiles and
    zero-fills the others at full bandwidth; then a persistent GEMM kernel walks the list,
    or, past the density crossover, the dense GEMM kernel the grid of wide tiles.
    """
    M, K = x.shape
    N = weight.shape[0]
    y = _empty((M, N), out_dtype, x.device)
    z = _empty((M, N), torch.promote_types(x.dtype, weight.dtype), x.device) if save_product else None
    if M == 0 or N == 0:
        return y, z
    BM, BN = bcat.block_m, bcat.block_n
    Mt, Nt = bcat.grid
    tiles = torch.empty(Mt * Nt, dtype=torch.int32, device=x.device)
    mark_active_tiles(bcat, gate, mask, threshold, zero_fill=y, tile_list=tiles)
    m = mask if mask is not None else gate
    args = (x, weight, bias, gate, m, y, z, bcat.perm, bcat.col_perm, bcat.state)
    strides = (x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), gate.stride(0), gate.stride(1),
               m.stride(0), m.stride(1), y.stride(0), y.stride(1), *(z.stride() if z is not None else (0, 0)))
    flags = dict(HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_PERM=bcat.perm is not None,
                 HAS_COL_PERM=bcat.col_perm is not None, SAVE_Z=z is not None, BM=BM, BN=BN,
                 PRECISION=dot_precision(x))
    # Both run; the active count (on the device) makes one of them return at once.
    cfg = _launch_config("sddmm", BM, x.device)
    programs = min(_persistent_programs(x.device), Mt * Nt)
    launchable(_sddmm_forward_kernel, x)[(programs,)](
        *args, tiles, M, N, K, Mt, Nt, bcat.n_words, bcat.dense_min, float(threshold), *strides,
        PROGRAMS=programs, EVEN_K=K % cfg["BK"] == 0, **flags, **cfg,
    )
    cfg = _launch_config("dense", BM, x.device)
    wide_tiles = Mt * triton.cdiv(N, DENSE_SPAN * BN)
    programs = min(_persistent_programs(x.device) // (2 if x.is_cuda else 1), wide_tiles)
    launchable(_dense_forward_kernel, x)[(programs,)](
        *args, M, N, K, Mt, bcat.n_words, bcat.dense_min, float(threshold), *strides,
        PROGRAMS=programs, INT64=max(x.numel(), weight.numel(), gate.numel()) >= 2**31,
        SPAN=DENSE_SPAN, GROUP_M=8, EVEN_K=K % cfg["BK"] == 0, TMA=_dense_tma((x, weight), bcat), **flags, **cfg,
    )
    return y, z


#: TMA operand loads in the dense forward and the backward's dense dx / dW loops: "auto" on
#: Hopper and newer; True also under the interpreter (tests); False never.
DENSE_TMA = "auto"


def _dense_tma(tensors: tuple[torch.Tensor, ...], bcat: BCAT) -> bool:
    """Whether a dense loop may load ``tensors`` through tensor descriptors: 16-bit operands
    of one dtype (a 64-deep step is one 128-byte swizzle row), unit inner strides, 16-byte
    aligned row strides and offsets (a symbolic size is guarded on; an unbacked one means
    no), no row or column permutation (G' is then in the user's indexing)."""
    if DENSE_TMA is False or bcat.perm is not None or bcat.col_perm is not None:
        return False
    first = tensors[0]
    if first.is_cuda:
        if DENSE_TMA == "auto" and torch.cuda.get_device_capability(first.device) < (9, 0):
            return False
    elif DENSE_TMA is not True:
        return False
    if first.dtype not in (torch.bfloat16, torch.float16) or any(t.dtype != first.dtype for t in tensors):
        return False
    size = first.element_size()
    aligned = all(guard_or_false(t.stride(1) == 1) and guard_or_false((t.stride(0) * size) % 16 == 0)
                  and guard_or_false((t.storage_offset() * size) % 16 == 0) for t in tensors)
    if aligned:
        ensure_triton_allocator()
    return aligned


def sddmm_backward(grad, x, weight, bias, gate, mask, threshold: float, bcat: BCAT,
                   need_dx: bool, need_dw: bool, need_db: bool, need_ds: bool, product=None):
    """(dx, dW, db, ds) of y = (x W^T + b) * R, each None when not needed. ``product``: the
    forward's saved z (else the kernel recomputes it where ds needs it)."""
    M, K = x.shape
    N = weight.shape[0]
    BM, BN = bcat.block_m, bcat.block_n
    Mt, Nt = bcat.grid
    cfg = _launch_config("sddmm_backward", BM, x.device)
    prec = dot_precision(x)
    has_perm, has_col_perm = bcat.perm is not None, bcat.col_perm is not None
    perm, col_perm = bcat.perm, bcat.col_perm
    m = mask if mask is not None else gate
    g = _empty((M, N), x.dtype, x.device)  # G' = dy * R, tile space
    ds = _empty(gate.shape, gate.dtype, x.device) if need_ds else None  # the kernel zero-fills skipped tiles
    row_counts = row_cols = col_counts = col_rows = None
    if M and N:
        bcat.lists = row_counts, row_cols, col_counts, col_rows = new_block_lists(Mt, Nt, x.device)
        launchable(_sddmm_backward_kernel, x)[(Mt * Nt + Mt + Nt,)](
            x, weight, bias, gate, m, grad, product, g, ds, perm, col_perm, bcat.state,
            row_counts, row_cols, col_counts, col_rows,
            M, N, K, Mt, Nt, bcat.n_words, bcat.dense_min, float(threshold),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), gate.stride(0), gate.stride(1),
            m.stride(0), m.stride(1), grad.stride(0), grad.stride(1),
            *(product.stride() if product is not None else (0, 0)), *(ds.stride() if ds is not None else (0, 0)),
            HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_PERM=has_perm,
            HAS_COL_PERM=has_col_perm, NEED_DS=need_ds, HAS_Z=product is not None,
            BM=BM, BN=BN, GROUP_M=8, CHUNK=min(32, BM), TILES=triton.next_power_of_2(max(Mt, Nt)), PRECISION=prec,
            EVEN_K=K % cfg["BK"] == 0, **cfg,
        )
    dx = dw = db = None
    if need_dx:
        dx = _empty(x.shape, x.dtype, x.device)
        if M and K:
            cfg = _launch_config("dx", BM, x.device)
            launchable(_dx_kernel, x)[(triton.cdiv(K, cfg["BK"]), Mt)](
                g, weight, dx, perm, col_perm, row_counts, row_cols, bcat.state,
                M, N, K, Nt, bcat.dense_min, weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
                HAS_PERM=has_perm, HAS_COL_PERM=has_col_perm, BM=BM, BN=BN, PRECISION=prec,
                EVEN=(M % BM == 0) and (N % BN == 0) and (K % cfg["BK"] == 0), TMA=_dense_tma((g, weight), bcat),
                **cfg,
            )
    if need_dw or need_db:
        dw = _empty(weight.shape, weight.dtype, x.device)
        db = _empty((N,), bias.dtype if bias is not None else x.dtype, x.device) if need_db else None
        if N and K:
            cfg = _launch_config("dw", BM, x.device)
            launchable(_dw_kernel, x)[(triton.cdiv(K, cfg["BK"]), Nt)](
                g, x, dw, db, perm, col_perm, col_counts, col_rows, bcat.state,
                M, N, K, Mt, bcat.dense_min, x.stride(0), x.stride(1), dw.stride(0), dw.stride(1),
                HAS_PERM=has_perm, HAS_COL_PERM=has_col_perm, NEED_DB=need_db, BM=BM, BN=BN, PRECISION=prec,
                EVEN=(M % BM == 0) and (N % BN == 0) and (K % cfg["BK"] == 0), TMA=_dense_tma((g, x), bcat),
                **cfg,
            )
        elif db is not None:
            db.zero_()
        if not need_dw:
            dw = None
    return dx, dw, db, ds
