"""Triton building blocks shared by the kernel families: dot precision, the tile GEMM
K-loop of ``x W^T``, and the L2-friendly tile order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(t: torch.Tensor) -> str:
    """"ieee" for float32 unless the user allowed TF32; "upcast" under the interpreter for
    16-bit inputs (its bf16 ``tl.dot`` is wrong in triton 3.6)."""
    if not t.is_cuda and t.dtype != torch.float32:
        return "upcast"
    if t.dtype == torch.float32 and not (t.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def grouped_tile(pid, Mt, Nt, GROUP_M: tl.constexpr):
    """Row tiles in groups of GROUP_M so that neighbouring programs share W tiles in L2."""
    width = GROUP_M * Nt
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(Mt - first_m, GROUP_M)
    tile_m = first_m + (pid % width) % size_m
    tile_n = (pid % width) // size_m
    return tile_m, tile_n


@triton.jit
def xwt_tile(x_ptr, w_ptr, b_ptr, rows, cols, offs_m, offs_n, M, N, K,
             stride_xm, stride_xk, stride_wn, stride_wk,
             HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """(x W^T + b)[rows, cols] in float32; ``offs_m`` / ``offs_n`` bound the tile.

    Rows and columns past the edge read row/column 0 instead of being masked (their
    results are never stored), so only K, the contracted dim, needs a mask, and none when
    BK divides K: unmasked loads pipeline best.
    """
    offs_k = tl.arange(0, BK)
    safe_rows = tl.where(offs_m < M, rows, 0)
    safe_cols = tl.where(offs_n < N, cols, 0)
    x_ptrs = x_ptr + safe_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + safe_cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BK
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        acc = mma(a, tl.trans(b), acc, PRECISION)
        x_ptrs += BK * stride_xk
        w_ptrs += BK * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc
