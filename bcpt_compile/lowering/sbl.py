"""``bcpt::sbl_masked_linear``: y = (x W^T + b) * R, R = where(keep, gate, 0).

keep is ``mask`` when given, else ``gate > threshold``. Only R's support is computed
(BCAT tiles, Triton block GEMMs) on CUDA, and on CPU under ``TRITON_INTERPRET=1``;
plain CPU runs a dense PyTorch reference of the same math.

The forward kernel finds R's active tiles itself and returns them (``tile_state``: BCAT
tile bits and count) with the row/column permutations of the defragmentation (empty when
off). The backward, ``bcpt::sbl_masked_linear_backward``, walks those blocks: dx, dW, db
from G' = dy * R and d(gate) = dy * (x W^T + b) on keep. No dense product is saved.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import tile_state_size, triton_runs_on
from .twins import cpu_twin


def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor, mask: Optional[Tensor]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"bcpt.sbl_masked_linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"bcpt.sbl_masked_linear: x's last dim {x.shape[-1]} does not match weight's in-features {weight.shape[1]}"
        )
    out_shape = (*x.shape[:-1], weight.shape[0])
    if tuple(gate.shape) != out_shape:
        raise ValueError(f"bcpt.sbl_masked_linear: gate shape {tuple(gate.shape)} must equal the output shape {out_shape}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bcpt.sbl_masked_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"bcpt.sbl_masked_linear: mask must be bool, got {mask.dtype}")


def _flat(x: Tensor, gate: Tensor, mask: Optional[Tensor]):
    x2 = x.reshape(-1, x.shape[-1])
    g2 = gate.reshape(-1, gate.shape[-1])
    m2 = mask.expand(gate.shape).reshape(g2.shape) if mask is not None else None
    return x2, g2, m2


def _keep(gate: Tensor, mask: Optional[Tensor], threshold: float, keep_nan: bool) -> Tensor:
    if mask is not None:
        return mask.expand(gate.shape)
    keep = gate > threshold
    return keep | torch.isnan(gate) if keep_nan else keep


def _use_kernels(x: Tensor) -> bool:
    return triton_runs_on(x) and x.shape[-1] > 0


def _tokens_features(gate: Tensor) -> tuple:
    """(tokens, features) of the gate; a product of sizes, so symbolic shapes stay symbolic."""
    tokens = 1
    for d in gate.shape[:-1]:
        tokens = tokens * d
    return tokens, gate.shape[-1]


@torch.library.triton_op("bcpt::sbl_masked_linear", mutates_args=())
def sbl_masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    gate: Tensor,
    mask: Optional[Tensor],
    threshold: float,
    block_size: int,
    density_crossover: float,
    reorder: bool,
    save_product: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, tile_state, row_perm, col_perm, product); only y is the user's value.

    ``save_product`` keeps x W^T + b on the active tiles for the gate's gradient (the pass
    sets it when the gate requires grad): the backward then reads it instead of computing
    a second SDDMM, for the same memory eager spends saving the linear output.

    A ``triton_op``: traced on CUDA, an opaque twin elsewhere (``twins.py``).
    """
    if x.device.type == "cuda":
        return _forward(x, weight, bias, gate, mask, threshold, block_size, density_crossover, reorder, save_product)
    return torch.ops.bcpt.sbl_masked_linear_cpu(x, weight, bias, gate, mask, threshold, block_size,
                                                density_crossover, reorder, save_product)


def _forward(x, weight, bias, gate, mask, threshold, block_size, density_crossover, reorder, save_product=False):
    # Keeps the schema's default: as the CPU op's kernel, it is called without trailing defaulted arguments.
    _check_inputs(x, weight, bias, gate, mask)
    out_dtype = torch.promote_types(x.dtype, gate.dtype)
    M, N = _tokens_features(gate)

    def no_perm():
        return gate.new_empty(0, dtype=torch.int32)

    if not _use_kernels(x):
        r = torch.where(_keep(gate, mask, threshold, keep_nan=True), gate, 0)
        state = gate.new_zeros(tile_state_size(M, N, block_size), dtype=torch.int32)
        z = F.linear(x, weight, bias)
        return z.to(out_dtype) * r, state, no_perm(), no_perm(), z if save_product else _no_product(gate)
    from ..kernels.bcat_cluster import defrag_permutations, empty_bcat
    from ..kernels.sbl_block_gemm import sddmm_forward

    x2, g2, m2 = _flat(x, gate, mask)
    perm = col_perm = None
    if reorder and M and N:
        perm, col_perm = defrag_permutations(g2, m2, threshold, block_size)
    bcat = empty_bcat(g2, block_size, density_crossover, perm=perm, col_perm=col_perm)
    y, z = sddmm_forward(x2, weight, bias, g2, m2, threshold, bcat, out_dtype, save_product)
    return (y.view(gate.shape), bcat.state,
            perm if perm is not None else no_perm(), col_perm if col_perm is not None else no_perm(),
            z.view(gate.shape) if z is not None else _no_product(gate))


_sbl_masked_linear_cpu = cpu_twin(sbl_masked_linear, _forward)


