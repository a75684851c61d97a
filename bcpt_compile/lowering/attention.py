"""``bcpt::nsa_selected_attention`` and ``bcpt::sliding_window_attention`` (+ ``_backward``).

Both return ``(out, lse)``: the attention output (like q) and the float32 natural-log
log-sum-exp per query row, ``(B, H, T)``, which the backward needs and nothing else uses
(it is marked non-differentiable). The inputs are q ``(B, H, T, D)``, k and v
``(B, H_kv, T, D)``; selected attention also takes the block table of a top-k
(int32 ``(B, H_kv, NQ, K)``) and per-row valid counts (int32 ``(B, H_kv, NQ)``), so no
T x T mask exists anywhere on the kernel path.

``own_block=True`` adds one step per query after its table entries: its own key block,
seen causally (native sparse attention's block-causal diagonal), while the entries follow
``causal``. A block listed twice (or listed and also the own block) is attended twice, as
a gathered-KV spelling does.

Semantics where the dense spelling is undefined: a query row that sees no key gets
output 0 and lse +inf (eager gives NaN for a ``-inf`` fill, a uniform average for a
finite one). See ``bcpt_compile/kernels/nsa_attention.py``.

The Triton kernels run on CUDA and on CPU under ``TRITON_INTERPRET=1``; plain CPU runs
the dense PyTorch reference below, which is also what the tests check the kernels
against (in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import triton_runs_on


# ----------------------------------------------------------------------------- references

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def selected_visibility(block_idx: Tensor, counts: Tensor, T: int, block_size: int, query_block: int,
                        causal: bool, own_block: bool = False) -> Tensor:
    """How often the selected-attention kernel lets query i see key j, int8 (B, H_kv, T, T) (tests, CPU).

    A count, not a bool: a block listed twice is attended twice, and with ``own_block`` the
    query's own block is one more (causal) step even when the table lists it too.
    """
    nkb = _cdiv(T, block_size)
    K = block_idx.shape[-1]
    idx = block_idx.long()
    valid = (torch.arange(K, device=idx.device) < counts[..., None].long()) & (idx >= 0) & (idx < nkb)
    sel = torch.zeros((*idx.shape[:-1], nkb + 1), dtype=torch.int8, device=idx.device)
    sel.scatter_add_(-1, torch.where(valid, idx, nkb), torch.ones_like(idx, dtype=torch.int8))
    sel = sel[..., :nkb]
    vis = sel.repeat_interleave(query_block, dim=-2)[..., :T, :].repeat_interleave(block_size, dim=-1)[..., :T]
    i = torch.arange(T, device=vis.device)
    causal_mask = i[None, :] <= i[:, None]
    if causal:
        vis = vis * causal_mask
    if own_block:
        vis = vis + (causal_mask & (i[None, :] // block_size == (i[:, None] // query_block * query_block) // block_size))
    return vis.to(torch.int8)


def window_visibility(T: int, window: int, device) -> Tensor:
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff < window)


def _log_weight(vis: Tensor, dtype) -> Tensor:
    """log of how often a key is seen: 0 once, log 2 twice, -inf never (``vis`` bool or a count)."""
    return torch.log(vis.to(dtype))


def reference_attention(q: Tensor, k: Tensor, v: Tensor, vis: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dense attention restricted to ``vis`` (bool, or a count of how often each key is seen;
    broadcastable to (B, H_kv, T, T)); empty rows give 0 and lse +inf.

    Differentiable, with finite gradients on empty rows (they are 0), in the dtype of q.
    """
    B, H, T, D = q.shape
    G = H // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    if vis.dim() == 4 and vis.shape[1] != 1:
        vis = vis.repeat_interleave(G, dim=1)
    seen = vis != 0
    s = (q @ k.transpose(-2, -1)) * scale
    any_row = seen.any(-1, keepdim=True)
    s = torch.where(any_row, torch.where(seen, s + _log_weight(vis, s.dtype), float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(seen, torch.exp(s - lse), torch.zeros_like(s))
    out = p @ v
    lse = torch.where(any_row, lse, torch.full_like(lse, float("inf"))).squeeze(-1)
    return out, lse.float()


def _reference_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, vis: Tensor, scale: float):
    """The analytic backward (P, dS = P (dP - delta)), since a custom op's body runs below autograd."""
    dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qf, kf, vf, gf = (t.to(dt) for t in (q, k, v, grad))
    out, lse = reference_attention(qf, kf, vf, vis, scale)
    ke, ve = kf.repeat_interleave(G, dim=1), vf.repeat_interleave(G, dim=1)
    if vis.dim() == 4 and vis.shape[1] != 1:
        vis = vis.repeat_interleave(G, dim=1)
    s = (qf @ ke.transpose(-2, -1)) * scale
    p = torch.where(vis != 0, torch.exp(s + _log_weight(vis, dt) - lse.to(dt)[..., None]), torch.zeros_like(s))
    delta = (gf * out).sum(-1, keepdim=True)
    ds = p * (gf @ ve.transpose(-2, -1) - delta)
    dq = (ds @ ke) * scale
    dk = ((ds.transpose(-2, -1) @ qf) * scale).view(B, Hkv, G, T, D).sum(2)
    dv = (p.transpose(-2, -1) @ gf).view(B, Hkv, G, T, D).sum(2)
    return tuple(g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


def _reference_forward(q, k, v, vis, scale):
    dt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out, lse = reference_attention(q.to(dt), k.to(dt), v.to(dt), vis, scale)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def block_mask_to_indices(block_mask: Tensor, batch: int, kv_heads: int) -> tuple[Tensor, Tensor]:
    """A bool block mask (broadcastable to (B, H_kv, NQ, NK)) as the kernel's (indices, counts), on the device.

    A stable descending sort puts each row's selected blocks first, in increasing block
    order; the count bounds the kernel's loop, so the unselected tail is never read.
    No host synchronisation: the table keeps its static width NK.
    """
    nq, nk = block_mask.shape[-2], block_mask.shape[-1]
    m = block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape)) if block_mask.dim() < 4 else block_mask
    m = m.expand(batch, kv_heads, nq, nk)
    order = torch.sort(m.to(torch.int8), dim=-1, descending=True, stable=True).indices
    counts = m.sum(-1, dtype=torch.int32)
    return order.to(torch.int32).contiguous(), counts.contiguous()


