"""Child process of test_kernels_compile.py: trace the CUDA-path launch code of the
``triton_op`` s (SBL forward and backward, DeepEmbed's output-scale backward) with symbolic
shapes (no interpreter), as AOTAutograd does once Dynamo goes dynamic.

On CUDA the ``triton_op`` bodies are traced, so every size they compute a grid, a flag or
a constexpr from may be a SymInt (``wrap_triton`` specialises constexprs; the rest stay
symbolic). Fake CUDA tensors need a CUDA build, so the bodies run on
fake CPU tensors with ``launchable`` forced to ``wrap_triton`` (what it returns while a
CUDA body is traced): the launch code is the same, only the CPU launch configs differ.
"""

import sys
from unittest import mock

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from bcpt_compile.kernels import bcat_cluster as bc
from bcpt_compile.kernels import deepembed as de
from bcpt_compile.kernels import sbl_block_gemm as bg
from bcpt_compile.lowering import deepembed as de_op
from bcpt_compile.lowering import sbl as sbl_op
from bcpt_compile.runtime.plan import build_plan


def _launches(gm) -> list:
    return [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]


def main() -> int:
    def traced(kernel, t):
        return torch.library.wrap_triton(kernel)

    patches = [mock.patch.object(bg, "launchable", traced), mock.patch.object(bc, "launchable", traced),
               mock.patch.object(de, "launchable", traced), mock.patch.object(sbl_op, "_use_kernels", lambda x: True),
               mock.patch.object(de_op, "_use_kernels", lambda x: True)]
    for p in patches:
        p.start()
    M, N, K, block = 100, 48, 32, 16
    x, w, b, s, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(N), torch.randn(M, N), torch.randn(M, N)
    state = torch.zeros(sbl_op.tile_state_size(M, N, block), dtype=torch.int32)
    none = torch.empty(0, dtype=torch.int32)
    failures = []
    for reorder in (False, True):
        def forward(x, w, b, s):
            return sbl_op._forward(x, w, b, s, None, 0.0, block, 0.7, reorder, True)

        def backward(dy, x, w, b, s, state, z):
            perm = torch.arange(M, dtype=torch.int32) if reorder else none
            col_perm = torch.arange(N, dtype=torch.int32) if reorder else none
            return sbl_op._backward_grads(dy, x, w, b, s, None, state, perm, col_perm, z, 0.0, block, 0.7,
                                          [True, True, True, True])

        for name, fn, args in (("forward", forward, (x, w, b, s)), ("backward", backward, (dy, x, w, b, s, state, dy))):
            try:
                gm = make_fx(fn, tracing_mode="symbolic")(*args)
            except Exception as exc:  # report them all
                failures.append(f"{name} reorder={reorder}: {type(exc).__name__}: {exc}")
                continue
            launches = _launches(gm)
            if len(launches) < 3:
                failures.append(f"{name} reorder={reorder}: {len(launches)} kernel launches traced")
            if not any(isinstance(d, torch.SymInt) for n in gm.graph.nodes if n.op == "placeholder"
                       for d in n.meta["val"].shape):
                failures.append(f"{name} reorder={reorder}: shapes were not symbolic")
    failures += _dense_tma_forward()
    failures += _dense_tma_backward()
    failures += _deepembed_forward()
    failures += _deepembed_backward()
    print("\n".join(failures) or "traced")
    return 1 if failures else 0


def _dense_tma_forward() -> list:
    """The dense forward with tensor-descriptor loads (bf16, Hopper's path, forced): its
    alignment test must hold on symbolic strides, and the launch must be traced with TMA on."""
    M, N, K, block = 100, 48, 32, 16
    x, w, s = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16(), torch.randn(M, N).bfloat16()

    def forward(x, w, s):
        return sbl_op._forward(x, w, None, s, None, 0.0, block, 0.0, False, False)

    with mock.patch.object(bg, "DENSE_TMA", True):
        try:
            gm = make_fx(forward, tracing_mode="symbolic")(x, w, s)
        except Exception as exc:
            return [f"dense TMA forward: {type(exc).__name__}: {exc}"]
    flags = [n.kwargs["kwargs"].get("TMA") for n in _launches(gm)]
    return [] if True in flags else [f"dense TMA forward: no launch traced with TMA=True ({flags})"]


