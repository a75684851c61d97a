"""DeepEmbed FFN stack on one GPU: eager vs inductor vs bcpt (tables on GPU / on host).

RWKV-8-style layer: ``x = x + value(relu(key(ln(x))) ** 2) * deepemb(idx)`` with a
(vocab x d) table per layer. Measures, per configuration:

* step time (forward + backward, no optimizer), median over timed steps, CUDA events;
* GPU memory held by the DeepEmbed tables (parameters on the GPU plus bcpt's row cache);
* peak GPU memory allocated during a step;
* bytes copied host -> device per step (bcpt runtime counters);
* for host tables, the share of host-to-device copy time that overlaps compute kernels on
  another stream, read from a torch.profiler trace.

Run: ``python benchmarks/bench_deepembed.py`` (defaults: 12 layers, vocab 65536, d 1024,
16 x 1024 tokens, bf16; ``--quick`` for a small smoke run). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bcpt_compile  # noqa: E402,F401
from bcpt_compile import runtime  # noqa: E402


class Layer(nn.Module):
    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.key = nn.Linear(d, 4 * d, bias=False)
        self.value = nn.Linear(4 * d, d, bias=False)
        self.deepemb = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.key.weight.normal_(0, d ** -0.5)
            self.value.weight.normal_(0, (4 * d) ** -0.5)
            self.deepemb.weight.uniform_(0.5, 1.5)

    def forward(self, x, idx):
        return x + self.value(torch.relu(self.key(self.ln(x))) ** 2) * self.deepemb(idx)


class Stack(nn.Module):
    def __init__(self, layers: int, d: int, vocab: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(d, vocab) for _ in range(layers))

    def forward(self, x, idx):
        for layer in self.layers:
            x = layer(x, idx)
        return x


def zipf_tokens(batch: int, seq: int, vocab: int, s: float, gen: torch.Generator) -> torch.Tensor:
    """Token ids with a Zipf law, as text has: a few ids repeat a lot, most are rare."""
    p = torch.arange(1, vocab + 1, dtype=torch.float64) ** -s
    return torch.multinomial(p / p.sum(), batch * seq, replacement=True, generator=gen).view(batch, seq)


def table_bytes_on_gpu(model: nn.Module) -> int:
    held = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, nn.Embedding) and m.weight.is_cuda)
    for per_table in list(runtime.engine._caches.values()):
        held += sum(c.buf.numel() * c.buf.element_size() for c in per_table.values() if c.buf.is_cuda)
    return held


def copy_overlap(trace_path: str) -> tuple[float, float, float, float]:
    """(HtoD copy us, of which overlapping compute kernels us, share, HtoD bytes) from a chrome trace."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    copies, kernels, nbytes = [], [], 0.0
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        span = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        if cat == "gpu_memcpy" and "HtoD" in name:
            copies.append(span)
            nbytes += float((e.get("args") or {}).get("bytes", 0))
        elif cat == "kernel":
            kernels.append(span)
    kernels.sort()
    merged: list[list[float]] = []
    for a, b in kernels:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    total = sum(b - a for a, b in copies)
    hidden = 0.0
    for a, b in copies:
        for ka, kb in merged:  # fine for a few hundred copies
            if kb <= a:
                continue
            if ka >= b:
                break
            hidden += min(b, kb) - max(a, ka)
    return total, hidden, (hidden / total if total else float("nan")), nbytes


