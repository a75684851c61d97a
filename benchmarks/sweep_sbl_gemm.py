"""Where the SBL block GEMMs lose to cuBLAS: kernel-level variants timed side by side (H100).

    python benchmarks/sweep_sbl_gemm.py [--out DIR]

x 8192x2048, W 8192x2048, bf16, 128x128 tiles, 10 % and 100 % of the tiles active. Times
the shipped forward kernel over the active-tile list against variants of the same loop:
launch configs, persistent programs per SM, list order (as the bits kernel appends it,
or grouped so that concurrent tiles share rows of x and W in L2), Triton's flattened
persistent loop, warp specialization and TMA descriptors; cuBLAS ``x @ W.T`` is the
reference. Each variant's output is checked against the shipped kernel's before timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from bench_sbl import block_mask_gate  # noqa: E402

from bcpt_compile.kernels import bcat_cluster as bc  # noqa: E402
from bcpt_compile.kernels import sbl_block_gemm as bg  # noqa: E402

M, K, N, BLOCK = 8192, 2048, 8192, 128


@triton.jit
def _fwd_variant(x_ptr, w_ptr, s_ptr, y_ptr, state_ptr, list_ptr, M, N, K, Nt,
                 stride_xm, stride_wn, stride_sm, stride_ym,
                 PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 TMA: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr):
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BM, BK])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BN, BK])
    count = tl.load(state_ptr)
    k_tiles = tl.cdiv(K, BK)
    for t in tl.range(tl.program_id(0), count, PROGRAMS, flatten=FLATTEN, warp_specialize=WS):
        tile = tl.load(list_ptr + t)
        tile_m = tile // Nt
        tile_n = tile % Nt
        offs_m = tile_m * BM + tl.arange(0, BM)
        offs_n = tile_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_tiles):
            if TMA:
                a = x_desc.load([tile_m * BM, k * BK])
                b = w_desc.load([tile_n * BN, k * BK])
            else:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k * BK + offs_k)[None, :])
                b = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k * BK + offs_k)[None, :])
            acc = tl.dot(a, b.T, acc)
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :]).to(tl.float32)
        r = tl.where((s > 0) | (s != s), s, 0.0)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], (acc * r).to(y_ptr.dtype.element_ty))


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def grouped(tiles: torch.Tensor, count: int, Nt: int, group: int) -> torch.Tensor:
    """The same active tiles, ordered by (row group, column, row): concurrent tiles share W rows."""
    t = tiles[:count].long()
    m, n = t // Nt, t % Nt
    key = ((m // group) * Nt + n) * group + m % group
    out = tiles.clone()
    out[:count] = t[key.argsort()].to(torch.int32)
    return out


def sweep_backward(x, w, s, case, record):
    """The shipped backward (G' and ds, block lists, dx, dW) with each family's config varied."""
    dy = torch.randn(s.shape, device="cuda", dtype=torch.bfloat16)
    bcat = bc.empty_bcat(s, BLOCK, 0.85)
    z = bg.sddmm_forward(x, w, None, s, None, 0.0, bcat, torch.bfloat16, save_product=True)[1]
    flops = 2 * 2.0 * int(bcat.count) * BLOCK * BLOCK * K

    def backward():
        bcat.lists = None
        return bg.sddmm_backward(dy, x, w, None, s, None, 0.0, bcat, True, True, False, True, product=z)
    ref = [t.float() for t in backward() if t is not None]
    defaults = {k: dict(v) for k, v in bg.CUDA_CONFIGS.items()}
    record(case, "backward, shipped configs", do_bench(backward, warmup=10, rep=100), flops)
    for kind in ("dx", "dw"):
        for bk, warps, stages in ((128, 8, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 4), (256, 8, 3)):
            bg.CUDA_CONFIGS[kind] = {**defaults[kind], "BK": bk, "num_warps": warps, "num_stages": stages}
            name = f"backward, {kind} BK{bk} w{warps} s{stages}"
            try:
                got = [t.float() for t in backward() if t is not None]
                err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
                record(case, name, do_bench(backward, warmup=10, rep=100), flops, f"{err:.1e}")
            except Exception as e:
                print(f"{case:>5} {name:<58} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
        bg.CUDA_CONFIGS[kind] = dict(defaults[kind])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backward-only", action="store_true")
    ap.add_argument("--shipped-only", action="store_true", help="no kernel variants")
    args = ap.parse_args()
    triton.set_allocator(_alloc)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(torch.bfloat16)
    rows = []

    def record(case, name, t_ms, flops, err=None, note=""):
        tf = flops / t_ms * 1e-9
        rows.append({"case": case, "variant": name, "ms": t_ms, "tflops": tf, "err": err, "note": note})
        print(f"{case:>5} {name:<58} {t_ms:8.4f} ms {tf:7.1f} TF/s  err {err}  {note}", flush=True)

    full = 2.0 * M * N * K
    record("ref", "cuBLAS x @ W.T (all tiles)", do_bench(lambda: x @ w.T, warmup=25, rep=200), full)
    for frac in (0.1, 1.0):
        case = f"{int(frac * 100)}%"
        s = block_mask_gate(M, N, frac)
        sweep_backward(x, w, s, case, record)
        if args.backward_only:
            continue
        bcat = bc.empty_bcat(s, BLOCK)
        Mt, Nt = bcat.grid
        tiles = torch.empty(Mt * Nt, dtype=torch.int32, device="cuda")
        y_ref = torch.zeros(M, N, device="cuda", dtype=torch.bfloat16)
        bc.mark_active_tiles(bcat, s, None, 0.0, zero_fill=y_ref, tile_list=tiles)
        count = int(bcat.count)
        flops = 2.0 * count * BLOCK * BLOCK * K

        def bits():
            bcat.state.zero_()
            bc.mark_active_tiles(bcat, s, None, 0.0, zero_fill=y_ref, tile_list=tiles)
        record(case, "bits + list + zero-fill (shipped)", do_bench(bits, warmup=25, rep=200), 0.0)
        bcat.state.zero_()
        shipped = bg.sddmm_forward(x, w, None, s, None, 0.0, bcat, torch.bfloat16)[0]

        def shipped_fwd():
            bcat.state.zero_()
            bg.sddmm_forward(x, w, None, s, None, 0.0, bcat, torch.bfloat16)
        record(case, "shipped sddmm_forward (bits + GEMM)", do_bench(shipped_fwd, warmup=25, rep=200), flops)
        bits()  # leaves the state and the list for the variants
        record(case, "cuBLAS + mask (eager)", do_bench(lambda: (x @ w.T) * torch.relu(s), warmup=25, rep=200), full)
        for save in (False, True):
            cfg = bg.CUDA_CONFIGS["sddmm"]
            y_s = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            z_s = torch.empty(M, N, device="cuda", dtype=torch.bfloat16) if save else None
            programs = min(2 * sms, Mt * Nt)

            def shipped_gemm():
                bg._sddmm_forward_kernel[(programs,)](
                    x, w, None, s, s, y_s, z_s, None, None, bcat.state, tiles, M, N, K, Mt, Nt, bcat.n_words,
                    bcat.dense_min, 0.0, x.stride(0), 1, w.stride(0), 1, s.stride(0), 1, s.stride(0), 1,
                    y_s.stride(0), 1, *((z_s.stride(0), 1) if save else (0, 0)),
                    HAS_BIAS=False, HAS_MASK=False, HAS_PERM=False, HAS_COL_PERM=False, SAVE_Z=save,
                    PROGRAMS=programs, BM=BLOCK, BN=BLOCK, GROUP_M=8, PRECISION="tf32", EVEN_K=True, **cfg)
            record(case, f"shipped GEMM kernel only, SAVE_Z={save}", do_bench(shipped_gemm, warmup=10, rep=100), flops)
        if args.shipped_only:
            continue
        active = bcat.tile_active.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:M, :N]
        poisoned = torch.where(active, float("nan"), 0.0).to(torch.bfloat16)
        orders = {"appended": tiles, "grouped8": grouped(tiles, count, Nt, 8)}
        configs = [(128, 8, 3), (64, 4, 4), (64, 8, 4), (64, 4, 3), (128, 4, 3), (64, 8, 5), (128, 8, 2)]
        if args.quick:
            configs = configs[:3]
        variants = []
        for (bk, warps, stages), mult, order in itertools.product(configs, (1, 2), ("appended", "grouped8")):
            variants.append(dict(BK=bk, num_warps=warps, num_stages=stages, mult=mult, order=order,
                                 TMA=False, FLATTEN=False, WS=False))
        for (bk, warps, stages), order, tma, flat, ws in itertools.product(
                [(64, 4, 4), (64, 8, 4), (128, 8, 3)], ("appended", "grouped8"),
                (False, True), (False, True), (False, True)):
            if not (tma or flat) or (ws and not flat):
                continue
            variants.append(dict(BK=bk, num_warps=warps, num_stages=stages, mult=1, order=order,
                                 TMA=tma, FLATTEN=flat, WS=ws))
        for v in variants:
            lst = orders[v["order"]]
            programs = min(v["mult"] * sms, count) if count else 1
            y = poisoned.clone()  # active tiles must overwrite the NaNs

            def launch():
                _fwd_variant[(programs,)](
                    x, w, s, y, bcat.state, lst, M, N, K, Nt, x.stride(0), w.stride(0), s.stride(0), y.stride(0),
                    PROGRAMS=programs, BM=BLOCK, BN=BLOCK, BK=v["BK"], TMA=v["TMA"], FLATTEN=v["FLATTEN"],
                    WS=v["WS"], num_warps=v["num_warps"], num_stages=v["num_stages"])
            name = ("BK{BK} w{num_warps} s{num_stages} x{mult} {order}".format(**v)
                    + "".join(f" {k}" for k in ("TMA", "FLATTEN", "WS") if v[k]))
            try:
                launch()
                torch.cuda.synchronize()
                err = ((y.float() - shipped.float()).norm() / shipped.float().norm()).item()
                record(case, name, do_bench(launch, warmup=10, rep=100), flops, f"{err:.1e}")
            except Exception as e:  # a variant this Triton cannot build is a result too
                rows.append({"case": case, "variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(f"{case:>5} {name:<58} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
    if args.out:
        with open(os.path.join(args.out, "sweep_sbl_gemm.json"), "w") as f:
            json.dump({"sms": sms, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
