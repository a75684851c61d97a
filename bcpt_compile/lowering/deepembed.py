"""DeepEmbed custom ops.

``bcpt::deepembed_linear``: ``y = (h W^T + b) * table[idx]`` (output-scale form). Returns
``(y, z)`` with ``z = h W^T + b``: z is what the table's gradient needs, and the forward
kernel writes it from the accumulator for free, where recomputing it would cost a GEMM.

``bcpt::deepembed_rowmix``: ``b[t] = a[t] @ table[idx[t]].view(r, r)`` (hidden-scale form).

Both gradients for the table are row-sparse and summed per distinct index in a fixed order
(deterministic), from a row plan (``bcpt_compile.runtime.plan``) that the pass builds once
per ``idx`` and hands to every layer (``plan``; built in the backward when absent). For a
table they are returned dense (zeros off ``idx``) because that is what eager's embedding
backward gives and what optimizers and ``.grad`` accumulation expect. With ``slots=True`` the
"table" is the slot-indexed row buffer of a host table (row u holds the plan's u-th distinct
row, ``idx`` the tokens' slots) and its gradient has the same layout.

``indexing`` selects whose rules ``idx`` follows: ``weight[idx]`` (negative indices wrap,
``IndexError: index ... is out of bounds``) or ``F.embedding`` (no negatives,
``index out of range in self``), so that a bad index fails exactly as it does in eager.
When a plan is passed, ``bcpt.row_plan`` has already checked ``idx`` (once for all layers);
the kernels only wrap negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import triton_runs_on
from ..runtime import ops as _runtime_ops  # noqa: F401  registers bcpt::row_plan / gather_rows / prefetch / wait
from ..runtime.plan import build_plan
from .twins import cpu_twin

INDEX_DTYPES = (torch.int64, torch.int32)


def _unneeded(like: Tensor) -> Tensor:
    """A fresh 0-element tensor for a gradient nobody asked for: a custom op's outputs must
    not alias each other, so two unneeded gradients cannot share one empty tensor."""
    return like.new_empty(0)


def check_index_dtype(idx: Tensor, indexing: bool) -> None:
    if idx.dtype in INDEX_DTYPES:
        return
    if indexing:
        raise IndexError("tensors used as indices must be long, int, byte or bool tensors")
    name = {torch.float32: "FloatTensor", torch.float64: "DoubleTensor", torch.float16: "HalfTensor",
            torch.bfloat16: "BFloat16Tensor", torch.int16: "ShortTensor", torch.int8: "CharTensor",
            torch.uint8: "ByteTensor", torch.bool: "BoolTensor"}.get(idx.dtype, str(idx.dtype))
    raise RuntimeError(
        "Expected tensor for argument #1 'indices' to have one of the following scalar types: Long, Int; "
        f"but got torch.{name} instead (while checking arguments for embedding)"
    )


def checked_index(idx: Tensor, rows: int, indexing: bool) -> Tensor:
    """idx flattened, negatives wrapped where eager wraps them; out-of-range raises eager's error.

    On CUDA the range check is asynchronous (as eager's device assert is), so it costs no sync.
    """
    check_index_dtype(idx, indexing)
    flat = idx.reshape(-1).contiguous()  # the kernels read it flat (idx[:, -1] reshapes to a strided view)
    lo = -rows if indexing else 0
    if flat.numel():
        if flat.device.type == "cuda":
            torch._assert_async(((flat >= lo) & (flat < rows)).all(), "bcpt.deepembed: index out of range")
        else:
            bad = flat[(flat < lo) | (flat >= rows)]
            if bad.numel():
                if indexing:
                    raise IndexError(f"index {int(bad[0])} is out of bounds for dimension 0 with size {rows}")
                raise IndexError("index out of range in self")
    if indexing:
        flat = torch.where(flat < 0, flat + rows, flat)
    return flat


def _rows_of(idx: Tensor, rows: int, indexing: bool, plan) -> tuple[Tensor, bool]:
    """(flat idx, wrap): checked and wrapped here without a plan; with one (already checked by
    ``bcpt.row_plan``) only flattened, negatives left for the kernel to wrap."""
    if plan is None:
        return checked_index(idx, rows, indexing), False
    check_index_dtype(idx, indexing)
    return idx.reshape(-1).contiguous(), indexing


def _wrapped(flat: Tensor, rows: int, wrap: bool) -> Tensor:
    return torch.where(flat < 0, flat + rows, flat) if wrap else flat


def _backward_plan(flat: Tensor, rows: int, wrap: bool, plan):
    return plan if plan is not None else build_plan(_wrapped(flat, rows, wrap))


def _check_linear(h: Tensor, weight: Tensor, bias, table: Tensor, idx: Tensor) -> None:
    if weight.dim() != 2 or table.dim() != 2:
        raise ValueError("bcpt.deepembed_linear: weight and table must be 2-D")
    if h.shape[-1] != weight.shape[1]:
        raise ValueError(f"bcpt.deepembed_linear: h's last dim {h.shape[-1]} != weight's in-features {weight.shape[1]}")
    if table.shape[1] != weight.shape[0]:
        raise ValueError(f"bcpt.deepembed_linear: table width {table.shape[1]} != out-features {weight.shape[0]}")
    if tuple(idx.shape) != tuple(h.shape[:-1]) and not (idx.dim() == 1 and idx.numel() == h.numel() // max(h.shape[-1], 1)):
        raise ValueError(f"bcpt.deepembed_linear: idx shape {tuple(idx.shape)} != h's leading shape {tuple(h.shape[:-1])}")


def _use_kernels(t: Tensor) -> bool:
    return triton_runs_on(t)


# ------------------------------------------------------------------ output-scale form

@torch.library.triton_op("bcpt::deepembed_linear", mutates_args=())
def deepembed_linear(h: Tensor, weight: Tensor, bias: Tensor | None, table: Tensor, idx: Tensor,
                     indexing: bool, plan: Tensor | None = None, slots: bool = False) -> tuple[Tensor, Tensor]:
    """A ``triton_op``: traced on CUDA, so a compiled forward runs cuBLAS and the scale
    kernel (or the fused GEMM, whichever is faster for its sizes, timed once while it is
    traced) from Inductor's code, with no opaque op and no Triton Python launch per layer:
    a host-table step is host-bound. An opaque twin elsewhere (``twins.py``)."""
    args = (h, weight, bias, table, idx, indexing, plan, slots)
    if h.device.type == "cuda":
        return _linear_forward(*args)
    return torch.ops.bcpt.deepembed_linear_cpu(*args)


def _linear_forward(h, weight, bias, table, idx, indexing, plan=None, slots=False):
    _check_linear(h, weight, bias, table, idx)
    flat, wrap = _rows_of(idx, table.shape[0], indexing, plan)
    out_dtype = torch.promote_types(h.dtype, table.dtype)
    h2 = h.reshape(-1, h.shape[-1])
    if _use_kernels(h):
        from ..kernels.deepembed import out_scale_forward

        y, z = out_scale_forward(h2, weight, bias, table, flat, out_dtype, wrap=wrap)
    else:
        z = F.linear(h2, weight, bias)
        y = z.to(out_dtype) * table[_wrapped(flat, table.shape[0], wrap)]
    n = weight.shape[0]
    return y.view(*h.shape[:-1], n), z.view(*h.shape[:-1], n)


_deepembed_linear_cpu = cpu_twin(deepembed_linear, _linear_forward)


@_deepembed_linear_cpu.register_fake
def _(h, weight, bias, table, idx, indexing, plan=None, slots=False):
    _check_linear(h, weight, bias, table, idx)
    check_index_dtype(idx, indexing)
    shape = (*h.shape[:-1], weight.shape[0])
    return h.new_empty(shape, dtype=torch.promote_types(h.dtype, table.dtype)), h.new_empty(shape)


@torch.library.triton_op("bcpt::deepembed_linear_backward", mutates_args=())
def deepembed_linear_backward(grad: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, table: Tensor,
                              idx: Tensor, z: Tensor, indexing: bool, needs: Sequence[bool],
                              plan: Tensor | None = None, slots: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dh, dW, db, dtable), an empty tensor for each one not needed. A ``triton_op``: traced
    on CUDA, so a compiled backward launches its kernels from Inductor's code (``twins.py``)."""
    args = (grad, h, weight, bias, table, idx, z, indexing, needs, plan, slots)
    if grad.device.type == "cuda":
        return _linear_backward_grads(*args)
    return torch.ops.bcpt.deepembed_linear_backward_cpu(*args)


def _linear_backward_grads(grad, h, weight, bias, table, idx, z, indexing, needs, plan=None, slots=False):
    need_dh, need_dw, need_db, need_dt = (bool(n) for n in needs)
    need_db = need_db and bias is not None
    rows = table.shape[0]
    flat, wrap = _rows_of(idx, rows, indexing, plan)
    n = weight.shape[0]
    g2 = grad.reshape(-1, n)
    z2 = z.reshape(-1, n)
    h2 = h.reshape(-1, h.shape[-1])
    need_gh = need_dh or need_dw or need_db
    if _use_kernels(grad):
        from ..kernels.deepembed import out_scale_backward

        plan = _backward_plan(flat, rows, wrap, plan) if need_dt else plan
        gh, dtable = out_scale_backward(g2.contiguous(), z2, table, flat, plan, need_gh, need_dt, slots=slots, wrap=wrap)
    else:
        flat = _wrapped(flat, rows, wrap)
        gh = (g2 * table[flat]).to(z.dtype) if need_gh else None
        dtable = None
        if need_dt:
            dtable = torch.zeros(table.shape, dtype=torch.float32, device=table.device).index_add_(0, flat, g2.float() * z2.float())
            dtable = dtable.to(table.dtype)
    dh = (gh @ weight).view(h.shape) if need_dh else _unneeded(grad)
    dw = (gh.t() @ h2).to(weight.dtype) if need_dw else _unneeded(grad)
    db = gh.sum(0).to(bias.dtype) if need_db else _unneeded(grad)
    return dh, dw, db, dtable if dtable is not None else _unneeded(grad)


_deepembed_linear_backward_cpu = cpu_twin(deepembed_linear_backward, _linear_backward_grads)


@_deepembed_linear_backward_cpu.register_fake
def _(grad, h, weight, bias, table, idx, z, indexing, needs, plan=None, slots=False):
    need_dh, need_dw, need_db, need_dt = (bool(n) for n in needs)
    need_db = need_db and bias is not None
    c = torch.contiguous_format
    return (
        torch.empty_like(h, memory_format=c) if need_dh else _unneeded(grad),
        torch.empty_like(weight, memory_format=c) if need_dw else _unneeded(grad),
        torch.empty_like(bias) if need_db else _unneeded(grad),
        torch.empty_like(table, memory_format=c) if need_dt else _unneeded(grad),
    )


def _linear_setup(ctx, inputs, output):
    h, weight, bias, table, idx, indexing, plan, slots = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient of the saved product
    ctx.save_for_backward(h, weight, bias, table, idx, output[1], plan)
    ctx.indexing, ctx.slots = indexing, slots


def _linear_backward(ctx, grad, _grad_z):
    if grad is None:
        return (None,) * 8
    h, weight, bias, table, idx, z, plan = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in range(4)]
    dh, dw, db, dt = torch.ops.bcpt.deepembed_linear_backward(
        grad.contiguous(), h, weight, bias, table, idx, z, ctx.indexing, needs, plan, ctx.slots)
    out = [g if n else None for g, n in zip((dh, dw, db, dt), needs)]
    if bias is None:
        out[2] = None
    return out[0], out[1], out[2], out[3], None, None, None, None


