"""A/B of two source trees on one machine: SBL forward and forward+backward, eager vs bcpt.

    python benchmarks/ab_sbl.py TREE_A TREE_B [TREE_C ...] [--rounds 2]

Each tree runs in its own process, alternately, so host speed drift hits both alike;
prints device time (do_bench median) and host time per compiled step (no sync), eager's
times in the same process, and both steps replayed from a CUDA graph
(``triton.testing.do_bench_cudagraph``: the GPU's time with no host launch cost).

At 10 % active tiles the compiled step is host-bound: its kernels take ~0.40 ms on the
H200, while torch.compile's own machinery (guards, AOTAutograd wrappers, the autograd
engine, the generated code) spends ~0.5 ms of host time per step, about what
``backend="inductor"`` spends on the dense op (benchmarks/cpu_overhead_sbl.py). The graph
replay is the op's cost inside a model whose step keeps the GPU fed.
"""

import json
import os
import subprocess
import sys

CHILD = r'''
import math, sys, time, json
import torch, torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph
import bcpt_compile  # noqa
sys.path.insert(0, "benchmarks")
from bench_sbl import block_mask_gate
torch.manual_seed(0)
M, K, N = 8192, 2048, 8192
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(torch.bfloat16).requires_grad_()
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
sbl = lambda x, w, s: F.linear(x, w) * torch.relu(s)
f = torch.compile(sbl, backend="bcpt")
out = {}
for frac in (0.1, 1.0):
    s = block_mask_gate(M, N, frac).requires_grad_()
    step = lambda: torch.autograd.grad(f(x, w, s), (x, w, s), dy)
    fwd = lambda: f(x, w, s)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        step()
    host = (time.perf_counter() - t) / 50 * 1e3
    torch.cuda.synchronize()
    eager_step = lambda: torch.autograd.grad(sbl(x, w, s), (x, w, s), dy)
    out[frac] = {"fwd": do_bench(fwd, warmup=50, rep=300, return_mode="median"),
                 "fwdbwd": do_bench(step, warmup=50, rep=300, return_mode="median"), "host_fwdbwd": host,
                 "eager_fwd": do_bench(lambda: sbl(x, w, s), warmup=50, rep=300, return_mode="median"),
                 "eager_fwdbwd": do_bench(eager_step, warmup=50, rep=300, return_mode="median"),
                 "graph_fwdbwd": do_bench_cudagraph(step, rep=300, return_mode="median"),
                 "graph_eager_fwdbwd": do_bench_cudagraph(eager_step, rep=300, return_mode="median")}
out["module"] = bcpt_compile.__file__
print(json.dumps(out))
'''


def run(tree):
    # each tree its own compile caches: a shared one would serve one tree's kernels to the other
    env = {**os.environ, "PYTHONPATH": tree, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tree, ".cache", "inductor"),
           "TRITON_CACHE_DIR": os.path.join(tree, ".cache", "triton")}
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=tree, capture_output=True, text=True, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": r.stderr[-800:]}


if __name__ == "__main__":
    args = sys.argv[1:]
    rounds = 2
    if "--rounds" in args:
        at = args.index("--rounds")
        rounds = int(args[at + 1])
        del args[at:at + 2]
    for i in range(rounds):
        for tree in args:
            print(tree, json.dumps(run(tree)), flush=True)
