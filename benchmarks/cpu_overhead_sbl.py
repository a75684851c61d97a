"""Host-side cost of one SBL forward+backward (cProfile), to find launch overhead."""

import cProfile
import math
import pstats
import sys
import time

import torch

import bcpt_compile  # noqa: F401
sys.path.insert(0, "benchmarks")
from bench_sbl import block_mask_gate  # noqa: E402

DEV = "cuda"
M, K, N = 8192, 2048, 8192
x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(N, K, device=DEV) / math.sqrt(K)).to(torch.bfloat16).requires_grad_()
s = block_mask_gate(M, N, 0.1).requires_grad_()
dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)


def eager_op():
    y = torch.ops.bcpt.sbl_masked_linear(x, w, None, s, None, 0.0, 128, 0.85, False)[0]
    torch.autograd.grad(y, (x, w, s), dy)


f = torch.compile(lambda x, w, s: torch.nn.functional.linear(x, w) * torch.relu(s), backend="bcpt")


def compiled():
    torch.autograd.grad(f(x, w, s), (x, w, s), dy)


for name, fn in (("op", eager_op), ("compiled", compiled)):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        fn()
    cpu = (time.perf_counter() - t) / 20
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 20
    print(f"{name}: host {cpu * 1e3:.3f} ms/iter, wall {wall * 1e3:.3f} ms/iter")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)
