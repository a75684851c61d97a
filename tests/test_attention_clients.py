"""Attention spellings found in client code in the wild (hand-written NSA / sliding-window
references, lucidrains-style modules, tutorials): minimal models of their math, each compiled
against eager (outputs and gradients) or refused with its reason in ``explain``."""

import math

import expecttest
import torch
import torch.nn.functional as F

from bcpt_compile.explain import explain
from bcpt_compile.testing import rewritten_graph
from tests.test_attention_pass import _compiled_vs_eager

pytestmark = __import__("pytest").mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")  # triton 3.6 interpreter

B, H, T, D, W = 1, 2, 40, 16, 12


def _qkv(seed=0, h=H):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, D, generator=g) for n in (h, H, H)]


def _band():
    i = torch.arange(T)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < W)


def tutorial_tensor_scale_stable_softmax(q, k, v):
    """A tutorial's ``/ torch.sqrt(torch.tensor(d_k))`` and lucidrains' stable softmax
    (``sim - sim.amax(-1, keepdim=True).detach()``) around a band mask."""
    s = torch.matmul(q, k.transpose(-2, -1)) / torch.sqrt(torch.tensor(D, dtype=torch.float32))
    s = s.masked_fill(~_band(), -torch.finfo(s.dtype).max)
    s = s - s.amax(dim=-1, keepdim=True).detach()
    return s.softmax(dim=-1) @ v


def max_shift_before_mask(q, k, v):
    """``s - s.max(-1, keepdim=True).values`` before the mask, scale on q before the product."""
    s = (q * D ** -0.5) @ k.mT
    s = s - s.max(dim=-1, keepdim=True).values
    return F.softmax(s.masked_fill(~_band(), float("-inf")), dim=-1) @ v


def unfold_window_einsum(q, k, v):
    """Per-token sliding window: keys zero-padded in front, ``unfold`` into W slots per token,
    ``einsum('bhtd,bhtwd->bhtw')``, the padding slots hidden with -finfo.max."""
    kw, vw = (F.pad(x, (0, 0, W - 1, 0)).unfold(-2, W, 1).transpose(-2, -1) for x in (k, v))
    s = torch.einsum("bhtd,bhtwd->bhtw", q, kw) * D ** -0.5
    real = (torch.arange(T)[:, None] + torch.arange(W)[None, :]) >= W - 1
    s = s.masked_fill(~real, -torch.finfo(s.dtype).max)
    return torch.einsum("bhtw,bhtwd->bhtd", torch.softmax(s, dim=-1), vw)


def unfold_window_matmul_rows(q, k, v):
    """The same window as ``(..., 1, d)`` matmul rows, torch.where with -inf, GQA by repeat_interleave."""
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    kw, vw = (F.pad(x, (0, 0, W - 1, 0)).unfold(2, W, 1).transpose(-2, -1) for x in (k, v))
    s = q.unsqueeze(-2) @ kw.transpose(-1, -2) / math.sqrt(D)
    real = (torch.arange(T)[:, None] - (W - 1) + torch.arange(W)) >= 0
    s = torch.where(real[:, None, :], s, float("-inf"))
    return (s.softmax(-1) @ vw).squeeze(-2)


def unfold_window_bthd_3d(q, k, v):
    """(B*H, T, D) rows unfolded along dim 1 without a transpose (slots last)."""
    q, k, v = (x.reshape(-1, T, D) for x in (q, k, v))
    kw, vw = (F.pad(x, (0, 0, W - 1, 0)).unfold(1, W, 1) for x in (k, v))
    s = torch.einsum("ntd,ntdw->ntw", q, kw) * D ** -0.5
    s = s.masked_fill((torch.arange(T)[:, None] + torch.arange(W)[None, :]) < W - 1, float("-inf"))
    return torch.einsum("ntw,ntdw->ntd", s.softmax(-1), vw).view(B, H, T, D)


