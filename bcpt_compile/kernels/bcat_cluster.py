"""BCAT clustering: R's support -> active tiles, on the device and without host syncs.

1. ``_tile_bits_kernel``: one program per tile reads the gate until it meets a nonzero
   and then sets the tile's bit in int32 words with atomic OR (several programs own
   bits of one word) and counts it; inactive tiles are read whole, active ones mostly
   only in their first rows.
2. With ``reorder`` (the online defragmentation), features and tokens are permuted first
   so that nonzeros gather into fewer tiles: columns are sorted by a min-hash of the rows
   that use them (``_column_keys_kernel``: co-used and dead features end up adjacent),
   then rows by their first active permuted column and their permuted tile bits (a
   stable lexicographic sort). Two passes over the gate instead of one.
   ``_row_tile_bits_kernel`` then sets per-row bits of permuted column tiles and
   ``_tile_bits_from_rows_kernel`` ORs them over each permuted row tile.
3. ``compact_tile_lists`` (backward only; the SBL backward runs it in spare programs of
   its first kernel) lists each row tile's active column tiles and each column tile's
   active row tiles, active first, with counts: the block lists the sparse dx and dW
   kernels walk. The forward needs only the bits.
Nothing leaves the device and every grid is sized by shapes alone, so the ops are
CUDA-graph capturable; everything is deterministic, so a recomputation (backward,
activation checkpointing) sees the same blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import launchable, tile_state_size
from .tile_gemm import grouped_tile


_NO_KEY_INT = 2**31 - 1
_NO_KEY = tl.constexpr(_NO_KEY_INT)  # 'no active column/row yet' for atomic min


@triton.jit
def original_index(perm_ptr, offs, limit, HAS_PERM: tl.constexpr):
    """Tile-space offsets -> row (or column) indices of the user's tensors."""
    if HAS_PERM:
        return tl.load(perm_ptr + offs, mask=offs < limit, other=0).to(tl.int64)
    return offs.to(tl.int64)


@triton.jit
def tile_word(state_ptr, tile_m, tile_n, n_words):
    """Pointer to the int32 word holding tile (tile_m, tile_n)'s bit in a BCAT state
    (the active count, then the bits row by row; one buffer, so no views reach the kernels)."""
    return state_ptr + 1 + tile_m * n_words + tile_n // 32


@triton.jit
def _load_keep(s_ptr, m_ptr, rows, cols, M, N, threshold,
               stride_sm, stride_sn, stride_mm, stride_mn, HAS_MASK: tl.constexpr):
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    return _load_keep_inside(s_ptr, m_ptr, rows, cols, inside, threshold,
                             stride_sm, stride_sn, stride_mm, stride_mn, HAS_MASK)


