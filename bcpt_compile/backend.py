"""The ``bcpt`` Dynamo backend: bcpt passes on the Dynamo graph, then an inner compiler.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="bcpt"``
resolves in a fresh interpreter without importing this package first.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx

from ._logging import log
from .options import BcptOptions
from .passes import run_passes
from .report import Report


def compile_inner(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: BcptOptions) -> Callable:
    if opts.inner_compiler == "eager":
        return gm.forward
    if opts.inner_compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if hasattr(inductor_config, "static_launch_user_defined_triton_kernels"):
        # our ops' kernels reach Inductor as user-defined Triton kernels: launched through
        # Triton's Python launcher they cost ~50 us of host time each on the H100 host we
        # measure on (benchmarks/cpu_overhead_sbl.py), Inductor's static launcher a fraction.
        # Kernels it cannot launch fall back to Triton's launcher.
        patches["static_launch_user_defined_triton_kernels"] = True
    patches.update(opts.inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches)


def bcpt_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
    *,
    report_sink: Report | None = None,
) -> Callable:
    """Rewrite the families bcpt knows on the Dynamo graph, then hand it to the inner compiler."""
    opts = BcptOptions.from_user(options, mode)
    import bcpt_compile.lowering  # noqa: F401  registers torch.ops.bcpt.*

    report = run_passes(gm, opts)
    log.info("rewritten sites: %s", report.counts)
    if report_sink is not None:
        report_sink.extend(report)
    return compile_inner(gm, example_inputs, opts)