deepembed_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------ hidden-scale form

def _check_rowmix(a: Tensor, table: Tensor, idx: Tensor, r: int) -> None:
    if a.dim() != 2 or a.shape[1] != r or table.dim() != 2 or table.shape[1] != r * r:
        raise ValueError(f"bcpt.deepembed_rowmix: a must be (M, {r}) and table (V, {r * r}), got "
                         f"{tuple(a.shape)} and {tuple(table.shape)}")
    if idx.numel() != a.shape[0]:
        raise ValueError(f"bcpt.deepembed_rowmix: {idx.numel()} indices for {a.shape[0]} rows of a")


@torch.library.custom_op("bcpt::deepembed_rowmix", mutates_args=())
def deepembed_rowmix(a: Tensor, table: Tensor, idx: Tensor, r: int, indexing: bool,
                     plan: Tensor | None = None, slots: bool = False) -> Tensor:
    _check_rowmix(a, table, idx, r)
    flat, wrap = _rows_of(idx, table.shape[0], indexing, plan)
    out_dtype = torch.promote_types(a.dtype, table.dtype)
    if _use_kernels(a):
        from ..kernels.deepembed import rowmix_forward

        return rowmix_forward(a, table, flat, r, out_dtype, wrap=wrap)
    rows = table[_wrapped(flat, table.shape[0], wrap)]
    return (a.to(out_dtype).unsqueeze(1) @ rows.view(-1, r, r).to(out_dtype)).squeeze(1)


