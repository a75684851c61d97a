"""Kernel-level breakdown of the SBL op (torch.profiler), for tuning on the GPU."""

import math
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import bcpt_compile  # noqa: F401
sys.path.insert(0, "benchmarks")
from bench_sbl import block_mask_gate  # noqa: E402

DEV = "cuda"
M, K, N = 8192, 2048, 8192
x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(N, K, device=DEV) / math.sqrt(K)).to(torch.bfloat16).requires_grad_()
for frac in (0.1, 1.0):
    s = block_mask_gate(M, N, frac).requires_grad_()
    dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)

    def run():
        y = torch.ops.bcpt.sbl_masked_linear(x, w, None, s, None, 0.0, 128, 0.85, False)[0]
        torch.autograd.grad(y, (x, w, s), dy)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print(f"=== block fraction {frac}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


# Calibration: a plain Triton GEMM with the same 128x128 tiles, and cuBLAS, on x W^T.
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.testing import do_bench  # noqa: E402


@triton.jit
def _plain_mm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pm = first_m + (pid % width) % size_m
    pn = (pid % width) // size_m
    offs_m = pm * BM + tl.arange(0, BM)
    offs_n = pn * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K // BK):
        acc = tl.dot(tl.load(a_ptrs), tl.trans(tl.load(b_ptrs)), acc)
        a_ptrs += BK
        b_ptrs += BK
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16))


xa = x.detach()
wa = w.detach()
c = torch.empty(M, N, device=DEV, dtype=torch.bfloat16)
flops = 2 * M * N * K
print(f"cuBLAS x@W^T: {do_bench(lambda: F.linear(xa, wa), return_mode='median'):.3f} ms")
for bm, bn, bk, warps, stages in ((128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3)):
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    t = do_bench(lambda: _plain_mm[grid](xa, wa, c, M, N, K, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages), return_mode="median")
    print(f"plain triton {bm}x{bn}x{bk} w{warps} s{stages}: {t:.3f} ms = {flops / t / 1e9:.0f} TFLOP/s")
