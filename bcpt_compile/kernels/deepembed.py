"""DeepEmbed kernels: a per-token table row scales a GEMM's output or a low-rank mix.

Output scale (RWKV-8 demo), ``y = (h V^T + b) * T[idx]``:

* ``_out_forward_kernel``: one program per output tile; the gather of ``T[idx[rows]]`` and
  the multiply run in the GEMM epilogue, so the (tokens x d) embedding never exists in
  memory. The unscaled product ``z`` is written as well, because the backward needs it
  for the table's gradient and writing it here is cheaper than a second GEMM later.
* ``_out_backward_kernel``: elementwise ``gh = dy * T[idx]`` (feeds the two dense GEMMs
  dh = gh V, dV = gh^T h, which stay on cuBLAS) and ``ge = dy * z`` (the table gradient
  per token, still to be summed per index).

Hidden scale (RWKV-7 DeepEmbed), ``b[t] = a[t] @ S[idx[t]].view(r, r)``:

* ``_rowmix_forward_kernel`` / ``_rowmix_dx_kernel`` gather each token's r x r matrix from
  its table row without ever materialising the (tokens x r x r) gather.

Both table gradients are row-sparse: only rows named by ``idx`` get a value.
``_segment_sum_kernel`` sums the per-token contributions of each distinct index in a fixed
order (tokens sorted stably by index, summed in fixed blocks), so the result is bitwise
reproducible, unlike a scatter-add with atomics. It needs no host sync: a program per
sorted position works only if it heads a run of equal indices.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .tile_gemm import dot_precision as _dot_precision
from .tile_gemm import grouped_tile as _grouped_tile
from .tile_gemm import mma as _mma
from .tile_gemm import xwt_tile


@triton.jit
def _out_forward_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, idx_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_hm, stride_hk, stride_wn, stride_wk, stride_tv, stride_tn,
    stride_ym, stride_yn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    Mt = tl.cdiv(M, BM)
    Nt = tl.cdiv(N, BN)
    tile_m, tile_n = _grouped_tile(tl.program_id(0), Mt, Nt, GROUP_M)
    offs_m = tile_m * BM + tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    acc = xwt_tile(h_ptr, w_ptr, b_ptr, rows, offs_n.to(tl.int64), offs_m, offs_n, M, N, K,
                   stride_hm, stride_hk, stride_wn, stride_wk, HAS_BIAS, BM, BN, BK, PRECISION, False)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_Z:
        z = acc.to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + rows[:, None] * stride_zm + offs_n[None, :] * stride_zn, z, mask=inside)
    ids = tl.load(idx_ptr + offs_m, mask=offs_m < M, other=0).to(tl.int64)
    e = tl.load(t_ptr + ids[:, None] * stride_tv + offs_n[None, :] * stride_tn, mask=inside, other=0.0)
    y = acc * e.to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _out_backward_kernel(
    dy_ptr, z_ptr, t_ptr, idx_ptr, gh_ptr, ge_ptr,
    M, N,
    stride_dym, stride_dyn, stride_zm, stride_zn, stride_tv, stride_tn,
    NEED_GH: tl.constexpr, NEED_GE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=inside, other=0.0)
    dy = dy.to(tl.float32)
    if NEED_GH:
        ids = tl.load(idx_ptr + offs_m, mask=offs_m < M, other=0).to(tl.int64)
        e = tl.load(t_ptr + ids[:, None] * stride_tv + offs_n[None, :] * stride_tn, mask=inside, other=0.0)
        tl.store(gh_ptr + rows[:, None] * N + offs_n[None, :], (dy * e.to(tl.float32)).to(gh_ptr.dtype.element_ty),
                 mask=inside)
    if NEED_GE:
        z = tl.load(z_ptr + rows[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=inside, other=0.0)
        tl.store(ge_ptr + rows[:, None] * N + offs_n[None, :], dy * z.to(tl.float32), mask=inside)


@triton.jit
def _segment_sum_kernel(
    vals_ptr, sorted_ptr, order_ptr, out_ptr,
    M, W, stride_vm, stride_ov,
    BT: tl.constexpr, BW: tl.constexpr,
):
    j = tl.program_id(0)
    offs = tl.program_id(1) * BW + tl.arange(0, BW)
    cur = tl.load(sorted_ptr + j)
    prev = tl.load(sorted_ptr + j - 1, mask=j > 0, other=-1)
    if (j == 0) | (prev != cur):
        # this program heads the run of `cur`: sum it BT tokens at a time (the run is a
        # prefix of each block, ids being sorted), so a frequent token is not a serial tail
        acc = tl.zeros((BW,), dtype=tl.float32)
        k = j
        nxt = cur
        while nxt == cur:
            offs_t = k + tl.arange(0, BT)
            same = tl.load(sorted_ptr + offs_t, mask=offs_t < M, other=-1) == cur
            t = tl.load(order_ptr + offs_t, mask=same, other=0).to(tl.int64)
            v = tl.load(vals_ptr + t[:, None] * stride_vm + offs[None, :],
                        mask=same[:, None] & (offs[None, :] < W), other=0.0)
            acc += tl.sum(v.to(tl.float32), axis=0)
            k += BT
            nxt = tl.load(sorted_ptr + k, mask=k < M, other=-1)
        tl.store(out_ptr + cur.to(tl.int64) * stride_ov + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < W)


@triton.jit
def _rowmix_forward_kernel(
    a_ptr, t_ptr, idx_ptr, b_ptr,
    M, R, stride_am, stride_ar, stride_tv, stride_tw, stride_bm, stride_br,
    BM: tl.constexpr, BR: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BR)
    rows = offs_m.to(tl.int64)
    in_m = offs_m < M
    ids = tl.load(idx_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    inside = in_m[:, None] & (offs_j[None, :] < R)
    for i in range(0, R):
        a_i = tl.load(a_ptr + rows * stride_am + i * stride_ar, mask=in_m, other=0.0).to(tl.float32)
        e = tl.load(t_ptr + ids[:, None] * stride_tv + (i * R + offs_j[None, :]) * stride_tw, mask=inside, other=0.0)
        acc += a_i[:, None] * e.to(tl.float32)
    tl.store(b_ptr + rows[:, None] * stride_bm + offs_j[None, :] * stride_br, acc.to(b_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rowmix_dx_kernel(
    db_ptr, t_ptr, idx_ptr, da_ptr,
    M, R, stride_dbm, stride_dbr, stride_tv, stride_tw,
    BM: tl.constexpr, BR: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_j = tl.arange(0, BR)
    rows = offs_m.to(tl.int64)
    in_m = offs_m < M
    inside = in_m[:, None] & (offs_j[None, :] < R)
    ids = tl.load(idx_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    db = tl.load(db_ptr + rows[:, None] * stride_dbm + offs_j[None, :] * stride_dbr, mask=inside, other=0.0)
    db = db.to(tl.float32)
    for i in range(0, R):
        e = tl.load(t_ptr + ids[:, None] * stride_tv + (i * R + offs_j[None, :]) * stride_tw, mask=inside, other=0.0)
        da_i = tl.sum(db * e.to(tl.float32), axis=1)
        tl.store(da_ptr + rows * R + i, da_i.to(da_ptr.dtype.element_ty), mask=in_m)


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


def _launch_gemm(kernel, M: int, N: int, device: torch.device, args: tuple, kwargs: dict) -> None:
    """Launch a tiled epilogue GEMM: autotuned on CUDA, the fixed config elsewhere or on failure."""
    if device.type == "cuda" and _autotune_ok[0]:
        tuned = _TUNED.get(kernel)
        if tuned is None:
            tuned = _TUNED[kernel] = triton.autotune(configs=_CUDA_GEMM_CONFIGS, key=["M", "N", "K"])(kernel)
        try:
            tuned[lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)](*args, **kwargs)
            return
        except Exception as exc:  # pragma: no cover - depends on the GPU / Triton build
            import warnings

            warnings.warn(f"bcpt.deepembed: autotuning failed ({type(exc).__name__}: {exc}); using a fixed tile")
            _autotune_ok[0] = False
    cfg = _out_config(device)
    kernel[(triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)](*args, **kwargs, **cfg)


_TUNED: dict = {}


def out_scale_forward(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], table: torch.Tensor,
                      idx: torch.Tensor, out_dtype: torch.dtype, store_z: bool = True):
    """(y, z) with z = h W^T + b (in h's dtype, or None) and y = z * table[idx]. h: (M, K), idx: (M,) in range."""
    M, K = h.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=h.device)
    z = torch.empty((M, N), dtype=h.dtype, device=h.device) if store_z else None
    if M == 0 or N == 0:
        return y, z
    if K == 0:
        y.copy_((bias.expand(M, N) if bias is not None else torch.zeros_like(y)) * table[idx])
        if z is not None:
            z.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(z))
        return y, z
    zz = z if z is not None else y
    _launch_gemm(_out_forward_kernel, M, N, h.device, (
        h, weight, bias if bias is not None else h, table, idx, y, zz,
        M, N, K,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), table.stride(0), table.stride(1),
        y.stride(0), y.stride(1), zz.stride(0), zz.stride(1),
    ), dict(HAS_BIAS=bias is not None, STORE_Z=z is not None, GROUP_M=8, PRECISION=_dot_precision(h)))
    return y, z