@deepembed_rowmix.register_fake
def _(a, table, idx, r, indexing, plan=None, slots=False):
    _check_rowmix(a, table, idx, r)
    check_index_dtype(idx, indexing)
    return a.new_empty((a.shape[0], r), dtype=torch.promote_types(a.dtype, table.dtype))


@torch.library.custom_op("bcpt::deepembed_rowmix_backward", mutates_args=())
def deepembed_rowmix_backward(grad: Tensor, a: Tensor, table: Tensor, idx: Tensor, r: int, indexing: bool,
                              needs: Sequence[bool], plan: Tensor | None = None,
                              slots: bool = False) -> tuple[Tensor, Tensor]:
    need_da, need_dt = (bool(n) for n in needs)
    rows = table.shape[0]
    flat, wrap = _rows_of(idx, rows, indexing, plan)
    if _use_kernels(grad):
        from ..kernels.deepembed import rowmix_backward

        plan = _backward_plan(flat, rows, wrap, plan) if need_dt else plan
        da, dt = rowmix_backward(grad.contiguous(), a, table, flat, r, plan, need_da, need_dt, slots=slots, wrap=wrap)
    else:
        flat = _wrapped(flat, rows, wrap)
        g = grad.float()
        da = (g.unsqueeze(1) @ table[flat].view(-1, r, r).float().transpose(1, 2)).squeeze(1).to(a.dtype) if need_da else None
        dt = None
        if need_dt:
            outer = (a.float()[:, :, None] * g[:, None, :]).reshape(-1, r * r)
            dt = torch.zeros(table.shape, dtype=torch.float32, device=table.device).index_add_(0, flat, outer).to(table.dtype)
    return da if da is not None else _unneeded(grad), dt if dt is not None else _unneeded(grad)