@_sbl_masked_linear_cpu.register_fake
def _(x, weight, bias, gate, mask, threshold, block_size, density_crossover, reorder, save_product=False):
    _check_inputs(x, weight, bias, gate, mask)
    M, N = _tokens_features(gate)
    y = gate.new_empty(gate.shape, dtype=torch.promote_types(x.dtype, gate.dtype))
    state = gate.new_empty(tile_state_size(M, N, block_size), dtype=torch.int32)
    z = gate.new_empty(gate.shape, dtype=torch.promote_types(x.dtype, weight.dtype)) if save_product else _no_product(gate)
    return (y, state, gate.new_empty(M if reorder else 0, dtype=torch.int32),
            gate.new_empty(N if reorder else 0, dtype=torch.int32), z)


def _no_product(gate: Tensor) -> Tensor:
    return gate.new_empty(0)


@torch.library.triton_op("bcpt::sbl_masked_linear_backward", mutates_args=())
def sbl_masked_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    gate: Tensor,
    mask: Optional[Tensor],
    tile_state: Tensor,
    row_perm: Tensor,
    col_perm: Tensor,
    product: Tensor,
    threshold: float,
    block_size: int,
    density_crossover: float,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW, db, ds), an empty tensor for each one not needed; traced like the forward."""
    args = (grad, x, weight, bias, gate, mask, tile_state, row_perm, col_perm, product, threshold, block_size,
            density_crossover, needs)
    if x.device.type == "cuda":
        return _backward_grads(*args)
    return torch.ops.bcpt.sbl_masked_linear_backward_cpu(*args)


def _backward_grads(grad, x, weight, bias, gate, mask, tile_state, row_perm, col_perm, product, threshold,
                    block_size, density_crossover, needs):
    need_dx, need_dw, need_db, need_ds = (bool(n) for n in needs)
    need_db = need_db and bias is not None
    if not _use_kernels(x):
        grads = _reference_backward(grad, x, weight, bias, gate, mask, threshold, need_ds, product)
    else:
        from ..kernels.bcat_cluster import empty_bcat
        from ..kernels.sbl_block_gemm import sddmm_backward

        x2, g2, m2 = _flat(x, gate, mask)
        dy2 = grad.reshape(g2.shape)
        bcat = empty_bcat(g2, block_size, density_crossover, state=tile_state,
                          perm=row_perm if row_perm.numel() else None, col_perm=col_perm if col_perm.numel() else None)
        dx, dw, db, ds = sddmm_backward(dy2, x2, weight, bias, g2, m2, threshold, bcat, need_dx, need_dw, need_db,
                                        need_ds, product.view(g2.shape) if product.numel() else None)
        grads = (dx.view(x.shape) if dx is not None else None, dw, db, ds.view(gate.shape) if ds is not None else None)
    wanted = (need_dx, need_dw, need_db, need_ds)
    return tuple(g if w and g is not None else grad.new_empty(0) for g, w in zip(grads, wanted))  # type: ignore[return-value]


def _reference_backward(grad, x, weight, bias, gate, mask, threshold, need_ds, product):
    g = (grad * torch.where(_keep(gate, mask, threshold, keep_nan=True), gate, 0)).to(x.dtype)
    g2 = g.reshape(-1, g.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = (g2 @ weight).view(x.shape)
    dw = g2.t() @ x2
    db = g2.sum(0).to(bias.dtype) if bias is not None else None
    ds = None
    if need_ds:
        z = (product if product.numel() else F.linear(x, weight, bias)).to(grad.dtype)
        ds = torch.where(_keep(gate, mask, threshold, keep_nan=False), grad * z, 0).to(gate.dtype)
    return dx, dw, db, ds


_sbl_masked_linear_backward_cpu = cpu_twin(sbl_masked_linear_backward, _backward_grads)


@_sbl_masked_linear_backward_cpu.register_fake
def _(grad, x, weight, bias, gate, mask, tile_state, row_perm, col_perm, product, threshold, block_size,
      density_crossover, needs):
    need_dx, need_dw, need_db, need_ds = (bool(n) for n in needs)
    need_db = need_db and bias is not None
    return (  # one fresh empty per unneeded gradient: outputs must not alias
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else grad.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else grad.new_empty(0),
        torch.empty_like(bias) if need_db else grad.new_empty(0),
        torch.empty_like(gate, memory_format=torch.contiguous_format) if need_ds else grad.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, gate, mask, threshold, block_size, density_crossover, reorder, save_product = inputs
    _, tile_state, row_perm, col_perm, product = output
    ctx.save_for_backward(x, weight, bias, gate, mask, tile_state, row_perm, col_perm, product)
    ctx.config = (threshold, block_size, density_crossover)
    ctx.mark_non_differentiable(tile_state, row_perm, col_perm, product)
    # Else autograd hands the backward zero-filled gradients of the four aux outputs: an
    # (M, N) memset for the product alone (40 us per eager backward at 8192x8192 bf16, H200).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *_aux_grads):
    if grad is None:
        return (None,) * 10
    x, weight, bias, gate, mask, tile_state, row_perm, col_perm, product = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    dx, dw, db, ds = torch.ops.bcpt.sbl_masked_linear_backward(
        grad.contiguous(), x, weight, bias, gate, mask, tile_state, row_perm, col_perm, product, *ctx.config, needs
    )
    out = [g if n else None for g, n in zip((dx, dw, db, ds), needs)]
    if out[2] is not None and bias is None:
        out[2] = None
    return out[0], out[1], out[2], out[3], None, None, None, None, None, None


sbl_masked_linear.register_autograd(_backward, setup_context=_setup_context)
