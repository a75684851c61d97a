"""``bcpt_compile.explain``: what the bcpt passes would rewrite in a model, and why not elsewhere."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch

from .backend import bcpt_backend
from .report import Report


def explain(model_or_fn: Callable, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any) -> Report:
    """Trace ``model_or_fn(*args, **kwargs)`` with Dynamo, run the bcpt passes, and report.

    The graphs are run eagerly after the passes (no Inductor compile), so this is quick.
    ``options`` are the backend options; the keyword is reserved for them.
    """
    report = Report()
    opts = {**(options or {}), "inner_compiler": "eager"}
    backend = functools.partial(bcpt_backend, options=opts, report_sink=report)
    compiled = torch.compile(model_or_fn, backend=backend)
    compiled(*args, **kwargs)
    return report
