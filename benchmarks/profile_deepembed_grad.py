"""The DeepEmbed table gradient (``plan_segment_sum``, MODE 1) alone, on bench_deepembed's shapes.

    python benchmarks/profile_deepembed_grad.py [--layers 12] [--quick]
    python benchmarks/profile_deepembed_grad.py --device cpu      # checks the script only

16384 tokens (Zipf 1.1 ids as ``bench_deepembed.zipf_tokens``, and uniform ids), d 1024,
vocab 65536, bf16 ``dy`` and ``z``; one row plan per id set (``build_plan``). Times with
``triton.testing.do_bench`` (median), per call into a zeroed bf16 (vocab x d) gradient:

* ``rows``: the previous kernel (one program per distinct row walking its tokens);
* ``tiles``: the current default, and launch variants (BT, BW, BJ, num_warps) of it;
* for reference: eager's ``zeros + index_add_(dy * z)``, eager's embedding backward (both
  with the multiply and the dense fill) and the zero fill alone (outside ``plan_segment_sum``,
  the same for every variant). GB/s: the segment sum's own traffic (dy, z read once, the
  distinct rows written) over its time.

Checks before timing, into fp32 gradients: each tiles variant bitwise equal over two calls,
within the worst-case fp32 summation error ((n + 1) 2^-24 sum |v| for a row of n tokens) of
a float64 sum, and whether it equals ``rows`` bit for bit (else the gap, in units of that
bound); for the default, no host sync (``torch.cuda.set_sync_debug_mode("error")``) and a
CUDA graph replay equal to the eager call, then its device time per kernel. Exits 1 if a
check fails. About 30-60 s on an H100 / H200, mostly compiling the variants.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

# (impl, BT, BW, BJ, num_warps); the first tiles entry should be the module default
CUDA_VARIANTS = [
    ("rows", 32, 128, 16, 4),
    ("tiles", 32, 128, 16, 4),
    ("tiles", 16, 128, 16, 4),
    ("tiles", 64, 128, 16, 4),
    ("tiles", 32, 256, 16, 4),
    ("tiles", 32, 256, 16, 8),
    ("tiles", 16, 256, 16, 4),
    ("tiles", 64, 256, 16, 8),
    ("tiles", 16, 512, 16, 8),
    ("tiles", 128, 64, 16, 4),
    ("tiles", 32, 128, 64, 4),
]
CPU_VARIANTS = [("rows", 4, 16, 2, 1), ("tiles", 4, 16, 2, 1), ("tiles", 8, 8, 4, 1)]


def make_inputs(torch, dist: str, tokens: int, width: int, vocab: int, dev, dtype, gen):
    from bench_deepembed import zipf_tokens

    if dist == "zipf":
        idx = zipf_tokens(1, tokens, vocab, 1.1, gen).view(-1)
    else:
        idx = torch.randint(0, vocab, (tokens,), generator=gen)
    dy = torch.randn(tokens, width, generator=gen).to(dev, dtype)
    z = torch.randn(tokens, width, generator=gen).to(dev, dtype)
    return idx.to(dev), dy, z


def use(de, variant, device_type: str) -> dict:
    """Make plan_segment_sum launch this variant on the device type."""
    impl, bt, bw, bj, warps = variant
    cfg = {"impl": impl, "BT": bt, "BW": bw, "BJ": bj, "num_warps": warps}
    de.SEGMENT_SUM_LAUNCH[device_type] = cfg
    return cfg


def check(torch, de, plan, dy, z, ref32, ref64, bound, variant) -> tuple[bool, str]:
    """(ok, note): the variant's fp32 gradient is bitwise stable over two calls and, as ``rows``,
    within the worst-case fp32 summation error of the float64 sum."""
    use(de, variant, dy.device.type)
    out = [de.plan_segment_sum(dy, z, plan, torch.zeros_like(ref32), 1) for _ in range(2)]
    if not torch.equal(out[0], out[1]):
        return False, "NOT DETERMINISTIC"
    worst = ((out[0].double() - ref64).abs() / bound).max().item()
    if worst > 1:
        return False, f"OFF FLOAT64 by {worst:.1f}x the fp32 error bound"
    if torch.equal(out[0], ref32):
        return True, "bitwise == rows"
    diff = ((out[0].double() - ref32.double()).abs() / bound).max().item()
    return True, f"fp32 rounding vs rows ({diff:.0e} of the bound)"


def graph_and_sync_check(torch, de, plan, dy, z, vocab) -> tuple[bool, str]:
    """Fails (raises) on a host sync inside plan_segment_sum; compares a CUDA graph replay with the eager call."""
    out = torch.zeros(vocab, dy.shape[1], dtype=dy.dtype, device=dy.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        de.plan_segment_sum(dy, z, plan, out, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = out.clone()
    captured = torch.zeros_like(out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture (compiles the kernels)
        de.plan_segment_sum(dy, z, plan, captured, 1)
    torch.cuda.current_stream().wait_stream(stream)
    captured.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        de.plan_segment_sum(dy, z, plan, captured, 1)
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(captured, eager)
    return same, "no host sync; CUDA graph replay == eager call" if same else "CUDA GRAPH REPLAY DIFFERS"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--layers", type=int, default=12, help="calls per training step, for the ms/step column")
    ap.add_argument("--dists", default="zipf,uniform")
    ap.add_argument("--quick", action="store_true", help="the default tiles variant and rows only")
    ap.add_argument("--device", default="cuda", help="cuda; 'cpu' only checks the script (Triton interpreter)")
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if cpu:  # before triton is imported: kernels decorated afterwards run in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        args.tokens, args.width, args.vocab = 40, 24, 128
    import torch
    from triton.testing import do_bench

    from bcpt_compile.kernels import deepembed as de
    from bcpt_compile.runtime.plan import build_plan, views

    if not cpu:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --device cpu)"
    dev = torch.device(args.device)
    dtype = torch.bfloat16
    variants = CPU_VARIANTS if cpu else CUDA_VARIANTS
    if args.quick:
        variants = variants[:2]
    default = dict(de.SEGMENT_SUM_LAUNCH[dev.type])
    t_start = time.time()

    def bench(fn) -> float:
        if cpu:  # one timed call: the interpreter is not worth timing
            s = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - s)
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name() if not cpu else "cpu (script check only)"
    print(f"plan_segment_sum MODE 1 (sum of dy * z per row), {args.tokens} tokens x d {args.width}, "
          f"vocab {args.vocab}, "
          f"{dtype}, {name}, torch {torch.__version__}; default launch {default}")
    rows_out = []
    failures = 0
    for dist in args.dists.split(","):
        idx, dy, z = make_inputs(torch, dist, args.tokens, args.width, args.vocab, dev, dtype, gen)
        plan = build_plan(idx)
        v = views(plan)
        distinct = int(v.count)
        longest = int(v.starts.diff()[:distinct].max())
        moved = 2 * dy.numel() * dy.element_size() + distinct * args.width * dy.element_size()
        prod = dy.double() * z.double()  # exact: bf16 x bf16 fits a double
        ref64 = torch.zeros(args.vocab, args.width, dtype=torch.float64, device=dev).index_add_(0, idx, prod)
        # any fp32 summation order of a row's n products (each rounded once) is within
        # (n + 1) 2^-24 sum |v| of the exact sum (plus a tiny absolute term for empty rows)
        abs_sum = torch.zeros_like(ref64).index_add_(0, idx, prod.abs())
        counts = torch.bincount(idx, minlength=args.vocab).double()[:, None]
        bound = (counts + 1) * 2.0 ** -24 * abs_sum + 1e-30
        del prod, abs_sum
        use(de, variants[0], dev.type)  # rows: the reference of the checks
        ref32 = de.plan_segment_sum(dy, z, plan, torch.zeros(args.vocab, args.width, device=dev), 1)
        print(f"\n{dist}: {distinct} distinct rows, longest {longest} tokens; "
              f"{moved / 2 ** 20:.0f} MiB read + written per call")
        out = torch.zeros(args.vocab, args.width, dtype=dtype, device=dev)
        zero_ms = bench(lambda: out.zero_())
        shape = (args.vocab, args.width)
        index_add_ms = bench(lambda: torch.zeros(shape, dtype=dtype, device=dev).index_add_(0, idx, dy * z))
        embedding_ms = bench(lambda: torch.ops.aten.embedding_dense_backward(dy * z, idx, args.vocab, -1, False))
        base_ms = None
        for variant in variants:
            if variant[0] == "rows":
                ok, note = True, "baseline"
            else:
                ok, note = check(torch, de, plan, dy, z, ref32, ref64, bound, variant)
            failures += not ok
            cfg = use(de, variant, dev.type)
            ms = bench(lambda: de.plan_segment_sum(dy, z, plan, out, 1))
            base_ms = ms if variant[0] == "rows" and base_ms is None else base_ms
            rows_out.append((dist, cfg, ms, moved / ms / 1e6, base_ms / ms, note))
        dense = "includes mul and (V x d) fill"
        for label, ms, note in (("eager zeros + index_add_(dy * z)", index_add_ms, dense),
                                ("eager embedding_dense_backward(dy * z)", embedding_ms, dense),
                                ("zero fill of the (V x d) gradient", zero_ms, "outside plan_segment_sum")):
            rows_out.append((dist, {"impl": label}, ms, float("nan"), base_ms / ms, note))
        del ref64, bound
        de.SEGMENT_SUM_LAUNCH[dev.type] = dict(default)
        if not cpu:
            ok, note = graph_and_sync_check(torch, de, plan, dy, z, args.vocab)
            failures += not ok
            print(f"  default launch: {note}")
            from kernel_profile import kernel_times_ms

            per_kernel = ", ".join(f"{name} {1e3 * ms:.1f} us"
                                   for name, ms in kernel_times_ms(lambda: de.plan_segment_sum(dy, z, plan, out, 1)))
            print(f"  default launch, per kernel: {per_kernel}")
    print(f"\n| ids | impl | BT | BW | BJ | warps | ms/call | ms/step (x{args.layers}) | GB/s | speedup vs rows "
          "| check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dist, cfg, ms, gbs, speedup, verdict in rows_out:
        launch = " | ".join(str(cfg.get(k, "")) for k in ("BT", "BW", "BJ", "num_warps"))
        bandwidth = "" if gbs != gbs else f"{gbs:.0f}"
        print(f"| {dist} | {cfg['impl']} | {launch} | {ms:.4f} | {ms * args.layers:.3f} | {bandwidth} | {speedup:.2f}x "
              f"| {verdict} |")
    print(f"\n{time.time() - t_start:.0f} s in all; {failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
