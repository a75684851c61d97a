"""Row plans: the distinct rows of one ``idx`` and how its tokens map to them, on idx's device.

A plan is one int64 tensor of length 4M + 2 for M tokens (static: no data-dependent shape
enters a graph), built with sort / cumsum / searchsorted only, so on CUDA it needs no host
sync and can be captured in a CUDA graph::

    [0]                U        number of distinct rows (a device scalar)
    [1, 1 + M)         uniq     the distinct rows ascending, padded past U with the largest
    [1 + M, 1 + 2M)    inv      token t's slot: uniq[inv[t]] == idx[t]
    [1 + 2M, 1 + 3M)   order    the tokens sorted stably by row
    [1 + 3M, 2 + 4M)   starts   slot u's tokens are order[starts[u]:starts[u + 1]]; M for u >= U

Everything built from a plan is deterministic (no scatter with repeated indices, no atomics).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PlanViews(NamedTuple):
    count: Tensor  # (1,)
    uniq: Tensor  # (M,)
    inv: Tensor  # (M,)
    order: Tensor  # (M,)
    starts: Tensor  # (M + 1,)


def plan_tokens(plan: Tensor) -> int:
    return (plan.numel() - 2) // 4


def plan_size(tokens: int) -> int:
    return 4 * tokens + 2


def views(plan: Tensor) -> PlanViews:
    m = plan_tokens(plan)
    return PlanViews(plan[0:1], plan[1:1 + m], plan[1 + m:1 + 2 * m], plan[1 + 2 * m:1 + 3 * m], plan[1 + 3 * m:])


def build_plan(flat: Tensor) -> Tensor:
    """The plan of ``flat`` (1-D int64, already range-checked and wrapped), on its device."""
    m = flat.numel()
    dev = flat.device
    if m == 0:
        return torch.zeros(plan_size(0), dtype=torch.int64, device=dev)
    flat = flat.to(torch.int64)
    sorted_ids, order = torch.sort(flat, stable=True)
    head = torch.ones(m, dtype=torch.bool, device=dev)
    head[1:] = sorted_ids[1:] != sorted_ids[:-1]
    rank = torch.cumsum(head, 0) - 1  # the slot of each sorted position, non-decreasing
    starts = torch.searchsorted(rank, torch.arange(m + 1, device=dev))  # first position of each slot
    uniq = sorted_ids[starts[:m].clamp(max=m - 1)]  # slots past U repeat the largest row
    inv = torch.searchsorted(uniq, flat)  # the first slot holding each token's row
    return torch.cat([rank[-1:] + 1, uniq, inv, order, starts])
