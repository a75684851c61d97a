"""Client spellings found by reading real SBL / DeepEmbed code (Tiny-ONN, RWKV demos and training
code): gates and rows computed under ``torch.no_grad()`` (regressions: the rewrite gave them a
gradient), statement-form in-place products, normalised relu routing, slices and flattened tokens."""

import math

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpt_compile
from bcpt_compile.testing import rewritten_graph

from .test_sbl_pass import AOT, assert_compiled_matches_eager

B, T, K, N = 2, 5, 24, 40
D, HID, VOCAB, R = 8, 16, 10, 4


def _sbl_args(seed=0, n_extra=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    p = torch.randn(N, K, generator=g) / K**0.5
    s = torch.randn(B, T, N, generator=g) - 0.3
    return x, w, p, s


def _sites(fn, *args, family):
    report = bcpt_compile.explain(fn, *args, options=AOT)
    return [s.op for s in report.sites if s.family == family], report


# ------------------------------------------------------------------ SBL

def gate_where_under_no_grad(x, w, p):
    scores = x @ p.t()
    with torch.no_grad():  # routing decided without a gradient, as prototype-routing code does
        r = torch.where(scores > 0.1, scores, 0.0)
    return F.linear(x, w) * r


def product_under_no_grad(x, w, s):
    with torch.no_grad():  # a frozen projection
        y = F.linear(x, w)
    return y * torch.relu(s)


@torch.no_grad()
def _route(x, p):
    return F.relu(x @ p.t() - 0.1)


def gate_from_no_grad_helper(x, w, p):
    return F.linear(x, w) * _route(x, p)


def product_mul_statement(x, w, s):
    y = F.linear(x, w)
    y.mul_(F.relu(s))  # a statement; the function returns y
    return y


def normalised_relu_routing(x, w, s):
    r = F.relu(s)
    r = r / (r.sum(-1, keepdim=True) + 1e-6)
    return F.linear(x, w) * r


@torch.jit.script
def _scripted_relu(r: torch.Tensor) -> torch.Tensor:
    return F.relu(r)


def scripted_gate(x, w, s):  # Tiny-ONN keeps its gate helpers under torch.jit.script
    return F.linear(x, w) * _scripted_relu(s)


@pytest.mark.parametrize("fn", [gate_where_under_no_grad, product_under_no_grad, gate_from_no_grad_helper])
def test_no_grad_operands_get_no_gradient(fn):
    """Regression: the op received the pre-gate value (or x, W) of a gate (or product) computed under
    no_grad and gave them eager's missing gradient; they are detached now."""
    x, w, p, s = _sbl_args(1)
    args = (x, w, s) if fn is product_under_no_grad else (x, w, p)
    ops, report = _sites(fn, *args, family="sbl")
    assert ops == ["bcpt.sbl_masked_linear"], str(report)
    assert_compiled_matches_eager(fn, args)


@pytest.mark.parametrize("fn", [product_mul_statement, normalised_relu_routing, scripted_gate])
def test_sbl_client_spellings_match_eager(fn):
    x, w, _, s = _sbl_args(2)
    ops, report = _sites(fn, x, w, s, family="sbl")
    assert ops == ["bcpt.sbl_masked_linear"], str(report)
    assert_compiled_matches_eager(fn, (x, w, s))


def tensor_over_gate(x, w, s):
    return F.linear(x, w) * (torch.ones_like(s) / (F.relu(s) + 1.0))


def test_tensor_divided_by_gate_is_refused_with_a_reason():
    """``t / R`` is not zero where R is (it is t / 0): only ``R / t`` keeps the gate's zeros."""
    x, w, _, s = _sbl_args(3)
    report = bcpt_compile.explain(tensor_over_gate, x, w, s)
    assert report.counts["sbl"] == 0
    assert [m.reason for m in report.misses if m.family == "sbl"] == [
        "gate is not provably zero off the mask (call_function truediv)"]


class SblClientSnapshots(expecttest.TestCase):
    def test_gate_where_under_no_grad(self):
        x, w, p, _ = _sbl_args()
        self.assertExpectedInline(rewritten_graph(gate_where_under_no_grad, x, w, p.requires_grad_()), """\
def forward(self, L_p_, L_x_, L_w_):
    l_p_ = L_p_
    l_x_ = L_x_
    l_w_ = L_w_
    t = l_p_.t()
    scores = l_x_ @ t
    _set_grad_enabled = torch._C._set_grad_enabled(False)
    gt = scores > 0.1
    _set_grad_enabled_1 = torch._C._set_grad_enabled(True)
    detach = scores.detach()
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, detach, gt, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_product_mul_statement(self):
        x, w, _, s = _sbl_args()
        self.assertExpectedInline(rewritten_graph(product_mul_statement, x, w, s), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_normalised_relu_routing(self):
        x, w, _, s = _sbl_args()
        self.assertExpectedInline(rewritten_graph(normalised_relu_routing, x, w, s), """\
def forward(self, L_s_, L_x_, L_w_):
    l_s_ = L_s_
    l_x_ = L_x_
    l_w_ = L_w_
    r = torch.nn.functional.relu(l_s_)
    sum_1 = r.sum(-1, keepdim = True)
    add = sum_1 + 1e-06
    r_1 = r / add
    le = l_s_ <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, r_1, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")


# ------------------------------------------------------------------ DeepEmbed

def _de_inputs(seed=0, shape=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g), torch.randint(0, VOCAB, shape, generator=g)


class Rwkv8SeqFFN(nn.Module):
    """RWKV-8 demo's CMix_seq: 2-D (T, C) tokens, token shift by cat, weights stored (in, out),
    the ``enn`` rows gathered by the caller and passed in."""

    def __init__(self, kind="plain"):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.kind = kind
        self.x_k = nn.Parameter(torch.rand(D, generator=g))
        self.K = nn.Parameter(torch.randn(D, HID, generator=g) * 0.3)
        self.V = nn.Parameter(torch.randn(HID, D, generator=g) * 0.3)
        self.enn = nn.Parameter(torch.rand(VOCAB, D, generator=g) + 0.5)

    def cmix(self, x, e):
        xx = torch.cat((torch.zeros_like(x[:1]), x[:-1, :])) - x
        k = torch.relu((x + xx * self.x_k) @ self.K) ** 2
        return (k @ self.V) * e

    def forward(self, x, idx):
        if self.kind == "rows_no_grad":  # a frozen deep embedding
            with torch.no_grad():
                e = self.enn[idx]
        elif self.kind == "rows_detached":
            e = self.enn[idx].detach()
        else:
            e = self.enn[idx]
        return self.cmix(x, e)


class TrainStyleFFN(nn.Module):
    """Training-style output scale: ``nn.ZeroPad2d`` token shift, nn.Linear key/value, the table an
    nn.Embedding in a ModuleDict."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.time_shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.x_k = nn.Parameter(torch.rand(1, 1, D))
        self.key = nn.Linear(D, HID, bias=False)
        self.value = nn.Linear(HID, D, bias=False)
        self.tables = nn.ModuleDict({"deepemb": nn.Embedding(VOCAB, D)})
        with torch.no_grad():
            self.tables["deepemb"].weight.uniform_(0.5, 1.5)

    def forward(self, x, idx):
        emb = self.tables["deepemb"]
        k = torch.relu(self.key(x + (self.time_shift(x) - x) * self.x_k)) ** 2
        if self.kind == "value_no_grad":  # a frozen value projection
            with torch.no_grad():
                v = self.value(k)
            return v * emb(idx)
        if self.kind == "sliced_tokens":
            return self.value(k[:, 1:]) * emb(idx[:, 1:])
        if self.kind == "flat_tokens":
            b, t, c = x.shape
            return (self.value(k.view(b * t, HID)) * emb(idx.view(-1))).view(b, t, c)
        if self.kind == "mul_statement":
            v = self.value(k)
            v.mul_(emb(idx))
            return v
        raise ValueError(self.kind)


class Rwkv7bHidden(nn.Module):
    """RWKV-7 DeepEmbed hidden scale as the 7b demo writes it (2-D tokens, shifted k for the relu,
    plain x for the mix), optionally with the rows gathered under no_grad."""

    def __init__(self, rows_no_grad=False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.rows_no_grad = rows_no_grad
        self.x_k = nn.Parameter(torch.rand(D, generator=g))
        self.K = nn.Parameter(torch.randn(D, HID, generator=g) * 0.3)
        self.V = nn.Parameter(torch.randn(HID, D, generator=g) * 0.3)
        self.s1 = nn.Parameter(torch.randn(D, R, generator=g) * 0.3)
        self.s2 = nn.Parameter(torch.randn(R, HID, generator=g) * 0.3)
        self.s0 = nn.Parameter(torch.ones(HID))
        self.s_emb = nn.Parameter(torch.randn(VOCAB, R * R, generator=g))

    def forward(self, x, idx):
        t, c = x.shape
        xx = torch.cat((torch.zeros(1, c), x[:-1, :])) - x
        k = torch.relu((x + xx * self.x_k) @ self.K) ** 2
        if self.rows_no_grad:
            with torch.no_grad():
                rows = self.s_emb[idx]
        else:
            rows = self.s_emb[idx]
        ss = (x @ self.s1).view(t, 1, R) @ rows.view(t, R, R)
        return (k * ((ss.view(t, R) @ self.s2) + self.s0)) @ self.V


DE_CASES = [
    (lambda: Rwkv8SeqFFN("rows_no_grad"), (5,), "bcpt.deepembed_linear"),
    (lambda: TrainStyleFFN("value_no_grad"), (2, 3), "bcpt.deepembed_linear"),
    (lambda: Rwkv7bHidden(rows_no_grad=True), (5,), "bcpt.deepembed_rowmix+hidden"),
]
DE_SPELLINGS = [
    (lambda: Rwkv8SeqFFN("plain"), (5,), "bcpt.deepembed_linear"),
    (lambda: Rwkv8SeqFFN("rows_detached"), (5,), "bcpt.deepembed_linear"),
    (lambda: TrainStyleFFN("sliced_tokens"), (2, 3), "bcpt.deepembed_linear"),
    (lambda: TrainStyleFFN("flat_tokens"), (2, 3), "bcpt.deepembed_linear"),
    (lambda: TrainStyleFFN("mul_statement"), (2, 3), "bcpt.deepembed_linear"),
    (lambda: Rwkv7bHidden(), (5,), "bcpt.deepembed_rowmix+hidden"),
]


@pytest.mark.parametrize("make, shape, op", DE_CASES, ids=["rows_no_grad", "value_no_grad", "hidden_rows_no_grad"])
def test_deepembed_no_grad_operands_get_no_gradient(make, shape, op):
    """Regression: rows (or the value projection) read under no_grad got a gradient from the fused op."""
    torch.manual_seed(0)
    model = make()
    x, idx = _de_inputs(4, shape)
    ops, report = _sites(model, x, idx, family="deepembed")
    assert ops == [op], str(report)
    assert_compiled_matches_eager(model, (x, idx))


@pytest.mark.parametrize("make, shape, op", DE_SPELLINGS,
                         ids=["rwkv8_seq", "rows_detached", "sliced_tokens", "flat_tokens", "mul_statement", "rwkv7b"])
def test_deepembed_client_spellings_match_eager(make, shape, op):
    torch.manual_seed(0)
    model = make()
    x, idx = _de_inputs(6, shape)
    ops, report = _sites(model, x, idx, family="deepembed")
    assert ops == [op], str(report)
    assert_compiled_matches_eager(model, (x, idx))


class DeepEmbedClientSnapshots(expecttest.TestCase):
    def test_rows_no_grad(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(Rwkv8SeqFFN("rows_no_grad"), *_de_inputs(0, (5,))), """\
def forward(self, L_self_parameters_enn_, L_idx_, L_x_, L_self_parameters_x_k_, L_self_parameters_K_, L_self_parameters_V_):
    l_self_parameters_enn_ = L_self_parameters_enn_
    l_idx_ = L_idx_
    l_x_ = L_x_
    l_self_parameters_x_k_ = L_self_parameters_x_k_
    l_self_parameters_k_ = L_self_parameters_K_
    l_self_parameters_v_ = L_self_parameters_V_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, True)
    _set_grad_enabled = torch._C._set_grad_enabled(False)
    _set_grad_enabled_1 = torch._C._set_grad_enabled(True)
    getitem_1 = l_x_[slice(None, 1, None)]
    zeros_like = torch.zeros_like(getitem_1)
    getitem_2 = l_x_[(slice(None, -1, None), slice(None, None, None))]
    cat = torch.cat((zeros_like, getitem_2))
    xx = cat - l_x_
    mul = xx * l_self_parameters_x_k_
    add = l_x_ + mul
    matmul = add @ l_self_parameters_k_
    relu = torch.relu(matmul)
    k = relu ** 2
    t = torch.t(l_self_parameters_v_)
    detach = l_self_parameters_enn_.detach()
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, t, None, detach, l_idx_, True, row_plan_default, False)
    getitem_3 = deepembed_linear_default[0]
    return (getitem_3,)
