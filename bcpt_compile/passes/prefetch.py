"""Prefetch hints: start host-to-device row copies at the graph input, wait at first use.

Every ``bcpt.gather_rows(table, plan, device, grad_mode)`` becomes
``handle = bcpt.prefetch_rows(table, plan, device)``, placed as early as its inputs allow
(right after the plan, which sits right after ``idx``: at the graph input when ``idx`` is
an input), and ``bcpt.wait_rows(handle, table, plan, device, grad_mode)`` where the gather
was, i.e. right before the fused op that uses the rows. The prefetches keep the layers'
order, so the copy stream delivers layer 0's rows first; all of them are queued on the copy
stream before layer 0's compute, and with pinned tables on CUDA none of them waits for the
host (``runtime/engine.py``).
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
    cursor = None
    for node in list(graph.nodes):
        if not is_function(node, torch.ops.bcpt.gather_rows.default):
            continue
        table, plan, device, grad_mode = node.args
        anchor = max((n for n in (table, plan) if isinstance(n, torch.fx.Node)), key=order.__getitem__)
        if anchor.op == "placeholder":
            anchor = max((n for n in graph.nodes if n.op == "placeholder"), key=order.__getitem__)
        where = cursor if cursor is not None and order[cursor] >= order[anchor] else anchor
        with graph.inserting_after(where):
            handle = graph.call_function(torch.ops.bcpt.prefetch_rows.default, (table, plan, device))
        order = {n: i for i, n in enumerate(graph.nodes)}
        cursor = handle
        with graph.inserting_before(node):
            wait = graph.call_function(torch.ops.bcpt.wait_rows.default, (handle, table, plan, device, grad_mode))
        wait.meta.update(node.meta)
        report.add_site(FAMILY, node, f"bcpt.prefetch_rows[{str(grad_mode).split(':')[0]}]", [table])
        node.replace_all_uses_with(wait)
        graph.erase_node(node)
