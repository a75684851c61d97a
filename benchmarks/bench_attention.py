"""bcpt sparse attention kernels on a CUDA GPU: correctness at real sizes, then timings.

    python benchmarks/bench_attention.py            # everything (~3-4 min on an H100)
    python benchmarks/bench_attention.py --quick    # T = 8k only, fewer peers

Checks (bf16, B=1, H=16, D=128): selected-block attention with 16 selected 64-blocks,
(a) one selection per 64-query block (DynNSA), (b) one per token (native-sparse-attention,
GQA 16:1), and a 512-token sliding window. The reference is exact float32 attention
computed in query chunks (so even T = 64k fits), with TF32 off; reported errors are the
max error divided by the reference's max magnitude.

Timings are medians of ``triton.testing.do_bench``, forward and forward+backward, side by
side with causal SDPA (dense, K/V expanded to all heads so the flash kernel runs) and
FlexAttention (``create_block_mask`` time reported separately and included in "flex+mask":
with a per-step top-k the mask changes every step). fla's ``parallel_nsa`` is timed for the
per-token case when fla is installed; its absence is reported, not an error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

B, H, D = 1, 16, 128
BS, TOPK = 64, 16
WINDOW = 512


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs

def make_selection(T: int, hkv: int, per_token: bool, device, seed: int = 0):
    """Top-16 causal blocks per query row (random importance, diagonal block forced), -1 padding.

    Rows are query blocks of 64 (DynNSA) or tokens (NSA). Blocks in the future of the
    row are never chosen: early rows that have fewer than 16 causal blocks get -1 slots.
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


