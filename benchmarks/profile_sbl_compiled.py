"""Kernel-level breakdown of the *compiled* SBL path (torch.profiler) and Inductor's code.

    python benchmarks/profile_sbl_compiled.py [--out DIR]

For 10 % and 100 % active tiles: the device time per kernel of one forward and one
forward+backward through ``torch.compile(backend="bcpt")``, and the generated code
(written to DIR/sbl_inductor_code.py) to check how Inductor launches the kernels.
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.profiler import ProfilerActivity, profile

import bcpt_compile  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))
from bench_sbl import block_mask_gate  # noqa: E402

DEV = "cuda"


def sbl(x, w, s):
    return F.linear(x, w) * torch.relu(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    M, K, N = 8192, 2048, 8192
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device=DEV) / math.sqrt(K)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)
    fn = torch.compile(sbl, backend="bcpt")
    for frac in (0.1, 1.0):
        s = block_mask_gate(M, N, frac).requires_grad_()

        def step():
            torch.autograd.grad(fn(x, w, s), (x, w, s), dy)

        if frac == 0.1:
            _, codes = run_and_get_code(step)
            with open(os.path.join(args.out, "sbl_inductor_code.py"), "w") as f:
                f.write("\n\n# ======== next graph\n".join(codes))
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"=== compiled fwd+bwd, block fraction {frac} (5 steps)")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=70))


if __name__ == "__main__":
    main()
