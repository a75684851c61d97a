"""Child process of test_kernels_compile.py: trace the SBL ops' CUDA-path launch code with
symbolic shapes (no interpreter), as AOTAutograd does once Dynamo goes dynamic.

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
from bcpt_compile.kernels import sbl_block_gemm as bg
from bcpt_compile.lowering import sbl as sbl_op


def _launches(gm) -> list:
    return [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]


def main() -> int:
    def traced(kernel, t):
        return torch.library.wrap_triton(kernel)

    patches = [mock.patch.object(bg, "launchable", traced), mock.patch.object(bc, "launchable", traced),
               mock.patch.object(sbl_op, "_use_kernels", lambda x: True)]
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
    print("\n".join(failures) or "traced")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