def segment_sum_rows(vals: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[u] = sum of vals[t] over tokens t with idx[t] == u, in token order; other rows untouched.

    vals: (M, W) float, idx: (M,) int in range, out: (V, W), zeroed by the caller.
    """
    M, W = vals.shape
    if M == 0 or W == 0:
        return out
    sorted_idx, order = torch.sort(idx, stable=True)
    BT, BW = (32, 128) if vals.is_cuda else (4, 16)
    _segment_sum_kernel[(M, triton.cdiv(W, BW))](
        vals, sorted_idx, order, out, M, W, vals.stride(0), out.stride(0), BT=BT, BW=BW,
        num_warps=4 if vals.is_cuda else 1,
    )
    return out


def out_scale_backward(grad: torch.Tensor, z: torch.Tensor, table: torch.Tensor, idx: torch.Tensor,
                       need_gh: bool, need_table: bool):
    """(gh, dtable): gh = dy * table[idx] in z's dtype, dtable row-sparse (zeros off idx)."""
    M, N = grad.shape
    gh = torch.empty((M, N), dtype=z.dtype, device=grad.device) if need_gh else None
    ge = torch.empty((M, N), dtype=torch.float32, device=grad.device) if need_table else None
    if M and N and (need_gh or need_table):
        BM, BN = (64, 128) if grad.is_cuda else (16, 16)
        _out_backward_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            grad, z, table, idx, gh if gh is not None else grad, ge if ge is not None else grad,
            M, N, grad.stride(0), grad.stride(1), z.stride(0), z.stride(1), table.stride(0), table.stride(1),
            NEED_GH=need_gh, NEED_GE=need_table, BM=BM, BN=BN, num_warps=4,
        )
    dtable = None
    if need_table:
        dtable = torch.zeros_like(table, memory_format=torch.contiguous_format)
        segment_sum_rows(ge, idx, dtable)
    return gh, dtable


