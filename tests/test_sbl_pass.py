"""SBL pass: every matched spelling rewrites to bcpt.sbl_masked_linear and matches eager."""

import copy

import pytest
import torch
from expecttest import TestCase

import bcpt_compile
from bcpt_compile.testing import rewritten_graph

from . import sbl_models as sm

AOT = {"inner_compiler": "aot_eager", "block_size": 16}
B, T, K, N = 2, 9, 24, 40  # 18 tokens: neither dim is a multiple of the 16-wide tiles


def _args(name, dtype=torch.float32):
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    x = torch.randn(B, T, K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype) / K**0.5
    b = torch.randn(N, generator=g, dtype=dtype)
    s = torch.randn(B, T, N, generator=g, dtype=dtype) - 0.4
    return {
        "matmul_bias_before": (x, w, b, s),
        "gate_first": (x, w, b, s),
        "einsum_clamp": (x, w, s),
        "weight_in_out": (x, w.t().contiguous(), s),
        "threshold_mul": (x, w, s),
        "where_tensor_threshold": (x, w, s, torch.randn(N, generator=g, dtype=dtype) * 0.3),
        "masked_fill_gate": (x, w, s, torch.rand(B, T, N, generator=g) < 0.3),
        "functional_threshold": (x, w, s),
        "viewed_linear": (x, w, s),
        "bias_after_mask": (x, w, b, s),
        "inplace_relu_gate": (x, w, s),
        "einsum_weight_first": (x, w, s),
        "inplace_product": (x, w, b, s),
        "mul_method_inplace": (x, w, s),
        "inplace_bias_before": (x, w, b, s),
        "detached_gate": (x, w, s),
        "cast_gate": (x, w, s),
        "scaled_gate": (x, w, s),
        "squared_gate": (x, w, s),
        "gain_gate": (x, w, s, torch.rand(N, generator=g, dtype=dtype) + 0.5),
        "eval_dropout_gate": (x, w, s),
        "where_zeros_like": (x, w, s),
        "relu6_gate": (x, w, s),
        "maximum_gate": (x, w, s),
        "clamp_inplace_gate": (x, w, s),
        "relu6_inplace_gate": (x, w, s),
        "threshold_inplace_gate": (x, w, s),
        "masked_fill_function_gate": (x, w, s, torch.rand(B, T, N, generator=g) < 0.3),
        "masked_fill_inplace_gate": (x, w, s, torch.rand(B, T, N, generator=g) < 0.3),
        "scalar_tensor_zero_gate": (x, w, s),
        "max_scalar_tensor_gate": (x, w, s),
        "hardshrink_gate": (x, w, s),
        "softshrink_gate": (x, w, s),
        "addmm_unit_scales": (x, w, b, s),
        "head_split_view": (x, w, s),
        "gate_viewed_after_relu": (x, w, s),
    }[name]


FUNCTION_SPELLINGS = [
    "matmul_bias_before", "gate_first", "einsum_clamp", "weight_in_out", "threshold_mul",
    "where_tensor_threshold", "masked_fill_gate", "functional_threshold", "viewed_linear", "bias_after_mask",
    "inplace_relu_gate",
]
# found by red-teaming client-style layers: in-place products, weight-first einsum, and
# gates wrapped in zero-preserving ops (casts, detach, scaling, squaring, eval dropout)
RED_TEAM_SPELLINGS = [
    "einsum_weight_first", "inplace_product", "mul_method_inplace", "inplace_bias_before", "detached_gate",
    "cast_gate", "scaled_gate", "squared_gate", "gain_gate", "eval_dropout_gate", "where_zeros_like",
    "relu6_gate", "maximum_gate",
]
FUNCTION_SPELLINGS += RED_TEAM_SPELLINGS
# third round: in-place gates (the result is gated: s is overwritten), torch.masked_fill and
# torch.tensor(0.0) zeros, shrinkage gates (zero where |s| <= lambda), addmm's unit
# beta/alpha, and views of the product that split the feature dim (heads)
THIRD_ROUND_SPELLINGS = [
    "clamp_inplace_gate", "relu6_inplace_gate", "threshold_inplace_gate", "masked_fill_function_gate",
    "masked_fill_inplace_gate", "scalar_tensor_zero_gate", "max_scalar_tensor_gate", "hardshrink_gate", "softshrink_gate", "addmm_unit_scales",
    "head_split_view", "gate_viewed_after_relu",
]
FUNCTION_SPELLINGS += THIRD_ROUND_SPELLINGS
MODULE_SPELLINGS = [sm.TinyOnnSBL, sm.SparseProtoLinear, sm.ModuleLinearGate]


