"""Where the SBL op's dense path starts to pay: the density crossover, measured (H100/H200).

    python benchmarks/crossover_sbl.py [--out DIR]

x 8192x2048, W 8192x2048, bf16, gates with a given fraction of 128x128 tiles active. Times
the op (forward, and forward+backward with x, W and s requiring grad) forced onto the
block-sparse path (crossover 1) and onto the dense path (crossover 0), beside eager. The
smallest fraction where dense wins sets ``Options.density_crossover``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_sbl import block_mask_gate  # noqa: E402
from kernel_profile import kernel_times_ms  # noqa: E402

import bcpt_compile  # noqa: E402,F401


def _op(x, w, s, crossover):
    return torch.ops.bcpt.sbl_masked_linear(x, w, None, s, None, 0.0, 128, crossover, False, True)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    M, K, N = 8192, 2048, 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)).to(torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = []
    for frac in (0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0):
        s = block_mask_gate(M, N, frac)
        xs, ws, ss = (t.detach().clone().requires_grad_() for t in (x, w, s))
        row = {"active_tiles": frac}
        for name, fn in (("eager", lambda a, b, c: F.linear(a, b) * torch.relu(c)),
                         ("sparse", lambda a, b, c: _op(a, b, c, 1.0 + 1e-6)),  # never dense
                         ("dense", lambda a, b, c: _op(a, b, c, 0.0))):
            row[f"{name}_fwd"] = do_bench(lambda: fn(x, w, s), warmup=25, rep=150)
            row[f"{name}_fwdbwd"] = do_bench(lambda: torch.autograd.grad(fn(xs, ws, ss), (xs, ws, ss), dy),
                                             warmup=25, rep=150)
        rows.append(row)
        print(json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    # last: a profiler trace slows the launches timed after it
    kernels = {}
    for frac, crossover in ((0.1, 1.0 + 1e-6), (1.0, 0.0)):
        s = block_mask_gate(M, N, frac)
        xs, ws, ss = (t.detach().clone().requires_grad_() for t in (x, w, s))
        step = lambda: torch.autograd.grad(_op(xs, ws, ss, crossover), (xs, ws, ss), dy)  # noqa: E731
        kernels[f"{frac} fwd+bwd"] = kernel_times_ms(step)
        print(frac, json.dumps([(k[:40], round(v, 4)) for k, v in kernels[f"{frac} fwd+bwd"]]), flush=True)
    cublas = kernel_times_ms(lambda: x @ w.T)
    print("cublas x @ W.T", json.dumps([(k[:40], round(v, 4)) for k, v in cublas]), flush=True)
    with open(os.path.join(args.out, "crossover_sbl.json"), "w") as f:
        json.dump({"timing": rows, "kernels_ms": kernels}, f, indent=1)


if __name__ == "__main__":
    main()