""")

    def test_flat_tokens(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(TrainStyleFFN("flat_tokens"), *_de_inputs(0, (2, 3))), """\
def forward(self, L_x_, L_self_parameters_x_k_, L_self_modules_key_parameters_weight_, L_self_modules_value_parameters_weight_, L_idx_, L_self_modules_tables_modules_deepemb_parameters_weight_):
    l_x_ = L_x_
    l_self_parameters_x_k_ = L_self_parameters_x_k_
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_idx_ = L_idx_
    l_self_modules_tables_modules_deepemb_parameters_weight_ = L_self_modules_tables_modules_deepemb_parameters_weight_
    pad = torch._C._nn.pad(l_x_, (0, 0, 1, -1), 'constant', 0.0)
    sub = pad - l_x_
    mul = sub * l_self_parameters_x_k_
    add = l_x_ + mul
    linear = torch._C._nn.linear(add, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    k = relu ** 2
    view = k.view(6, 16)
    view_1 = l_idx_.view(-1)
    row_plan_default = torch.ops.bcpt.row_plan.default(view_1, 10, False)
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(view, l_self_modules_value_parameters_weight_, None, l_self_modules_tables_modules_deepemb_parameters_weight_, view_1, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    view_2 = getitem.view(2, 3, 8)
    return (view_2,)
""")

    def test_mul_statement(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(TrainStyleFFN("mul_statement"), *_de_inputs(0, (2, 3))), """\
def forward(self, L_x_, L_self_parameters_x_k_, L_self_modules_key_parameters_weight_, L_self_modules_value_parameters_weight_, L_self_modules_tables_modules_deepemb_parameters_weight_, L_idx_):
    l_x_ = L_x_
    l_self_parameters_x_k_ = L_self_parameters_x_k_
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_tables_modules_deepemb_parameters_weight_ = L_self_modules_tables_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    pad = torch._C._nn.pad(l_x_, (0, 0, 1, -1), 'constant', 0.0)
    sub = pad - l_x_
    mul = sub * l_self_parameters_x_k_
    add = l_x_ + mul
    linear = torch._C._nn.linear(add, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    k = relu ** 2
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_tables_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")
