"""SBL masked matmul on the GPU: correctness at size, then time vs eager and Inductor.

    python benchmarks/bench_sbl.py [--quick] [--out DIR]

y = F.linear(x, W) * relu(s), x 8192x2048, W 8192x2048, s 8192x8192, bf16. Prints
markdown tables (forward, forward+backward, fill ratios, CUDA-graph capture, a
Tiny-ONN-style training step, an unmatched Llama) and writes them as JSON to --out.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import bcpt_compile  # noqa: F401
from bcpt_compile.kernels import bcat_cluster as bc
from bcpt_compile.kernels import sbl_block_gemm as bg

DEV = "cuda"
results: dict = {"tables": {}}


def log(*a):
    print(*a, flush=True)


def ms(fn, reps=200):
    return do_bench(fn, warmup=50, rep=reps, return_mode="median")


def sbl(x, w, s):
    return F.linear(x, w) * torch.relu(s)


def block_mask_gate(M, N, frac, block=128, seed=0):
    """s with exactly `frac` of 128x128 tiles active (relu(s) ~50 % dense inside)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    Mt, Nt = M // block, N // block
    n_active = int(round(frac * Mt * Nt))
    scores = torch.rand(Mt * Nt, generator=g, device=DEV)
    tiles = torch.zeros(Mt * Nt, dtype=torch.bool, device=DEV)
    tiles[scores.argsort()[:n_active]] = True
    tiles = tiles.view(Mt, Nt).repeat_interleave(block, 0).repeat_interleave(block, 1)
    s = torch.randn(M, N, generator=g, device=DEV, dtype=torch.bfloat16)
    return torch.where(tiles, s, torch.full_like(s, -1.0))


def unstructured_gate(M, N, density, seed=0):
    q = {0.05: 1.6449, 0.10: 1.2816, 0.25: 0.6745, 0.5: 0.0, 1.0: None}[density]
    g = torch.Generator(device=DEV).manual_seed(seed)
    s = torch.randn(M, N, generator=g, device=DEV, dtype=torch.float32)
    s = s.abs() + 0.01 if q is None else s - q
    return s.to(torch.bfloat16)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def correctness(x, w, s):
    out = {}
    xr, wr, sr = (t.detach().double().requires_grad_() for t in (x, w, s))
    ref = F.linear(xr, wr) * torch.relu(sr)
    dy = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, (xr, wr, sr), dy)
    for name, reorder in (("fixed", False), ("reordered", True)):
        xs, ws, ss = (t.detach().clone().requires_grad_() for t in (x, w, s))
        y = torch.ops.bcpt.sbl_masked_linear(xs, ws, None, ss, None, 0.0, 128, 0.85, reorder, True)[0]
        g = torch.autograd.grad(y, (xs, ws, ss), dy.to(y.dtype))
        eager = sbl(*(t.detach() for t in (x, w, s)))
        out[name] = {"y": rel(y, ref), "dx": rel(g[0], ref_g[0]), "dW": rel(g[1], ref_g[1]), "ds": rel(g[2], ref_g[2]),
                     "eager_y": rel(eager, ref)}
    return out


def time_case(x, w, s, compiled, reorder_too=False):
    row = {}
    row["eager_fwd"] = ms(lambda: sbl(x, w, s))
    row["inductor_fwd"] = ms(lambda: compiled["inductor"](x, w, s))
    row["bcpt_fwd"] = ms(lambda: compiled["bcpt"](x, w, s))
    if reorder_too:
        row["bcpt_reorder_fwd"] = ms(lambda: compiled["bcpt_reorder"](x, w, s))
    xs, ws, ss = (t.detach().clone().requires_grad_() for t in (x, w, s))
    dy = torch.randn(s.shape, device=DEV, dtype=torch.bfloat16)

    def step(fn):
        def run():
            torch.autograd.grad(fn(xs, ws, ss), (xs, ws, ss), dy)
        return run

    row["eager_fwdbwd"] = ms(step(sbl))
    row["inductor_fwdbwd"] = ms(step(compiled["inductor"]))
    row["bcpt_fwdbwd"] = ms(step(compiled["bcpt"]))
    if reorder_too:
        row["bcpt_reorder_fwdbwd"] = ms(step(compiled["bcpt_reorder"]))
    return row


def cluster_stats(s, reorder):
    bcat = bc.bcat_cluster(s, None, 0.0, 128, reorder)
    r = torch.relu(s)
    t = ms(lambda: bc.bcat_cluster(s, None, 0.0, 128, reorder))
    return {"fill": bcat.fill_ratio(r, trim=reorder), "active_tiles": float(bcat.tile_active.float().mean()), "cluster_ms": t}