def _dense_tma_backward() -> list:
    """The backward's dense dx / dW loops with tensor-descriptor loads (bf16, forced): the
    alignment test of G' (fresh, (M, N)), W and x must hold on symbolic sizes, and both
    launches must be traced with TMA on."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    M, N, K, block = 100, 48, 32, 16
    x, w, b = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
    s, dy, z = torch.randn(M, N).bfloat16(), torch.randn(M, N).bfloat16(), torch.randn(M, N).bfloat16()
    state = torch.zeros(sbl_op.tile_state_size(M, N, block), dtype=torch.int32)
    none = torch.empty(0, dtype=torch.int32)

    def backward(dy, x, w, b, s, state, z):
        return sbl_op._backward_grads(dy, x, w, b, s, None, state, none, none, z, 0.0, block, 0.0,
                                      [True, True, True, True])

    with mock.patch.object(bg, "DENSE_TMA", True):
        try:
            gm = make_fx(backward, tracing_mode="symbolic")(dy, x, w, b, s, state, z)
        except Exception as exc:
            return [f"dense TMA backward: {type(exc).__name__}: {exc}"]
    flags = {kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__: n.kwargs["kwargs"].get("TMA")
             for n in _launches(gm)}
    wanted = {"_dx_kernel": True, "_dw_kernel": True}
    if {k: flags.get(k) for k in wanted} != wanted:
        return [f"dense TMA backward: dx / dW not traced with TMA=True ({flags})"]
    return []


def _deepembed_forward() -> list:
    """The output-scale forward traced as on CUDA, each variant forced (the timing that picks
    one needs a GPU): cuBLAS + the scale kernel, or the fused GEMM with its fixed tile."""
    import os

    T, d, V = 64, 24, 40
    h, w, table = torch.randn(T, 2 * d), torch.randn(d, 2 * d), torch.randn(V, d)
    idx = torch.randint(0, V, (T,))
    plan = build_plan(idx)  # as the pass gives it (checked once by bcpt.row_plan)
    failures = []
    for impl, mode, kernel in (("split", "symbolic", "_scale_rows_kernel"), ("fused", "fake", "_out_forward_kernel")):
        def forward(h, w, table, idx, plan):
            return de_op._linear_forward(h, w, None, table, idx, False, plan, False)

        with mock.patch.dict(os.environ, {"BCPT_DEEPEMBED_FORWARD": impl}), \
                mock.patch.object(de, "traced", lambda t: True):
            try:
                gm = make_fx(forward, tracing_mode=mode)(h, w, table, idx, plan)
            except Exception as exc:
                failures.append(f"deepembed forward {impl}: {type(exc).__name__}: {exc}")
                continue
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

        names = [getattr(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]), "__name__", "")
                 or kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in _launches(gm)]
        if kernel not in names:
            failures.append(f"deepembed forward {impl}: {kernel} not traced ({names})")
    return failures


def _deepembed_backward() -> list:
    """gh and the row-sparse table gradient (segment sum tiles + fixup) from a plan."""
    T, d, V = 64, 24, 40
    grad, z, h = torch.randn(T, d), torch.randn(T, d), torch.randn(T, 2 * d)
    w, table = torch.randn(d, 2 * d), torch.randn(V, d)
    idx = torch.randint(0, V, (T,))
    plan = build_plan(idx)

    def backward(grad, h, w, table, idx, z, plan):
        return de_op._linear_backward_grads(grad, h, w, None, table, idx, z, False, [True, True, False, True], plan)

    try:
        gm = make_fx(backward, tracing_mode="symbolic")(grad, h, w, table, idx, z, plan)
    except Exception as exc:
        return [f"deepembed backward: {type(exc).__name__}: {exc}"]
    launches = _launches(gm)
    if len(launches) < 3:  # gh, segment-sum tiles, fixup
        return [f"deepembed backward: {len(launches)} kernel launches traced"]
    return []


if __name__ == "__main__":
    sys.exit(main())
