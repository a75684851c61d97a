"""The attention pass differentiates only what eager differentiates: where eager reads q, k or v
without a gradient (scores, probabilities or window gathers computed under ``torch.no_grad()``,
a ``.detach()`` inside the gathers, the whole attention under no_grad with its output moved
back outside), the op is handed ``.detach()`` of that operand. Each spelling is compiled
(aot_eager, so the custom ops' own backward runs) and compared with eager: the output, whether
it requires grad, and every gradient, a gradient eager leaves None (or zero) included."""

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from bcpt_compile.backend import bcpt_backend
from bcpt_compile.explain import explain
from bcpt_compile.report import Report
from bcpt_compile.testing import rewritten_graph

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")  # triton 3.6 interpreter

B, H, T, D, W = 1, 2, 32, 16, 12
S, TF = 16, 32  # gathered layouts: key blocks of S, T a multiple of S
OPTS = {"inner_compiler": "aot_eager", "block_size": 16}
WINDOW, SELECTED = "bcpt.sliding_window_attention", "bcpt.nsa_selected_attention"


def _qkv(shape=(B, H, T, D), hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kshape = (shape[0], hkv or shape[1], *shape[2:])
    return [torch.randn(shape, generator=g), torch.randn(kshape, generator=g), torch.randn(kshape, generator=g)]


def _band():
    i = torch.arange(T)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < W)


def _no_grad(on):
    return torch.no_grad() if on else contextlib.nullcontext()


def _grads_as_eager(fn, tensors, op, params=()):
    """fn is rewritten to ``op``, and compiled equals eager: output, its requires_grad, and the
    gradients of the inputs and ``params`` (None and zero alike where eager has none)."""
    ins = [t.clone().requires_grad_(True) for t in tensors]
    ref = [t.clone().requires_grad_(True) for t in tensors]
    torch._dynamo.reset()
    report = Report()
    out = torch.compile(fn, backend=functools.partial(bcpt_backend, options=OPTS, report_sink=report))(*ins)
    assert [s.op for s in report.sites] == [op], (report.sites, [m.reason for m in report.misses])
    expected = fn(*ref)
    assert out.requires_grad == expected.requires_grad, "the output requires grad where eager's does not"
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(42))
    grads = []
    for res, inputs in ((out, ins), (expected, ref)):
        for p in params:
            p.grad = None
        if res.requires_grad:
            res.backward(grad)
        grads.append([x.grad for x in inputs] + [p.grad for p in params])
    for i, (a, b) in enumerate(zip(*grads)):
        if b is None or not bool(b.any()):
            assert a is None or not bool(a.any()), f"gradient {i}: eager has none, the rewrite gives one"
        else:
            assert a is not None, f"gradient {i}: eager has one, the rewrite none"
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4, f"gradient {i} differs"


# --------------------------------------------------------------------------- explicit / SDPA


def scores_under_no_grad(q, k, v):
    """The scores (and their mask) under no_grad, the softmax and P @ V outside: only v has a gradient."""
    with torch.no_grad():
        s = q @ k.transpose(-2, -1) * D ** -0.5
        s = s.masked_fill(~_band(), float("-inf"))
    return s.softmax(-1) @ v


def probabilities_under_no_grad_bthd(q, k, v):
    """(B, T, H, D) einsums, the probabilities under no_grad: the op also permutes q, k, v."""
    with torch.no_grad():
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
        p = s.masked_fill(~_band(), float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def transposed_k_under_no_grad(q, k, v):
    """k^T taken under no_grad: a view, which still requires grad in eager but passes none back."""
    with torch.no_grad():
        kt = k.transpose(-2, -1)
    return torch.softmax((q @ kt * D ** -0.5).masked_fill(~_band(), float("-inf")), -1) @ v


def test_scores_under_no_grad_give_q_and_k_no_gradient():
    q, k, v = _qkv()
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert rewritten_graph(scores_under_no_grad, q, k, v).count(".detach()") == 2
    for fn in (scores_under_no_grad, transposed_k_under_no_grad):
        _grads_as_eager(fn, _qkv(), WINDOW)
    _grads_as_eager(probabilities_under_no_grad_bthd, _qkv((B, T, H, D)), WINDOW)


def detached_k_explicit(q, k, v):
    return (q @ k.detach().mT * D ** -0.5).masked_fill(~_band(), float("-inf")).softmax(-1) @ v


def detached_kv_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k.detach(), v.detach(), attn_mask=_band())