@triton.jit
def _load_keep_inside(s_ptr, m_ptr, rows, cols, inside, threshold,
                      stride_sm, stride_sn, stride_mm, stride_mn, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        m = tl.load(m_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn, mask=inside, other=0)
        keep = m != 0
    else:
        s = tl.load(s_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=inside, other=0.0)
        s = s.to(tl.float32)
        keep = (s > threshold) | (s != s)  # NaN stays NaN through relu: keep it visible
    return keep & inside


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _row_tile_bits_kernel(
    s_ptr, m_ptr, bits_ptr, inv_col_ptr, row_key_ptr,
    M, N, n_words, threshold,
    stride_sm, stride_sn, stride_mm, stride_mn,
    HAS_MASK: tl.constexpr, HAS_COL_PERM: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    keep = _load_keep(s_ptr, m_ptr, rows, cols, M, N, threshold,
                      stride_sm, stride_sn, stride_mm, stride_mn, HAS_MASK)
    if HAS_COL_PERM:
        # columns land in permuted tiles: OR their bits word by word
        slot = tl.load(inv_col_ptr + cols, mask=cols < N, other=0)
        tile = slot // BN
        first = tl.min(tl.where(keep, slot[None, :], _NO_KEY), axis=1)
        tl.atomic_min(row_key_ptr + rows, first, mask=(rows < M) & (first != _NO_KEY))
        for w in range(0, n_words):
            bits = tl.where(keep & ((tile // 32) == w)[None, :], (1 << (tile % 32))[None, :], 0)
            word = tl.reduce(bits, 1, _bitwise_or)
            tl.atomic_or(bits_ptr + rows * n_words + w, word, mask=(rows < M) & (word != 0))
    else:
        tile_n = tl.program_id(1)
        row_any = tl.max(keep.to(tl.int32), axis=1)
        bit = row_any << (tile_n % 32)
        tl.atomic_or(bits_ptr + rows * n_words + tile_n // 32, bit, mask=(rows < M) & (row_any != 0))


@triton.jit
def _column_keys_kernel(
    s_ptr, m_ptr, col_key_ptr, M, N, threshold,
    stride_sm, stride_sn, stride_mm, stride_mn,
    HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
):
    """Min-hash of each column's active rows: columns used by the same rows share keys."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    keep = _load_keep(s_ptr, m_ptr, rows, cols, M, N, threshold,
                      stride_sm, stride_sn, stride_mm, stride_mn, HAS_MASK)
    row_hash = ((rows.to(tl.int64) * 2654435761) % 2147483647).to(tl.int32)
    key = tl.min(tl.where(keep, row_hash[:, None], _NO_KEY), axis=0)
    tl.atomic_min(col_key_ptr + cols, key, mask=(cols < N) & (key != _NO_KEY))


_ROWS = 32


def row_tile_bits(gate: torch.Tensor, mask: Optional[torch.Tensor], threshold: float, block_n: int,
                  inv_col_perm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: int32 words with bit c set iff the row has a nonzero in column tile c, and
    (with ``inv_col_perm``, tiles of permuted columns) the row's first active permuted column."""
    M, N = gate.shape
    n_words = triton.cdiv(triton.cdiv(N, block_n), 32)
    bits = torch.zeros((M, n_words), dtype=torch.int32, device=gate.device)
    row_key = torch.full((M,), _NO_KEY_INT, dtype=torch.int32, device=gate.device)
    if M == 0 or N == 0:
        return bits, row_key
    src = mask if mask is not None else gate
    launchable(_row_tile_bits_kernel, gate)[(triton.cdiv(M, _ROWS), triton.cdiv(N, block_n))](
        gate, src, bits, inv_col_perm, row_key,
        M, N, n_words, float(threshold),
        gate.stride(0), gate.stride(1), src.stride(0), src.stride(1),
        HAS_MASK=mask is not None, HAS_COL_PERM=inv_col_perm is not None, ROWS=_ROWS, BN=block_n,
    )
    return bits, row_key


def column_order(gate: torch.Tensor, mask: Optional[torch.Tensor], threshold: float, block_n: int) -> torch.Tensor:
    """A stable order of columns (features) by the min-hash of the rows that use them."""
    M, N = gate.shape
    key = torch.full((N,), _NO_KEY_INT, dtype=torch.int32, device=gate.device)
    if M and N:
        src = mask if mask is not None else gate
        launchable(_column_keys_kernel, gate)[(triton.cdiv(M, _ROWS), triton.cdiv(N, block_n))](
            gate, src, key, M, N, float(threshold),
            gate.stride(0), gate.stride(1), src.stride(0), src.stride(1),
            HAS_MASK=mask is not None, ROWS=_ROWS, BN=block_n,
        )
    return torch.sort(key, stable=True).indices


@triton.jit
def _popcount(x):
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def claim_tile(s_ptr, m_ptr, state_ptr, list_ptr, perm_ptr, col_perm_ptr, tile_m, tile_n, Nt, M, N, n_words,
               threshold, stride_sm, stride_sn, stride_mm, stride_mn,
               HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr, LIST: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr):
    """Is tile (tile_m, tile_n) of R active? If so, set its bit and count it, and with LIST
    append its id (tile_m * Nt + tile_n) to the list at the slot the count hands out.

    Reads CHUNK rows at a time and stops at the first nonzero: an active tile usually
    costs one chunk, an inactive one a full read.
    """
    offs_n = tile_n * BN + tl.arange(0, BN)
    cols = original_index(col_perm_ptr, offs_n, N, HAS_COL_PERM)
    found = 0
    i = 0
    while (i < BM) & (found == 0):
        offs_m = tile_m * BM + i + tl.arange(0, CHUNK)
        rows = original_index(perm_ptr, offs_m, M, HAS_PERM)
        inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        keep = _load_keep_inside(s_ptr, m_ptr, rows, cols, inside, threshold,
                                 stride_sm, stride_sn, stride_mm, stride_mn, HAS_MASK)
        found = tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0)
        i += CHUNK
    if found != 0:
        tl.atomic_or(tile_word(state_ptr, tile_m, tile_n, n_words), 1 << (tile_n % 32))
        slot = tl.atomic_add(state_ptr, 1)
        if LIST:
            tl.store(list_ptr + slot, tile_m * Nt + tile_n)
    return found != 0


@triton.jit
def zero_fill_tile(y_ptr, perm_ptr, col_perm_ptr, tile_m, tile_n, M, N, stride_ym, stride_yn,
                   HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr):
    """Write zeros to tile (tile_m, tile_n) of y, CHUNK rows at a time."""
    offs_n = tile_n * BN + tl.arange(0, BN)
    cols = original_index(col_perm_ptr, offs_n, N, HAS_COL_PERM)
    for j in range(0, BM, CHUNK):
        offs_m = tile_m * BM + j + tl.arange(0, CHUNK)
        rows = original_index(perm_ptr, offs_m, M, HAS_PERM)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                 tl.zeros((CHUNK, BN), dtype=y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _tile_bits_kernel(
    s_ptr, m_ptr, y_ptr, state_ptr, list_ptr, perm_ptr, col_perm_ptr,
    M, N, Mt, Nt, n_words, threshold,
    stride_sm, stride_sn, stride_mm, stride_mn, stride_ym, stride_yn,
    HAS_MASK: tl.constexpr, HAS_PERM: tl.constexpr, HAS_COL_PERM: tl.constexpr, ZERO_FILL: tl.constexpr,
    LIST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program per tile. With ZERO_FILL, an inactive tile's output y is written as
    zeros here, by this light, high-occupancy kernel, so that the GEMM kernel after it
    touches only active tiles: those in the list (LIST).

    Programs visit the tiles in GEMM-friendly grouped order (columns within groups of
    GROUP_M row tiles), so the list comes out in roughly that order (appends race only
    between neighbours), and the persistent GEMM that walks it finds the x and W rows of
    concurrent tiles in L2: 1.2x at full density on the H100 (benchmarks/sweep_sbl_gemm.py).
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0), Mt, Nt, GROUP_M)
    active = claim_tile(s_ptr, m_ptr, state_ptr, list_ptr, perm_ptr, col_perm_ptr, tile_m, tile_n, Nt,
                        M, N, n_words, threshold, stride_sm, stride_sn, stride_mm, stride_mn,
                        HAS_MASK, HAS_PERM, HAS_COL_PERM, LIST, BM, BN, CHUNK)
    if ZERO_FILL:
        if not active:
            zero_fill_tile(y_ptr, perm_ptr, col_perm_ptr, tile_m, tile_n, M, N, stride_ym, stride_yn,
                           HAS_PERM, HAS_COL_PERM, BM, BN, CHUNK)


def mark_active_tiles(bcat: "BCAT", gate: torch.Tensor, mask: Optional[torch.Tensor], threshold: float,
                      zero_fill: Optional[torch.Tensor] = None, tile_list: Optional[torch.Tensor] = None) -> None:
    """Set ``bcat``'s tile bits and count from the gate (in its tile space); optionally write
    zeros into ``zero_fill`` (same shape as gate) on the inactive tiles and the active tiles'
    ids into ``tile_list`` (int32, Mt * Nt; the first ``count`` entries, in no fixed order)."""
    M, N = gate.shape
    if M == 0 or N == 0:
        return
    Mt, Nt = bcat.grid
    src = mask if mask is not None else gate
    launchable(_tile_bits_kernel, gate)[(Mt * Nt,)](
        gate, src, zero_fill, bcat.state, tile_list, bcat.perm, bcat.col_perm,
        M, N, Mt, Nt, bcat.n_words, float(threshold),
        gate.stride(0), gate.stride(1), src.stride(0), src.stride(1), *(zero_fill.stride() if zero_fill is not None else (0, 0)),
        HAS_MASK=mask is not None, HAS_PERM=bcat.perm is not None, HAS_COL_PERM=bcat.col_perm is not None,
        ZERO_FILL=zero_fill is not None, LIST=tile_list is not None, BM=bcat.block_m, BN=bcat.block_n, CHUNK=min(32, bcat.block_m),
        GROUP_M=8, num_warps=4,
    )


@triton.jit
def _tile_bits_from_rows_kernel(
    row_bits_ptr, perm_ptr, state_ptr, M, n_words,
    BM: tl.constexpr, WORDS: tl.constexpr,
):
    """OR the (permuted) rows' bits over each row tile."""
    tile_m = tl.program_id(0)
    offs = tile_m * BM + tl.arange(0, BM)
    rows = tl.load(perm_ptr + offs, mask=offs < M, other=0)
    w = tl.arange(0, WORDS)
    bits = tl.load(row_bits_ptr + rows[:, None] * n_words + w[None, :],
                   mask=(offs[:, None] < M) & (w[None, :] < n_words), other=0)
    words = tl.reduce(bits, 0, _bitwise_or)
    tl.store(tile_word(state_ptr, tile_m, 0, n_words) + w, words, mask=w < n_words)
    tl.atomic_add(state_ptr, tl.sum(_popcount(words), axis=0))


@triton.jit
def compact_tile_lists(p, state_ptr, row_counts_ptr, row_cols_ptr, col_counts_ptr, col_rows_ptr,
                       Mt, Nt, n_words, TILES: tl.constexpr):
    """p < Mt lists row tile p's column tiles, p >= Mt column tile p - Mt's row tiles:
    active ones first in ascending order, then the inactive ones (the dense loop walks all).
    A helper, so the SBL backward can run it in spare programs instead of a launch."""
    t = tl.arange(0, TILES)
    if p < Mt:
        n_other = Nt
        word = tl.load(tile_word(state_ptr, p, t, n_words), mask=t < Nt, other=0)
        bit = t % 32
        out_ptr = row_cols_ptr + p * Nt
        count_ptr = row_counts_ptr + p
    else:
        c = p - Mt
        n_other = Mt
        word = tl.load(tile_word(state_ptr, t, c, n_words), mask=t < Mt, other=0)
        bit = t * 0 + c % 32
        out_ptr = col_rows_ptr + c * Mt
        count_ptr = col_counts_ptr + c
    valid = t < n_other
    active = (((word >> bit) & 1) != 0) & valid
    inactive = (~active) & valid
    n_active = tl.sum(active.to(tl.int32), axis=0)
    pos = tl.where(active, tl.cumsum(active.to(tl.int32), 0) - 1,
                   n_active + tl.cumsum(inactive.to(tl.int32), 0) - 1)
    tl.store(out_ptr + pos, t, mask=valid)
    tl.store(count_ptr, n_active)


@triton.jit
def _compact_kernel(
    state_ptr, row_counts_ptr, row_cols_ptr, col_counts_ptr, col_rows_ptr,
    Mt, Nt, n_words, TILES: tl.constexpr,
):
    compact_tile_lists(tl.program_id(0), state_ptr, row_counts_ptr, row_cols_ptr, col_counts_ptr, col_rows_ptr,
                       Mt, Nt, n_words, TILES)


def new_block_lists(Mt: int, Nt: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (row_counts, row_cols, col_counts, col_rows) for ``compact_tile_lists``."""
    return (torch.empty(Mt, dtype=torch.int32, device=device), torch.empty((Mt, Nt), dtype=torch.int32, device=device),
            torch.empty(Nt, dtype=torch.int32, device=device), torch.empty((Nt, Mt), dtype=torch.int32, device=device))


@dataclasses.dataclass
class BCAT:
    """Block-Clustered Activation Tensor: where R's nonzeros are, as dense tiles.

    Rows and columns are indexed in *tile space*: tile (r, c) covers rows
    ``perm[r*BM:(r+1)*BM]`` and columns ``col_perm[c*BN:(c+1)*BN]`` of R (None: the
    identity). ``tile_bits`` holds bit c of word c // 32 of row r for an active tile (r, c);
    ``count`` is the number of active tiles, on the device. Kernels run their dense loop
    when ``count >= dense_min`` (the density crossover), also decided on the device.
    """

    shape: tuple[int, int]
    block_m: int
    block_n: int
    tile_bits: torch.Tensor  # int32 (Mt, words)
    count: torch.Tensor  # int32 (1,)
    dense_min: int
    perm: Optional[torch.Tensor] = None  # int32 (M,)
    col_perm: Optional[torch.Tensor] = None  # int32 (N,)
    gate: Optional[torch.Tensor] = None  # kept for the lazy reports (block_meta, fill)
    mask: Optional[torch.Tensor] = None
    threshold: float = 0.0
    lists: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None
    state: Optional[torch.Tensor] = None  # the buffer tile_bits and count view

    @property
    def grid(self) -> tuple[int, int]:
        return triton.cdiv(self.shape[0], self.block_m), triton.cdiv(self.shape[1], self.block_n)

    @property
    def n_words(self) -> int:
        return self.tile_bits.shape[1]

    @property
    def num_blocks(self) -> torch.Tensor:
        """Device scalar: the number of active blocks."""
        return self.count[0]

    @property
    def tile_active(self) -> torch.Tensor:
        """bool (Mt, Nt), unpacked from the bits (reports and tests)."""
        return unpack_bits(self.tile_bits, self.grid[1])

    def block_lists(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row_counts (Mt,), row_cols (Mt, Nt), col_counts (Nt,), col_rows (Nt, Mt)), int32."""
        if self.lists is None:
            Mt, Nt = self.grid
            row_counts, row_cols, col_counts, col_rows = new_block_lists(Mt, Nt, self.tile_bits.device)
            launchable(_compact_kernel, self.state)[(Mt + Nt,)](
                self.state, row_counts, row_cols, col_counts, col_rows, Mt, Nt, self.n_words,
                TILES=triton.next_power_of_2(max(Mt, Nt)),
            )
            self.lists = (row_counts, row_cols, col_counts, col_rows)
        return self.lists

    def row_active(self) -> torch.Tensor:
        """bool (M, Nt): row i (tile space) has a nonzero in column tile c. One more pass."""
        inv_col = None
        if self.col_perm is not None:
            inv_col = torch.empty_like(self.col_perm)
            inv_col[self.col_perm.long()] = torch.arange(self.shape[1], dtype=torch.int32, device=inv_col.device)
        bits, _ = row_tile_bits(self.gate, self.mask, self.threshold, self.block_n, inv_col)
        active = unpack_bits(bits, self.grid[1])
        return active[self.perm.long()] if self.perm is not None else active

    def block_meta(self, trim: bool = True) -> torch.Tensor:
        """int32 (Mt*Nt, 4) rows (row_start, col_start, row_len, col_len), active blocks first.

        Rows past ``num_blocks`` are zero. Starts are in tile space (see ``perm``,
        ``col_perm``). ``trim`` shrinks each block to the rows that have a nonzero in it.
        """
        (M, N), BM, BN = self.shape, self.block_m, self.block_n
        Mt, Nt = self.grid
        dev = self.tile_bits.device
        if trim:
            ra = torch.zeros((Mt * BM, Nt), dtype=torch.bool, device=dev)
            ra[:M] = self.row_active()
            ra = ra.view(Mt, BM, Nt)
            idx = torch.arange(BM, device=dev).view(1, BM, 1)
            first = torch.where(ra, idx, BM).amin(1)
            last = torch.where(ra, idx, -1).amax(1)
        else:
            first = torch.zeros((Mt, Nt), dtype=torch.long, device=dev)
            last = (torch.clamp(M - torch.arange(Mt, device=dev) * BM, max=BM) - 1).view(Mt, 1).expand(Mt, Nt)
        r = torch.arange(Mt, device=dev).view(Mt, 1).expand(Mt, Nt)
        c = torch.arange(Nt, device=dev).view(1, Nt).expand(Mt, Nt)
        meta = torch.stack(
            [r * BM + first, c * BN, last - first + 1, torch.clamp(N - c * BN, max=BN)], dim=-1
        ).view(-1, 4)
        flat = self.tile_active.reshape(-1)
        slot = torch.where(flat, torch.cumsum(flat, 0) - 1, Mt * Nt)
        out = torch.zeros((Mt * Nt + 1, 4), dtype=torch.int32, device=dev)
        out.index_copy_(0, slot, meta.to(torch.int32))
        return out[:-1]

    def block_values(self, r: torch.Tensor) -> torch.Tensor:
        """(Mt*Nt, BM, BN) copies of R's tiles in ``block_meta`` order (zero padded)."""
        (M, N), BM, BN = self.shape, self.block_m, self.block_n
        Mt, Nt = self.grid
        rows = self.perm.long() if self.perm is not None else torch.arange(M, device=r.device)
        cols = self.col_perm.long() if self.col_perm is not None else torch.arange(N, device=r.device)
        padded = r.new_zeros((Mt * BM, Nt * BN))
        padded[:M, :N] = r[rows][:, cols]
        tiles = padded.view(Mt, BM, Nt, BN).permute(0, 2, 1, 3).reshape(Mt * Nt, BM, BN)
        flat = self.tile_active.reshape(-1)
        slot = torch.where(flat, torch.cumsum(flat, 0) - 1, Mt * Nt)
        out = r.new_zeros((Mt * Nt + 1, BM, BN))
        out.index_copy_(0, slot, tiles)
        return out[:-1]

    def fill_ratio(self, r: torch.Tensor, trim: bool = True) -> float:
        """nnz(R) / total block area. Syncs: for reports and benchmarks, not the hot path."""
        meta = self.block_meta(trim)
        area = (meta[:, 2].long() * meta[:, 3].long()).sum()
        return float((r != 0).sum()) / max(float(area), 1.0)


def unpack_bits(bits: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """bool (rows, n_tiles) from packed int32 words."""
    tiles = torch.arange(n_tiles, device=bits.device)
    words = bits[:, tiles // 32]
    return ((words >> (tiles % 32).to(torch.int32)) & 1).bool()


def lexicographic_row_order(bits: torch.Tensor, first_key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A stable order of rows by (first_key, bit words): equal patterns end up adjacent."""
    M, n_words = bits.shape
    order = torch.arange(M, device=bits.device)
    for w in range(n_words):  # least significant word first: a stable radix sort over words
        order = order[torch.sort(bits[order, w], stable=True).indices]
    if first_key is not None:
        order = order[torch.sort(first_key[order], stable=True).indices]
    return order


def defrag_permutations(gate: torch.Tensor, mask: Optional[torch.Tensor], threshold: float,
                        block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row perm, column perm), int32, on the device: the defragmenting order, or the
    identity when it would not reduce the active tiles (a mask already aligned to the
    grid loses its alignment under the sort). The choice is a device-side select."""
    M, N = gate.shape
    dev = gate.device
    col_order = column_order(gate, mask, threshold, block_size)
    col_perm = col_order.to(torch.int32)
    inv_col = torch.empty_like(col_perm)
    inv_col[col_order] = torch.arange(N, dtype=torch.int32, device=dev)
    bits, first_col = row_tile_bits(gate, mask, threshold, block_size, inv_col)
    perm = lexicographic_row_order(bits, first_col).to(torch.int32)
    permuted = empty_bcat(gate, block_size, perm=perm, col_perm=col_perm)
    launchable(_tile_bits_from_rows_kernel, gate)[(permuted.grid[0],)](
        bits, perm, permuted.state, M, bits.shape[1],
        BM=block_size, WORDS=triton.next_power_of_2(bits.shape[1]),
    )
    fixed = empty_bcat(gate, block_size)
    mark_active_tiles(fixed, gate, mask, threshold)
    better = permuted.count < fixed.count
    perm = torch.where(better, perm, torch.arange(M, dtype=torch.int32, device=dev))
    col_perm = torch.where(better, col_perm, torch.arange(N, dtype=torch.int32, device=dev))
    return perm, col_perm


def empty_bcat(gate: torch.Tensor, block_size: int, density_crossover: float = 1.0,
               state: Optional[torch.Tensor] = None, perm: Optional[torch.Tensor] = None,
               col_perm: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
               threshold: float = 0.0) -> BCAT:
    """A BCAT over ``state`` (int32 (1 + Mt * words,): count then bits; zeros when None)."""
    M, N = gate.shape
    Mt, Nt = triton.cdiv(M, block_size), triton.cdiv(N, block_size)
    n_words = triton.cdiv(Nt, 32)
    if state is None:  # one allocation (one memset) for the bits and the counter
        state = torch.zeros(tile_state_size(M, N, block_size), dtype=torch.int32, device=gate.device)
    dense_min = max(1, math.ceil(density_crossover * Mt * Nt - 1e-9)) if density_crossover > 0 else 0
    return BCAT((M, N), block_size, block_size, state[1:].view(Mt, n_words), state[:1], dense_min,
                perm=perm, col_perm=col_perm, gate=gate, mask=mask, threshold=threshold, state=state)


def bcat_cluster(
    gate: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
    block_size: int = 128,
    reorder: bool = False,
    density_crossover: float = 1.0,
) -> BCAT:
    """Cluster the support of R (= gate where mask, or where gate > threshold) into BCAT tiles.

    The SBL forward kernel does this on the fly; this standalone form serves reports,
    tests and other consumers.
    """
    if gate.dim() != 2:
        raise ValueError(f"bcat_cluster: gate must be 2-D (tokens, features), got shape {tuple(gate.shape)}")
    if mask is not None and mask.shape != gate.shape:
        mask = mask.expand_as(gate)
    M, N = gate.shape
    bcat = empty_bcat(gate, block_size, density_crossover, mask=mask, threshold=threshold)
    if M == 0 or N == 0:
        return bcat
    if not reorder:
        mark_active_tiles(bcat, gate, mask, threshold)
        return bcat
    bcat.perm, bcat.col_perm = defrag_permutations(gate, mask, threshold, block_size)
    mark_active_tiles(bcat, gate, mask, threshold)
    return bcat
