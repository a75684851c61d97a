"""Fused row optimizers for host tables: the touched rows are updated during backward.

``FusedRowOptimizer(tables, kind="sgd" | "adam", lr=...)`` takes host-resident DeepEmbed
tables out of the ``.grad`` / ``optimizer.step()`` loop. For each table and each backward:

* compiled (``deepembed_tables="cpu"``): the rows' gradient, summed per distinct row on the
  device, is applied to the table rows the batch touched by ``_row_update_kernel``, which
  reads and writes the pinned host table (and the Adam moments, also pinned on the host)
  through their mapped device addresses, on the copy stream. Nothing crosses back to the
  host through the CPU, no host sync, and no (vocab x d) gradient exists anywhere;
* eager: a post-accumulate-grad hook applies the same update to the rows present in the
  gradient (a sparse COO gradient, as ``nn.Embedding(sparse=True)`` gives, or the nonzero
  rows of a dense one) on the host, then drops the gradient.

Either way the table's ``.grad`` is ``None`` after backward, and the result equals eager
``nn.Embedding(sparse=True)`` followed by ``torch.optim.SGD(lr=lr)`` (``kind="sgd"``) or
``torch.optim.SparseAdam(lr, betas, eps)`` (``kind="adam"``) stepped right after each
backward (tested). Adam's moments are float32 whatever the table's dtype.

Consequences the user must know:

* leave these tables out of the main optimizer (their ``.grad`` stays ``None``);
* every backward through the graph updates the table: no gradient accumulation over
  micro-batches, and ``torch.autograd.grad`` through a compiled graph also updates it;
* on CUDA the update is asynchronous: read the table on the host (checkpointing,
  ``state_dict``) only after ``torch.cuda.synchronize()``; host writes to the table must
  likewise follow a synchronize;
* a table used twice in one compiled graph gets a sparse gradient instead, which the hook
  applies at the end of backward (one update per backward, as eager);
* register before the first call of the compiled model (the graph is specialised to it);
  ``lr`` may change at any time (read at each update), and ``remove()`` detaches.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import engine

KINDS = ("sgd", "adam")


class _Entry:
    def __init__(self, key: int, opt: FusedRowOptimizer, param: nn.Parameter):
        self.key = key
        self.opt = opt
        self.param_ref = weakref.ref(param)
        self.exp_avg: Tensor | None = None
        self.exp_avg_sq: Tensor | None = None
        self.step = torch.zeros(1, dtype=torch.int64)  # moves to the compute device on first use
        self.hook = param.register_post_accumulate_grad_hook(_eager_hook)
        if opt.kind == "adam":
            pin = param.device.type == "cpu" and param.is_pinned()
            self.exp_avg = torch.zeros(param.shape, dtype=torch.float32, pin_memory=pin, device=param.device)
            self.exp_avg_sq = torch.zeros(param.shape, dtype=torch.float32, pin_memory=pin, device=param.device)


_by_param = WeakIdKeyDictionary()
_by_key: dict[int, _Entry] = {}
_keys = itertools.count(1)


def mode_for(table: Tensor | None) -> str | None:
    """The gather's gradient mode for a real table tensor: ``"fused:<key>"`` if registered."""
    if table is None:
        return None
    entry = _by_param.get(table)
    return f"fused:{entry.key}" if entry is not None else None


def _state_with(entry: _Entry, table: Tensor) -> None:
    """Keep the Adam moments where the table is (pinned with it): offloading after registering moves them."""
    if entry.exp_avg is None or (entry.exp_avg.device == table.device
                                 and entry.exp_avg.is_pinned() == (table.device.type == "cpu" and table.is_pinned())):
        return
    pin = table.device.type == "cpu" and table.is_pinned()
    entry.exp_avg = entry.exp_avg.to(table.device)
    entry.exp_avg_sq = entry.exp_avg_sq.to(table.device)
    if pin:
        entry.exp_avg, entry.exp_avg_sq = entry.exp_avg.pin_memory(), entry.exp_avg_sq.pin_memory()


def _entry(mode: str, table: Tensor) -> _Entry:
    key = int(mode.split(":", 1)[1])
    entry = _by_key.get(key)
    param = entry.param_ref() if entry is not None else None
    if param is None:
        raise RuntimeError("bcpt: this graph was compiled for a FusedRowOptimizer that has since been removed; "
                           "call torch._dynamo.reset() (or torch.compiler.reset()) and compile again")
    if param.data_ptr() != table.data_ptr() or param.shape != table.shape:
        raise RuntimeError("bcpt: a fused row optimizer's table was replaced after compiling; compile again")
    _state_with(entry, table)
    return entry


