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