def rowmix_forward(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, r: int, out_dtype: torch.dtype) -> torch.Tensor:
    """b[t] = a[t] @ table[idx[t]].view(r, r). a: (M, r)."""
    M = a.shape[0]
    b = torch.empty((M, r), dtype=out_dtype, device=a.device)
    if M == 0 or r == 0:
        return b.zero_()
    BM = 64 if a.is_cuda else 16
    _rowmix_forward_kernel[(triton.cdiv(M, BM),)](
        a, table, idx, b, M, r, a.stride(0), a.stride(1), table.stride(0), table.stride(1),
        b.stride(0), b.stride(1), BM=BM, BR=triton.next_power_of_2(r), num_warps=4,
    )
    return b


def rowmix_backward(grad: torch.Tensor, a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, r: int,
                    need_a: bool, need_table: bool):
    """(da, dtable) of b = rowmix(a, table, idx); dtable row-sparse, summed deterministically."""
    M = a.shape[0]
    da = dtable = None
    if need_a:
        da = torch.empty((M, r), dtype=a.dtype, device=a.device)
        if M and r:
            BM = 64 if a.is_cuda else 16
            _rowmix_dx_kernel[(triton.cdiv(M, BM),)](
                grad, table, idx, da, M, r, grad.stride(0), grad.stride(1), table.stride(0), table.stride(1),
                BM=BM, BR=triton.next_power_of_2(r), num_warps=4,
            )
        else:
            da.zero_()
    if need_table:
        dtable = torch.zeros_like(table, memory_format=torch.contiguous_format)
        # per-token outer products a[t] (x) db[t] are the table row's gradient, r*r wide
        outer = (a.float()[:, :, None] * grad.float()[:, None, :]).reshape(M, r * r)
        segment_sum_rows(outer, idx, dtable)
    return da, dtable


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
    c = _mma(bt, st, tl.zeros((BM, BN), dtype=tl.float32), PRECISION)
    if HAS_S0:
        c += tl.load(s0_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return c


@triton.jit
def _hidden_forward_kernel(
    x_ptr, w_ptr, b_ptr, s2_ptr, s0_ptr, k_ptr, u_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bm, stride_br, stride_s2r, stride_s2n,
    HAS_S0: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    Mt = tl.cdiv(M, BM)
    Nt = tl.cdiv(N, BN)
    tile_m, tile_n = _grouped_tile(tl.program_id(0), Mt, Nt, GROUP_M)
    offs_m = tile_m * BM + tl.arange(0, BM)
    offs_n = tile_n * BN + tl.arange(0, BN)
    rows = offs_m.to(tl.int64)
    acc = xwt_tile(x_ptr, w_ptr, w_ptr, rows, offs_n.to(tl.int64), offs_m, offs_n, M, N, K,
                   stride_xm, stride_xk, stride_wn, stride_wk, False, BM, BN, BK, PRECISION, False)
    c = _scale_tile(b_ptr, s2_ptr, s0_ptr, rows, offs_m, offs_n, M, N, R,
                    stride_bm, stride_br, stride_s2r, stride_s2n, HAS_S0, BM, BN, BR, PRECISION)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    relu = tl.where((acc > 0) | (acc != acc), acc, 0.0)  # relu keeps NaN, as torch.relu does
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
    ), dict(HAS_S0=s0 is not None, BR=max(16, triton.next_power_of_2(R)), GROUP_M=8, PRECISION=_dot_precision(x)))
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
