"""Graph passes, one per family, run in order on the Dynamo graph.

Each pass takes ``(gm, opts, report)``, rewrites matched sites in place and records
sites and near-misses in ``report``. A pass that raises is undone (the graph is restored
from a copy) and logged, unless ``strict`` is set.
"""

from __future__ import annotations

from typing import Callable

import torch.fx

from .._logging import log
from ..options import BcptOptions
from ..report import Report
from . import attention, deepembed, sbl

PassFn = Callable[[torch.fx.GraphModule, BcptOptions, Report], None]

#: (family, pass) in the order they run; later passes see earlier rewrites.
PASSES: list[tuple[str, PassFn]] = [
    ("deepembed", deepembed.rewrite_deepembed),  # also places "prefetch" hints
    ("attention", attention.rewrite_sparse_attention),
    ("sbl", sbl.rewrite_sbl_masked_linear),
]


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = copy.graph_copy(graph, val_map)
    copy.output(out)
    copy._codegen = graph._codegen
    for old, new in val_map.items():  # Dynamo keeps e.g. _dynamo_source on placeholder nodes
        for key, value in old.__dict__.items():
            new.__dict__.setdefault(key, value)
    return copy


def run_passes(gm: torch.fx.GraphModule, opts: BcptOptions) -> Report:
    report = Report(graphs=1)
    for family, fn in PASSES:
        if not opts.enabled(family):
            continue
        saved = _copy_graph(gm.graph)
        local = Report()
        try:
            fn(gm, opts, local)
            gm.graph.lint()
            gm.recompile()
        except Exception as exc:
            if opts.strict:
                raise
            log.warning("bcpt: the %s pass failed and its graph is compiled unmodified: %s: %s",
                        family, type(exc).__name__, exc, exc_info=True)
            gm.graph = saved
            gm.recompile()
            report.failures.append(f"{family}: {type(exc).__name__}: {exc}")
            continue
        for miss in local.misses:
            log.info("near-miss [%s] %s at %s", miss.family, miss.reason, miss.source)
        report.extend(local)
    return report
