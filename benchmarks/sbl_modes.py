"""Where a compiled SBL step's time goes, process by process: the 10 % forward+backward of
``ab_sbl.py`` took ~0.65 ms in some processes and ~1.0 ms in others (H200, stop 12).

    python benchmarks/sbl_modes.py [--procs 4] [--frac 0.1]

Each process builds the same inputs (fixed seeds), then reports the step's median time
(do_bench), the spread of single steps, the host's issue time, the device time of every
kernel (torch.profiler) and the share of the step the GPU is busy; eager's step in the same
process for scale. Comparing a fast and a slow process kernel by kernel says whether the
slow mode is one kernel, all of them (clocks, placement) or idle gaps (the host).
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, math, os, sys, time
import torch, torch.nn.functional as F
from triton.testing import do_bench
from torch.profiler import ProfilerActivity, profile
import bcpt_compile  # noqa
sys.path.insert(0, "benchmarks")
from bench_sbl import block_mask_gate
frac = float(sys.argv[1])
torch.manual_seed(0)
M, K, N = 8192, 2048, 8192
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(torch.bfloat16).requires_grad_()
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
s = block_mask_gate(M, N, frac).requires_grad_()
sbl = lambda x, w, s: F.linear(x, w) * torch.relu(s)
f = torch.compile(sbl, backend="bcpt")
step = lambda: torch.autograd.grad(f(x, w, s), (x, w, s), dy)
eager = lambda: torch.autograd.grad(sbl(x, w, s), (x, w, s), dy)
for _ in range(10):
    step()
torch.cuda.synchronize()
singles = []
for _ in range(30):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record(); step(); b.record(); b.synchronize()
    singles.append(a.elapsed_time(b))
t = time.perf_counter()
for _ in range(50):
    step()
host = (time.perf_counter() - t) / 50 * 1e3
torch.cuda.synchronize()
out = {"step": do_bench(step, warmup=50, rep=300, return_mode="median"),
       "eager": do_bench(eager, warmup=50, rep=300, return_mode="median"),
       "singles_min_med_max": [min(singles), sorted(singles)[15], max(singles)], "host": host,
       "ptrs_mod_2M": [t.data_ptr() % (2 << 20) for t in (x, w, s, dy)]}
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        step()
    torch.cuda.synchronize()
kernels = {}
for e in prof.key_averages():
    if e.self_device_time_total > 0:
        kernels[e.key[:60]] = round(e.self_device_time_total / 10 / 1e3, 4)
out["kernels"] = kernels
out["kernel_sum"] = round(sum(kernels.values()), 4)
print(json.dumps(out))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--frac", type=float, default=0.1)
    args = ap.parse_args()
    rows = []
    for i in range(args.procs):
        r = subprocess.run([sys.executable, "-c", CHILD, str(args.frac)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"error": r.stderr[-1500:]}
        rows.append(row)
        print(f"process {i}: {json.dumps(row)}", flush=True)
    names = sorted({k for r in rows for k in r.get("kernels", {})})
    print("\nkernel ms per step, by process")
    for n in names:
        print(f"{n:60s} " + " ".join(f"{r.get('kernels', {}).get(n, 0):7.4f}" for r in rows))
    print(f"{'sum':60s} " + " ".join(f"{r.get('kernel_sum', 0):7.4f}" for r in rows))
    print(f"{'step (do_bench)':60s} " + " ".join(f"{r.get('step', 0):7.4f}" for r in rows))
    print(f"{'eager':60s} " + " ".join(f"{r.get('eager', 0):7.4f}" for r in rows))


if __name__ == "__main__":
    main()
