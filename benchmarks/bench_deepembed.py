"""DeepEmbed FFN stack on one GPU: eager vs inductor vs bcpt, tables on the GPU or on the host.

RWKV-8-style layer: ``x = x + value(relu(key(ln(x))) ** 2) * deepemb(idx)`` with a
(vocab x d) table per layer. Configurations (``--only`` picks a subset by substring):

* ``eager gpu``, ``inductor gpu``, ``bcpt gpu``: tables on the GPU (the reference);
* ``bcpt host fused-sgd``: tables in pinned host memory, ``deepembed_tables="cpu"``, a
  ``FusedRowOptimizer`` (SGD) on the tables: the step includes the table update;
* ``bcpt host sparse``: same tables, ``nn.Embedding(sparse=True)``: the tables' ``.grad`` is a
  sparse COO host tensor of the touched rows (eager semantics of sparse=True);
* ``bcpt host fused-sgd serial``: the host-row kernels in line on the compute stream
  (``runtime.configure(overlap=False)``): serial minus ``bcpt host fused-sgd`` is the copy
  time the copy stream hides;
* with ``--all``: ``eager host`` and ``bcpt host dense`` (dense (vocab x d) host gradients,
  eager's semantics for ``sparse=False``; slow by nature).

Measured per configuration: step time (forward + backward, median over timed steps, CUDA
events; no optimizer step except the fused table update), GPU memory held by the tables,
peak GPU memory, host<->device bytes per step (runtime counters), and from a torch.profiler
trace: the time of host-table traffic (the zero-copy gather / update kernels on the copy
stream, plus any memcpy) and the share of it that overlaps compute kernels on other streams
(in the traced step: the untraced step hides more, see "serial" below).
For the GPU-table configurations and the host fused one it prints the top CUDA kernels.
The traces run in a second pass, after every configuration is timed: once a process has run
the profiler, its kernel launches stay slower (CUPTI stays attached), which inflated the
host-bound rows timed after a trace by up to 40 % (H200, 2026-12-02).

Run on the H100: ``python benchmarks/bench_deepembed.py`` (defaults: 12 layers, vocab 65536,
d 1024, 16 x 1024 tokens, bf16; about 2-3 minutes, mostly compilation). ``--device cpu``
only checks the script (tiny sizes, Triton interpreter).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
if "--device=cpu" in sys.argv or "--device cpu" in " ".join(sys.argv):  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bcpt_compile  # noqa: F401
from bcpt_compile import runtime


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


HOST_TRAFFIC_KERNELS = ("_gather_rows_kernel", "_row_update_kernel")
#: What ``--pytrace`` lists: bcpt's functions, Triton's launch path, the custom-op machinery.
PYTRACE_KEYS = ("bcpt_compile", "triton/", "_library/", "torch/cuda/", "_ops.py")
TRACE_KEYS = ("copy_ms", "hidden", "per_kind", "top", "kernel_ms", "busy_ms", "host_top", "timeline", "gaps")


def _merge(spans):
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _overlap(a: float, b: float, merged) -> float:
    out = 0.0
    for ka, kb in merged:  # fine for a few thousand spans
        if kb <= a:
            continue
        if ka >= b:
            break
        out += min(b, kb) - max(a, ka)
    return out


def trace_analysis(trace_path: str, steps: int) -> dict:
    """Host-table traffic per step from a chrome trace: time of the copy kernels / memcpys, the
    share overlapping compute kernels on other streams, and the top kernels by time."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    traffic, compute, kernel_time = [], {}, {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        stream = (e.get("args") or {}).get("stream", e.get("tid"))
        span = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        if cat == "gpu_memcpy" and ("HtoD" in name or "DtoH" in name):
            traffic.append((span, stream, "memcpy " + ("HtoD" if "HtoD" in name else "DtoH")))
        elif cat == "kernel":
            kernel_time[name] = kernel_time.get(name, 0.0) + span[1] - span[0]
            if any(k in name for k in HOST_TRAFFIC_KERNELS):
                traffic.append((span, stream, next(k for k in HOST_TRAFFIC_KERNELS if k in name)))
            else:
                compute.setdefault(stream, []).append(span)
    merged_other = {s: _merge([sp for t, spans in compute.items() if t != s for sp in spans])
                    for s in {s for _, s, _ in traffic}}
    total = hidden = 0.0
    per_kind: dict[str, list[float]] = {}
    for (a, b), stream, kind in traffic:
        ov = _overlap(a, b, merged_other[stream])
        total += b - a
        hidden += ov
        k = per_kind.setdefault(kind, [0.0, 0.0])
        k[0] += b - a
        k[1] += ov
    top = sorted(kernel_time.items(), key=lambda kv: -kv[1])[:12]
    busy = _merge([sp for spans in compute.values() for sp in spans])
    t0 = min([a for (a, _), _, _ in traffic] + [a for a, _ in busy], default=0.0)
    # when the traffic ran and what compute did meanwhile, and where compute stood idle
    timeline = [(round((a - t0) / 1000, 3), kind, round((b - a) / 1000, 3),
                 round(_overlap(a, b, merged_other[stream]) / (b - a), 2) if b > a else 1.0)
                for (a, b), stream, kind in sorted(traffic)]
    gaps = [(round((a0 - t0) / 1000, 3), round((b0 - a0) / 1000, 3))
            for (_, a0), (b0, _) in zip(busy, busy[1:]) if b0 - a0 > 30]
    return {
        # compute kernels' union: step time minus this is when the GPU computed nothing
        "busy_ms": sum(b - a for a, b in busy) / steps / 1000,
        "copy_ms": total / steps / 1000,
        "hidden": hidden / total if total else float("nan"),
        "per_kind": {k: (v[0] / steps / 1000, v[1] / v[0] if v[0] else float("nan")) for k, v in per_kind.items()},
        "top": [(n, t / steps / 1000) for n, t in top],
        "kernel_ms": sum(kernel_time.values()) / steps / 1000,
        "timeline": timeline,
        "gaps": gaps,
    }


