"""Launch configs of the host-row kernels (zero-copy gather, fused row update), alone and
overlapped with compute on the high-priority copy stream.

    python benchmarks/sweep_host_rows.py [--quick]

One layer's traffic of bench_deepembed.py: the distinct rows of 16 x 1024 Zipf(1.1) tokens
(about 4.3k rows of 1024 bf16) from a pinned (65536 x 1024) table. Per config:

* alone: the gather / the SGD row update by itself (do_bench median, ms);
* overlapped: a fixed chain of bf16 GEMMs on the compute stream (a stand-in for a layer's
  forward, about 1 ms) with the kernel started at the same time on the engine's copy stream;
  "cost" is how much longer the pair takes than the GEMMs alone, and "hidden" the share of
  the kernel's own time that the overlap saved against running the two back to back.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bcpt_compile.kernels import deepembed as de  # noqa: E402
from bcpt_compile.runtime import engine  # noqa: E402
from bcpt_compile.runtime.plan import build_plan, plan_tokens  # noqa: E402


def zipf_ids(tokens: int, vocab: int, s: float = 1.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    p = torch.arange(1, vocab + 1, dtype=torch.float64) ** -s
    return torch.multinomial(p / p.sum(), tokens, replacement=True, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    vocab, d, tokens = 65536, 1024, 16 * 1024
    table = torch.randn(vocab, d, dtype=torch.bfloat16).pin_memory()
    plan = build_plan(zipf_ids(tokens, vocab).to(dev))
    u = int(plan[0])
    rows = torch.empty(plan_tokens(plan), d, dtype=torch.bfloat16, device=dev)
    grad_rows = torch.randn_like(rows) * 1e-3
    stats = torch.zeros(4, dtype=torch.int64, device=dev)
    state = engine.device_state(dev)
    copy = state.copy_stream
    a = torch.randn(16384, 1024, device=dev, dtype=torch.bfloat16)
    b = torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16)

    def gemms():
        for _ in range(4):
            torch.mm(a, b)

    def gather():
        de.gather_rows_into(table, plan, rows, stats)

    def update():
        de.row_update(table, grad_rows, plan, lr=0.0, adam=False, stats=stats)  # writes the rows back unchanged

    def overlapped(kernel):
        def run():
            compute = torch.cuda.current_stream()
            copy.wait_stream(compute)
            with torch.cuda.stream(copy):
                kernel()
            gemms()
            compute.wait_stream(copy)
        return run

    mib = u * d * 2 / 2 ** 20
    t_gemm = do_bench(gemms, return_mode="median")
    print(f"{u} distinct rows = {mib:.1f} MiB per gather; GEMM chain alone {t_gemm:.3f} ms; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows_ref = table[plan[1:1 + u].cpu()].to(dev)
    # first row: the whole-grid launch shipped before (one 16 x 256 tile per program)
    grid = [(triton.cdiv(u, 16) * triton.cdiv(d, 256), 16, 256, 4)]
    grid += list(itertools.product((8, 16, 32), (4, 8), (1024,), (4, 8)) if args.quick else
                 itertools.product((8, 16, 32, 66, 132, 528), (4, 8, 16), (1024,), (4, 8)))
    print("| programs | BS | BW | warps | gather ms | GB/s | update ms | gather cost | gather hidden "
          "| update cost | update hidden |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for programs, bs, bw, warps in grid:
        de.HOST_ROWS_CUDA.update(programs=programs, BS=bs, BW=bw, num_warps=warps)
        rows.fill_(float("nan"))
        gather()
        torch.cuda.synchronize()
        assert torch.equal(rows[:u], rows_ref), "gather copied the wrong rows"
        tg = do_bench(gather, rep=50, return_mode="median")
        tu = do_bench(update, rep=50, return_mode="median")
        og = do_bench(overlapped(gather), rep=50, return_mode="median")
        ou = do_bench(overlapped(update), rep=50, return_mode="median")
        hid_g = (t_gemm + tg - og) / tg
        hid_u = (t_gemm + tu - ou) / tu
        results.append((og + ou, programs, bs, bw, warps))
        print(f"| {programs} | {bs} | {bw} | {warps} | {tg:.3f} | {mib / 1024 / tg * 1e3:.1f} | {tu:.3f} "
              f"| {og - t_gemm:+.3f} | {hid_g:.0%} | {ou - t_gemm:+.3f} | {hid_u:.0%} |", flush=True)
    best = min(results)
    print(f"best overlapped (gather + update): programs={best[1]},BS={best[2]},BW={best[3]},num_warps={best[4]}")


if __name__ == "__main__":
    main()
