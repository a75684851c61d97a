"""Host time of the host-table ops on CUDA: 12 tables prefetched one op per table
(``prefetch_rows([t])`` each) or in one op (``prefetch_rows(tables)``), each then waited
for; and the backward's fused row update (``rows_to_table_grad`` with a
``FusedRowOptimizer``), peeled layer by layer: the op, ``fused.apply_rows`` called
directly, and the bare ``row_update`` launch. No sync inside the timed loops, so this is
what the host spends issuing them.

    python benchmarks/host_overhead_prefetch.py [--tables 12] [--vocab 65536] [--d 1024] [--tokens 16384]

Prints one JSON line (ms per round of 12 prefetch + wait, and one ``row_plan`` for scale).
"""

import argparse
import json
import time

import torch

import bcpt_compile  # noqa: F401  registers the ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16 * 1024)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    tables = [torch.randn(args.vocab, args.d, dtype=torch.bfloat16).pin_memory() for _ in range(args.tables)]
    idx = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    plan = torch.ops.bcpt.row_plan(idx, args.vocab, False)
    out = {}

    def timed(name, fn):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.rounds):
            fn()
        out[name] = (time.perf_counter() - start) / args.rounds * 1e3
        torch.cuda.synchronize()

    def one_op_per_table():
        handles = [torch.ops.bcpt.prefetch_rows([t], plan, "cuda") for t in tables]
        for h, t in zip(handles, tables):
            torch.ops.bcpt.wait_rows(h, t, plan, "cuda", "dense", 0)

    def one_op_for_all():
        h = torch.ops.bcpt.prefetch_rows(tables, plan, "cuda")
        for slot, t in enumerate(tables):
            torch.ops.bcpt.wait_rows(h, t, plan, "cuda", "dense", slot)

    timed(f"{args.tables} prefetch+wait, one prefetch per table (ms)", one_op_per_table)
    timed(f"{args.tables} prefetch+wait, one grouped prefetch (ms)", one_op_for_all)
    timed("row_plan (ms)", lambda: torch.ops.bcpt.row_plan(idx, args.vocab, False))

    from torch import nn

    from bcpt_compile.kernels.deepembed import row_update
    from bcpt_compile.runtime import fused

    params = [nn.Parameter(t, requires_grad=True) for t in tables]
    opt = fused.FusedRowOptimizer(params, kind="sgd", lr=1e-3)
    modes = [fused.mode_for(p) for p in params]
    grads = [torch.randn(args.tokens, args.d, dtype=torch.bfloat16, device="cuda") for _ in tables]
    with torch.no_grad():
        timed(f"{args.tables} rows_to_table_grad, fused (ms)", lambda: [
            torch.ops.bcpt.rows_to_table_grad(g, p, plan, m) for g, p, m in zip(grads, params, modes)])
        timed(f"{args.tables} fused.apply_rows (ms)", lambda: [
            fused.apply_rows(g, p, plan, m) for g, p, m in zip(grads, params, modes)])
        timed(f"{args.tables} row_update launches (ms)", lambda: [
            row_update(p, g, plan, lr=1e-3, adam=False) for g, p in zip(grads, params)])
        inv = plan[1:1 + args.tokens]
        timed(f"{args.tables} inv.clone() (ms)", lambda: [inv.clone() for _ in tables])
        timed(f"{args.tables} torch.empty (ms)", lambda: [
            torch.empty((args.tokens, args.d), dtype=torch.bfloat16, device="cuda") for _ in tables])
    opt.remove()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
