"""Custom ops through which compiled graphs reach the runtime.

* ``bcpt::row_plan(idx, rows, indexing)``: distinct rows of ``idx`` and each token's
  position among them, on the host. It validates ``idx`` as eager would (dtype, range,
  negative wrap for ``weight[idx]``), so a bad index fails before any layer runs. Its
  output has a static length (2M + 1) so that no data-dependent shape enters the graph.
* ``bcpt::gather_rows(table, plan, device)``: the plan's rows of a host table on
  ``device``, synchronously: ``(rows (M, W), inverse (M,))``; rows past the distinct count
  are left unset and never read.
* ``bcpt::prefetch_rows`` / ``bcpt::wait_rows``: the same gather split in two, so that the
  copy starts at the graph input and the compute stream waits only right before first use.
  The int64 handle is what orders them in the graph.

The gradient of ``rows`` flows back to the host table through
``bcpt::rows_to_table_grad``: the distinct rows' gradients come back to the host and are
written into a dense zero gradient with the table's shape and device, as eager's
embedding backward would give for a table on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import engine


def _device(device: str) -> torch.device:
    return torch.device(device)


@torch.library.custom_op("bcpt::row_plan", mutates_args=())
def row_plan(idx: Tensor, rows: int, indexing: bool) -> Tensor:
    from ..lowering.deepembed import checked_index

    flat = idx.reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.to("cpu")  # the plan is host bookkeeping; this is the one sync of the path
    return engine.make_plan(checked_index(flat, rows, indexing))


@row_plan.register_fake
def _(idx, rows, indexing):
    from ..lowering.deepembed import check_index_dtype

    check_index_dtype(idx, indexing)
    return torch.empty((2 * idx.numel() + 1,), dtype=torch.int64, device="cpu")


def _fake_rows(table: Tensor, plan: Tensor, device: str):
    m = (plan.shape[0] - 1) // 2
    dev = _device(device)
    return (table.new_empty((m, table.shape[1]), device=dev),
            torch.empty((m,), dtype=torch.int64, device=dev))


@torch.library.custom_op("bcpt::gather_rows", mutates_args=())
def gather_rows(table: Tensor, plan: Tensor, device: str) -> tuple[Tensor, Tensor]:
    return engine.gather_now(table, plan, _device(device))


gather_rows.register_fake(_fake_rows)


@torch.library.custom_op("bcpt::prefetch_rows", mutates_args=())
def prefetch_rows(table: Tensor, plan: Tensor, device: str) -> Tensor:
    return torch.tensor([engine.start(table, plan, _device(device))], dtype=torch.int64)


@prefetch_rows.register_fake
def _(table, plan, device):
    return torch.empty((1,), dtype=torch.int64, device="cpu")


@torch.library.custom_op("bcpt::wait_rows", mutates_args=())
def wait_rows(handle: Tensor, table: Tensor, plan: Tensor, device: str) -> tuple[Tensor, Tensor]:
    return engine.finish(int(handle[0]), table, plan, _device(device))


@wait_rows.register_fake
def _(handle, table, plan, device):
    return _fake_rows(table, plan, device)


@torch.library.custom_op("bcpt::rows_to_table_grad", mutates_args=())
def rows_to_table_grad(grad_rows: Tensor, table: Tensor, plan: Tensor) -> Tensor:
    uniq, _ = engine.split_plan(plan)
    out = torch.zeros(table.shape, dtype=table.dtype, device=table.device)
    if uniq.numel():
        part = grad_rows[: uniq.numel()].to(table.device)
        out.index_copy_(0, uniq.to(table.device), part.to(table.dtype))
    return out


@rows_to_table_grad.register_fake
def _(grad_rows, table, plan):
    return torch.empty_like(table, memory_format=torch.contiguous_format)


def _rows_backward(table: Tensor, plan: Tensor, grad_rows):
    if grad_rows is None:
        return None
    return torch.ops.bcpt.rows_to_table_grad(grad_rows.contiguous(), table, plan)


def _gather_setup(ctx, inputs, output):
    table, plan, device = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(table, plan)


def _gather_backward(ctx, grad_rows, _grad_inv):
    table, plan = ctx.saved_tensors
    return _rows_backward(table, plan, grad_rows), None, None


def _wait_setup(ctx, inputs, output):
    handle, table, plan, device = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(table, plan)


def _wait_backward(ctx, grad_rows, _grad_inv):
    table, plan = ctx.saved_tensors
    return None, _rows_backward(table, plan, grad_rows), None, None


gather_rows.register_autograd(_gather_backward, setup_context=_gather_setup)
wait_rows.register_autograd(_wait_backward, setup_context=_wait_setup)