class TestAttentionClients(expecttest.TestCase):
    def test_constant_tensor_scale_and_row_max_shift(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(tutorial_tensor_scale_stable_softmax, q, k, v), """\
def forward(self, L_k_, L_q_, L_v_):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 12, 0.25)
    getitem_4 = sliding_window_attention_default[0]
    return (getitem_4,)
""")
        _compiled_vs_eager(tutorial_tensor_scale_stable_softmax, [q, k, v])
        _compiled_vs_eager(max_shift_before_mask, [q, k, v])

    def test_per_token_unfold_window_is_sliding_window(self):
        q, k, v = _qkv(1)
        self.assertExpectedInline(rewritten_graph(unfold_window_einsum, q, k, v), """\
def forward(self, L_k_, L_v_, L_q_):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 12, 0.25)
    getitem_2 = sliding_window_attention_default[0]
    return (getitem_2,)
""")
        _compiled_vs_eager(unfold_window_einsum, [q, k, v])
        _compiled_vs_eager(unfold_window_bthd_3d, [q, k, v])
        q4 = torch.randn(B, 4, T, D, generator=torch.Generator().manual_seed(2))
        _compiled_vs_eager(unfold_window_matmul_rows, [q4, k, v])

    def test_client_near_misses_name_their_reason(self):
        q, k, v = _qkv(3)
        TS = 64

        def misses(q, k, v, q64, k64, v64, imp):
            kw, vw = (F.pad(x, (0, 0, W - 1, 0)).unfold(-2, W, 1).transpose(-2, -1) for x in (k, v))
            a = torch.einsum("bhtw,bhtwd->bhtd", torch.einsum("bhtd,bhtwd->bhtw", q, kw).softmax(-1), vw)  # pads seen
            kl, vl = (F.pad(x, (0, 0, 3, 3)).unfold(2, 7, 1) for x in (k, v))
            pos = torch.arange(T)[:, None] - 3 + torch.arange(7)[None, :]
            s = torch.einsum("bhtd,bhtdw->bhtw", q, kl).masked_fill((pos < 0) | (pos >= T), float("-inf"))
            b = torch.einsum("bhtw,bhtdw->bhtd", s.softmax(-1), vl)                    # two-sided window
            s = torch.einsum("bhtd,bhtdw->bhtw", q, kl * 2.0).masked_fill((pos < 0) | (pos >= T), float("-inf"))
            c = torch.einsum("bhtw,bhtdw->bhtd", s.softmax(-1), vl)                    # keys scaled after unfold
            m = _band()
            p = (q @ k.mT * 0.25).masked_fill(~m, float("-inf")).softmax(-1).masked_fill(~m, 0.0)
            d = p @ v                                                                  # zeroed after the softmax
            # fla-style vectorised reference: token ids from top-k blocks, advanced indexing
            idx = imp.topk(2, -1).indices                                              # b h t k
            ids = (idx[..., None] * 16 + torch.arange(16)).flatten(-2)                 # b h t 32
            bi, hi = torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1)
            ks, vs = k64[bi, hi, ids], v64[bi, hi, ids]                                # b h t 32 d
            s = (q64.unsqueeze(-2) @ ks.transpose(-1, -2)).squeeze(-2)
            s = s.masked_fill(ids > torch.arange(TS)[:, None], float("-inf"))
            e = (s.softmax(-1).unsqueeze(-2) @ vs).squeeze(-2)
            return a, b, c, d, e

        g = torch.Generator().manual_seed(4)
        q64, k64, v64 = (torch.randn(B, H, TS, D, generator=g) for _ in range(3))
        imp = torch.rand(B, H, TS, TS // 16, generator=g)
        report = explain(misses, q, k, v, q64, k64, v64, imp)
        self.assertEqual(report.counts["attention"], 0)
        self.assertExpectedInline("\n".join(sorted(m.reason for m in report.misses if m.family == "attention")), """\
gathered attention: K/V are gathered by advanced indexing (getitem: x[b, ids, h]), not by torch.gather of whole key blocks along a block dim: the slots' blocks and entries are not read
per-token windowed attention whose q/k/v gathers are not pure data movement
the attention probabilities are masked again after the softmax (call_method masked_fill, fill 0): only casts and inactive dropout are looked through between the softmax and P @ V
windowed attention looks ahead of the query (keys up to i+3) at token level: the sliding-window kernel is causal only
windowed attention: padding slots are visible""")

    def test_unfold_window_bf16_is_no_farther_from_float64_than_eager(self):
        """In bf16 the kernel and eager round differently (eager rounds the unfolded scores and
        probabilities to bf16); the rewrite must be at least as close to a float64 reference."""
        q, k, v = _qkv(seed=3)
        dy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(5))

        def run(fn, dtype):
            ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*ins)
            out.backward(dy.to(dtype))
            return [out.double()] + [t.grad.double() for t in ins]

        self.assertEqual(explain(unfold_window_einsum, *(t.bfloat16() for t in (q, k, v))).counts["attention"], 1)
        ref = run(unfold_window_einsum, torch.float64)
        eager = run(unfold_window_einsum, torch.bfloat16)
        compiled = run(torch.compile(unfold_window_einsum, backend="bcpt"), torch.bfloat16)
        for name, r, e, c in zip(("out", "dq", "dk", "dv"), ref, eager, compiled):
            err_eager = ((e - r).norm() / r.norm()).item()
            err_bcpt = ((c - r).norm() / r.norm()).item()
            self.assertLess(err_bcpt, 1.25 * err_eager + 1e-4, f"{name}: bcpt {err_bcpt:.2e}, eager {err_eager:.2e}")
