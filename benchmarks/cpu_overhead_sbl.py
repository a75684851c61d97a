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


from bcpt_compile.kernels.bcat_cluster import empty_bcat  # noqa: E402
from bcpt_compile.kernels.sbl_block_gemm import sddmm_backward, sddmm_forward  # noqa: E402


def kernels_only():
    """The same work without the custom-op machinery: the wrappers called directly."""
    bcat = empty_bcat(s, 128, 0.85)
    sddmm_forward(x, w, None, s, None, 0.0, bcat, torch.bfloat16)
    sddmm_backward(dy, x, w, None, s, None, 0.0, bcat, True, True, False, True)


def timed(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host * 1e3, (time.perf_counter() - t) / n * 1e3


with torch.no_grad():
    print("kernels only (host, wall ms): %.3f %.3f" % timed(kernels_only))
    print("forward op only, no grad (host, wall ms): %.3f %.3f" % timed(
        lambda: torch.ops.bcpt.sbl_masked_linear(x, w, None, s, None, 0.0, 128, 0.85, False)))

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
