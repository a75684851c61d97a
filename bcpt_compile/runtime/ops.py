"""Custom ops through which compiled graphs reach the runtime.

* ``bcpt::row_plan(idx, rows, indexing)``: the row plan of ``idx`` (``plan.py``) on idx's
  device: distinct rows, each token's slot, the tokens grouped by row. It validates ``idx``
  as eager would (dtype, range, negative wrap for ``weight[idx]``; on CUDA the range check
  is a device-side assert), once for every layer that uses ``idx``. No host sync. Its
  output has a static length (4M + 2) so that no data-dependent shape enters the graph.
* ``bcpt::gather_rows(table, plan, device, grad_mode)``: the plan's rows of a host table on
  ``device``, synchronously: ``(rows (M, W), pos (M,))``; slot u of ``rows`` holds the
  u-th distinct row, slots past the distinct count are left unset and never read.
* ``bcpt::prefetch_rows(tables, plan, device)`` / ``bcpt::wait_rows(handle, table, plan,
  device, grad_mode, slot)``: the same gather split in two, so that the copies start at the
  graph input and the compute stream waits only right before first use. One prefetch
  serves every table gathered with one plan (one op call per step, not one per layer:
  the step is host-bound); ``handle[slot]`` is table ``slot``'s ticket. The int64 handle
  is what orders them in the graph.

The gradient of ``rows`` flows back to the host table through
``bcpt::rows_to_table_grad(grad_rows, table, plan, grad_mode)``; ``grad_mode`` is fixed by
the pass:

* ``"dense"`` (``nn.Embedding``, raw parameters): a dense gradient with the table's shape
  on the host, zeros off the touched rows, as eager gives. The U summed rows come back
  device-to-host (one sync) and are written into a zero (vocab x d) host tensor: O(vocab x d)
  host memory traffic per table per step, eager's own cost;
* ``"sparse"`` (``nn.Embedding(sparse=True)``): a coalesced sparse COO gradient on the host
  with the U touched rows, which eager gives uncoalesced (same values);
  ``torch.optim.SparseAdam`` / ``SGD`` / ``Adagrad`` take it. One sync and U rows D2H;
* ``"fused:<key>"`` (a ``FusedRowOptimizer`` table): the update is applied on the device
  side to the host table (``fused.py``), no sync; the op returns an empty sparse gradient,
  which the optimizer's hook drops, so ``.grad`` stays None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import engine, fused
from .plan import build_plan, plan_size, views

GRAD_MODES = ("dense", "sparse")


def _device(device: str) -> torch.device:
    return torch.device(device)


def check_grad_mode(mode: str) -> None:
    if mode not in GRAD_MODES and not mode.startswith("fused:"):
        raise ValueError(f"bcpt: unknown table gradient mode {mode!r}")


@torch.library.custom_op("bcpt::row_plan", mutates_args=())
def row_plan(idx: Tensor, rows: int, indexing: bool) -> Tensor:
    from ..lowering.deepembed import checked_index

    plan = build_plan(checked_index(idx.reshape(-1), rows, indexing))
    engine.count(plans=1)
    return plan


@row_plan.register_fake
def _(idx, rows, indexing):
    from ..lowering.deepembed import check_index_dtype

    check_index_dtype(idx, indexing)
    return torch.empty((plan_size(idx.numel()),), dtype=torch.int64, device=idx.device)


def _fake_rows(table: Tensor, plan: Tensor, device: str):
    m = (plan.shape[0] - 2) // 4
    dev = _device(device)
    return (table.new_empty((m, table.shape[1]), device=dev),
            torch.empty((m,), dtype=torch.int64, device=dev))


@torch.library.custom_op("bcpt::gather_rows", mutates_args=())
def gather_rows(table: Tensor, plan: Tensor, device: str, grad_mode: str = "dense") -> tuple[Tensor, Tensor]:
    check_grad_mode(grad_mode)
    return engine.gather_now(table, plan, _device(device))


@gather_rows.register_fake
def _(table, plan, device, grad_mode="dense"):
    return _fake_rows(table, plan, device)


@torch.library.custom_op("bcpt::prefetch_rows", mutates_args=())
def prefetch_rows(tables: list[Tensor], plan: Tensor, device: str) -> Tensor:
    return torch.tensor(engine.start(list(tables), plan, _device(device)), dtype=torch.int64)


@prefetch_rows.register_fake
def _(tables, plan, device):
    return torch.empty((len(tables),), dtype=torch.int64, device="cpu")


@torch.library.custom_op("bcpt::wait_rows", mutates_args=())
def wait_rows(handle: Tensor, table: Tensor, plan: Tensor, device: str,
              grad_mode: str = "dense", slot: int = 0) -> tuple[Tensor, Tensor]:
    check_grad_mode(grad_mode)
    if not 0 <= slot < handle.numel():
        raise ValueError(f"bcpt.wait_rows: slot {slot} is outside the prefetch's {handle.numel()} tables")
    return engine.finish(int(handle[slot]), table, plan, _device(device))


@wait_rows.register_fake
def _(handle, table, plan, device, grad_mode="dense", slot=0):
    return _fake_rows(table, plan, device)


def _empty_sparse(table: Tensor) -> Tensor:
    return torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.int64, device=table.device),
                                   table.new_empty((0, table.shape[1])), table.shape, is_coalesced=True,
                                   check_invariants=False)


@torch.library.custom_op("bcpt::rows_to_table_grad", mutates_args=())
def rows_to_table_grad(grad_rows: Tensor, table: Tensor, plan: Tensor, grad_mode: str = "dense") -> Tensor:
    check_grad_mode(grad_mode)
    if grad_mode.startswith("fused:"):
        fused.apply_rows(grad_rows, table, plan, grad_mode)
        return _empty_sparse(table)
    v = views(plan)
    u = int(v.count)  # the host needs the distinct count to build its gradient: a sync on CUDA
    ids = v.uniq[:u].to(table.device)
    part = grad_rows[:u].to(device=table.device, dtype=table.dtype)
    if grad_rows.device != table.device:
        engine.count(grad_bytes_to_host=part.numel() * part.element_size() + ids.numel() * 8)
    if grad_mode == "sparse":
        return torch.sparse_coo_tensor(ids.unsqueeze(0), part, table.shape, is_coalesced=True, check_invariants=False)
    out = torch.zeros(table.shape, dtype=table.dtype, device=table.device)
    if u:
        out.index_copy_(0, ids, part)
    return out


@rows_to_table_grad.register_fake
def _(grad_rows, table, plan, grad_mode="dense"):
    if grad_mode == "dense":
        return torch.empty_like(table, memory_format=torch.contiguous_format)
    return torch.empty(table.shape, dtype=table.dtype, device=table.device, layout=torch.sparse_coo)


def _rows_backward(table: Tensor, plan: Tensor, grad_rows, mode: str):
    if grad_rows is None:
        return None
    return torch.ops.bcpt.rows_to_table_grad(grad_rows.contiguous(), table, plan, mode)


def _gather_setup(ctx, inputs, output):
    table, plan, _, grad_mode = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(table, plan)
    ctx.grad_mode = grad_mode


def _gather_backward(ctx, grad_rows, _grad_inv):
    table, plan = ctx.saved_tensors
    return _rows_backward(table, plan, grad_rows, ctx.grad_mode), None, None, None


def _wait_setup(ctx, inputs, output):
    _, table, plan, _, grad_mode, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(table, plan)
    ctx.grad_mode = grad_mode


def _wait_backward(ctx, grad_rows, _grad_inv):
    table, plan = ctx.saved_tensors
    return None, _rows_backward(table, plan, grad_rows, ctx.grad_mode), None, None, None, None


gather_rows.register_autograd(_gather_backward, setup_context=_gather_setup)
wait_rows.register_autograd(_wait_backward, setup_context=_wait_setup)
