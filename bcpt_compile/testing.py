"""Test helpers: capture the post-pass FX graph as stable text for expecttest snapshots."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

from .options import BcptOptions
from .passes import run_passes
from .report import Report

_DEL_SUFFIX = re.compile(r";\s+(?:\w+\s*=\s*)+None\s*$")
_ANNOTATION = re.compile(r"\s*:\s*[\w\.]+(?=[,)])")


def normalize_graph_code(code: str) -> str:
    """Drop Dynamo's ``x = None`` frees, type annotations and blank lines."""
    lines = []
    for line in code.splitlines():
        line = _DEL_SUFFIX.sub("", line.rstrip())
        if line.lstrip().startswith("def forward"):
            line = _ANNOTATION.sub("", line)
        if line.strip():
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def rewritten_graphs(fn: Callable, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> tuple[list[str], Report]:
    """Compile ``fn`` with the bcpt passes only, run it once, return each graph's text after the passes."""
    import bcpt_compile.lowering  # noqa: F401

    opts = BcptOptions.from_user({**(options or {}), "inner_compiler": "eager"})
    graphs: list[str] = []
    report = Report()

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        report.extend(run_passes(gm, opts))
        graphs.append(normalize_graph_code(gm.code))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(*args, **kwargs)
    return graphs, report


def rewritten_graph(fn: Callable, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
    """The single graph of ``fn`` after the bcpt passes (fails if Dynamo split it)."""
    graphs, _ = rewritten_graphs(fn, *args, options=options, **kwargs)
    if len(graphs) != 1:
        raise AssertionError(f"expected one graph, Dynamo produced {len(graphs)}")
    return graphs[0]