def sweep_configs(x, w, s):
    """Pick launch configs for the three kernel families on gate ``s`` (eager op calls)."""
    xs, ws, ss = (t.detach().clone().requires_grad_() for t in (x, w, s))
    dy = torch.randn(s.shape, device=DEV, dtype=torch.bfloat16)
    fn = lambda: torch.ops.bcpt.sbl_masked_linear(x, w, None, s, None, 0.0, 128, 0.85, False)  # noqa: E731
    _, state, rp, cp, _ = torch.ops.bcpt.sbl_masked_linear(x, w, None, s, None, 0.0, 128, 0.85, False, True)
    z = torch.ops.bcpt.sbl_masked_linear(x, w, None, s, None, 0.0, 128, 0.85, False, True)[4]
    bwd = lambda: torch.ops.bcpt.sbl_masked_linear_backward(  # noqa: E731
        dy, xs, ws, None, ss, None, state, rp, cp, z, 0.0, 128, 0.85, [True, True, False, True])
    picks = {}
    for kind, bench in (("sddmm", fn), ("dx", bwd), ("dw", bwd)):
        best = None
        for bk in (64, 128, 256):
            for warps in (4, 8):
                for stages in (3, 4):
                    bg.CUDA_CONFIGS[kind] = {**bg.CUDA_CONFIGS[kind], "BK": bk, "num_warps": warps, "num_stages": stages}
                    try:
                        t = ms(bench, reps=60)
                    except Exception:  # out of shared memory etc.
                        continue
                    if best is None or t < best[0]:
                        best = (t, dict(bg.CUDA_CONFIGS[kind]))
        bg.CUDA_CONFIGS[kind] = best[1]
        picks[kind] = {"config": best[1], "ms": best[0]}
        log(f"  config {kind}: {best[1]} -> {best[0]:.3f} ms")
    return picks


class TinyOnnBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.mu_weight = nn.Parameter(torch.randn(h, d) / math.sqrt(d))
        self.sigma_weight = nn.Parameter(torch.zeros(h, d))
        self.gate_param = nn.Parameter(torch.zeros(h))
        self.out = nn.Linear(h, d, bias=False)

    def forward(self, x):
        keys = self.mu_weight * F.softplus(self.sigma_weight)
        raw = F.relu(x @ keys.t() / math.sqrt(x.size(-1)) - self.gate_param)
        return x + self.out(F.linear(x, self.mu_weight) * raw), raw


def tiny_onn_step(d=2048, h=8192, tokens=8192, layers=2):
    """Training step of a Tiny-ONN-style stack whose routing is topic-structured (~10 % tiles)."""
    torch.manual_seed(0)
    topics = 10
    blocks = nn.ModuleList([TinyOnnBlock(d, h) for _ in range(layers)]).to(DEV, torch.bfloat16)
    # prototypes in topic groups, gates high: a token fires (mostly) only its topic's group
    with torch.no_grad():
        centres = torch.randn(topics, d, device=DEV)
        for b in blocks:
            group = torch.arange(h, device=DEV) * topics // h
            b.mu_weight.copy_((centres[group] + 0.5 * torch.randn(h, d, device=DEV)) / math.sqrt(d))
            b.gate_param.fill_(0.35)
    topic = torch.arange(tokens, device=DEV) * topics // tokens
    x = (centres[topic] + 0.5 * torch.randn(tokens, d, device=DEV)).to(torch.bfloat16)

    def model(x):
        aux = 0
        for b in blocks:
            x, raw = b(x)
            aux = aux + raw.float().mean()
        return x.float().pow(2).mean() + 1e-3 * aux

    out = {}
    with torch.no_grad():
        _, raw = blocks[0](x)
        bcat = bc.bcat_cluster(raw, None, 0.0, 128)
        out["layer0_active_tiles"] = float(bcat.tile_active.float().mean())
        out["layer0_density"] = float((raw > 0).float().mean())
    for name, fn in (("eager", model), ("inductor", torch.compile(model, backend="inductor")),
                     ("bcpt", torch.compile(model, backend="bcpt"))):
        def step():
            loss = fn(x)
            loss.backward()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = ms(step, reps=300)
        out[name] = {"step_ms": t, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
        for p in blocks.parameters():
            p.grad = None
    return out


def llama_check():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (4, 1024), device=DEV)
    report = bcpt_compile.explain(model, ids)
    ind = torch.compile(model, backend="inductor")
    bc_ = torch.compile(model, backend="bcpt")
    with torch.no_grad():
        a, b = ind(ids).logits, bc_(ids).logits
        t_ind, t_bc = [], []
        for _ in range(3):  # interleaved: this model is small enough for host jitter to show
            t_ind.append(ms(lambda: ind(ids), reps=200))
            t_bc.append(ms(lambda: bc_(ids), reps=200))
    return {"counts": report.counts, "max_abs_diff": (a.float() - b.float()).abs().max().item(),
            "inductor_ms": sorted(t_ind), "bcpt_ms": sorted(t_bc)}