def detached_v_einsum_bthd(q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
    return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~_band(), float("-inf")).softmax(-1), v.detach())


def test_detached_operands_stay_detached():
    """Already right (the detached node is the operand); guards against looking through detach."""
    _grads_as_eager(detached_k_explicit, _qkv(), WINDOW)
    _grads_as_eager(detached_kv_sdpa, _qkv(), WINDOW)
    _grads_as_eager(detached_v_einsum_bthd, _qkv((B, T, H, D)), WINDOW)


class FrozenKV(torch.nn.Module):
    """K/V projections under no_grad (frozen), q trained: no gradient to wk, wv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wq, self.wk, self.wv = (torch.nn.Linear(D, D) for _ in range(3))

    def forward(self, x):
        q = self.wq(x)
        with torch.no_grad():
            k, v = self.wk(x), self.wv(x)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_band()).transpose(1, 2).reshape(B, T, D)


def test_frozen_kv_projection():
    mod = FrozenKV()
    _grads_as_eager(mod, [torch.randn(B, T, D)], WINDOW, params=list(mod.parameters()))


def stable_softmax_without_detach(q, k, v):
    """The row-max shift without .detach(): eager's gradient through the max is zero in total
    (softmax is shift-invariant), so the rewrite's gradients are eager's."""
    s = (q @ k.mT * D ** -0.5).masked_fill(~_band(), float("-inf"))
    return (s - s.amax(-1, keepdim=True)).softmax(-1) @ v


def test_row_max_shift_without_detach():
    _grads_as_eager(stable_softmax_without_detach, _qkv(), WINDOW)


bias_scale = torch.nn.Parameter(torch.ones(()))


def bias_times_a_parameter(q, k, v):
    return F.softmax(q @ k.mT * D ** -0.5 + torch.where(_band(), 0.0, float("-inf")) * bias_scale, -1) @ v


def test_a_bias_that_requires_grad_is_refused():
    q, k, v = (x.requires_grad_() for x in _qkv())
    report = explain(bias_times_a_parameter, q, k, v)
    assert report.counts["attention"] == 0
    assert [m.reason for m in report.misses] == ["additive mask mul is not where(mask, 0, -inf) or "
                                                 "zeros.masked_fill(mask, -inf)"]


# --------------------------------------------------------------------------- windowed layouts (probe-evaluated)

def _unfold(x):
    return F.pad(x, (0, 0, W - 1, 0)).unfold(2, W, 1).transpose(-2, -1)


def unfold_window(q, k, v, gathers_no_grad=False, all_no_grad=False, k_after=False, mid=False, q_rows=False):
    """Per-token windows as (..., 1, d) matmul rows; ``mid``: ``pad(k).detach().unfold(...)``."""
    with _no_grad(all_no_grad):
        with _no_grad(gathers_no_grad):
            kw = F.pad(k, (0, 0, W - 1, 0)).detach().unfold(2, W, 1).transpose(-2, -1) if mid else _unfold(k)
        vw = _unfold(v)
        if k_after:
            kw = kw.detach()
        qr = q.unsqueeze(-2).detach() if q_rows else q.unsqueeze(-2)
        real = (torch.arange(T)[:, None] - (W - 1) + torch.arange(W)) >= 0  # the slot holds a key, not padding
        s = torch.where(real[:, None, :], qr @ kw.transpose(-1, -2) / math.sqrt(D), float("-inf"))
        o = s.softmax(-1) @ vw
    return o.squeeze(-2)  # outside the no_grad block: the op is inserted here


def unfold_window_gqa(q, k, v):
    """GQA by repeat_interleave, K/V detached after the repeat (the pass undoes the repeat)."""
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1).detach() for x in (k, v))
    return unfold_window(q, k, v)


def _look_around(x):
    """local-attention's look_around: each window with the one before it (pad value -1)."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (1, 0), value=-1).unfold(1, 2, 1).movedim(-1, 2).flatten(2, 3)