def run_config(name, build, args, x, idx, gy):
    cuda = x.is_cuda
    torch.compiler.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    runtime.reset_stats()
    t0 = time.time()
    model, fn, tables = build()
    first = []

    def step():
        xs = x.detach().requires_grad_()
        y = fn(xs, idx)
        y.backward(gy)
        for p in model.parameters():
            p.grad = None

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        s = time.time()
        step()
        sync()
        first.append(time.time() - s)
    runtime.reset_stats()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            s = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - s))
    stats = runtime.stats()
    row = {
        "config": name,
        "step_ms": statistics.median(times),
        "tables_gib": table_bytes_on_gpu(model) / 2 ** 30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"),
        "copied_mib": stats.bytes_copied / args.steps / 2 ** 20,
        "hidden": float("nan"),
        "warmup_s": sum(first),
    }
    if tables == "cpu":
        row["waits_ready"] = f"{stats.waits_ready}/{stats.waits}"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(2):
                    step()
                sync()
            prof.export_chrome_trace(path)
            total, hidden, share, nbytes = copy_overlap(path)
        row["hidden"] = share
        row["copy_ms"] = total / 2 / 1000
        row["trace_mib"] = nbytes / 2 / 2 ** 20
    print(f"[bench] {name}: {row['step_ms']:.2f} ms/step, built+warmed in {time.time() - t0:.0f} s", file=sys.stderr)
    del model, fn
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--zipf", type=float, default=1.1, help="token frequency exponent (0: uniform)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cache-rows", type=int, default=0, help="bcpt device row cache per table (host tables)")
    ap.add_argument("--only", default="", help="comma-separated subset of configs")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--device", default="cuda", help="cuda; 'cpu' only checks the script (TRITON_INTERPRET=1, --quick)")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.vocab, args.d, args.batch, args.seq, args.steps = 2, 4096, 256, 2, 256, 3
    if args.device == "cpu":  # a check of the script itself, not a measurement
        args.layers, args.vocab, args.d, args.batch, args.seq, args.steps, args.warmup = 2, 64, 32, 2, 16, 1, 1
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d, generator=gen).to(dev, dtype)
    idx_cpu = (zipf_tokens(args.batch, args.seq, args.vocab, args.zipf, gen) if args.zipf > 0
               else torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen))
    idx = idx_cpu.to(dev)
    gy = torch.randn(x.shape, generator=gen).to(dev, dtype)
    runtime.configure(cache_rows=args.cache_rows)

    def model_on(tables: str):
        torch.manual_seed(0)
        m = Stack(args.layers, args.d, args.vocab).to(dev, dtype)
        if tables == "cpu":
            runtime.offload_tables(m, lambda name, mod: name.endswith("deepemb"))
        return m

    def eager(tables):
        def build():
            m = model_on(tables)
            return m, m, tables
        return build

    def compiled(tables, backend, options=None):
        def build():
            m = model_on(tables)
            kw = {"options": options} if options else {}
            return m, torch.compile(m, backend=backend, **kw), tables
        return build

    configs = {
        "eager (tables on GPU)": eager("gpu"),
        "inductor (tables on GPU)": compiled("gpu", "inductor"),
        "bcpt, deepembed_tables=gpu": compiled("gpu", "bcpt"),
        "eager (tables on host)": eager("cpu"),
        "bcpt, deepembed_tables=cpu": compiled("cpu", "bcpt", {"deepembed_tables": "cpu"}),
    }
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    rows = []
    for name, build in configs.items():
        if only and not any(o in name for o in only):
            continue
        try:
            rows.append(run_config(name, build, args, x, idx, gy))
        except Exception as exc:  # keep the other rows
            print(f"[bench] {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"config": name, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
    distinct = idx_cpu.unique().numel()
    gpu_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (script check only)"
    print(f"\n{args.layers} layers, vocab {args.vocab}, d {args.d}, {args.batch}x{args.seq} tokens "
          f"({distinct} distinct, zipf {args.zipf}), {dtype}, {gpu_name}, "
          f"torch {torch.__version__}; fwd+bwd, median of {args.steps} steps\n")
    print("| config | step ms | tables on GPU GiB | peak GPU GiB | H2D MiB/step (runtime) | H2D MiB/step (trace) "
          "| copy ms/step | copy hidden | waits ready |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error']} | | | | | | | |")
            continue
        hidden = "" if r["hidden"] != r["hidden"] else f"{100 * r['hidden']:.0f} %"
        copy_ms = f"{r['copy_ms']:.2f}" if "copy_ms" in r else ""
        trace_mib = f"{r['trace_mib']:.1f}" if "trace_mib" in r else ""
        print(f"| {r['config']} | {r['step_ms']:.2f} | {r['tables_gib']:.3f} | {r['peak_gib']:.2f} | "
              f"{r['copied_mib']:.1f} | {trace_mib} | {copy_ms} | {hidden} | {r.get('waits_ready', '')} |")


if __name__ == "__main__":
    main()