def cuda_graph_check(x, w, s):
    """mode="reduce-overhead": the ops capture in CUDA graphs; times without host overhead."""
    out = {}
    fns = {name: torch.compile(sbl, backend=name, mode="reduce-overhead") for name in ("inductor", "bcpt")}
    f = fns["bcpt"]
    for _ in range(3):
        y = f(x, w, s)
    torch.cuda.synchronize()
    y = f(x, w, s).clone()
    s2 = block_mask_gate(*s.shape, 0.2, seed=5)
    y2 = f(x, w, s2).clone()
    out["rel_err"], out["rel_err_new_mask"] = rel(y, sbl(x, w, s)), rel(y2, sbl(x, w, s2))
    xs, ws, ss = (t.detach().clone().requires_grad_() for t in (x, w, s))
    dy = torch.randn(s.shape, device=DEV, dtype=torch.bfloat16)
    for name, fn in fns.items():
        out[f"{name}_fwd_ms"] = ms(lambda: fn(x, w, s))
        ft = torch.compile(sbl, backend=name, mode="reduce-overhead")

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            torch.autograd.grad(ft(xs, ws, ss), (xs, ws, ss), dy)
        out[f"{name}_fwdbwd_ms"] = ms(step)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="re-pick the kernels' launch configs first")
    args = ap.parse_args()
    # one function compiled by three backends, with and without grads, masks of each density:
    # past Dynamo's default limit of 8 it would silently run eager for the later cases
    torch._dynamo.config.recompile_limit = 64
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"date {time.strftime('%Y-%m-%d')}")
    M, K, N = 8192, 2048, 8192
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16, generator=g)
    w = (torch.randn(N, K, device=DEV, generator=g) / math.sqrt(K)).to(torch.bfloat16)
    compiled = {
        "inductor": torch.compile(sbl, backend="inductor"),
        "bcpt": torch.compile(sbl, backend="bcpt"),
        "bcpt_reorder": torch.compile(sbl, backend="bcpt", options={"sbl_reorder": True}),
    }
    s10 = block_mask_gate(M, N, 0.10)
    log("correctness at size (10 % blocks):", json.dumps(correctness(x, w, s10)))
    log("correctness at size (unstructured 10 %):", json.dumps(correctness(x, w, unstructured_gate(M, N, 0.10))))
    if args.sweep:
        results["configs"] = {"blocks 10%": sweep_configs(x, w, s10)}
    results["configs_used"] = {k: dict(v) for k, v in bg.CUDA_CONFIGS.items()}
    rows = {}
    for frac in ((0.10, 1.0) if args.quick else (0.05, 0.10, 0.25, 0.5, 1.0)):
        s = block_mask_gate(M, N, frac)
        rows[f"blocks {int(frac*100)}%"] = time_case(x, w, s, compiled)
        log(f"blocks {frac}: {rows[f'blocks {int(frac*100)}%']}")
    for dens in (() if args.quick else (0.05, 0.10, 0.25, 0.5, 1.0)):
        s = unstructured_gate(M, N, dens)
        rows[f"unstructured {int(dens*100)}%"] = time_case(x, w, s, compiled, reorder_too=dens < 1.0)
        log(f"unstructured {dens}: {rows[f'unstructured {int(dens*100)}%']}")
    results["tables"]["timing"] = rows
    fills = {}
    for dens in (() if args.quick else (0.05, 0.10, 0.25, 0.5)):
        s = unstructured_gate(M, N, dens)
        fills[f"unstructured {int(dens*100)}%"] = {"fixed": cluster_stats(s, False), "reordered": cluster_stats(s, True)}
    fills["blocks 10%"] = {"fixed": cluster_stats(s10, False), "reordered": cluster_stats(s10, True)}
    results["tables"]["fill"] = fills
    log("fill:", json.dumps(fills))
    extra = (("cuda_graph", lambda: cuda_graph_check(x, w, s10)), ("tiny_onn", tiny_onn_step), ("llama", llama_check))
    for name, fn in extra[:2] if args.quick else extra:
        try:
            results[name] = fn()
        except Exception as e:  # keep the rest of the numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        log(name, json.dumps(results[name]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_sbl.json"), "w") as f:
        json.dump(results, f, indent=1)
    log("\n| case | eager fwd | inductor fwd | bcpt fwd | speedup | eager f+b | inductor f+b | bcpt f+b | speedup |")
    log("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        log(f"| {k} | {r['eager_fwd']:.3f} | {r['inductor_fwd']:.3f} | {r['bcpt_fwd']:.3f} | {r['eager_fwd']/r['bcpt_fwd']:.2f}x "
            f"| {r['eager_fwdbwd']:.3f} | {r['inductor_fwdbwd']:.3f} | {r['bcpt_fwdbwd']:.3f} | {r['eager_fwdbwd']/r['bcpt_fwdbwd']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