def _grads_of(fn, args, compiled_options=None):
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    run = torch.compile(fn, backend="bcpt", options=compiled_options) if compiled_options else fn
    out = run(*args)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    gen = torch.Generator().manual_seed(7)
    cots = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    leaves = [a for a in args if a.requires_grad] + params
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def assert_compiled_matches_eager(fn, args, options=AOT, rtol=1e-4, atol=1e-5):
    eager_fn = copy.deepcopy(fn) if isinstance(fn, torch.nn.Module) else fn
    (eo, eg), (co, cg) = _grads_of(eager_fn, args), _grads_of(fn, args, options)
    assert len(eo) == len(co) and len(eg) == len(cg)
    for e, c in zip(eo + eg, co + cg):
        if e is None:
            assert c is None or not c.any()
            continue
        assert torch.isfinite(c).all()
        # atol scales with the tensor: sums of large products cancel to small elements
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("name", FUNCTION_SPELLINGS)
def test_function_spelling_matches_eager(name):
    fn = getattr(sm, name)
    report = bcpt_compile.explain(fn, *_args(name), options=AOT)
    assert report.counts["sbl"] == 1, report
    assert_compiled_matches_eager(fn, _args(name))


@pytest.mark.parametrize("cls", MODULE_SPELLINGS, ids=lambda c: c.__name__)
def test_module_spelling_matches_eager(cls):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(B, T, K)
    assert bcpt_compile.explain(model, x, options=AOT).counts["sbl"] == 1
    assert_compiled_matches_eager(model, (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_against_float64(dtype):
    """16-bit results are judged against float64 (norm-wise), as eager's own 16-bit result is."""
    torch.manual_seed(0)
    model = sm.TinyOnnSBL()
    x = torch.randn(B, T, K)
    ref_out, ref_grads = _grads_of(copy.deepcopy(model).double(), (x.double(),))
    eager_out, eager_grads = _grads_of(copy.deepcopy(model).to(dtype), (x.to(dtype),))
    out, grads = _grads_of(model.to(dtype), (x.to(dtype),), AOT)
    for r, e, c in zip(ref_out + ref_grads, eager_out + eager_grads, out + grads):
        err = ((c.double() - r).norm() / r.norm()).item()
        eager_err = ((e.double() - r).norm() / r.norm()).item()
        assert err <= max(1e-2, 2 * eager_err), (err, eager_err)


@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("shift", [-100.0, 100.0, 0.5], ids=["empty", "full", "partial"])
def test_empty_full_and_reordered_masks(shift, reorder):
    x, w, b, s = _args("matmul_bias_before")
    s = s + shift
    assert_compiled_matches_eager(sm.matmul_bias_before, (x, w, b, s), options={**AOT, "sbl_reorder": reorder})


def test_rows_with_no_active_output():
    x, w, b, s = _args("matmul_bias_before")
    s[:, ::2] = -1.0  # every other token routes nowhere
    assert_compiled_matches_eager(sm.matmul_bias_before, (x, w, b, s))


@pytest.mark.parametrize(
    "name, args, reason",
    [
        ("gelu_gate", lambda: (torch.randn(8, 24), torch.randn(40, 24), torch.randn(8, 40)),
         "gate is not provably zero off the mask (call_function gelu)"),
        ("broadcast_gate", lambda: (torch.randn(8, 24), torch.randn(40, 24), torch.randn(8, 1)),
         "gate shape (8, 1) is not the linear output's (8, 40) (a broadcast gate is not block-sparse)"),
        ("product_reused", lambda: (torch.randn(8, 24), torch.randn(40, 24), torch.randn(8, 40)),
         "the dense product linear(x, W) has other users, so it is computed anyway"),
        ("relu_plus_eps_gate", lambda: (torch.randn(8, 24), torch.randn(40, 24), torch.randn(8, 40)),
         "gate is not provably zero off the mask (call_function add)"),
        ("relu_then_exp_gate", lambda: (torch.randn(8, 24), torch.randn(40, 24), torch.randn(8, 40)),
         "gate is not provably zero off the mask (call_function exp)"),
        ("threshold_mul", lambda: (torch.randn(8, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64),
                                   torch.randn(8, 40, dtype=torch.float64)),
         "input dtype torch.float64 is not supported (float32, bfloat16, float16)"),
    ],
)
def test_near_misses_are_reported_and_left_alone(name, args, reason):
    fn = getattr(sm, name)
    report = bcpt_compile.explain(fn, *args())
    assert report.counts["sbl"] == 0
    assert [m.reason for m in report.misses] == [reason]
    out = torch.compile(fn, backend="bcpt", options=AOT)(*args())
    assert out is not None


class SnapshotTest(TestCase):
    def snap(self, name):
        return rewritten_graph(getattr(sm, name), *_args(name))

    def test_matmul_bias_before(self):
        self.assertExpectedInline(self.snap("matmul_bias_before"), """\
def forward(self, L_w_, L_x_, L_b_, L_s_):
    l_w_ = L_w_
    l_x_ = L_x_
    l_b_ = L_b_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, l_b_, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_gate_first(self):
        self.assertExpectedInline(self.snap("gate_first"), """\
def forward(self, L_s_, L_x_, L_w_, L_b_):
    l_s_ = L_s_
    l_x_ = L_x_
    l_w_ = L_w_
    l_b_ = L_b_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, l_b_, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_einsum_clamp(self):
        self.assertExpectedInline(self.snap("einsum_clamp"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_weight_in_out(self):
        self.assertExpectedInline(self.snap("weight_in_out"), """\
def forward(self, L_x_, L_w_in_out_, L_s_):
    l_x_ = L_x_
    l_w_in_out_ = L_w_in_out_
    l_s_ = L_s_
    t = torch.t(l_w_in_out_)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, t, None, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_threshold_mul(self):
        self.assertExpectedInline(self.snap("threshold_mul"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.1, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_where_tensor_threshold(self):
        self.assertExpectedInline(self.snap("where_tensor_threshold"), """\
def forward(self, L_x_, L_w_, L_s_, L_t_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    l_t_ = L_t_
    gt = l_s_ > l_t_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, gt, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_masked_fill_gate(self):
        self.assertExpectedInline(self.snap("masked_fill_gate"), """\
def forward(self, L_x_, L_w_, L_s_, L_m_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    l_m_ = L_m_
    invert = ~l_m_
    logical_not = torch.logical_not(invert)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_functional_threshold(self):
        self.assertExpectedInline(self.snap("functional_threshold"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.2, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_viewed_linear(self):
        self.assertExpectedInline(self.snap("viewed_linear"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    reshape = l_x_.reshape(18, -1)
    reshape_1 = reshape.reshape(-1, 24)
    size = l_s_.size()
    reshape_2 = l_s_.reshape(-1, 40)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(reshape_1, l_w_, None, reshape_2, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    view_1 = getitem.view(size)
    return (view_1,)
""")

    def test_bias_after_mask(self):
        self.assertExpectedInline(self.snap("bias_after_mask"), """\
def forward(self, L_x_, L_w_, L_s_, L_b_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    l_b_ = L_b_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    add = getitem + l_b_
    return (add,)
""")

    def test_inplace_relu_gate(self):
        self.assertExpectedInline(self.snap("inplace_relu_gate"), """\
def forward(self, L_s_, L_x_, L_w_):
    l_s_ = L_s_
    l_x_ = L_x_
    l_w_ = L_w_
    mul = l_s_ * 1.0
    raw = torch.nn.functional.relu(mul, inplace = True)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, raw, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    sum_1 = raw.sum()
    return (getitem, sum_1)
""")

    def test_einsum_weight_first(self):
        self.assertExpectedInline(self.snap("einsum_weight_first"), """\
def forward(self, L_w_, L_x_, L_s_):
    l_w_ = L_w_
    l_x_ = L_x_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_inplace_product(self):
        self.assertExpectedInline(self.snap("inplace_product"), """\
def forward(self, L_x_, L_w_, L_b_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_b_ = L_b_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, l_b_, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_mul_method_inplace(self):
        self.assertExpectedInline(self.snap("mul_method_inplace"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_inplace_bias_before(self):
        self.assertExpectedInline(self.snap("inplace_bias_before"), """\
def forward(self, L_w_, L_x_, L_b_, L_s_):
    l_w_ = L_w_
    l_x_ = L_x_
    l_b_ = L_b_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, l_b_, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_detached_gate(self):
        self.assertExpectedInline(self.snap("detached_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    relu = torch.relu(l_s_)
    detach = relu.detach()
    le = l_s_ <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, detach, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_cast_gate(self):
        self.assertExpectedInline(self.snap("cast_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    relu = torch.nn.functional.relu(l_s_)
    to = relu.to(torch.float32)
    le = l_s_ <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, to, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_scaled_gate(self):
        self.assertExpectedInline(self.snap("scaled_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    relu = torch.relu(l_s_)
    truediv = relu / 0.5
    le = l_s_ <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, truediv, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_squared_gate(self):
        self.assertExpectedInline(self.snap("squared_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    relu = torch.nn.functional.relu(l_s_)
    square = relu.square()
    le = l_s_ <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, square, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_gain_gate(self):
        self.assertExpectedInline(self.snap("gain_gate"), """\
def forward(self, L_x_, L_w_, L_s_, L_gain_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    l_gain_ = L_gain_
    sub = l_s_ - 0.1
    relu = torch.relu(sub)
    mul = relu * l_gain_
    le = sub <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, mul, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_eval_dropout_gate(self):
        self.assertExpectedInline(self.snap("eval_dropout_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    relu = torch.relu(l_s_)
    dropout_1 = torch.nn.functional.dropout(relu, 0.1, training = False)
    le = l_s_ <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, dropout_1, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_where_zeros_like(self):
        self.assertExpectedInline(self.snap("where_zeros_like"), """\
def forward(self, L_s_, L_x_, L_w_):
    l_s_ = L_s_
    l_x_ = L_x_
    l_w_ = L_w_
    _set_grad_enabled = torch._C._set_grad_enabled(False)
    active = l_s_ > 0.2
    _set_grad_enabled_1 = torch._C._set_grad_enabled(True)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, active, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_relu6_gate(self):
        self.assertExpectedInline(self.snap("relu6_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    mul = l_s_ * 4
    relu6 = torch.nn.functional.relu6(mul)
    le = mul <= 0.0
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, relu6, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_maximum_gate(self):
        self.assertExpectedInline(self.snap("maximum_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_tiny_onn(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(sm.TinyOnnSBL(), torch.randn(B, T, K)), """\
def forward(self, L_self_parameters_mu_weight_, L_self_parameters_sigma_weight_, L_x_, L_self_parameters_gate_param_):
    l_self_parameters_mu_weight_ = L_self_parameters_mu_weight_
    l_self_parameters_sigma_weight_ = L_self_parameters_sigma_weight_
    l_x_ = L_x_
    l_self_parameters_gate_param_ = L_self_parameters_gate_param_
    softplus = torch._C._nn.softplus(l_self_parameters_sigma_weight_)
    keys = l_self_parameters_mu_weight_ * softplus
    t = keys.t()
    matmul = torch.matmul(l_x_, t)
    scores = matmul / 4.898979485566356
    sub = scores - l_self_parameters_gate_param_
    raw = torch.nn.functional.relu(sub)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_self_parameters_mu_weight_, None, sub, None, 0.0, 128, 0.7, False, True)
    getitem = sbl_masked_linear_default[0]
    return (getitem, raw)
""")

    def test_sparse_proto_linear(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(sm.SparseProtoLinear(), torch.randn(B, T, K)), """\
def forward(self, L_x_, L_self_parameters_weight_, L_self_parameters_bias_, L_self_parameters_proto_):
    l_x_ = L_x_
    l_self_parameters_weight_ = L_self_parameters_weight_
    l_self_parameters_bias_ = L_self_parameters_bias_
    l_self_parameters_proto_ = L_self_parameters_proto_
    silu = torch.nn.functional.silu(l_x_)
    getattr_1 = l_self_parameters_proto_.T
    logits = l_x_ @ getattr_1
    abs_1 = logits.abs()
    amax = abs_1.amax(-1, keepdim = True)
    add = amax + 1e-06
    truediv = logits / add
    sub = truediv - 0.3
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(silu, l_self_parameters_weight_, l_self_parameters_bias_, sub, None, 0.0, 128, 0.7, False, True)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_module_linear_gate(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(sm.ModuleLinearGate(), torch.randn(B, T, K)), """\
def forward(self, L_self_modules_value_parameters_weight_, L_self_modules_value_parameters_bias_, L_x_, L_self_modules_score_parameters_weight_, L_self_modules_score_parameters_bias_):
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_value_parameters_bias_ = L_self_modules_value_parameters_bias_
    l_x_ = L_x_
    l_self_modules_score_parameters_weight_ = L_self_modules_score_parameters_weight_
    l_self_modules_score_parameters_bias_ = L_self_modules_score_parameters_bias_
    linear_1 = torch._C._nn.linear(l_x_, l_self_modules_score_parameters_weight_, l_self_modules_score_parameters_bias_)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_self_modules_value_parameters_weight_, l_self_modules_value_parameters_bias_, linear_1, None, 0.0, 128, 0.7, False, True)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")


def test_only_the_weight_needs_a_gradient():
    """Frozen inputs: the backward op returns only dW (the others are empty, unaliased)."""
    x, w, b, s = _args("matmul_bias_before")
    w = w.clone().requires_grad_()
    out = torch.compile(sm.matmul_bias_before, backend="bcpt", options=AOT)(x, w, b, s)
    (dw,) = torch.autograd.grad(out, (w,), torch.ones_like(out))
    wr = w.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(sm.matmul_bias_before(x, wr, b, s), (wr,), torch.ones_like(out))
    torch.testing.assert_close(dw, ref, rtol=1e-4, atol=1e-4)


def test_dynamic_token_count_reuses_the_rewritten_graph():
    """After one recompile Dynamo makes the token dim symbolic; the op's fake kernel and the
    BCAT state size follow it, and a third size runs without compiling again."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return bcpt_compile.bcpt_backend(gm, example_inputs, options=AOT)

    compiled = torch.compile(sm.threshold_mul, backend=counting_backend)
    for tokens in (20, 33, 47):
        x, w, s = torch.randn(tokens, K), torch.randn(N, K), torch.randn(tokens, N)
        torch.testing.assert_close(compiled(x, w, s), sm.threshold_mul(x, w, s), rtol=1e-4, atol=1e-4)
    assert len(compiles) == 2
    assert "torch.ops.bcpt.sbl_masked_linear" in compiles[1].code


def autocast_sbl(x, w, k):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.nn.functional.linear(x, w) * torch.relu(x @ k.T - 0.2)


def test_autocast_region_keeps_eager_dtypes_and_values():
    """The op is not autocast-aware: the pass casts x and W to the dtype the linear ran in,
    so the result has eager's dtype (bf16 here) and bf16-level agreement."""
    g = torch.Generator().manual_seed(3)
    x, w, k = (torch.randn(s, generator=g, requires_grad=True) for s in ((18, 24), (40, 24), (40, 24)))
    report = bcpt_compile.explain(autocast_sbl, x, w, k)
    assert report.counts["sbl"] == 1
    eager = autocast_sbl(x, w, k)
    out = torch.compile(autocast_sbl, backend="bcpt", options=AOT)(x, w, k)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert ((out.double() - eager.double()).norm() / eager.double().norm()).item() < 1e-2
    (gw,) = torch.autograd.grad(out.float().sum(), (w,))
    (ew,) = torch.autograd.grad(eager.float().sum(), (w,))
    assert gw.dtype == torch.float32 and ((gw - ew).norm() / ew.norm()).item() < 2e-2


class _DroppedProductSBL(torch.nn.Module):
    """Tiny-ONN SBL with ``nn.Dropout`` on the product, as a training model writes it."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w = torch.nn.Parameter(torch.randn(N, K, generator=g) / K**0.5)
        self.k = torch.nn.Parameter(torch.randn(N, K, generator=g) / K**0.5)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(torch.nn.functional.linear(x, self.w)) * torch.relu(x @ self.k.T - 0.1)


def test_active_dropout_on_the_product_is_refused_with_a_reason():
    """In training the dropout's random mask sits between the product and the gate: not
    looked through (eval's identity dropout is), and explain says why instead of nothing."""
    model = _DroppedProductSBL()
    x = torch.randn(B, T, K, generator=torch.Generator().manual_seed(5))
    report = bcpt_compile.explain(model, x, options=AOT)
    assert report.counts["sbl"] == 0
    [miss] = report.misses
    assert "dropout on the product linear(x, W) is active (training)" in miss.reason and "self.drop" in miss.source
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bcpt", options=AOT)
    torch.manual_seed(9)
    out = compiled(x)
    torch.manual_seed(9)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)  # same random mask: aot_eager, same RNG order
    model.eval()
    torch._dynamo.reset()
    assert bcpt_compile.explain(model, x, options=AOT).counts["sbl"] == 1
    outs, grads = _grads_of(model, (x,), AOT)
    ref_outs, ref_grads = _grads_of(model, (x,))
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _gate_before_break(x, w, k):
    r = torch.relu(x @ k.T - 0.1)
    torch._dynamo.graph_break()
    return torch.nn.functional.linear(x, w) * r


def test_gate_from_before_a_graph_break_is_refused_with_a_reason():
    """A graph break between the gate and the product leaves R a graph input of the second
    graph: its zeros are not provable there, and the reason points at the break."""
    x, w, k = _args("threshold_mul")[:2] + (torch.randn(N, K) / K**0.5,)
    report = bcpt_compile.explain(_gate_before_break, x, w, k)
    assert report.counts["sbl"] == 0 and report.graphs == 2
    [miss] = report.misses
    assert "graph input" in miss.reason and "graph break" in miss.reason
    torch._dynamo.reset()
    out = torch.compile(_gate_before_break, backend="bcpt", options=AOT)(x, w, k)
    torch.testing.assert_close(out, _gate_before_break(x, w, k), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ client spellings, second red-team round
# (Tiny-ONN bcat_poc / RoPE_SBL write ``masked.view(...)`` then ``+= bias`` in place; RWKV-style
# code keeps biases as (1, 1, N) parameters; mixed-precision code casts the product with ``.float()``)
F = torch.nn.functional


def viewed_product_written_in_place(x, w, s):
    b, t, _ = x.shape
    flat = x.view(-1, x.shape[-1])
    out = (F.linear(flat, w) * torch.relu(s.view(b * t, -1))).view(b, t, -1)
    out += torch.zeros(w.shape[0], dtype=x.dtype)  # Tiny-ONN's zero sbl_bias, added in place
    return out


def feature_bias_parameter(x, w, b, s):
    return (x @ w.t() + b.view(1, 1, -1)) * F.relu(s)


def same_dtype_cast_product(x, w, s):
    return (F.linear(x, w).float() * torch.relu(s).float()).to(x.dtype)


def fused_gate_up(x, w, s):
    gate, up = F.linear(x, torch.cat([w, w.flip(0)])).chunk(2, dim=-1)
    return up * F.relu(gate)


@pytest.mark.parametrize("name", ["viewed_product_written_in_place", "feature_bias_parameter", "same_dtype_cast_product"])
def test_second_round_client_spellings_match_eager(name):
    """Each rewrites to one site, explain runs the rewritten graph eagerly (an in-place write on
    the op's result gets a clone, since autograd forbids writing a custom op's view output), and
    outputs and gradients match eager."""
    fn = globals()[name]
    x, w, b, s = _args("matmul_bias_before")
    args = (x, w, b, s) if name == "feature_bias_parameter" else (x, w, s)
    report = bcpt_compile.explain(fn, *args, options=AOT)
    assert report.counts["sbl"] == 1, report
    assert_compiled_matches_eager(fn, args)


class SecondRoundSnapshotTest(TestCase):
    def test_viewed_product_written_in_place(self):
        x, w, _, s = _args("matmul_bias_before")
        self.assertExpectedInline(rewritten_graph(viewed_product_written_in_place, x, w, s), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    flat = l_x_.view(-1, 24)
    view_1 = l_s_.view(18, -1)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(flat, l_w_, None, view_1, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    clone = getitem.clone()
    out = clone.view(2, 9, -1)
    zeros = torch.zeros(40, dtype = torch.float32)
    out += zeros;  out_1 = out
    return (out_1,)
""")

    def test_feature_bias_parameter(self):
        x, w, b, s = _args("matmul_bias_before")
        self.assertExpectedInline(rewritten_graph(feature_bias_parameter, x, w, b, s), """\
def forward(self, L_w_, L_x_, L_b_, L_s_):
    l_w_ = L_w_
    l_x_ = L_x_
    l_b_ = L_b_
    l_s_ = L_s_
    view = l_b_.view(1, 1, -1)
    reshape = view.reshape(-1)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, reshape, l_s_, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")


def test_fused_gate_up_slice_is_refused_with_a_reason():
    """``gate, up = gate_up_proj(x).chunk(2, -1)``: the product's weight is not split, so the
    pass leaves it, and explain says why rather than nothing."""
    x, w, _, s = _args("matmul_bias_before")
    report = bcpt_compile.explain(fused_gate_up, x, w, s)
    assert report.counts["sbl"] == 0
    [miss] = report.misses
    assert miss.reason.startswith("the product is a slice of a fused linear"), miss.reason


# ------------------------------------------------------------------ third red-team round


def test_product_cast_up_matches_eager_to_bf16_precision():
    """``linear(x, W).float() * relu(s)`` with bf16 x, W and an fp32 gate: the op computes the
    product unrounded, so it is closer to float64 than eager and agrees with eager to bf16."""
    def upcast_product(x, w, s):
        return F.linear(x, w).float() * torch.relu(s)

    x, w, _, s = _args("matmul_bias_before")
    args = (x.bfloat16(), w.bfloat16(), s)
    report = bcpt_compile.explain(upcast_product, *args, options=AOT)
    assert report.counts["sbl"] == 1, report
    (ref,), _ = _grads_of(upcast_product, [a.double() for a in args])
    (eager,), eager_grads = _grads_of(upcast_product, args)
    (out,), grads = _grads_of(upcast_product, args, AOT)
    assert out.dtype == eager.dtype == torch.float32
    assert (out.double() - ref).norm() <= (eager.double() - ref).norm()
    for e, c in zip([eager] + eager_grads, [out] + grads):
        assert ((c.double() - e.double()).norm() / e.double().norm()).item() < 2e-2


@pytest.mark.parametrize(
    "name, args, reason",
    [
        ("downcast_product", lambda x, w, s: (x, w, s),
         "the product linear(x, W) (torch.float32) is cast to torch.bfloat16 before the mask, "
         "but the op computes in torch.float32"),
        ("mask_broadcasts_gate_up", lambda x, w, s: (x[0], w, s[0], torch.rand(B, T, N) < 0.5),
         "the gate broadcasts the product up from (9, 40) to (2, 9, 40) (not one gate per element)"),
        ("masked_gate_viewed", lambda x, w, s: (x, w, s, torch.rand(B, T, N) < 0.5),
         "the gate is viewed after its mask is applied (apply the view to its input instead)"),
    ],
)
def test_third_round_near_misses_are_reported_and_left_alone(name, args, reason):
    """Each is refused with its reason; the broadcast mask used to crash the op at run time."""
    fn = getattr(sm, name)
    x, w, _, s = _args("matmul_bias_before")
    torch.manual_seed(0)
    inputs = args(x, w, s)
    report = bcpt_compile.explain(fn, *inputs)
    assert report.counts["sbl"] == 0
    assert [m.reason for m in report.misses] == [reason]
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend="bcpt", options=AOT)(*inputs), fn(*inputs))


class _GainScaledLinear(torch.nn.Module):
    """A per-feature gain parameter times a linear (LayerScale-like): dense, not a gate."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(N, K) / K**0.5)
        self.gain = torch.nn.Parameter(torch.rand(B, T, N))

    def forward(self, x):
        return sm.parameter_scaled_product(x, self.w, self.gain)


def test_parameter_times_product_is_not_blamed_on_a_graph_break():
    report = bcpt_compile.explain(_GainScaledLinear(), torch.randn(B, T, K))
    assert [m.reason for m in report.misses] == [
        "gate is not provably zero off the mask (a parameter, L_self_parameters_gain_, scales the product)"]


class ThirdRoundSnapshotTest(TestCase):
    def snap(self, name):
        return rewritten_graph(getattr(sm, name), *_args(name))

    def test_masked_fill_inplace_gate(self):
        self.assertExpectedInline(self.snap("masked_fill_inplace_gate"), """\
def forward(self, L_x_, L_w_, L_s_, L_m_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    l_m_ = L_m_
    mul = l_s_ * 1.0
    invert = ~l_m_
    masked_fill_ = mul.masked_fill_(invert, 0)
    logical_not = torch.logical_not(invert)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, masked_fill_, logical_not, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_softshrink_gate(self):
        self.assertExpectedInline(self.snap("softshrink_gate"), """\
def forward(self, L_x_, L_w_, L_s_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_s_ = L_s_
    softshrink = torch._C._nn.softshrink(l_s_, 0.3)
    abs_1 = torch.abs(l_s_)
    le = abs_1 <= 0.3
    logical_not = torch.logical_not(le)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(l_x_, l_w_, None, softshrink, logical_not, 0.3, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    return (getitem,)
""")

    def test_head_split_view(self):
        self.assertExpectedInline(self.snap("head_split_view"), """\
def forward(self, L_s_, L_x_, L_w_):
    l_s_ = L_s_
    l_x_ = L_x_
    l_w_ = L_w_
    view_1 = l_s_.view(2, 9, 4, 10)
    reshape = l_x_.reshape(-1, 24)
    size = view_1.size()
    reshape_1 = view_1.reshape(-1, 40)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(reshape, l_w_, None, reshape_1, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    view_2 = getitem.view(size)
    return (view_2,)
""")

    def test_gate_viewed_after_relu(self):
        self.assertExpectedInline(self.snap("gate_viewed_after_relu"), """\
def forward(self, L_s_, L_x_, L_w_):
    l_s_ = L_s_
    l_x_ = L_x_
    l_w_ = L_w_
    relu = torch.relu(l_s_)
    view_1 = relu.view(2, 9, 4, 10)
    reshape = l_x_.reshape(-1, 24)
    size = view_1.size()
    reshape_1 = view_1.reshape(-1, 40)
    sbl_masked_linear_default = torch.ops.bcpt.sbl_masked_linear.default(reshape, l_w_, None, reshape_1, None, 0.0, 128, 0.7, False, False)
    getitem = sbl_masked_linear_default[0]
    view_2 = getitem.view(size)
    flatten = view_2.flatten(2)
    return (flatten,)
""")