def python_time(step, sync, steps: int) -> list[tuple[str, float, float]]:
    """[(function, inclusive ms per step, calls per step)] from torch.profiler's Python
    stacks: a recursive function counts once per outermost call."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "py.json")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
            for _ in range(steps):
                step()
            sync()
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    per_thread: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "python_function":
            per_thread.setdefault(e.get("tid"), []).append((float(e["ts"]), float(e.get("dur", 0)), e["name"]))
    total: dict[str, list[float]] = {}
    for spans in per_thread.values():
        open_until: dict[str, float] = {}  # name -> end of its outermost open call
        for ts, dur, fn_name in sorted(spans):
            if open_until.get(fn_name, -1.0) > ts:
                continue
            open_until[fn_name] = ts + dur
            acc = total.setdefault(fn_name, [0.0, 0.0])
            acc[0] += dur
            acc[1] += 1
    rows = [(n, v[0] / steps / 1000, v[1] / steps) for n, v in total.items()]
    return sorted(rows, key=lambda r: -r[1])


def run_config(name, build, args, x, idx, gy, trace: bool = False):
    cuda = x.is_cuda
    torch.compiler.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    runtime.reset_stats()
    t0 = time.time()
    model, fn, host, extra = build()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        xs = x.detach().requires_grad_()
        y = fn(xs, idx)
        y.backward(gy)
        for p in model.parameters():
            p.grad = None

    for _ in range(args.warmup):
        step()
        sync()
    warm_s = time.time() - t0
    runtime.reset_stats()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = args.steps if "dense" not in name and "eager host" not in name else max(2, args.steps // 3)
    times, host_times = [], []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            s = time.perf_counter()
            step()
            host_times.append(1e3 * (time.perf_counter() - s))  # the host's issue time, no sync
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            s = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - s))
    sync()
    stats = runtime.stats()
    row = {
        "config": name,
        "step_ms": statistics.median(times),
        "host_ms": statistics.median(host_times) if host_times else float("nan"),
        "tables_gib": table_bytes_on_gpu(model) / 2 ** 30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"),
        "h2d_mib": stats.bytes_copied / steps / 2 ** 20,
        "d2h_mib": stats.grad_bytes_to_host / steps / 2 ** 20,
        "rows_updated": stats.rows_updated / steps,
        "waits": f"{stats.waits_ready}/{stats.waits}" if stats.waits else "",
        "syncs": stats.sync_gathers,
        "hidden": float("nan"),
        "warm_s": warm_s,
        "extra": extra,
    }
    if stats.rows_updated:  # fused update: read + write of each updated row
        row["upd_mib"] = 2 * stats.rows_updated / steps * args.d * x.element_size() / 2 ** 20
    if trace and (host or name in ("bcpt gpu", "inductor gpu")):
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
            row.update(trace_analysis(path, 2))
            # host side: where a step's CPU time goes, and any call that waits for the GPU
            host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
            row["host_top"] = [(e.key, e.self_cpu_time_total / 2 / 1000, e.count // 2) for e in host]
    if args.pytrace:
        print(f"\n[pytrace] {name}: bcpt's, Triton's and the op machinery's Python functions by inclusive host "
              "ms per step, every thread (the backward runs on the autograd engine's device thread, which "
              "cProfile misses)", file=sys.stderr)
        ours = [r for r in python_time(step, sync, steps=3) if any(k in r[0] for k in PYTRACE_KEYS)]
        for fn_name, ms, calls in ours[:40]:
            print(f"  {ms:8.3f} {calls:6.1f}  {fn_name[:120]}", file=sys.stderr)
    if args.cprofile:  # the Python side of a step: where host-bound configurations spend it
        import cProfile
        import pstats

        prof_py = cProfile.Profile()
        prof_py.enable()
        for _ in range(5):
            step()
        sync()
        prof_py.disable()
        print(f"\n[cprofile] {name}, 5 steps", file=sys.stderr)
        stats_py = pstats.Stats(prof_py, stream=sys.stderr)
        stats_py.sort_stats("tottime").print_stats(20)
        stats_py.sort_stats("cumtime").print_stats("bcpt_compile", 25)
    print(f"[bench] {name}: {row['step_ms']:.2f} ms/step, host {row['host_ms']:.2f} ms (built + warmed in {warm_s:.0f} s, "
          f"total {time.time() - t0:.0f} s)", file=sys.stderr)
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
    ap.add_argument("--cache-rows", type=int, default=0, help="bcpt device row cache per table (host tables; "
                    "> 0 uses the host-bookkept path)")
    ap.add_argument("--only", default="", help="comma-separated substrings of config names")
    ap.add_argument("--all", action="store_true", help="also the dense-gradient host configs (slow)")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="skip the profiler traces")
    ap.add_argument("--cprofile", action="store_true", help="print each configuration's Python hot spots")
    ap.add_argument("--timeline", action="store_true", help="print the traced steps' host-traffic kernels "
                    "and the compute streams' idle gaps")
    ap.add_argument("--pytrace", action="store_true", help="Python functions' host time on every thread "
                    "(torch.profiler stacks), per configuration")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--device", default="cuda", help="cuda; 'cpu' only checks the script (TRITON_INTERPRET=1)")
    ap.add_argument("--rounds", type=int, default=1, help="time every configuration this many times, interleaved")
    ap.add_argument("--host-rows", default="", help="override the host-row kernels' CUDA launch config, "
                    "e.g. programs=16,BS=8,BW=1024,num_warps=4")
    args = ap.parse_args()
    if args.host_rows:
        from bcpt_compile.kernels import deepembed as de

        de.HOST_ROWS_CUDA.update({k: int(v) for k, v in (kv.split("=") for kv in args.host_rows.split(","))})
        print(f"[bench] host-row kernels: {de.HOST_ROWS_CUDA}", file=sys.stderr)
    if args.quick:
        args.layers, args.vocab, args.d, args.batch, args.seq, args.steps = 2, 4096, 256, 2, 256, 3
    if args.device == "cpu":  # a check of the script itself, not a measurement
        os.environ.setdefault("TRITON_INTERPRET", "1")
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

    def model_on(tables: str, sparse: bool = False):
        torch.manual_seed(0)
        m = Stack(args.layers, args.d, args.vocab).to(dev, dtype)
        if tables == "host":
            runtime.offload_tables(m, lambda name, mod: name.endswith("deepemb"), sparse=sparse)
        return m

    def eager(tables):
        def build():
            m = model_on(tables)
            return m, m, tables == "host", None
        return build

    def compiled(tables, backend, grad="dense", overlap=True):
        def build():
            runtime.configure(overlap=overlap)  # reset to True after each configuration
            m = model_on(tables, sparse=(grad == "sparse"))
            extra = None
            if grad == "fused-sgd":
                extra = runtime.FusedRowOptimizer([l.deepemb for l in m.layers], kind="sgd", lr=1e-4)
            kw = {"options": {"deepembed_tables": "cpu"}} if tables == "host" else {}
            return m, torch.compile(m, backend=backend, **kw), tables == "host", extra
        return build

    configs = {
        "eager gpu": eager("gpu"),
        "inductor gpu": compiled("gpu", "inductor"),
        "bcpt gpu": compiled("gpu", "bcpt"),
        "bcpt host fused-sgd": compiled("host", "bcpt", "fused-sgd"),
        "bcpt host sparse": compiled("host", "bcpt", "sparse"),
        # the host-row kernels in line on the compute stream: the step without any overlap
        "bcpt host fused-sgd serial": compiled("host", "bcpt", "fused-sgd", overlap=False),
    }
    if args.all:
        configs["eager host"] = eager("host")
        configs["bcpt host dense"] = compiled("host", "bcpt", "dense")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    rows, traced = [], []
    t_start = time.time()
    picked = [(name, build) for name, build in configs.items() if not only or any(o in name for o in only)]
    for rnd, (name, build) in itertools.product(range(args.rounds), picked):  # rounds interleave the configs
        if rnd:
            name = f"{name} (round {rnd + 1})"
        try:
            rows.append(run_config(name, build, args, x, idx, gy))
            if args.trace and not rnd:  # a profiled process launches slower ever after: trace in a second pass
                traced.append((name, build, rows[-1]))
        except Exception as exc:  # noqa: BLE001  keep the other rows
            import traceback

            traceback.print_exc()
            print(f"[bench] {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"config": name, "error": f"{type(exc).__name__}: {str(exc)[:100]}"})
        finally:
            runtime.configure(overlap=True)
            for r in rows[-1:]:
                if r.get("extra") is not None:
                    r["extra"].remove()
    for name, build, row in traced:
        if "error" in row or not (name in ("bcpt gpu", "inductor gpu") or "host" in name):
            continue
        try:
            again = run_config(name, build, argparse.Namespace(**{**vars(args), "steps": 2, "cprofile": False}),
                               x, idx, gy, trace=True)
            row.update({k: again[k] for k in TRACE_KEYS if k in again})
            if again.get("extra") is not None:
                again["extra"].remove()
        except Exception as exc:  # noqa: BLE001  keep the timings
            print(f"[bench] {name} trace failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    distinct = idx_cpu.unique().numel()
    gpu_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (script check only)"
    esize = x.element_size()
    print(f"\n{args.layers} layers, vocab {args.vocab}, d {args.d}, {args.batch}x{args.seq} tokens "
          f"({distinct} distinct, zipf {args.zipf}), {dtype}, {gpu_name}, torch {torch.__version__}; "
          f"fwd+bwd, median of {args.steps} steps; {time.time() - t_start:.0f} s in all")
    print(f"distinct rows per step and table: {distinct} = {distinct * args.d * esize / 2 ** 20:.1f} MiB; "
          f"a dense (vocab x d) table gradient is {args.vocab * args.d * esize / 2 ** 20:.0f} MiB per table\n")
    ref = next((r["step_ms"] for r in rows if r.get("config") == "eager gpu" and "error" not in r), None)
    print("| config | step ms | vs eager gpu | tables on GPU GiB | peak GPU GiB | H2D rows MiB/step "
          "| D2H grad MiB/step | fused update MiB/step | host traffic ms/step | hidden | waits ready | sync gathers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error']} | | | | | | | | | | |")
            continue
        vs = f"{r['step_ms'] / ref:.3f}x" if ref else ""
        hidden = "" if r["hidden"] != r["hidden"] else f"{100 * r['hidden']:.0f} %"
        copy_ms = f"{r['copy_ms']:.2f}" if r.get("copy_ms") else ""
        upd = f"{r['upd_mib']:.1f}" if "upd_mib" in r else ""
        print(f"| {r['config']} | {r['step_ms']:.2f} | {vs} | {r['tables_gib']:.3f} | {r['peak_gib']:.2f} | "
              f"{r['h2d_mib']:.1f} | {r['d2h_mib']:.1f} | {upd} | {copy_ms} | {hidden} | {r['waits']} | {r['syncs']} |")
    for r in rows:
        if r.get("per_kind"):
            parts = ", ".join(f"{k}: {ms:.2f} ms/step, {100 * h:.0f} % hidden" for k, (ms, h) in r["per_kind"].items())
            print(f"\n{r['config']} host traffic: {parts}")
        if r.get("timeline") and args.timeline:
            print(f"\n{r['config']}: traced steps' host traffic (start ms, kernel, ms, share overlapping compute)")
            for ev in r["timeline"]:
                print(f"  {ev[0]:8.3f}  {ev[1]:22s} {ev[2]:6.3f} {ev[3]:5.2f}")
            print(f"{r['config']}: compute idle > 30 us (start ms, ms): {r['gaps']}")
    for r in rows:
        if "host_top" in r:
            print(f"\n{r['config']}: top host ops (self CPU ms/step, calls/step)")
            for n, ms, calls in r["host_top"]:
                print(f"  {ms:8.3f} {calls:5d}  {n[:100]}")
        if "top" in r:
            print(f"\n{r['config']}: top CUDA kernels (ms/step, of {r['kernel_ms']:.2f} ms of kernel time; "
                  f"compute busy {r.get('busy_ms', float('nan')):.2f} ms of the traced step)")
            for n, ms in r["top"]:
                print(f"  {ms:8.3f}  {n[:110]}")


if __name__ == "__main__":
    main()
