"""BCAT clustering: R's support -> active tiles, on the device and without host syncs.

1. ``_row_tile_bits_kernel`` reads R's gate once and sets, for every row, one bit per
   column tile that holds a nonzero of that row. Bits live in int32 words and are set
   with atomic OR, since several programs own bits of one word.
2. With ``reorder`` (the online defragmentation), features and tokens are permuted first
   so that nonzeros gather into fewer tiles: columns are sorted by a min-hash of the rows
   that use them (``_column_keys_kernel``: co-used and dead features end up adjacent),
   then rows by their first active permuted column and their permuted tile bits (a
   stable lexicographic sort). Two passes over the gate instead of one.
3. Tile activity, per-row-tile and per-column-tile block lists (padded, with device-side
   counts) are derived with a handful of small torch ops on the (tiles x tiles) grid.
Everything is deterministic, so a recomputation (backward, checkpointing) sees the same blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl


_NO_KEY_INT = 2**31 - 1
_NO_KEY = tl.constexpr(_NO_KEY_INT)  # 'no active column/row yet' for atomic min


@triton.jit
def _load_keep(s_ptr, m_ptr, rows, cols, M, N, threshold,
               stride_sm, stride_sn, stride_mm, stride_mn, HAS_MASK: tl.constexpr):
    inside = (rows[:, None] < M) & (cols[None, :] < N)
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
    _row_tile_bits_kernel[(triton.cdiv(M, _ROWS), triton.cdiv(N, block_n))](
        gate, src, bits, inv_col_perm if inv_col_perm is not None else bits, row_key,
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
        _column_keys_kernel[(triton.cdiv(M, _ROWS), triton.cdiv(N, block_n))](
            gate, src, key, M, N, float(threshold),
            gate.stride(0), gate.stride(1), src.stride(0), src.stride(1),
            HAS_MASK=mask is not None, ROWS=_ROWS, BN=block_n,
        )
    return torch.sort(key, stable=True).indices


def unpack_bits(bits: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """bool (M, n_tiles) from the packed words."""
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


@dataclasses.dataclass
class BCAT:
    """Block-Clustered Activation Tensor: where R's nonzeros are, as dense tiles.

    Rows and columns are indexed in *tile space*: tile (r, c) covers rows
    ``perm[r*BM:(r+1)*BM]`` and columns ``col_perm[c*BN:(c+1)*BN]`` of R (None: the identity). Block lists are padded to the grid size; counts and
    the dense flag are device tensors, so consumers never sync.
    """

    shape: tuple[int, int]
    block_m: int
    block_n: int
    row_bits: torch.Tensor  # int32 (M, words)
    perm: Optional[torch.Tensor]  # int32 (M,) or None
    col_perm: Optional[torch.Tensor]  # int32 (N,) or None
    row_active: torch.Tensor  # bool (M, Nt), rows in tile space
    tile_active: torch.Tensor  # bool (Mt, Nt)
    row_counts: torch.Tensor  # int32 (Mt,) active column tiles per row tile
    row_cols: torch.Tensor  # int32 (Mt, Nt): active column tiles first, ascending
    col_counts: torch.Tensor  # int32 (Nt,)
    col_rows: torch.Tensor  # int32 (Nt, Mt)
    dense: torch.Tensor  # int32 scalar: 1 when the dense loop runs

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.tile_active.shape)  # type: ignore[return-value]

    @property
    def num_blocks(self) -> torch.Tensor:
        """Device scalar: the number of active blocks."""
        return self.row_counts.sum()

    def block_meta(self, trim: bool = True) -> torch.Tensor:
        """int32 (Mt*Nt, 4) rows (row_start, col_start, row_len, col_len), active blocks first.

        Rows past ``num_blocks`` are zero. ``trim`` shrinks each block to the rows that
        have a nonzero in it (row_start is in tile space, see ``perm``).
        """
        (M, N), BM, BN = self.shape, self.block_m, self.block_n
        Mt, Nt = self.grid
        dev = self.tile_active.device
        ra = torch.zeros((Mt * BM, Nt), dtype=torch.bool, device=dev)
        ra[:M] = self.row_active
        ra = ra.view(Mt, BM, Nt)
        idx = torch.arange(BM, device=dev).view(1, BM, 1)
        if trim:
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


def bcat_cluster(
    gate: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
    block_size: int = 128,
    reorder: bool = False,
    density_crossover: float = 1.0,
) -> BCAT:
    """Cluster the support of R (= gate where mask, or where gate > threshold) into BCAT tiles."""
    if gate.dim() != 2:
        raise ValueError(f"bcat_cluster: gate must be 2-D (tokens, features), got shape {tuple(gate.shape)}")
    if mask is not None and mask.shape != gate.shape:
        mask = mask.expand_as(gate)
    M, N = gate.shape
    BM = BN = block_size
    Mt, Nt = triton.cdiv(M, BM), triton.cdiv(N, BN)
    perm = col_perm = inv_col = None
    if reorder:
        col_order = column_order(gate, mask, threshold, BN)
        col_perm = col_order.to(torch.int32)
        inv_col = torch.empty_like(col_perm)
        inv_col[col_order] = torch.arange(N, dtype=torch.int32, device=gate.device)
    bits, first_col = row_tile_bits(gate, mask, threshold, BN, inv_col)
    row_active = unpack_bits(bits, Nt)
    if reorder:
        order = lexicographic_row_order(bits, first_col)
        row_active = row_active[order]
        perm = order.to(torch.int32)
    padded = torch.zeros((Mt * BM, Nt), dtype=torch.bool, device=gate.device)
    padded[:M] = row_active
    tile_active = padded.view(Mt, BM, Nt).any(1)
    inactive = (~tile_active).to(torch.int8)
    row_cols = torch.sort(inactive, dim=1, stable=True).indices.to(torch.int32)
    col_rows = torch.sort(inactive.t().contiguous(), dim=1, stable=True).indices.to(torch.int32)
    row_counts = tile_active.sum(1, dtype=torch.int32)
    col_counts = tile_active.sum(0, dtype=torch.int32)
    total = max(Mt * Nt, 1)
    dense = (row_counts.sum() >= density_crossover * total).to(torch.int32)
    return BCAT((M, N), BM, BN, bits, perm, col_perm, row_active, tile_active, row_counts, row_cols,
                col_counts, col_rows.contiguous(), dense)