def topk_to_indices(idx: Tensor, batch: int, kv_heads: int) -> tuple[Tensor, Tensor]:
    """Top-k block indices (broadcastable to (B, H_kv, NQ, k); -1 marks an unused slot) as (indices, counts).

    Every row's count is the table width: per-row variable k arrives as -1 entries, which
    the kernel skips, so no compaction (and no sync) is needed.
    """
    while idx.dim() < 4:
        idx = idx.unsqueeze(0)
    idx = idx.expand(batch, kv_heads, *idx.shape[-2:]).to(torch.int32).contiguous()
    counts = torch.full(idx.shape[:-1], idx.shape[-1], dtype=torch.int32, device=idx.device)
    return idx, counts


def local_block_table(t: Tensor, block_size: int, lookback: int, lookforward: int = 0) -> tuple[Tensor, Tensor]:
    """Block-local attention (query block W sees key blocks W-lookback..W+lookforward) as a static
    selection table, sized by ``t``'s batch and heads (the K/V heads the kernel indexes).

    Out-of-range blocks are -1 (skipped by the kernel), so every row has the same width.
    """
    B, H, T, _ = t.shape
    nq = _cdiv(T, block_size)
    rows = torch.arange(nq, device=t.device)[:, None] + torch.arange(-lookback, lookforward + 1, device=t.device)[None, :]
    idx = torch.where((rows >= 0) & (rows < nq), rows, -1).to(torch.int32)
    idx = idx.expand(B, H, nq, lookback + lookforward + 1).contiguous()
    counts = torch.full((B, H, nq), lookback + lookforward + 1, dtype=torch.int32, device=t.device)
    return idx, counts


# ----------------------------------------------------------------------------- selected blocks

def _use_kernels(q: Tensor) -> bool:
    return triton_runs_on(q)


@torch.library.custom_op("bcpt::nsa_selected_attention", mutates_args=())
def nsa_selected_attention(
    q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_counts: Tensor,
    block_size: int, query_block: int, causal: bool, scale: float, own_block: bool = False,
) -> tuple[Tensor, Tensor]:
    from ..kernels import nsa_attention as K

    if _use_kernels(q):
        return K.selected_attention_fwd(q, k, v, block_idx, block_counts, block_size, query_block, causal, scale,
                                        own_block)
    K._check(q, k, v)
    K._validate_table(q, block_idx, block_counts, query_block, block_size, own_block)
    vis = selected_visibility(block_idx, block_counts, q.shape[2], block_size, query_block, causal, own_block)
    return _reference_forward(q, k, v, vis, scale)


@nsa_selected_attention.register_fake
def _(q, k, v, block_idx, block_counts, block_size, query_block, causal, scale, own_block=False):
    B, H, T, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, T), dtype=torch.float32)


#: Per configuration of the per-token (query_block = 1) dk/dv kernel on a GPU: the relative
#: error of a one-time self-check (see ``_check_per_token_backward``).
_PER_TOKEN_CHECKED: dict = {}


