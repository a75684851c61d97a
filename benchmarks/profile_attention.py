"""Where the selected-attention backward spends its time: bcpt's kernels one by one, next to fla.

    python benchmarks/profile_attention.py [--ts 8192,32768] [--warps 4,8]

bench_attention's shapes: B 1, H 16, D 128, bf16; per-token selection (Hkv 1, 16 blocks of 64),
or with ``--case`` per-block selection or the 512 window (Hkv 4). For each T: the device time per kernel of one bcpt forward+backward and one fla
``parallel_nsa`` forward+backward (torch.profiler, 5 steps), then bcpt's fwd+bwd time
(``triton.testing.do_bench``) for each dk/dv warp count, chunk floor, and with and without the
exact delta.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import BS, HKV_BLOCK, TOPK, bcpt_call, fla_import, fla_inputs, make_qkv, make_selection  # noqa: E402

from kernel_profile import kernel_times_ms  # noqa: E402

from bcpt_compile.kernels import nsa_attention as K  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ts", default="8192,32768")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--chunks", default="256", help="DKV_CHUNK_MIN values to try")
    ap.add_argument("--case", default="token", choices=("token", "block", "window"),
                    help="per-token selection (Hkv 1, with fla), per-block selection or window 512 (Hkv 4)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    fla, note = fla_import()
    for T in (int(t) for t in args.ts.split(",")):
        per_token = args.case == "token"
        hkv = 1 if per_token else HKV_BLOCK
        q, k, v, do = make_qkv(T, hkv, dev)
        idx, counts = make_selection(T, hkv, per_token, dev)
        kind = "window" if args.case == "window" else "selected"
        scale = q.shape[-1] ** -0.5
        ins = [t.requires_grad_(True) for t in (q, k, v)]

        def bcpt_step():
            bcpt_call(kind, q, k, v, idx, counts, per_token, scale).backward(do)

        print(f"=== {args.case} T {T}: bcpt fwd+bwd kernels (ms per step)")
        for name, ms in kernel_times_ms(bcpt_step, warmup=3)[:10]:
            print(f"  {ms:8.3f}  {name[:90]}")
        if per_token and fla is not None:
            qt, kt, vt, it = fla_inputs(q, k, v, idx)
            dot = do.transpose(1, 2).contiguous()

            def fla_step():
                fla(qt, kt, vt, block_indices=it, block_counts=TOPK, block_size=BS, scale=scale).backward(dot)

            print(f"=== T {T}: fla fwd+bwd kernels (ms per step)")
            for name, ms in kernel_times_ms(fla_step, warmup=3)[:10]:
                print(f"  {ms:8.3f}  {name[:90]}")
            print(f"  fla fwd+bwd do_bench {do_bench(fla_step, grad_to_none=[qt, kt, vt], return_mode='median'):.3f} ms")
        elif per_token:
            print(f"  fla unavailable: {note}")
        defaults = K.EXACT_DELTA_16BIT, K.DKV_WARPS, K.DKV_CHUNK_MIN
        for exact in (True, False):
            K.EXACT_DELTA_16BIT = exact
            for w in (int(x) for x in args.warps.split(",")):
                K.DKV_WARPS = w
                for c in (int(x) for x in args.chunks.split(",")):
                    K.DKV_CHUNK_MIN = c
                    ms = do_bench(bcpt_step, grad_to_none=ins, return_mode="median")
                    print(f"  bcpt fwd+bwd exact_delta={exact} dkv_warps={w} chunk_min={c}: {ms:.3f} ms")
        K.EXACT_DELTA_16BIT, K.DKV_WARPS, K.DKV_CHUNK_MIN = defaults
    return 0


if __name__ == "__main__":
    sys.exit(main())
