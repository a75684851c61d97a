"""Prefetch hints: start host-to-device row copies at the graph input, wait at first use.

The ``bcpt.gather_rows(table, plan, device, grad_mode)`` nodes that share a plan, a device
and the earliest point their inputs allow (right after the plan, which sits right after
``idx``: at the graph input when ``idx`` is an input) become one
``handle = bcpt.prefetch_rows([table_0, table_1, ...], plan, device)`` placed there, and
each gather a ``bcpt.wait_rows(handle, table_i, plan, device, grad_mode, i)`` where it was,
i.e. right before the fused op that uses the rows. One prefetch per plan, not per layer:
a host-table step is host-bound, and each custom-op call costs the host more than the
copy queueing it does. The tables keep the layers' order, so the copy stream delivers
layer 0's rows first, each with its own event; all of them are queued on the copy stream
before layer 0's compute, and with pinned tables on CUDA none of them waits for the host
(``runtime/engine.py``).
"""

from __future__ import annotations

import torch
import torch.fx

from ..options import BcptOptions
from ..report import Report
from .canonical import is_function

FAMILY = "prefetch"


def insert_prefetch_hints(gm: torch.fx.GraphModule, opts: BcptOptions, report: Report) -> None:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    last_input = max((n for n in graph.nodes if n.op == "placeholder"), key=order.__getitem__, default=None)
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if not is_function(node, torch.ops.bcpt.gather_rows.default):
            continue
        table, plan, device, _ = node.args
        anchor = max((n for n in (table, plan) if isinstance(n, torch.fx.Node)), key=order.__getitem__)
        if anchor.op == "placeholder":
            anchor = last_input
        groups.setdefault((plan, device, anchor), []).append(node)
    cursor = None
    for (plan, device, anchor), gathers in groups.items():
        where = cursor if cursor is not None and order[cursor] >= order[anchor] else anchor
        with graph.inserting_after(where):
            handle = graph.call_function(torch.ops.bcpt.prefetch_rows.default,
                                         ([n.args[0] for n in gathers], plan, device))
        order = {n: i for i, n in enumerate(graph.nodes)}
        cursor = handle
        for slot, node in enumerate(gathers):
            table, _, _, grad_mode = node.args
            with graph.inserting_before(node):
                wait = graph.call_function(torch.ops.bcpt.wait_rows.default,
                                           (handle, table, plan, device, grad_mode, slot))
            wait.meta.update(node.meta)
            report.add_site(FAMILY, node, f"bcpt.prefetch_rows[{str(grad_mode).split(':')[0]}]", [table])
            node.replace_all_uses_with(wait)
            graph.erase_node(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