@deepembed_rowmix_backward.register_fake
def _(grad, a, table, idx, r, indexing, needs, plan=None, slots=False):
    need_da, need_dt = (bool(n) for n in needs)
    c = torch.contiguous_format
    return (torch.empty_like(a, memory_format=c) if need_da else _unneeded(grad),
            torch.empty_like(table, memory_format=c) if need_dt else _unneeded(grad))


def _rowmix_setup(ctx, inputs, output):
    a, table, idx, r, indexing, plan, slots = inputs
    ctx.save_for_backward(a, table, idx, plan)
    ctx.config = (r, indexing)
    ctx.slots = slots


def _rowmix_backward(ctx, grad):
    a, table, idx, plan = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    da, dt = torch.ops.bcpt.deepembed_rowmix_backward(grad.contiguous(), a, table, idx, *ctx.config, needs,
                                                       plan, ctx.slots)
    return (da if needs[0] else None), (dt if needs[1] else None), None, None, None, None, None


deepembed_rowmix.register_autograd(_rowmix_backward, setup_context=_rowmix_setup)


# ------------------------------------------------------------------ hidden-scale producer

def _check_hidden(x: Tensor, weight: Tensor, b: Tensor, s2: Tensor, s0) -> None:
    if weight.dim() != 2 or s2.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError("bcpt.deepembed_hidden: weight must be (hidden, in) and match x's last dim")
    if b.dim() != 2 or b.shape[0] * x.shape[-1] != x.numel() or b.shape[1] != s2.shape[0]:
        raise ValueError(f"bcpt.deepembed_hidden: b must be (tokens, r), got {tuple(b.shape)}")
    if s2.shape[1] != weight.shape[0] or (s0 is not None and tuple(s0.shape) != (weight.shape[0],)):
        raise ValueError("bcpt.deepembed_hidden: s2 must be (r, hidden) and s0 (hidden,)")


