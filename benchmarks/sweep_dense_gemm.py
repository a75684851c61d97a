"""How close a Triton GEMM gets to cuBLAS on the SBL shapes past the density crossover (H100/H200).

    python benchmarks/sweep_dense_gemm.py [--out DIR]

The three products of ``y = (x W^T) * R`` at 100 % density, bf16, x 8192x2048, W 8192x2048:
forward ``x W^T`` (NT), ``dx = G' W`` (NN), ``dW = G'^T x`` (TN). Each variant (tile shape,
warps, stages, pointer loads or host-side TMA descriptors, persistent or not) is checked
against cuBLAS and timed beside it; the winners set the dense branch of the SBL kernels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _gemm(a_ptr, b_ptr, c_ptr, M, N, K, stride_a0, stride_b0, stride_c0,
          A_T: tl.constexpr, B_T: tl.constexpr, TMA: tl.constexpr, PERSISTENT: tl.constexpr,
          PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C = op(A) op(B); A stored (M, K) or, A_T, (K, M); B stored (K, N) or, B_T, (N, K)."""
    Mt = tl.cdiv(M, BM)
    Nt = tl.cdiv(N, BN)
    start = tl.program_id(0)
    step = PROGRAMS if PERSISTENT else Mt * Nt
    for t in tl.range(start, Mt * Nt, step, flatten=PERSISTENT):
        width = GROUP_M * Nt
        first_m = (t // width) * GROUP_M
        size_m = tl.minimum(Mt - first_m, GROUP_M)
        tile_m = first_m + (t % width) % size_m
        tile_n = (t % width) // size_m
        off_m = tile_m * BM
        off_n = tile_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        rk = tl.arange(0, BK)
        rm = off_m + tl.arange(0, BM)
        rn = off_n + tl.arange(0, BN)
        for k in range(0, tl.cdiv(K, BK)):
            kk = k * BK
            if TMA:
                if A_T:
                    a = tl.make_tensor_descriptor(a_ptr, [K, M], [stride_a0, 1], [BK, BM]).load([kk, off_m]).T
                else:
                    a = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_a0, 1], [BM, BK]).load([off_m, kk])
                if B_T:
                    b = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_b0, 1], [BN, BK]).load([off_n, kk]).T
                else:
                    b = tl.make_tensor_descriptor(b_ptr, [K, N], [stride_b0, 1], [BK, BN]).load([kk, off_n])
            else:
                if A_T:
                    a = tl.load(a_ptr + (kk + rk)[None, :] * stride_a0 + rm[:, None])
                else:
                    a = tl.load(a_ptr + rm[:, None] * stride_a0 + (kk + rk)[None, :])
                if B_T:
                    b = tl.load(b_ptr + rn[None, :] * stride_b0 + (kk + rk)[:, None])
                else:
                    b = tl.load(b_ptr + (kk + rk)[:, None] * stride_b0 + rn[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * stride_c0 + rn[None, :], acc.to(c_ptr.dtype.element_ty))


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def run(out_dir: str) -> list:
    triton.set_allocator(_alloc)
    torch.manual_seed(0)
    M, K, N = 8192, 2048, 8192
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt)
    w = torch.randn(N, K, device="cuda", dtype=dt)
    g = torch.randn(M, N, device="cuda", dtype=dt)
    cases = {  # name: (A storage, A_T, B storage, B_T, (M, N, K) of the product, cuBLAS)
        "fwd_NT": (x, False, w, True, (M, N, K), lambda: x @ w.T),
        "dx_NN": (g, False, w, False, (M, K, N), lambda: g @ w),
        "dW_TN": (g, True, x, False, (N, K, M), lambda: g.T @ x),
    }
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (a, a_t, b, b_t, (m, n, k), ref_fn) in cases.items():
        ref = ref_fn()
        ms = do_bench(ref_fn, warmup=50, rep=300)
        flops = 2 * m * n * k
        rows.append({"case": name, "variant": "cublas", "ms": ms, "tflops": flops / ms / 1e9})
        print(rows[-1], flush=True)
        for (bm, bn, bk), warps, stages, tma, persistent in itertools.product(
                [(128, 256, 64), (128, 128, 64), (256, 128, 64), (128, 256, 128)], [8, 4], [3, 4],
                [False, True], [False, True]):
            if warps == 4 and bm * bn > 128 * 128:
                continue
            c = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
            programs = sms if persistent else 1
            grid = (programs,) if persistent else (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            fn = lambda: _gemm[grid](a, b, c, m, n, k, a.stride(0), b.stride(0), c.stride(0),  # noqa: E731
                                     A_T=a_t, B_T=b_t, TMA=tma, PERSISTENT=persistent, PROGRAMS=programs,
                                     BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            variant = f"{bm}x{bn}x{bk} w{warps} s{stages} {'tma' if tma else 'ptr'}{' pers' if persistent else ''}"
            try:
                fn()
                err = ((c.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                t = do_bench(fn, warmup=50, rep=300)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                rows.append({"case": name, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                print(rows[-1], flush=True)
                continue
            rows.append({"case": name, "variant": variant, "ms": t, "tflops": flops / t / 1e9, "rel_err": err})
            print(rows[-1], flush=True)
    with open(os.path.join(out_dir, "sweep_dense_gemm.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    run(p.parse_args().out)