def block_windows(q, k, v, gathers_no_grad=False, all_no_grad=False, k_before=False, v_after=False):
    """local-attention's bucketed windows of S tokens, looking one window back, 3-D (B*H, T, D)."""
    b, h, t, d = q.shape
    q, k, v = (x.reshape(b * h, t, d) for x in (q, k, v))
    pos = torch.arange(t).reshape(1, t // S, S)
    kpos = _look_around(pos)
    hidden = (pos[..., :, None] < kpos[..., None, :]) | (kpos[..., None, :] == -1)
    with _no_grad(all_no_grad):
        bq, bk, bv = (x.reshape(b * h, t // S, S, d) for x in (q, k, v))
        if k_before:
            bk = bk.detach()
        with _no_grad(gathers_no_grad):
            bk = _look_around(bk)
        bv = _look_around(bv)
        if v_after:
            bv = bv.detach()
        s = torch.einsum("bhie,bhje->bhij", bq * d ** -0.5, bk)
        o = torch.einsum("bhij,bhjd->bhid", s.masked_fill(hidden, -torch.finfo(s.dtype).max).softmax(-1), bv)
    return o.reshape(b, h, t, d)  # outside the no_grad block


@pytest.mark.parametrize("kw", [dict(gathers_no_grad=True), dict(all_no_grad=True)], ids=lambda kw: next(iter(kw)))
def test_window_gathers_under_no_grad(kw):
    """K's window gather under no_grad: k has no gradient (the op was handed k itself). The whole
    attention under no_grad with the output moved back outside: nothing has a gradient, and the
    output requires none (the op is inserted at the move back, where grad mode is on again)."""
    _grads_as_eager(lambda q, k, v: unfold_window(q, k, v, **kw), _qkv(), WINDOW)
    _grads_as_eager(lambda q, k, v: block_windows(q, k, v, **kw), _qkv(), WINDOW)


def test_detach_inside_window_gathers():
    """``detach`` is data movement for the probe replay, so the pass reaches the un-detached k (or q)
    behind it; the op is handed its ``.detach()``."""
    q, k, v = _qkv()
    assert ".detach()" in rewritten_graph(lambda q, k, v: unfold_window(q, k, v, k_after=True),
                                          q, k.requires_grad_(), v)
    for kw in (dict(k_after=True), dict(mid=True), dict(q_rows=True)):
        _grads_as_eager(lambda q, k, v: unfold_window(q, k, v, **kw), _qkv(), WINDOW)
    _grads_as_eager(unfold_window_gqa, _qkv((B, 4, T, D), hkv=2), WINDOW)
    for kw in (dict(k_before=True), dict(v_after=True)):
        _grads_as_eager(lambda q, k, v: block_windows(q, k, v, **kw), _qkv(), WINDOW)


# --------------------------------------------------------------------------- gathered layouts (NSA fine branch)

_IMP = torch.rand(B, 1, TF, TF // S, generator=torch.Generator().manual_seed(3))
_IMP[..., 0] = 0.9


def nsa_fine(q, k, v, gather_no_grad=False, all_no_grad=False, k_after=False, v_after=False):
    """Per-token top-1 key block plus the own block (causal), gathered, einsums (B, T, H, D) out."""
    b, h, t, d = q.shape
    with _no_grad(all_no_grad):
        val, idx = _IMP.topk(1, dim=-1)
        own = (torch.arange(t) // S).view(1, 1, t, 1).expand(b, h, t, 1)
        gidx = torch.cat([idx, own], dim=-1)[..., None, None].expand(b, h, t, 2, S, d)
        with _no_grad(gather_no_grad):
            kk = k.view(b, h, t // S, S, d).unsqueeze(2).expand(b, h, t, t // S, S, d).gather(3, gidx).flatten(3, 4)
        vv = v.view(b, h, t // S, S, d).unsqueeze(2).expand(b, h, t, t // S, S, d).gather(3, gidx).flatten(3, 4)
        kk, vv = kk.detach() if k_after else kk, vv.detach() if v_after else vv
        s = torch.einsum("bhtd,bhtjd->bhtj", q, kk) * d ** -0.5
        tril = torch.ones(S, S, dtype=torch.bool).tril().repeat(t // S, 1).expand(b, h, t, S)
        keep = torch.cat([(val > 0.05).repeat_interleave(S, -1), tril], -1)
        o = torch.einsum("bhtj,bhtjd->bthd", s.masked_fill(~keep, float("-inf")).softmax(-1), vv)
    return o.transpose(1, 2)  # outside the no_grad block


@pytest.mark.parametrize("kw", [dict(gather_no_grad=True), dict(all_no_grad=True), dict(k_after=True),
                                dict(v_after=True)], ids=lambda kw: next(iter(kw)))
def test_gathered_keys_without_gradient(kw):
    _grads_as_eager(lambda q, k, v: nsa_fine(q, k, v, **kw), _qkv((B, 1, TF, D)), SELECTED)
