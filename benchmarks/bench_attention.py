"""bcpt sparse attention kernels on a CUDA GPU: correctness at real sizes, then timings side by side.

    python benchmarks/bench_attention.py              # H100: under about 4 minutes (see --budget)
    python benchmarks/bench_attention.py --quick      # T = 8k only
    python benchmarks/bench_attention.py --cpu-check  # no GPU: this script's own logic at small sizes

Shapes: B=1, H=16, D=128, bf16, causal. Selected attention picks 16 key blocks of 64 per query
(random importance over the causal blocks, the query's own block always kept, -1 where a
row has fewer than 16 blocks), in two layouts: one selection per token, GQA 16:1 (native
sparse attention, what fla's ``parallel_nsa`` computes), and one per 64-query block, Hkv 4
(DynNSA). The sliding window is 512 tokens, Hkv 4.

Timed, forward and forward+backward (median ms of ``triton.testing.do_bench``):

* per-token selection at T = 8k, 32k, 64k: bcpt, fla ``parallel_nsa`` (its [B, T, H, D]
  layout, GQA >= 16), FlexAttention with the block mask prebuilt and with
  ``create_block_mask`` added (a per-step top-k rebuilds it every step), causal SDPA (dense,
  K/V expanded to all heads so the flash kernel runs), and eager masked dense attention
  where its T x T scores fit in memory (8k);
* sliding window 512 at 32k: bcpt, FlexAttention (+ mask), causal SDPA;
* per-block selection at T = 8k, 32k, 64k: bcpt, causal SDPA.

Cases run per-token 8k, window, per-token 32k and 64k, per-block; once ``--budget`` seconds
(default 180) have passed, the optional peers (flex, fla, eager) are skipped and reported,
so slow compiles cannot push the run past about 4 minutes.
FlexAttention is compiled once with automatic dynamic shapes (a second T recompiles it
with T dynamic, further T reuse that). A peer that fails is reported, not fatal.

Correctness first (bf16 vs exact float32 attention computed in query chunks, TF32 off; max
error / max reference; ok when <= 1e-2 or <= 1.5x eager bf16's own error): per-token at 8k
(the layout whose dk failed on the H100) and 64k, per-block at 8k, window at 32k. Each
timed peer's forward output is also compared with bcpt's (the "vs bcpt" note).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

B, H, D = 1, 16, 128
BS, TOPK = 64, 16
WINDOW = 512
HKV_BLOCK = 4  # KV heads for the per-block (DynNSA) and window cases; per-token is GQA 16:1
TS, T_WINDOW, T_QUICK = (8192, 32768, 65536), 32768, 8192


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs

def make_selection(T: int, hkv: int, per_token: bool, device, seed: int = 0):
    """Top-TOPK causal blocks per query row (random importance, own block forced), -1 padding.

    Rows are query blocks of BS (DynNSA) or tokens (NSA). Blocks in the future of the row are
    never chosen: early rows that have fewer than TOPK causal blocks get -1 slots.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    nkb = math.ceil(T / BS)
    nq = T if per_token else nkb
    qblock = (torch.arange(nq, device=device) // BS) if per_token else torch.arange(nq, device=device)
    imp = torch.rand((B, hkv, nq, nkb), generator=g, device=device)
    future = torch.arange(nkb, device=device)[None, :] > qblock[:, None]
    imp = imp.masked_fill(future, float("-inf"))
    imp.scatter_(-1, qblock.view(1, 1, nq, 1).expand(B, hkv, nq, 1), 2.0)
    top = imp.topk(min(TOPK, nkb), dim=-1)
    idx = torch.where(torch.isinf(top.values), -1, top.indices).to(torch.int32).contiguous()
    counts = torch.full((B, hkv, nq), idx.shape[-1], dtype=torch.int32, device=device)
    return idx, counts


def make_qkv(T: int, hkv: int, device, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn((B, H, T, D), generator=g, device=device, dtype=dtype)
    k = torch.randn((B, hkv, T, D), generator=g, device=device, dtype=dtype)
    v = torch.randn((B, hkv, T, D), generator=g, device=device, dtype=dtype)
    do = torch.randn((B, H, T, D), generator=g, device=device, dtype=dtype)
    return q, k, v, do


# ----------------------------------------------------------------------------- exact reference

def _visible_rows(kind, rows: torch.Tensor, T: int, idx, counts, per_token: bool) -> torch.Tensor:
    """bool (B, Hkv|1, len(rows), T) visibility of the given query rows (built per chunk, never T x T)."""
    keys = torch.arange(T, device=rows.device)
    causal = keys[None, :] <= rows[:, None]
    if kind == "window":
        return (causal & (rows[:, None] - keys[None, :] < WINDOW))[None, None]
    nkb = math.ceil(T / BS)
    r = rows if per_token else rows // BS
    sel_idx = idx[:, :, r].long()
    valid = (torch.arange(sel_idx.shape[-1], device=rows.device) < counts[:, :, r, None]) & (sel_idx >= 0)
    sel = torch.zeros((*sel_idx.shape[:-1], nkb + 1), dtype=torch.bool, device=rows.device)
    sel.scatter_(-1, torch.where(valid, sel_idx, nkb), True)
    return sel[..., :nkb].repeat_interleave(BS, dim=-1)[..., :T] & causal


@torch.no_grad()
def reference(kind, q, k, v, do, idx, counts, per_token, scale, chunk=2048, dtype=torch.float32):
    """(out, dq, dk, dv) of masked attention, query-chunked; empty rows give 0 like the kernels.

    float32: the exact reference. bfloat16: what eager computes in bf16 (same formulas,
    bf16 tensors), the yardstick for how far from exact a bf16 implementation may be.
    """
    T = q.shape[2]
    G = H // k.shape[1]
    qf, kf, vf, dof = (t.to(dtype) for t in (q, k, v, do))
    out = torch.empty_like(qf)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf, dtype=torch.float32)  # chunk sums in fp32: eager reduces over all queries at once
    dv = torch.zeros_like(vf, dtype=torch.float32)
    for c0 in range(0, T, chunk):
        rows = torch.arange(c0, min(T, c0 + chunk), device=q.device)
        vis = _visible_rows(kind, rows, T, idx, counts, per_token)       # (B, Hkv|1, c, T)
        for hk in range(k.shape[1]):
            kk, vv = kf[:, hk], vf[:, hk]                                    # (B, T, D)
            m = vis[:, hk if vis.shape[1] > 1 else 0]                         # (B, c, T)
            for g in range(G):
                h = hk * G + g
                qq, gg = qf[:, h, rows], dof[:, h, rows]
                s = (qq @ kk.transpose(-1, -2)) * scale
                s = s.masked_fill(~m, float("-inf"))
                lse = torch.logsumexp(s, -1, keepdim=True)
                p = torch.where(m, torch.exp(s - lse.nan_to_num(posinf=0.0, neginf=0.0)), 0.0)
                o = p @ vv
                out[:, h, rows] = o
                ds = p * (gg @ vv.transpose(-1, -2) - (gg * o).sum(-1, keepdim=True))
                dq[:, h, rows] = (ds @ kk) * scale
                dk[:, hk] += (ds.transpose(-1, -2) @ qq) * scale
                dv[:, hk] += p.transpose(-1, -2) @ gg
    return out, dq, dk, dv


# ----------------------------------------------------------------------------- implementations

def bcpt_call(kind, q, k, v, idx, counts, per_token, scale):
    import bcpt_compile.lowering  # noqa: F401  registers torch.ops.bcpt.*

    if kind == "window":
        return torch.ops.bcpt.sliding_window_attention(q, k, v, WINDOW, scale)[0]
    return torch.ops.bcpt.nsa_selected_attention(q, k, v, idx, counts, BS, 1 if per_token else BS, True, scale)[0]


def sdpa_call(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def dense_mask(kind, T, idx, counts, per_token, device) -> torch.Tensor:
    """The bool (B, Hkv|1, T, T) mask eager attention needs (built once, not timed)."""
    return _visible_rows(kind, torch.arange(T, device=device), T, idx, counts, per_token)


def eager_call(q, k, v, mask, scale):
    """Masked dense attention as a model would write it: T x T scores, masked_fill, softmax."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def dense_fits(T: int, device) -> bool:
    """Eager keeps about six (B, H, T, T) bf16 tensors alive through the backward."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 64 << 30
    return 6 * B * H * T * T * 2 < 0.7 * total


_FLEX = None


def flex():
    """flex_attention compiled once (automatic dynamic shapes: a new T recompiles once with T symbolic)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention)
    return _FLEX


def mask_mod_for(kind, hkv, idx, counts, per_token, T, device):
    """The visibility as a FlexAttention mask_mod (the selection as a dense bool block table)."""
    G = H // hkv
    if kind == "window":
        def mask_mod(b, h, qi, kj):
            return (qi >= kj) & (qi - kj < WINDOW)
        return mask_mod
    nkb = math.ceil(T / BS)
    valid = (torch.arange(idx.shape[-1], device=device) < counts[..., None]) & (idx >= 0)
    sel = torch.zeros((*idx.shape[:-1], nkb + 1), dtype=torch.bool, device=device)
    sel.scatter_(-1, torch.where(valid, idx, nkb).long(), True)
    sel = sel[..., :nkb].contiguous()
    if per_token:
        def mask_mod(b, h, qi, kj):
            return sel[b, h // G, qi, kj // BS] & (qi >= kj)
    else:
        def mask_mod(b, h, qi, kj):
            return sel[b, h // G, qi // BS, kj // BS] & (qi >= kj)
    return mask_mod


def flex_mask(kind, T, hkv, idx, counts, per_token, device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = mask_mod_for(kind, hkv, idx, counts, per_token, T, device)
    heads = None if kind == "window" or hkv == 1 else H
    try:  # compiled mask construction where this torch has it: the fair (fast) number
        return create_block_mask(mask_mod, None if kind == "window" else B, heads, T, T, device=device, _compile=True)
    except TypeError:
        return create_block_mask(mask_mod, None if kind == "window" else B, heads, T, T, device=device)


def fla_import():
    """fla's parallel_nsa, or (None, why). fla/__init__ imports its layers and models, which need
    a matching transformers; the kernels do not, so a failing package import is retried with
    only the ``fla.ops`` modules (a namespace stand-in for the top package)."""
    try:
        from fla.ops.nsa.parallel import parallel_nsa  # type: ignore
        return parallel_nsa, ""
    except ModuleNotFoundError as exc:
        return None, f"fla not installed ({exc.name})"
    except Exception as exc:  # noqa: BLE001  fla's package import failed, not its kernels (maybe)
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    import importlib.util
    import types

    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
        del sys.modules[name]
    try:
        spec = importlib.util.find_spec("fla")
        stub = types.ModuleType("fla")
        stub.__path__ = list(spec.submodule_search_locations)
        try:
            from importlib.metadata import version

            stub.__version__ = version("fla-core")
        except Exception:  # noqa: BLE001  not installed as a distribution (a source tree on the path)
            stub.__version__ = "0"
        sys.modules["fla"] = stub
        from fla.ops.nsa.parallel import parallel_nsa  # type: ignore
        return parallel_nsa, f"fla.ops imported without the fla package ({first})"
    except Exception as exc:  # noqa: BLE001
        return None, f"fla not usable ({first}; ops only: {type(exc).__name__})"


def fla_inputs(q, k, v, idx):
    """fla's layout: q, k, v [B, T, H, D]; per-token block indices [B, T, Hkv, S] (int64, -1 skipped)."""
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
    return qt, kt, vt, idx.transpose(1, 2).long().contiguous()


# ----------------------------------------------------------------------------- timing

def bench(fn, backward: bool, inputs, grad):
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(fn, warmup=10, rep=50, return_mode="median")

    def step():
        out = fn()
        out.backward(grad)

    return do_bench(step, warmup=10, rep=50, grad_to_none=inputs, return_mode="median")


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _empty_cache(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check(kind, per_token, T, hkv, dev, dtype=torch.bfloat16, chunk=2048):
    """(errors of bcpt vs exact fp32, errors of eager in dtype vs exact, ok) for out, dq, dk, dv."""
    q, k, v, do = make_qkv(T, hkv, dev, dtype=dtype)
    idx, counts = make_selection(T, hkv, per_token, dev)
    scale = D ** -0.5
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = bcpt_call(kind, qq, kk, vv, idx, counts, per_token, scale)
    out.backward(do)
    ref = reference(kind, q, k, v, do, idx, counts, per_token, scale, chunk=chunk)
    eager = reference(kind, q, k, v, do, idx, counts, per_token, scale, chunk=chunk, dtype=dtype)
    errs = [_rel(got, want) for got, want in zip((out, qq.grad, kk.grad, vv.grad), ref)]
    eager_errs = [_rel(bf, want) for bf, want in zip(eager, ref)]
    # 16-bit contract: 1e-2 relative, or no worse than eager in the same dtype
    ok = all(e <= max(1e-2, 1.5 * b) for e, b in zip(errs, eager_errs)) and bool(torch.isfinite(out).all())
    return errs, eager_errs, ok


def time_case(kind, per_token, T, hkv, dev, args, deadline, fla, fla_note) -> list:
    """Rows (impl, fwd ms, fwd+bwd ms, note) for one case; peers after the deadline are skipped."""
    q, k, v, do = make_qkv(T, hkv, dev)
    idx, counts = make_selection(T, hkv, per_token, dev)
    scale = D ** -0.5
    ins = [t.requires_grad_(True) for t in (q, k, v)]
    rows = []
    with torch.no_grad():
        ref_out = bcpt_call(kind, q, k, v, idx, counts, per_token, scale).float()

    def run(name, fn, note="", ins=ins, grad=do, out_layout=None, same=True):
        """Time fn forward and forward+backward; for peers that compute the same attention
        (``same``), note their output's distance from bcpt's."""
        try:
            if same:
                with torch.no_grad():
                    out = fn()
                out = out if out_layout is None else out_layout(out)
                note = f"{note}; vs bcpt {_rel(out, ref_out):.1e}".lstrip("; ")
            f = bench(fn, False, ins, grad)
            fb = bench(fn, True, ins, grad)
            rows.append((name, f, fb, note))
        except Exception as exc:  # a peer failing is reported, not fatal
            rows.append((name, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
            _log(traceback.format_exc())

    def optional(name) -> bool:
        if time.time() < deadline:
            return True
        rows.append((name, None, None, f"skipped: past the {args.budget:.0f} s budget"))
        return False

    run("bcpt", lambda: bcpt_call(kind, q, k, v, idx, counts, per_token, scale), same=False)
    if kind == "selected" and not per_token:
        from bcpt_compile.kernels import nsa_attention as kernels

        kernels.EXACT_DELTA_16BIT = False  # FlashAttention's delta = rowsum(dO * O_bf16): faster, less exact
        try:
            run("bcpt, delta from bf16 O", lambda: bcpt_call(kind, q, k, v, idx, counts, per_token, scale),
                "EXACT_DELTA_16BIT=False", same=False)
        finally:
            kernels.EXACT_DELTA_16BIT = True
    ke = k.detach().repeat_interleave(H // hkv, 1).requires_grad_(True)
    ve = v.detach().repeat_interleave(H // hkv, 1).requires_grad_(True)
    run("sdpa causal (dense)", lambda: sdpa_call(q, ke, ve), "all keys; K/V expanded to 16 heads",
        ins=[q, ke, ve], same=False)
    if per_token and optional("fla parallel_nsa"):
        if fla is None:
            rows.append(("fla parallel_nsa", None, None, fla_note))
        else:
            qt, kt, vt, it = fla_inputs(q, k, v, idx)
            run("fla parallel_nsa", lambda: fla(qt, kt, vt, block_indices=it, block_counts=TOPK, block_size=BS,
                                                scale=scale), ("[B,T,H,D] layout; " + fla_note).strip("; "),
                ins=[qt, kt, vt], grad=do.transpose(1, 2).contiguous(), out_layout=lambda o: o.transpose(1, 2))
    if (per_token or kind == "window") and not args.no_flex and optional("flex"):
        try:
            times = []
            for _ in range(4):  # the first call compiles the mask builder; median of the other three
                _sync(dev)
                t0 = time.perf_counter()
                mask = flex_mask(kind, T, hkv, idx, counts, per_token, dev)
                _sync(dev)
                times.append((time.perf_counter() - t0) * 1e3)
            mask_ms = sorted(times[1:])[1]
            fx = flex()
            run("flex", lambda: fx(q, k, v, block_mask=mask, scale=scale, enable_gqa=hkv != H),
                f"block mask prebuilt; create_block_mask {mask_ms:.2f} ms")
            _, f, fb, _ = rows[-1]
            if f is not None:
                rows.append(("flex + create_block_mask", f + mask_ms, fb + mask_ms, "mask rebuilt every step"))
        except Exception as exc:
            rows.append(("flex", None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
            _log(traceback.format_exc())
    if per_token and not dense_fits(T, dev):
        rows.append(("eager masked dense", None, None, "T x T scores do not fit in memory"))
    elif per_token and optional("eager masked dense"):
        mask = dense_mask(kind, T, idx, counts, per_token, dev)
        run("eager masked dense", lambda: eager_call(q, k, v, mask, scale), "T x T mask prebuilt")
        del mask
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T = 8k only")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--budget", type=float, default=180.0,
                    help="seconds after which optional peers (flex, fla, eager) are skipped")
    ap.add_argument("--cpu-check", action="store_true", help="check this script's logic on the CPU, small sizes")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests of the control flow only
    args = ap.parse_args(argv)
    if args.cpu_check:
        return cpu_check()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (or --cpu-check)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    import triton

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    t_start = time.time()
    deadline = t_start + args.budget
    name = torch.cuda.get_device_name() if dev.type == "cuda" else dev.type
    print(f"# bcpt attention, {name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"B={B} H={H} D={D} bf16 causal; selection: top-{TOPK} blocks of {BS}; window {WINDOW}\n")
    Ts = [T_QUICK] if args.quick else list(TS)
    T_win = T_QUICK if args.quick else T_WINDOW

    # ---- correctness
    failures = 0
    if not args.no_check:
        checks = [("selected", True, Ts[0], 1), ("selected", False, Ts[0], HKV_BLOCK), ("window", False, T_win, HKV_BLOCK)]
        if len(Ts) > 1:
            checks.insert(1, ("selected", True, Ts[-1], 1))
        print("## correctness vs exact float32 (max |err| / max |ref|; ok: <= 1e-2 or <= 1.5x eager bf16)\n")
        print("| case | rows | T | Hkv | out | dq | dk | dv | eager bf16 out/dq/dk/dv | |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for kind, per_token, T, hkv in checks:
            try:
                errs, eager_errs, ok = check(kind, per_token, T, hkv, dev)
                cells = " | ".join(f"{e:.2e}" for e in errs) + " | " + "/".join(f"{e:.1e}" for e in eager_errs)
            except Exception as exc:  # e.g. the per-token self-check refusing: a failure, reported
                ok, cells = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | | "
                _log(traceback.format_exc())
            failures += not ok
            print(f"| {kind} | {'token' if per_token else 'block'} | {T} | {hkv} | {cells} | {'ok' if ok else 'FAIL'} |",
                  flush=True)
            _empty_cache(dev)
        print(f"\n(checks took {time.time() - t_start:.0f} s)\n")

    # ---- timings
    fla, fla_note = fla_import()
    print("## timings, median ms (do_bench)\n")
    print("| case | rows | T | Hkv | impl | fwd | fwd+bwd | note |")
    print("|---|---|---|---|---|---|---|---|")
    # most wanted first: the budget may skip the optional peers of the last cases
    cases = [("selected", True, Ts[0], 1), ("window", False, T_win, HKV_BLOCK)] \
        + [("selected", True, T, 1) for T in Ts[1:]] + [("selected", False, T, HKV_BLOCK) for T in Ts]
    for kind, per_token, T, hkv in cases:
        rows = time_case(kind, per_token, T, hkv, dev, args, deadline, fla, fla_note)
        for name, f, fb, note in rows:
            print(f"| {kind} | {'token' if per_token else 'block'} | {T} | {hkv} | {name} | {_fmt(f)} | {_fmt(fb)} "
                  f"| {note} |", flush=True)
        _empty_cache(dev)
        _log(f"{kind} {T} done at {time.time() - t_start:.0f} s")
    print(f"\ntotal {time.time() - t_start:.0f} s; correctness failures: {failures}")
    return 1 if failures else 0


def cpu_check() -> int:
    """This script's own logic at small sizes on the CPU: the chunked reference against bcpt (the
    Triton kernels through the interpreter), the Flex mask_mod and the eager mask against the
    reference's visibility, and the fla layout against fla's naive PyTorch selection."""
    global H, D, BS, TOPK, WINDOW
    os.environ.setdefault("TRITON_INTERPRET", "1")
    H, D, BS, TOPK, WINDOW = 16, 32, 16, 4, 40
    T, dev, scale = 96, torch.device("cpu"), 32 ** -0.5
    from bcpt_compile.lowering.attention import selected_visibility, window_visibility

    bad = 0
    for kind, per_token, hkv in (("selected", True, 1), ("selected", False, 4), ("window", False, 4)):
        errs, _, _ = check(kind, per_token, T, hkv, dev, dtype=torch.float32, chunk=40)
        idx, counts = make_selection(T, hkv, per_token, dev)
        rows = torch.arange(T)
        vis = _visible_rows(kind, rows, T, idx, counts, per_token)
        want = window_visibility(T, WINDOW, dev)[None, None] if kind == "window" else \
            selected_visibility(idx, counts, T, BS, 1 if per_token else BS, True) > 0
        mm = mask_mod_for(kind, hkv, idx, counts, per_token, T, dev)
        flex_vis = torch.stack([mm(0, h, rows[:, None], rows[None, :]) for h in range(0, H, H // hkv)])[None]
        q, k, v, _ = make_qkv(T, hkv, dev, dtype=torch.float32)
        eager = eager_call(q, k, v, dense_mask(kind, T, idx, counts, per_token, dev), scale)
        ref = reference(kind, q, k, v, q, idx, counts, per_token, scale, chunk=40)[0]
        ok = max(errs) < 1e-4 and torch.equal(*torch.broadcast_tensors(vis, want)) \
            and torch.equal(*torch.broadcast_tensors(flex_vis, want)) and _rel(eager, ref) < 1e-5
        print(f"{kind:8s} {'token' if per_token else 'block'}: bcpt vs reference {max(errs):.1e}, masks "
              f"{'equal' if ok else 'DIFFER'}, eager vs reference {_rel(eager, ref):.1e}")
        bad += not ok
    fla, note = fla_import()
    try:
        from fla.ops.nsa.naive import naive_nsa_selection  # type: ignore
    except Exception as exc:  # noqa: BLE001
        print(f"fla layout: not checked ({note or type(exc).__name__})")
    else:
        q, k, v, do = make_qkv(T, 1, dev, dtype=torch.float32)
        idx, counts = make_selection(T, 1, True, dev)
        qt, kt, vt, it = fla_inputs(q, k, v, idx)
        got = naive_nsa_selection(qt, kt, vt, it, block_size=BS, scale=scale).transpose(1, 2)
        err = _rel(got, reference("selected", q, k, v, do, idx, counts, True, scale, chunk=40)[0])
        print(f"fla layout: naive_nsa_selection on our inputs vs reference {err:.1e}"
              f"{'' if fla is not None else ' (parallel_nsa: ' + note + ')'}")
        bad += err > 1e-4
    print("cpu check:", "ok" if not bad else f"{bad} FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
