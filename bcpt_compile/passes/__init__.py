"""Graph passes, one per family, run in order on the Dynamo graph.

Each pass takes ``(gm, opts, report)``, rewrites matched sites in place and records
sites and near-misses in ``report``. A pass that raises is undone (the graph is restored
from a copy) and logged, unless ``strict`` is set.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.fx

from .._logging import log
from ..options import BODY_HOST_TABLES, BcptOptions
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


#: Higher-order ops whose body is the user's code, run as written (``torch.utils.checkpoint``:
#: recomputed in the backward). Dynamo puts it in a subgraph, so the passes go into it.
BODY_HOPS = (torch.ops.higher_order.tag_activation_checkpoint,)


def _bodies(gm: torch.fx.GraphModule) -> Iterator[torch.fx.GraphModule]:
    """The subgraphs of ``BODY_HOPS`` calls, each once. A body called once gets the outer
    inputs' ``grapharg`` on its placeholders (the real tensor a pass may look up, e.g. a
    table's fused-optimizer mode); one shared by several calls could see different tensors."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in BODY_HOPS and node.args:
            attr = node.args[0]
            if isinstance(attr, torch.fx.Node) and attr.op == "get_attr":
                calls.setdefault(attr.target, []).append(node)
    for target, nodes in calls.items():
        body = getattr(gm, target, None)
        if not isinstance(body, torch.fx.GraphModule):
            continue
        if len(nodes) == 1:
            inner = [n for n in body.graph.nodes if n.op == "placeholder"]
            for ph, outer in zip(inner, nodes[0].args[1:]):
                if isinstance(outer, torch.fx.Node) and "grapharg" in outer.meta:
                    ph.meta.setdefault("grapharg", outer.meta["grapharg"])
        yield body


def run_passes(gm: torch.fx.GraphModule, opts: BcptOptions, *, body: bool = False) -> Report:
    """Run the passes on ``gm``, then inside its checkpointed bodies (``body``: one of those,
    not a graph of its own for ``explain``; host tables are not prefetched there, since the
    recompute would gather their rows a second time outside the prefetch schedule)."""
    report = Report(graphs=0 if body else 1)
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
    inner_opts = dataclasses.replace(opts, deepembed_tables="gpu" if opts.deepembed_tables == "gpu" else BODY_HOST_TABLES)
    for sub in list(_bodies(gm)):
        report.extend(run_passes(sub, inner_opts, body=True))
    return report