def make_qkv(T: int, hkv: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn((B, H, T, D), generator=g, device=device, dtype=torch.bfloat16)
    k = torch.randn((B, hkv, T, D), generator=g, device=device, dtype=torch.bfloat16)
    v = torch.randn((B, hkv, T, D), generator=g, device=device, dtype=torch.bfloat16)
    do = torch.randn((B, H, T, D), generator=g, device=device, dtype=torch.bfloat16)
    return q, k, v, do


# ----------------------------------------------------------------------------- exact reference

def _visible_rows(kind, rows: torch.Tensor, T: int, idx, counts, per_token: bool) -> torch.Tensor:
    """bool (B, Hkv, len(rows), T) visibility of the given query rows (built per chunk, never T x T)."""
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


_FLEX = None


def flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_mask(kind, T, hkv, idx, counts, per_token, device):
    """The same visibility as a FlexAttention BlockMask (the selection as a dense bool table)."""
    from torch.nn.attention.flex_attention import create_block_mask

    G = H // hkv
    if kind == "window":
        def mask_mod(b, h, qi, kj):
            return (qi >= kj) & (qi - kj < WINDOW)
        return _create(create_block_mask, mask_mod, None, None, T, device)
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
    return _create(create_block_mask, mask_mod, B, None if hkv == 1 else H, T, device)


def _create(create_block_mask, mask_mod, b, h, T, device):
    try:  # compiled mask construction where this torch has it: the fair (fast) number
        return create_block_mask(mask_mod, b, h, T, T, device=device, _compile=True)
    except TypeError:
        return create_block_mask(mask_mod, b, h, T, T, device=device)


def fla_call():
    """fla's parallel_nsa (q, k, v as [B, T, H, D], per-token indices [B, T, Hkv, S]) or None."""
    try:
        from fla.ops.nsa.parallel import parallel_nsa  # type: ignore
    except Exception as exc:  # absent, or an incompatible build
        return None, f"fla not available ({type(exc).__name__})"
    return parallel_nsa, ""


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


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T = 8k only")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    import triton

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    print(f"# bcpt attention, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"B={B} H={H} D={D} bf16, selection: top-{TOPK} blocks of {BS}, window {WINDOW}\n")
    t_start = time.time()
    Ts = [8192] if args.quick else [8192, 32768, 65536]
    cases = []  # (kind, per_token, T, hkv)
    for T in Ts:
        cases.append(("selected", False, T, 4))
        cases.append(("selected", False, T, 1))
        cases.append(("selected", True, T, 1))
    for T in ([8192] if args.quick else [32768]):
        cases.append(("window", False, T, 4))
        cases.append(("window", False, T, 1))

    # ---- correctness
    check_rows = []
    failures = 0
    if not args.no_check:
        for kind, per_token, T, hkv in cases:
            q, k, v, do = make_qkv(T, hkv, dev)
            idx, counts = make_selection(T, hkv, per_token, dev)
            scale = D ** -0.5
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            out = bcpt_call(kind, qq, kk, vv, idx, counts, per_token, scale)
            out.backward(do)
            ref = reference(kind, q, k, v, do, idx, counts, per_token, scale)
            eager = reference(kind, q, k, v, do, idx, counts, per_token, scale, dtype=torch.bfloat16)
            errs, eager_errs = [], []
            for got, bf, want in zip((out, qq.grad, kk.grad, vv.grad), eager, ref):
                scale_ref = want.abs().max()
                errs.append(((got.float() - want).abs().max() / scale_ref).item())
                eager_errs.append(((bf.float() - want).abs().max() / scale_ref).item())
            # bf16 contract: 1e-2 relative, or no worse than eager bf16 itself
            ok = all(e <= max(1e-2, 1.5 * b) for e, b in zip(errs, eager_errs)) and torch.isfinite(out).all().item()
            failures += not ok
            check_rows.append((kind, "token" if per_token else "block", T, hkv, *errs,
                               "/".join(f"{e:.1e}" for e in eager_errs), "ok" if ok else "FAIL"))
            del q, k, v, do, qq, kk, vv, out, ref
            torch.cuda.empty_cache()
            _log(f"checked {kind} {T} {hkv}: {errs}")
        print("## correctness vs exact float32 (max |err| / max |ref|; ok: <= 1e-2 or <= 1.5x eager bf16)\n")
        print("| case | rows | T | Hkv | out | dq | dk | dv | eager bf16 out/dq/dk/dv | |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in check_rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2e} | {r[5]:.2e} | {r[6]:.2e} | {r[7]:.2e} | {r[8]} | {r[9]} |")
        print()

    # ---- timings
    fla, fla_note = fla_call()
    print("## timings, median ms (do_bench)\n")
    print("| case | rows | T | Hkv | impl | fwd | fwd+bwd | note |")
    print("|---|---|---|---|---|---|---|---|")
    sdpa_done = set()
    for kind, per_token, T, hkv in cases:
        q, k, v, do = make_qkv(T, hkv, dev)
        idx, counts = make_selection(T, hkv, per_token, dev)
        scale = D ** -0.5
        ins = [t.requires_grad_(True) for t in (q, k, v)]
        label = (kind, "token" if per_token else "block", T, hkv)
        rows = []

        def run(name, fn, note="", ins=ins, grad=do):
            try:
                f = bench(fn, False, ins, grad)
                fb = bench(fn, True, ins, grad)
                rows.append((name, f, fb, note))
            except Exception as exc:  # a peer failing is reported, not fatal
                rows.append((name, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
                _log(traceback.format_exc())

        run("bcpt", lambda: bcpt_call(kind, q, k, v, idx, counts, per_token, scale))
        if not per_token:
            from bcpt_compile.kernels import nsa_attention as kernels

            kernels.EXACT_DELTA_16BIT = False  # FlashAttention's delta = rowsum(dO * O_bf16): faster, less exact
            try:
                run("bcpt, delta from bf16 O", lambda: bcpt_call(kind, q, k, v, idx, counts, per_token, scale),
                    "EXACT_DELTA_16BIT=False")
            finally:
                kernels.EXACT_DELTA_16BIT = True
        if (T, hkv) not in sdpa_done:
            sdpa_done.add((T, hkv))
            ke = k.detach().repeat_interleave(H // hkv, 1).requires_grad_(True)
            ve = v.detach().repeat_interleave(H // hkv, 1).requires_grad_(True)
            run("sdpa causal (dense)", lambda: sdpa_call(q, ke, ve), "K/V expanded to 16 heads", ins=[q, ke, ve])
        # Flex recompiles per shape and mask closure (~20-40 s each): one T only (32k, as in DESIGN.md).
        want_flex = hkv == 4 and not per_token and T == (8192 if args.quick else 32768)
        if not args.no_flex and want_flex:
            try:
                times = []
                for _ in range(4):  # first call compiles the mask builder; median of the other three
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    mask = flex_mask(kind, T, hkv, idx, counts, per_token, dev)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1e3)
                mask_ms = sorted(times[1:])[1]
                fx = flex()
                run("flex", lambda: fx(q, k, v, block_mask=mask, scale=scale, enable_gqa=hkv != H),
                    f"create_block_mask {mask_ms:.2f} ms")
                name, f, fb, note = rows[-1]
                if f is not None:
                    rows.append(("flex+mask", f + mask_ms, fb + mask_ms, "per-step mask rebuild"))
            except Exception as exc:
                rows.append(("flex", None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
                _log(traceback.format_exc())
        if per_token and kind == "selected":
            if fla is None:
                rows.append(("fla parallel_nsa", None, None, fla_note))
            elif H // hkv < 16:
                rows.append(("fla parallel_nsa", None, None, "needs GQA group >= 16"))
            else:
                qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
                it = idx.transpose(1, 2).long().contiguous()
                dot = do.transpose(1, 2).contiguous()
                run("fla parallel_nsa", lambda: fla(qt, kt, vt, block_indices=it, block_counts=TOPK,
                                                    block_size=BS, scale=scale), "[B,T,H,D] layout",
                    ins=[qt, kt, vt], grad=dot)
        for name, f, fb, note in rows:
            print(f"| {label[0]} | {label[1]} | {label[2]} | {label[3]} | {name} | {_fmt(f)} | {_fmt(fb)} | {note} |",
                  flush=True)
        del q, k, v, do, ins
        torch.cuda.empty_cache()
    print(f"\ntotal {time.time() - t_start:.0f} s; correctness failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