class FusedRowOptimizer:
    """SGD or SparseAdam applied to the touched rows of host tables during backward.

    ``tables``: parameters or modules (``nn.Embedding``: its weight) whose tables live on
    the host (``bcpt_compile.runtime.offload_tables``). See the module docstring.
    """

    def __init__(self, tables: Iterable[nn.Parameter | nn.Module] | nn.Parameter | nn.Module,
                 kind: str = "sgd", lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if not (lr >= 0.0 and eps >= 0.0 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"invalid hyperparameters lr={lr}, betas={betas}, eps={eps}")
        self.kind, self.lr, self.betas, self.eps = kind, float(lr), tuple(float(b) for b in betas), float(eps)
        if isinstance(tables, (nn.Module, torch.Tensor)):
            tables = [tables]
        self.params: list[nn.Parameter] = []
        for t in tables:
            p = t.weight if isinstance(t, nn.Module) else t
            if not isinstance(p, nn.Parameter) or p.dim() != 2:
                raise TypeError(f"FusedRowOptimizer takes 2-D parameters or embedding modules, got {type(t).__name__}")
            if p.stride(1) != 1:
                raise ValueError("FusedRowOptimizer needs tables with contiguous rows")
            if p in _by_param:
                raise ValueError("this table already has a FusedRowOptimizer; remove() it first")
            self.params.append(p)
        self.entries = []
        for p in self.params:
            entry = _Entry(next(_keys), self, p)
            _by_param[p] = entry
            _by_key[entry.key] = entry
            self.entries.append(entry)

    def state(self, param: nn.Parameter) -> dict:
        """``step`` (int), and for Adam ``exp_avg`` / ``exp_avg_sq`` (float32, table-shaped)."""
        e = _by_param[param]
        return {"step": int(e.step), "exp_avg": e.exp_avg, "exp_avg_sq": e.exp_avg_sq}

    def remove(self) -> None:
        for e in self.entries:
            e.hook.remove()
            _by_key.pop(e.key, None)
            p = e.param_ref()
            if p is not None:
                _by_param.pop(p, None)
        self.entries = []


# ------------------------------------------------------------------ the update, three ways

@torch.no_grad()
def _update_reference(entry: _Entry, table: Tensor, ids: Tensor, g: Tensor) -> None:
    """The PyTorch rule (host eager hook and plain-CPU runs): ids distinct, g (len(ids), W)."""
    opt = entry.opt
    g = g.to(device=table.device, dtype=torch.float32)
    ids = ids.to(table.device)
    w = table.index_select(0, ids).float()
    if opt.kind == "sgd":
        w = w - opt.lr * g
    else:
        b1, b2 = opt.betas
        m = entry.exp_avg.index_select(0, ids)
        v = entry.exp_avg_sq.index_select(0, ids)
        m = m + (g - m) * (1.0 - b1)
        v = v + (g * g - v) * (1.0 - b2)
        entry.exp_avg.index_copy_(0, ids, m)
        entry.exp_avg_sq.index_copy_(0, ids, v)
        t = int(entry.step) + 1
        step_size = opt.lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        w = w - step_size * (m / (v.sqrt() + opt.eps))
        entry.step.add_(1)
    table.index_copy_(0, ids, w.to(table.dtype))


def apply_rows(grad_rows: Tensor, table: Tensor, plan: Tensor, mode: str) -> None:
    """Apply the registered update for the plan's distinct rows (``grad_rows`` slot-indexed, on
    the compute device) to ``table`` in place; on CUDA asynchronously, on the copy stream."""
    from ..kernels import triton_runs_on
    from ..kernels.deepembed import row_update
    from .plan import views

    entry = _entry(mode, table)
    opt = entry.opt
    dev = grad_rows.device
    if entry.step.device != dev:
        entry.step = entry.step.to(dev)
    plan = plan if plan.device == dev else plan.to(dev, non_blocking=True)
    adam = opt.kind == "adam"
    state = engine.device_state(dev)
    kw = {"lr": opt.lr, "adam": adam, "betas": opt.betas, "eps": opt.eps, "exp_avg": entry.exp_avg,
          "exp_avg_sq": entry.exp_avg_sq, "step": entry.step, "stats": state.counters[3:]}
    copy_stream = engine.side_stream(state) if dev.type == "cuda" else None
    if dev.type == "cuda" and not (table.device.type == "cpu" and table.is_pinned()) and table.device != dev:
        raise RuntimeError("bcpt: a fused row optimizer needs its table pinned on the host "
                           "(offload_tables(pin=True)) or on the compute device")
    if copy_stream is not None:
        compute = torch.cuda.current_stream(dev)
        copy_stream.wait_stream(compute)  # the gradient is ready
        with torch.cuda.device(dev), torch.cuda.stream(copy_stream):
            row_update(table, grad_rows, plan, **kw)
            if adam:
                entry.step.add_(1)
        for t in (grad_rows, plan, entry.step):  # used on the copy stream, freed on the compute stream
            t.record_stream(copy_stream)
    elif dev.type == "cuda" or (triton_runs_on(grad_rows) and table.device == dev):
        row_update(table, grad_rows, plan, **kw)
        if adam:
            entry.step.add_(1)
    else:
        v = views(plan)
        u = int(v.count)
        _update_reference(entry, table, v.uniq[:u], grad_rows[:u])
        engine.count(rows_updated=u)
    # the version counter is left alone, as for writes through .data: the compiled graph keeps
    # the table for its backward, and a second graph using it must not see a "modified" error
    engine.count(fused_updates=1)


def _eager_hook(param: Tensor) -> None:
    entry = _by_param.get(param)
    g = param.grad
    if entry is None or g is None:
        return
    if g.is_sparse:
        g = g.coalesce()
        ids, vals = g.indices()[0], g.values()
    else:
        ids = (g != 0).any(dim=1).nonzero().flatten()
        vals = g.index_select(0, ids)
    if ids.numel():  # an empty sparse gradient: a compiled graph already applied the update
        _state_with(entry, param)
        _update_reference(entry, param.data, ids, vals)
    param.grad = None
