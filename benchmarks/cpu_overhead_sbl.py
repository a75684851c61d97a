"""Host-side cost of one compiled SBL forward+backward at 10 % active tiles: the step is
host-bound there (the GPU's kernels take ~0.40 ms on the H200; the host 0.45-0.82 ms).

    python benchmarks/cpu_overhead_sbl.py

Host issue time (no sync) of the forward and of the backward apart, for bcpt (with and
without the TMA dense forward, which Inductor's static launcher cannot launch), Inductor
and eager; then torch.profiler's self-CPU table of the bcpt step (it sees the autograd
engine's device thread, where the backward runs; cProfile sees only the calling thread).
"""

import math
import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import bcpt_compile  # noqa: F401
from bcpt_compile.kernels import sbl_block_gemm

sys.path.insert(0, "benchmarks")
from bench_sbl import block_mask_gate  # noqa: E402

DEV = "cuda"
M, K, N = 8192, 2048, 8192
x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(N, K, device=DEV) / math.sqrt(K)).to(torch.bfloat16).requires_grad_()
s = block_mask_gate(M, N, 0.1).requires_grad_()
dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)


def sbl(x, w, s):
    return F.linear(x, w) * torch.relu(s)


def host_times(fn, n=50, rounds=5):
    """(forward ms, backward ms, step ms): medians over rounds of n steps, host issue time."""
    for _ in range(10):
        torch.autograd.grad(fn(x, w, s), (x, w, s), dy)
    fwd, bwd, step = [], [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        tf = tb = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            a = time.perf_counter()
            y = fn(x, w, s)
            b = time.perf_counter()
            torch.autograd.grad(y, (x, w, s), dy)
            c = time.perf_counter()
            tf += b - a
            tb += c - b
        step.append((time.perf_counter() - t0) / n * 1e3)
        fwd.append(tf / n * 1e3)
        bwd.append(tb / n * 1e3)
        torch.cuda.synchronize()
    return statistics.median(fwd), statistics.median(bwd), statistics.median(step)


def main():
    configs = {
        "bcpt": lambda: torch.compile(sbl, backend="bcpt"),
        "bcpt, no TMA": lambda: torch.compile(sbl, backend="bcpt"),
        "inductor": lambda: torch.compile(sbl, backend="inductor"),
        "eager": lambda: sbl,
    }
    compiled = {}
    for name, build in configs.items():
        torch.compiler.reset()
        with mock.patch.object(sbl_block_gemm, "DENSE_TMA", False if "no TMA" in name else "auto"):
            fn = build()
            f_ms, b_ms, step_ms = host_times(fn)
        compiled[name] = fn
        print(f"{name:14s} host ms: forward {f_ms:.3f}  backward {b_ms:.3f}  step {step_ms:.3f}", flush=True)
    torch.compiler.reset()
    fn = torch.compile(sbl, backend="bcpt")
    for _ in range(10):
        torch.autograd.grad(fn(x, w, s), (x, w, s), dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            torch.autograd.grad(fn(x, w, s), (x, w, s), dy)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