@torch.library.custom_op("bcpt::deepembed_hidden", mutates_args=())
def deepembed_hidden(x: Tensor, weight: Tensor, b: Tensor, s2: Tensor, s0: Tensor | None) -> tuple[Tensor, Tensor]:
    """(k, u): k = relu(x W^T) ** 2 * (b @ s2 + s0), with u = x W^T kept for the backward.

    The scale never exists as a (tokens x hidden) tensor: each tile recomputes it from the
    rank-r ``b`` in the GEMM epilogue (an r-deep dot), forward and backward.
    """
    _check_hidden(x, weight, b, s2, s0)
    x2 = x.reshape(-1, x.shape[-1])
    if _use_kernels(x):
        from ..kernels.deepembed import hidden_forward

        k, u = hidden_forward(x2, weight, b, s2, s0)
    else:
        u = x2 @ weight.t()
        c = b @ s2 + (s0 if s0 is not None else 0)
        k = (torch.relu(u.float()) ** 2 * c.float()).to(x.dtype)
    shape = (*x.shape[:-1], weight.shape[0])
    return k.view(shape), u.view(shape)


@deepembed_hidden.register_fake
def _(x, weight, b, s2, s0):
    _check_hidden(x, weight, b, s2, s0)
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("bcpt::deepembed_hidden_backward", mutates_args=())
def deepembed_hidden_backward(grad: Tensor, x: Tensor, weight: Tensor, b: Tensor, s2: Tensor, s0: Tensor | None,
                              u: Tensor, needs: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_dx, need_dw, need_db, need_ds2, need_ds0 = (bool(n) for n in needs)
    need_ds0 = need_ds0 and s0 is not None
    n = weight.shape[0]
    g2, u2, x2 = grad.reshape(-1, n), u.reshape(-1, n), x.reshape(-1, x.shape[-1])
    if _use_kernels(grad):
        from ..kernels.deepembed import hidden_backward

        du, dc = hidden_backward(g2, u2, b, s2, s0)
    else:
        c = (b @ s2 + (s0 if s0 is not None else 0)).float()
        relu = torch.relu(u2.float())
        du = (g2.float() * c * 2 * relu).to(u.dtype)
        dc = (g2.float() * relu * relu).to(u.dtype)
    return (
        (du @ weight).view(x.shape) if need_dx else _unneeded(grad),
        (du.t() @ x2).to(weight.dtype) if need_dw else _unneeded(grad),
        (dc @ s2.t()).to(b.dtype) if need_db else _unneeded(grad),
        (b.t() @ dc).to(s2.dtype) if need_ds2 else _unneeded(grad),
        dc.float().sum(0).to(s0.dtype) if need_ds0 else _unneeded(grad),
    )


@deepembed_hidden_backward.register_fake
def _(grad, x, weight, b, s2, s0, u, needs):
    need_dx, need_dw, need_db, need_ds2, need_ds0 = (bool(n) for n in needs)
    need_ds0 = need_ds0 and s0 is not None
    c = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=c) if need_dx else _unneeded(grad),
        torch.empty_like(weight, memory_format=c) if need_dw else _unneeded(grad),
        torch.empty_like(b, memory_format=c) if need_db else _unneeded(grad),
        torch.empty_like(s2, memory_format=c) if need_ds2 else _unneeded(grad),
        torch.empty_like(s0) if need_ds0 else _unneeded(grad),
    )


def _hidden_setup(ctx, inputs, output):
    x, weight, b, s2, s0 = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient of the saved product
    ctx.save_for_backward(x, weight, b, s2, s0, output[1])


def _hidden_backward(ctx, grad, _grad_u):
    if grad is None:
        return (None,) * 5
    x, weight, b, s2, s0, u = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in range(5)]
    grads = torch.ops.bcpt.deepembed_hidden_backward(grad.contiguous(), x, weight, b, s2, s0, u, needs)
    out = [g if n else None for g, n in zip(grads, needs)]
    if s0 is None:
        out[4] = None
    return tuple(out)


deepembed_hidden.register_autograd(_hidden_backward, setup_context=_hidden_setup)