def _check_per_token_backward(q: Tensor, k: Tensor, block_size: int, causal: bool, own_block: bool) -> None:
    """Run the per-token backward once per kernel configuration on a small problem and compare
    with float32 PyTorch; raise instead of returning wrong gradients.

    Why: this layout's dk came out wrong on the H100 (relative error 2.2e-1, 2026-11-23) while
    the interpreter was exact. The dk/dv kernel now avoids the Hopper miscompile that matches
    it (see ``_bwd_dkv_kernel``), but that fix was made without a GPU; the check keeps a
    wrong gradient from passing silently on a GPU or Triton build where it still fails. The
    problem (8 key blocks) has every token select key block 0, so that block's list holds all
    T query rows, and a random earlier block.
    """
    from ..kernels import nsa_attention as K
    from ..kernels.tile_gemm import dot_precision

    G, D = q.shape[1] // k.shape[1], q.shape[-1]
    key = (q.device, q.dtype, D, G, block_size, causal, own_block, dot_precision(q))
    if key in _PER_TOKEN_CHECKED or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        err = _PER_TOKEN_CHECKED.get(key, 0.0)
    else:
        T = 8 * block_size
        g = torch.Generator(device=q.device).manual_seed(0)
        qq, kk, vv, do = (torch.randn((1, h, T, D), generator=g, device=q.device).to(q.dtype) for h in (G, 1, 1, G))
        own = torch.arange(T, device=q.device) // block_size
        past = (torch.rand(T, generator=g, device=q.device) * (own - 1).clamp_min(0)).long() + 1
        cols = [torch.where(own > 0, 0, -1), torch.where(own > 1, past, -1)]
        if not own_block:
            cols.append(own)
        idx = torch.stack(cols, -1).view(1, 1, T, -1).to(torch.int32).contiguous()
        cnt = torch.full((1, 1, T), idx.shape[-1], dtype=torch.int32, device=q.device)
        scale = D ** -0.5
        o, lse = K.selected_attention_fwd(qq, kk, vv, idx, cnt, block_size, 1, causal, scale, own_block)
        got = (o, *K.selected_attention_bwd(do, qq, kk, vv, o, lse, idx, cnt, block_size, 1, causal, scale, own_block))
        vis = selected_visibility(idx, cnt, T, block_size, 1, causal, own_block)
        ref = (_reference_forward(qq, kk, vv, vis, scale)[0], *_reference_backward(do, qq, kk, vv, vis, scale))
        err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, ref))
        _PER_TOKEN_CHECKED[key] = err
    tol = 1e-4 if q.dtype == torch.float32 and dot_precision(q) == "ieee" else 3e-2
    if err > tol:
        where = torch.cuda.get_device_name(q.device) if q.is_cuda else str(q.device)
        raise NotImplementedError(
            f"bcpt.nsa_selected_attention: the per-token (query_block=1) backward failed its self-check on "
            f"{where} (relative error {err:.1e}); use query_block = block_size")


@torch.library.custom_op("bcpt::nsa_selected_attention_backward", mutates_args=())
def nsa_selected_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, block_idx: Tensor,
    block_counts: Tensor, block_size: int, query_block: int, causal: bool, scale: float, own_block: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import nsa_attention as K

    if q.is_cuda and query_block == 1:
        _check_per_token_backward(q, k, block_size, causal, own_block)
    if _use_kernels(q):
        return K.selected_attention_bwd(grad, q, k, v, out, lse, block_idx, block_counts, block_size,
                                        query_block, causal, scale, own_block)
    vis = selected_visibility(block_idx, block_counts, q.shape[2], block_size, query_block, causal, own_block)
    return _reference_backward(grad, q, k, v, vis, scale)


@nsa_selected_attention_backward.register_fake
def _(grad, q, k, v, out, lse, block_idx, block_counts, block_size, query_block, causal, scale, own_block=False):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _selected_setup(ctx, inputs, output):
    q, k, v, block_idx, block_counts, block_size, query_block, causal, scale, *own = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient of lse
    ctx.save_for_backward(q, k, v, out, lse, block_idx, block_counts)
    ctx.config = (block_size, query_block, causal, scale, bool(own and own[0]))


def _selected_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, block_idx, block_counts = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.bcpt.nsa_selected_attention_backward(
        grad_out, q, k, v, out, lse, block_idx, block_counts, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None, None


nsa_selected_attention.register_autograd(_selected_backward, setup_context=_selected_setup)


# ----------------------------------------------------------------------------- sliding window

@torch.library.custom_op("bcpt::sliding_window_attention", mutates_args=())
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    from ..kernels import nsa_attention as K

    if _use_kernels(q):
        return K.sliding_window_fwd(q, k, v, window, scale)
    K._check(q, k, v)
    return _reference_forward(q, k, v, window_visibility(q.shape[2], window, q.device), scale)


@sliding_window_attention.register_fake
def _(q, k, v, window, scale):
    B, H, T, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("bcpt::sliding_window_attention_backward", mutates_args=())
def sliding_window_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, window: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import nsa_attention as K

    if _use_kernels(q):
        return K.sliding_window_bwd(grad, q, k, v, out, lse, window, scale)
    return _reference_backward(grad, q, k, v, window_visibility(q.shape[2], window, q.device), scale)


@sliding_window_attention_backward.register_fake
def _(grad, q, k, v, out, lse, window, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _window_setup(ctx, inputs, output):
    q, k, v, window, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient of lse
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.config = (window, scale)


def _window_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.bcpt.sliding_window_attention_backward(grad_out, q, k, v, out, lse, *ctx.config)
    return dq, dk, dv, None, None


sliding_window_attention.register_autograd(_window_backward, setup_context=_window_setup)
