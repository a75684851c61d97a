"""The deepembed pass: spellings (snapshots), compiled == eager, explain counts, bad idx."""

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bcpt_compile
from bcpt_compile.options import BcptOptions
from bcpt_compile.testing import rewritten_graph, rewritten_graphs

D, HID, VOCAB, R = 8, 16, 10, 4


def _inputs(seed=0, shape=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g), torch.randint(0, VOCAB, shape, generator=g)


class OutScale(nn.Module):
    """RWKV-8-style output scale with selectable spellings."""

    def __init__(self, emb="module", sq="pow", lin="module", bias=False):
        super().__init__()
        self.emb_kind, self.sq, self.lin = emb, sq, lin
        self.key = nn.Linear(D, HID, bias=False)
        self.value = nn.Linear(HID, D, bias=bias)
        self.deepemb = nn.Embedding(VOCAB, D)
        with torch.no_grad():
            self.deepemb.weight.uniform_(0.5, 1.5)

    def forward(self, x, idx):
        r = torch.relu(self.key(x))
        k = {"pow": lambda: r ** 2, "mul": lambda: r * r, "square": lambda: torch.square(r)}[self.sq]()
        if self.lin == "module":
            v = self.value(k)
        elif self.lin == "functional":
            v = F.linear(k, self.value.weight, self.value.bias)
        else:
            v = k @ self.value.weight.T
        if self.emb_kind == "module":
            e = self.deepemb(idx)
        elif self.emb_kind == "functional":
            e = F.embedding(idx, self.deepemb.weight)
        else:
            e = self.deepemb.weight[idx]
        return v * e


class HiddenScale(nn.Module):
    """RWKV-7 DeepEmbed hidden scale: k * (((x @ s1) @ s_emb[idx].view(r, r)) @ s2 + s0)."""

    def __init__(self, emb="index"):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.emb_kind = emb
        self.K = nn.Parameter(torch.randn(D, HID, generator=g) * 0.3)
        self.V = nn.Parameter(torch.randn(HID, D, generator=g) * 0.3)
        self.s1 = nn.Parameter(torch.randn(D, R, generator=g) * 0.3)
        self.s2 = nn.Parameter(torch.randn(R, HID, generator=g) * 0.3)
        self.s0 = nn.Parameter(torch.ones(HID))
        self.s_emb = nn.Parameter(torch.randn(VOCAB, R * R, generator=g))

    def forward(self, x, idx):
        k = torch.relu(x @ self.K) ** 2
        rows = self.s_emb[idx] if self.emb_kind == "index" else F.embedding(idx, self.s_emb)
        if idx.dim() == 0:  # one token, as the RNN-mode release writes it
            mix = (x @ self.s1) @ rows.view(R, R)
        else:
            mix = ((x @ self.s1).unsqueeze(-2) @ rows.view(*idx.shape, R, R)).squeeze(-2)
        k = k * (mix @ self.s2 + self.s0)
        return k @ self.V


def _compare(model, x, idx, **options):
    """Outputs and every parameter gradient of the compiled model against eager."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", **options})
    xs = x.clone().requires_grad_()
    y = compiled(xs, idx)
    gy = torch.randn_like(y)
    y.backward(gy)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    xe = x.clone().requires_grad_()
    ye = model(xe, idx)
    ye.backward(gy)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)
    torch.testing.assert_close(xs.grad, xe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    model.zero_grad()
    return y


class TestSnapshots(expecttest.TestCase):
    def test_nn_embedding_nn_linear_pow(self):
        self.assertExpectedInline(rewritten_graph(OutScale(), *_inputs()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    r = torch.relu(linear)
    k = r ** 2
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_functional_embedding_functional_linear_mul(self):
        self.assertExpectedInline(rewritten_graph(OutScale("functional", "mul", "functional", bias=True), *_inputs()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_self_modules_value_parameters_bias_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_value_parameters_bias_ = L_self_modules_value_parameters_bias_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    r = torch.relu(linear)
    k = r * r
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, l_self_modules_value_parameters_bias_, l_self_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_weight_index_matmul_square(self):
        self.assertExpectedInline(rewritten_graph(OutScale("index", "square", "matmul"), *_inputs()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, True)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    r = torch.relu(linear)
    k = torch.square(r)
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, l_idx_, True, row_plan_default, False)
    getitem_1 = deepembed_linear_default[0]
    return (getitem_1,)
""")

    def test_hidden_scale_batched(self):
        self.assertExpectedInline(rewritten_graph(HiddenScale(), *_inputs()), """\
def forward(self, L_self_parameters_K_, L_x_, L_self_parameters_s_emb_, L_idx_, L_self_parameters_s1_, L_self_parameters_s2_, L_self_parameters_s0_, L_self_parameters_V_):
    l_self_parameters_k_ = L_self_parameters_K_
    l_x_ = L_x_
    l_self_parameters_s_emb_ = L_self_parameters_s_emb_
    l_idx_ = L_idx_
    l_self_parameters_s1_ = L_self_parameters_s1_
    l_self_parameters_s2_ = L_self_parameters_s2_
    l_self_parameters_s0_ = L_self_parameters_s0_
    l_self_parameters_v_ = L_self_parameters_V_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, True)
    matmul_1 = l_x_ @ l_self_parameters_s1_
    unsqueeze = matmul_1.unsqueeze(-2)
    reshape = torch.reshape(unsqueeze, (-1, 4))
    deepembed_rowmix_default = torch.ops.bcpt.deepembed_rowmix.default(reshape, l_self_parameters_s_emb_, l_idx_, 4, True, row_plan_default, False)
    reshape_as = deepembed_rowmix_default.reshape_as(unsqueeze)
    mix = reshape_as.squeeze(-2)
    t = torch.t(l_self_parameters_k_)
    reshape_1 = torch.reshape(mix, (-1, 4))
    deepembed_hidden_default = torch.ops.bcpt.deepembed_hidden.default(l_x_, t, reshape_1, l_self_parameters_s2_, l_self_parameters_s0_)
    getitem_1 = deepembed_hidden_default[0]
    matmul_4 = getitem_1 @ l_self_parameters_v_
    return (matmul_4,)
""")

    def test_hidden_scale_one_token_functional_embedding(self):
        x = torch.randn(D)
        self.assertExpectedInline(rewritten_graph(HiddenScale("functional"), x, torch.tensor(3)), """\
def forward(self, L_self_parameters_K_, L_x_, L_self_parameters_s_emb_, L_idx_, L_self_parameters_s1_, L_self_parameters_s2_, L_self_parameters_s0_, L_self_parameters_V_):
    l_self_parameters_k_ = L_self_parameters_K_
    l_x_ = L_x_
    l_self_parameters_s_emb_ = L_self_parameters_s_emb_
    l_idx_ = L_idx_
    l_self_parameters_s1_ = L_self_parameters_s1_
    l_self_parameters_s2_ = L_self_parameters_s2_
    l_self_parameters_s0_ = L_self_parameters_s0_
    l_self_parameters_v_ = L_self_parameters_V_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    matmul_1 = l_x_ @ l_self_parameters_s1_
    reshape = torch.reshape(matmul_1, (-1, 4))
    deepembed_rowmix_default = torch.ops.bcpt.deepembed_rowmix.default(reshape, l_self_parameters_s_emb_, l_idx_, 4, False, row_plan_default, False)
    reshape_as = deepembed_rowmix_default.reshape_as(matmul_1)
    t = torch.t(l_self_parameters_k_)
    reshape_1 = torch.reshape(reshape_as, (-1, 4))
    deepembed_hidden_default = torch.ops.bcpt.deepembed_hidden.default(l_x_, t, reshape_1, l_self_parameters_s2_, l_self_parameters_s0_)
    getitem = deepembed_hidden_default[0]
    matmul_4 = getitem @ l_self_parameters_v_
    return (matmul_4,)
""")

    def test_near_miss_is_left_alone(self):
        # no squared relu: a linear * embedding that is not a DeepEmbed FFN
        def f(x, w, table, idx):
            return F.linear(x, w) * F.embedding(idx, table)

        x, idx = _inputs()
        self.assertExpectedInline(rewritten_graph(f, x, torch.randn(D, D), torch.randn(VOCAB, D), idx), """\
def forward(self, L_x_, L_w_, L_idx_, L_table_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_idx_ = L_idx_
    l_table_ = L_table_
    linear = torch._C._nn.linear(l_x_, l_w_)
    embedding = torch.nn.functional.embedding(l_idx_, l_table_)
    mul = linear * embedding
    return (mul,)
""")


@pytest.mark.parametrize("emb,sq,lin", [
    ("module", "pow", "module"),
    ("functional", "mul", "functional"),
    ("index", "square", "matmul"),
])
@pytest.mark.parametrize("tables", ["gpu", "cpu"])
def test_output_scale_matches_eager(emb, sq, lin, tables):
    torch.manual_seed(0)
    model = OutScale(emb, sq, lin, bias=(lin == "functional"))
    report = bcpt_compile.explain(model, *_inputs(), options={"deepembed_tables": tables})
    assert report.counts["deepembed"] == 1
    assert report.counts["prefetch"] == (1 if tables == "cpu" else 0)
    _compare(model, *_inputs(1), deepembed_tables=tables)


@pytest.mark.parametrize("emb", ["index", "functional"])
@pytest.mark.parametrize("tables", ["gpu", "cpu"])
def test_hidden_scale_matches_eager(emb, tables):
    model = HiddenScale(emb)
    report = bcpt_compile.explain(model, *_inputs(), options={"deepembed_tables": tables})
    assert report.counts["deepembed"] == 1
    assert [s.op for s in report.sites if s.family == "deepembed"] == ["bcpt.deepembed_rowmix+hidden"]
    assert report.counts["prefetch"] == (1 if tables == "cpu" else 0)
    _compare(model, *_inputs(2), deepembed_tables=tables)
    _compare(model, torch.randn(D), torch.tensor(VOCAB - 1), deepembed_tables=tables)


def test_repeated_tokens_bf16_close_to_float64():
    torch.manual_seed(0)
    model = OutScale().to(torch.bfloat16)
    x, _ = _inputs(3, shape=(4, 8))
    x = x.bfloat16()
    idx = torch.tensor([1, 1, 1, 2] * 8).view(4, 8)  # heavy repeats: the table gradient sums
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager"})
    y = compiled(x, idx)
    y.float().sum().backward()
    m64 = OutScale().double()
    m64.load_state_dict(model.state_dict())
    y64 = m64(x.double(), idx)
    y64.sum().backward()
    assert ((y.double() - y64).abs() <= 2 ** -6 * y64.abs() + 1e-2).all()
    dt, dt64 = model.deepemb.weight.grad.double(), m64.deepemb.weight.grad
    assert (dt[[0, 3, 4, 5, 6, 7, 8, 9]] == 0).all()
    assert ((dt - dt64).abs() <= 2 ** -6 * dt64.abs().max()).all()


@pytest.mark.parametrize("tables", ["gpu", "cpu"])
def test_two_layers_explain_counts(tables):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = OutScale(), OutScale("index", "mul", "matmul")

        def forward(self, x, idx):
            return self.b(self.a(x, idx), idx)

    report = bcpt_compile.explain(Two(), *_inputs(), options={"deepembed_tables": tables})
    assert report.counts["deepembed"] == 2
    assert report.counts["prefetch"] == (2 if tables == "cpu" else 0)


def test_near_misses_have_reasons():
    x, idx = _inputs()

    def no_sqrelu(x, w, table, idx):
        return F.linear(x, w) * F.embedding(idx, table)

    def padding(x, w, table, idx):
        return F.linear(torch.relu(x) ** 2, w) * F.embedding(idx, table, padding_idx=0)

    def broadcast(x, w, table, idx):
        return F.linear(torch.relu(x) ** 2, w) * F.embedding(idx[0], table)

    def sparse(x, w, table, idx):
        return F.linear(torch.relu(x) ** 2, w) * F.embedding(idx, table, sparse=True)

    w, table = torch.randn(D, D), torch.randn(VOCAB, D)
    reasons = {}
    for fn in (no_sqrelu, padding, broadcast, sparse):
        torch._dynamo.reset()
        report = bcpt_compile.explain(fn, x, w, table, idx)
        assert report.counts["deepembed"] == 0
        reasons[fn.__name__] = " ".join(m.reason for m in report.misses if m.family == "deepembed")
    assert "squared relu" in reasons["no_sqrelu"]
    assert "padding_idx" in reasons["padding"]
    assert "broadcasts" in reasons["broadcast"]
    assert "sparse=True on a table used in place" in reasons["sparse"]


@pytest.mark.parametrize("emb", ["functional", "index"])
@pytest.mark.parametrize("tables", ["gpu", "cpu"])
def test_out_of_range_idx_raises_like_eager(emb, tables):
    model = OutScale(emb)
    x, idx = _inputs()
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": tables})
    compiled(x, idx)
    bad = idx.clone()
    bad[1, 2] = VOCAB + 3
    with pytest.raises(IndexError) as eager:
        model(x, bad)
    with pytest.raises(IndexError) as ours:
        compiled(x, bad)
    assert str(ours.value) == str(eager.value)
    if emb == "index":  # weight[idx] wraps negatives in eager, and so must we
        neg = idx.clone()
        neg[0, 0] = -1
        torch.testing.assert_close(compiled(x, neg), model(x, neg), rtol=1e-5, atol=1e-5)
    else:
        neg = idx.clone()
        neg[0, 0] = -1
        with pytest.raises(IndexError, match="index out of range in self"):
            compiled(x, neg)


@pytest.mark.parametrize("emb,message", [("functional", "Long, Int"), ("index", "tensors used as indices must be")])
@pytest.mark.parametrize("tables", ["gpu", "cpu"])
def test_float_idx_raises_like_eager(emb, message, tables):
    model = OutScale(emb)
    x, idx = _inputs()
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": tables})
    compiled(x, idx)
    with pytest.raises((RuntimeError, IndexError), match=message):
        model(x, idx.float())
    with pytest.raises(Exception, match=message):
        compiled(x, idx.float())


def test_int32_idx_matches_eager():
    x, idx = _inputs()
    _compare(OutScale("functional"), x, idx.int())


def test_option_validation():
    assert BcptOptions.from_user({"deepembed_tables": "cpu"}).deepembed_tables == "cpu"
    with pytest.raises(ValueError, match=r"deepembed_tables must be one of \['gpu', 'cpu'\]"):
        BcptOptions.from_user({"deepembed_tables": "disk"})


def test_family_switch_leaves_graph_alone():
    graphs, report = rewritten_graphs(OutScale(), *_inputs(), options={"families": ["sbl"]})
    assert "bcpt.deepembed" not in graphs[0] and report.counts["deepembed"] == 0


@pytest.mark.parametrize("spelling", ["einsum_pow_method", "torch_pow_index_select", "clamp_kn_weight", "emb_first"])
def test_more_spellings_rewrite_and_match_eager(spelling):
    g = torch.Generator().manual_seed(11)
    wk, wv = torch.randn(HID, D, generator=g) * 0.3, torch.randn(D, HID, generator=g) * 0.3
    table = torch.rand(VOCAB, D, generator=g) + 0.5
    params = [t.requires_grad_() for t in (wk, wv, table)]

    def f(x, idx, wk, wv, table):
        if spelling == "einsum_pow_method":
            h = F.relu(x @ wk.t()).pow(2)
            return torch.einsum("btk,nk->btn", h, wv) * table[idx]
        if spelling == "torch_pow_index_select":
            h = torch.pow(torch.relu(F.linear(x, wk)), 2)
            return F.linear(h, wv) * torch.index_select(table, 0, idx)
        if spelling == "clamp_kn_weight":
            h = torch.clamp(x @ wk.t(), min=0).square()
            return (h @ wv.t().contiguous()) * F.embedding(idx, table)
        return F.embedding(idx, table) * (torch.relu(x @ wk.t()) ** 2 @ wv.t())

    x, idx = _inputs()
    if spelling == "torch_pow_index_select":
        idx = idx.reshape(-1)
        x = x.reshape(-1, D)
    report = bcpt_compile.explain(f, x, idx, *params)
    assert report.counts["deepembed"] == 1, str(report)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="bcpt", options={"inner_compiler": "aot_eager"})
    y = compiled(x, idx, *params)
    grads = torch.autograd.grad(y.square().sum(), params)
    ye = f(x, idx, *params)
    grads_e = torch.autograd.grad(ye.square().sum(), params)
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hidden_scale_host_table_spelling():
    class HostHidden(HiddenScale):
        def forward(self, x, idx):
            k = torch.relu(x @ self.K) ** 2
            rows = self.s_emb[idx.cpu()].to(x.device)
            mix = ((x @ self.s1).unsqueeze(-2) @ rows.view(*idx.shape, R, R)).squeeze(-2)
            return (k * (mix @ self.s2 + self.s0)) @ self.V

    model = HostHidden()
    report = bcpt_compile.explain(model, *_inputs(), options={"deepembed_tables": "cpu"})
    assert report.counts["deepembed"] == 1 and report.counts["prefetch"] == 1
    _compare(model, *_inputs(4), deepembed_tables="cpu")


def test_ops_called_directly_validate_idx():
    h, w, table = torch.randn(3, D), torch.randn(D, D), torch.randn(VOCAB, D)
    with pytest.raises(RuntimeError, match="Long, Int"):
        torch.ops.bcpt.deepembed_linear(h, w, None, table, torch.zeros(3), False)
    with pytest.raises(IndexError, match="tensors used as indices"):
        torch.ops.bcpt.deepembed_rowmix(torch.randn(3, R), torch.randn(VOCAB, R * R), torch.zeros(3), R, True)
    with pytest.raises(IndexError, match=f"index {-VOCAB - 1} is out of bounds for dimension 0 with size {VOCAB}"):
        torch.ops.bcpt.deepembed_linear(h, w, None, table, torch.tensor([0, -VOCAB - 1, 1]), True)
    y, _ = torch.ops.bcpt.deepembed_linear(h, w, None, table, torch.tensor([0, -1, 1]), True)
    torch.testing.assert_close(y, (h @ w.t()) * table[torch.tensor([0, -1, 1])], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tables", ["gpu", "cpu"])
def test_cuda_inductor_matches_eager(dtype, tables):
    """The real GPU path: compiled Triton kernels, Inductor, copy stream for host tables."""
    from bcpt_compile import runtime

    torch.manual_seed(0)
    d, hid, vocab, shape = 256, 1024, 1000, (2, 384)
    eager = nn.ModuleList()
    for _ in range(3):
        layer = nn.ModuleDict({"key": nn.Linear(d, hid, bias=False), "value": nn.Linear(hid, d, bias=False),
                               "deepemb": nn.Embedding(vocab, d)})
        nn.init.uniform_(layer.deepemb.weight, 0.5, 1.5)
        eager.append(layer)

    class Stack3(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x, idx):
            for l in self.layers:
                x = x + l.value(torch.relu(l.key(x)) ** 2) * l.deepemb(idx)
            return x

    import copy

    ref = Stack3(eager).cuda().to(dtype)
    model = copy.deepcopy(ref)
    if tables == "cpu":
        runtime.offload_tables(model)
        assert not any(m.weight.is_cuda for m in model.modules() if isinstance(m, nn.Embedding))
    x = torch.randn(*shape, d, device="cuda", dtype=dtype)
    idx = torch.randint(0, vocab, shape, device="cuda")
    idx[0, :100] = 7  # a frequent token
    runtime.reset_stats()
    compiled = torch.compile(model, backend="bcpt", options={"deepembed_tables": tables})
    y = compiled(x, idx)
    y.float().square().mean().backward()
    ye = ref(x, idx)
    ye.float().square().mean().backward()
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(y.float(), ye.float(), **tol)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.float().to(q.device)
        scale = q.grad.float().abs().max().clamp(min=1e-6)
        assert ((g - q.grad.float()).abs().max() / scale).item() < (1e-4 if dtype == torch.float32 else 3e-2), n
    if tables == "cpu":
        s = runtime.stats()
        assert s.prefetches == 3 and s.waits == 3 and s.sync_gathers == 0
        assert s.bytes_copied == 3 * idx.unique().numel() * d * torch.finfo(dtype).bits // 8
        assert s.uva_gathers == 3  # zero-copy from the pinned tables


@pytest.mark.parametrize("model_cls", [OutScale, HiddenScale])
@pytest.mark.parametrize("tables", ["gpu", "cpu"])
def test_new_shapes_recompile_dynamic_and_stay_rewritten(model_cls, tables):
    import functools

    report = bcpt_compile.Report()
    model = model_cls()
    backend = functools.partial(bcpt_compile.bcpt_backend, report_sink=report,
                                options={"inner_compiler": "aot_eager", "deepembed_tables": tables})
    compiled = torch.compile(model, backend=backend)
    for shape in ((2, 3), (2, 5), (3, 7)):  # the second shape makes Dynamo go dynamic
        x, idx = _inputs(5, shape)
        torch.testing.assert_close(compiled(x, idx), model(x, idx), rtol=1e-5, atol=1e-5)
    assert report.graphs >= 2
    assert report.counts["deepembed"] == report.graphs
    assert report.counts["prefetch"] == (report.graphs if tables == "cpu" else 0)


def test_frozen_value_and_table_only_input_gradient():
    """Several gradients unneeded at once: the backward op must return unaliased empties
    (it returned one shared empty tensor, which torch.library rejects)."""

    class FFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.key = torch.nn.Linear(16, 32, bias=False)
            self.value = torch.nn.Linear(32, 16, bias=False)
            self.deepemb = torch.nn.Embedding(50, 16)

        def forward(self, x, idx):
            return self.value(torch.relu(self.key(x)) ** 2) * self.deepemb(idx)

    torch.manual_seed(0)
    model = FFN()
    model.value.requires_grad_(False)
    model.deepemb.requires_grad_(False)
    x = torch.randn(2, 8, 16, requires_grad=True)
    idx = torch.randint(0, 50, (2, 8))
    out = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager"})(x, idx)
    (got,) = torch.autograd.grad(out.sum(), (x,))
    (want,) = torch.autograd.grad(model(x, idx).sum(), (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ spellings found by red-teaming

class ClientFFN(nn.Module):
    """Output-scale spellings seen in client-style layers (eval dropout, in-place ops, casts)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.key = nn.Linear(D, HID, bias=False)
        self.value = nn.Linear(HID, D, bias=False)
        self.deepemb = nn.Embedding(VOCAB, D)
        self.drop = nn.Dropout(0.1)
        with torch.no_grad():
            self.deepemb.weight.uniform_(0.5, 1.5)

    def forward(self, x, idx):
        if self.kind == "inplace_relu":
            return self.value(F.relu(self.key(x), inplace=True) ** 2) * self.deepemb(idx)
        k = torch.relu(self.key(x)) ** 2
        if self.kind == "eval_dropout":
            return self.drop(self.value(k)) * self.deepemb(idx)
        if self.kind == "inplace_scale":
            y = self.value(k)
            y *= self.deepemb(idx)
            return y
        if self.kind == "rows_cast_long_idx":
            return self.value(k) * self.deepemb(idx.long()).to(x.dtype)
        if self.kind == "einsum_weight_first":
            return torch.einsum("dh,bth->btd", self.value.weight, k) * self.deepemb(idx)
        raise ValueError(self.kind)


class ClientHidden(HiddenScale):
    """Hidden-scale spellings: einsum mix, ``[:, :, 0]`` instead of squeeze, ``k *= scale``."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x, idx):
        k = torch.relu(x @ self.K) ** 2
        e = self.s_emb[idx].view(*idx.shape, R, R)
        if self.kind == "einsum_mix":
            mix = torch.einsum("btr,btrs->bts", x @ self.s1, e)
            return (k * (mix @ self.s2 + self.s0)) @ self.V
        mix = torch.matmul((x @ self.s1).unsqueeze(2), e)[:, :, 0]
        k *= self.s0 + mix @ self.s2  # "index_unit_dim_inplace"
        return k @ self.V


CLIENT_FFN = ["inplace_relu", "eval_dropout", "inplace_scale", "rows_cast_long_idx", "einsum_weight_first"]
CLIENT_HIDDEN = ["einsum_mix", "index_unit_dim_inplace"]


@pytest.mark.parametrize("kind", CLIENT_FFN)
def test_client_output_scale_spellings_match_eager(kind):
    torch.manual_seed(0)
    model = ClientFFN(kind).eval()
    x, idx = _inputs(6)
    idx = idx.int() if kind == "rows_cast_long_idx" else idx
    report = bcpt_compile.explain(model, x, idx)
    assert [s.op for s in report.sites if s.family == "deepembed"] == ["bcpt.deepembed_linear"], str(report)
    _compare(model, x, idx)


@pytest.mark.parametrize("kind", CLIENT_HIDDEN)
def test_client_hidden_scale_spellings_match_eager(kind):
    model = ClientHidden(kind)
    report = bcpt_compile.explain(model, *_inputs())
    assert [s.op for s in report.sites if s.family == "deepembed"] == ["bcpt.deepembed_rowmix+hidden"], str(report)
    _compare(model, *_inputs(8))


def test_bf16_activations_fp32_table_and_autocast():
    """Rows cast to the activations' dtype, and the whole FFN under autocast: the op's result
    is cast to eager's dtype and agrees to bf16 precision."""

    class Cast(nn.Module):
        def __init__(self, autocast):
            super().__init__()
            self.autocast = autocast
            self.key = nn.Linear(D, HID, bias=False)
            self.value = nn.Linear(HID, D, bias=False)
            self.deepemb = nn.Embedding(VOCAB, D)

        def forward(self, x, idx):
            if self.autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.value(torch.relu(self.key(x)) ** 2) * self.deepemb(idx)
            return self.value(torch.relu(self.key(x)) ** 2) * self.deepemb(idx).to(x.dtype)

    for autocast in (False, True):
        torch.manual_seed(0)
        model = Cast(autocast)
        if not autocast:
            model.key.bfloat16(), model.value.bfloat16()  # fp32 table, bf16 FFN
        x, idx = _inputs(9)
        x = x if autocast else x.bfloat16()
        assert bcpt_compile.explain(model, x, idx).counts["deepembed"] == 1
        torch._dynamo.reset()
        y = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager"})(x, idx)
        ye = model(x, idx)
        assert y.dtype == ye.dtype
        assert ((y.double() - ye.double()).norm() / ye.double().norm()).item() < 1e-2
        (gt,) = torch.autograd.grad(y.float().sum(), (model.deepemb.weight,))
        (et,) = torch.autograd.grad(ye.float().sum(), (model.deepemb.weight,))
        assert gt.dtype == et.dtype and ((gt - et).norm() / et.norm()).item() < 2e-2


class TestClientSnapshots(expecttest.TestCase):
    def test_inplace_relu(self):
        self.assertExpectedInline(rewritten_graph(ClientFFN("inplace_relu").eval(), *_inputs()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    relu = torch.nn.functional.relu(linear, inplace = True)
    pow_1 = relu ** 2
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(pow_1, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_eval_dropout(self):
        self.assertExpectedInline(rewritten_graph(ClientFFN("eval_dropout").eval(), *_inputs()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    k = relu ** 2
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_inplace_scale(self):
        self.assertExpectedInline(rewritten_graph(ClientFFN("inplace_scale").eval(), *_inputs()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    k = relu ** 2
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_rows_cast_long_idx(self):
        x, idx = _inputs()
        self.assertExpectedInline(rewritten_graph(ClientFFN("rows_cast_long_idx").eval(), x, idx.int()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_idx_, L_self_modules_deepemb_parameters_weight_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_idx_ = L_idx_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    k = relu ** 2
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_einsum_weight_first(self):
        self.assertExpectedInline(rewritten_graph(ClientFFN("einsum_weight_first").eval(), *_inputs()), """\
def forward(self, L_self_modules_key_parameters_weight_, L_x_, L_self_modules_value_parameters_weight_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    k = relu ** 2
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, l_idx_, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_einsum_mix(self):
        self.assertExpectedInline(rewritten_graph(ClientHidden("einsum_mix"), *_inputs()), """\
def forward(self, L_self_parameters_K_, L_x_, L_self_parameters_s_emb_, L_idx_, L_self_parameters_s1_, L_self_parameters_s2_, L_self_parameters_s0_, L_self_parameters_V_):
    l_self_parameters_k_ = L_self_parameters_K_
    l_x_ = L_x_
    l_self_parameters_s_emb_ = L_self_parameters_s_emb_
    l_idx_ = L_idx_
    l_self_parameters_s1_ = L_self_parameters_s1_
    l_self_parameters_s2_ = L_self_parameters_s2_
    l_self_parameters_s0_ = L_self_parameters_s0_
    l_self_parameters_v_ = L_self_parameters_V_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, True)
    matmul_1 = l_x_ @ l_self_parameters_s1_
    reshape = torch.reshape(matmul_1, (-1, 4))
    deepembed_rowmix_default = torch.ops.bcpt.deepembed_rowmix.default(reshape, l_self_parameters_s_emb_, l_idx_, 4, True, row_plan_default, False)
    reshape_as = deepembed_rowmix_default.reshape_as(matmul_1)
    t = torch.t(l_self_parameters_k_)
    reshape_1 = torch.reshape(reshape_as, (-1, 4))
    deepembed_hidden_default = torch.ops.bcpt.deepembed_hidden.default(l_x_, t, reshape_1, l_self_parameters_s2_, l_self_parameters_s0_)
    getitem_1 = deepembed_hidden_default[0]
    matmul_3 = getitem_1 @ l_self_parameters_v_
    return (matmul_3,)
""")

    def test_index_unit_dim_inplace(self):
        self.assertExpectedInline(rewritten_graph(ClientHidden("index_unit_dim_inplace"), *_inputs()), """\
def forward(self, L_self_parameters_K_, L_x_, L_self_parameters_s_emb_, L_idx_, L_self_parameters_s1_, L_self_parameters_s0_, L_self_parameters_s2_, L_self_parameters_V_):
    l_self_parameters_k_ = L_self_parameters_K_
    l_x_ = L_x_
    l_self_parameters_s_emb_ = L_self_parameters_s_emb_
    l_idx_ = L_idx_
    l_self_parameters_s1_ = L_self_parameters_s1_
    l_self_parameters_s0_ = L_self_parameters_s0_
    l_self_parameters_s2_ = L_self_parameters_s2_
    l_self_parameters_v_ = L_self_parameters_V_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, True)
    matmul_1 = l_x_ @ l_self_parameters_s1_
    unsqueeze = matmul_1.unsqueeze(2)
    reshape = torch.reshape(unsqueeze, (-1, 4))
    deepembed_rowmix_default = torch.ops.bcpt.deepembed_rowmix.default(reshape, l_self_parameters_s_emb_, l_idx_, 4, True, row_plan_default, False)
    reshape_as = deepembed_rowmix_default.reshape_as(unsqueeze)
    mix = reshape_as[(slice(None, None, None), slice(None, None, None), 0)]
    t = torch.t(l_self_parameters_k_)
    reshape_1 = torch.reshape(mix, (-1, 4))
    deepembed_hidden_default = torch.ops.bcpt.deepembed_hidden.default(l_x_, t, reshape_1, l_self_parameters_s2_, l_self_parameters_s0_)
    getitem_2 = deepembed_hidden_default[0]
    matmul_4 = getitem_2 @ l_self_parameters_v_
    return (matmul_4,)
""")


# ------------------------------------------------------------------ second red-team round (RWKV training-style modules)

class RwkvTrainHidden(HiddenScale):
    """RWKV-7 DeepEmbed as training code writes it: ``s0`` a (1, 1, hidden) parameter, ``nn.Embedding``
    rows, and ``(x @ s1).view(B, T, 1, r) @ rows.view(B, T, r, r)``."""

    def __init__(self):
        super().__init__()
        self.s0 = nn.Parameter(torch.ones(1, 1, HID))
        del self.s_emb  # the rows come from an nn.Embedding here
        self.table = nn.Embedding(VOCAB, R * R)

    def forward(self, x, idx):
        b, t, _ = x.size()
        k = torch.relu(x @ self.K) ** 2
        ss = (x @ self.s1).view(b, t, 1, R) @ self.table(idx).view(b, t, R, R)
        k = k * ((ss.view(b, t, R) @ self.s2) + self.s0)
        return k @ self.V


class ResidualInPlaceFFN(OutScale):
    """RWKV-8 output scale whose result gets the residual added in place (``out += x``)."""

    def forward(self, x, idx):
        out = self.value(torch.relu(self.key(x)) ** 2) * self.deepemb(idx)
        out += x
        return out


@pytest.mark.parametrize("model_cls, op", [(RwkvTrainHidden, "bcpt.deepembed_rowmix+hidden"),
                                           (ResidualInPlaceFFN, "bcpt.deepembed_linear")])
def test_rwkv_training_style_modules_match_eager(model_cls, op):
    """A (1, 1, hidden) ``s0`` still fuses the hidden scale (it is reshaped to the op's vector), and
    an in-place write on the output-scale result runs under explain (the result is cloned first)."""
    torch.manual_seed(0)
    model = model_cls()
    report = bcpt_compile.explain(model, *_inputs())
    assert [s.op for s in report.sites if s.family == "deepembed"] == [op], str(report)
    _compare(model, *_inputs(3))


class TestSecondRoundSnapshots(expecttest.TestCase):
    def test_rwkv_train_hidden_3d_s0(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(RwkvTrainHidden(), *_inputs()), """\
def forward(self, L_x_, L_self_parameters_K_, L_self_parameters_s1_, L_self_modules_table_parameters_weight_, L_idx_, L_self_parameters_s2_, L_self_parameters_s0_, L_self_parameters_V_):
    l_x_ = L_x_
    l_self_parameters_k_ = L_self_parameters_K_
    l_self_parameters_s1_ = L_self_parameters_s1_
    l_self_modules_table_parameters_weight_ = L_self_modules_table_parameters_weight_
    l_idx_ = L_idx_
    l_self_parameters_s2_ = L_self_parameters_s2_
    l_self_parameters_s0_ = L_self_parameters_s0_
    l_self_parameters_v_ = L_self_parameters_V_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 10, False)
    matmul_1 = l_x_ @ l_self_parameters_s1_
    view = matmul_1.view(2, 3, 1, 4)
    reshape = torch.reshape(view, (-1, 4))
    deepembed_rowmix_default = torch.ops.bcpt.deepembed_rowmix.default(reshape, l_self_modules_table_parameters_weight_, l_idx_, 4, False, row_plan_default, False)
    reshape_as = deepembed_rowmix_default.reshape_as(view)
    view_2 = reshape_as.view(2, 3, 4)
    t = torch.t(l_self_parameters_k_)
    reshape_1 = torch.reshape(view_2, (-1, 4))
    reshape_2 = l_self_parameters_s0_.reshape(-1)
    deepembed_hidden_default = torch.ops.bcpt.deepembed_hidden.default(l_x_, t, reshape_1, l_self_parameters_s2_, reshape_2)
    getitem = deepembed_hidden_default[0]
    matmul_4 = getitem @ l_self_parameters_v_
    return (matmul_4,)
""")


# ------------------------------------------------------------------ third red-team round

class ThirdRoundFFN(ClientFFN):
    """Output-scale spellings of the third round: the ATen-level ``torch.embedding``, gathers over
    flattened ids viewed back to the tokens (``index_select`` needs a 1-D index), ``relu(u) * relu(u)``,
    casts around the squared relu and on the value output, and the last token's ids ``idx[:, -1]``
    (non-contiguous: the op is given a contiguous copy)."""

    def __init__(self, kind):
        super().__init__(kind)
        if kind == "rows_scale_hidden":
            self.hidden_emb = nn.Embedding(VOCAB, HID)

    def forward(self, x, idx):
        b, t, d = x.shape
        if self.kind == "last_token":
            return self.value(torch.relu(self.key(x[:, -1])) ** 2) * self.deepemb(idx[:, -1])
        k = torch.relu(self.key(x)) ** 2
        if self.kind == "torch_embedding":
            return self.value(k) * torch.embedding(self.deepemb.weight, idx)
        if self.kind == "flat_ids_viewed":
            return self.value(k) * self.deepemb(idx.view(-1)).view(b, t, d)
        if self.kind == "index_select_view_as":
            return self.value(k) * self.deepemb.weight.index_select(0, idx.flatten()).view_as(x)
        if self.kind == "relu_written_twice":
            u = self.key(x)
            return self.value(F.relu(u) * F.relu(u)) * self.deepemb(idx)
        if self.kind == "cast_square":
            return self.value((torch.relu(self.key(x)).float() ** 2).type_as(x)) * self.deepemb(idx)
        if self.kind == "value_cast":
            return self.value(k).float() * self.deepemb(idx)
        if self.kind == "rows_scale_hidden":  # near-miss: value(k * emb(idx)), the rows of hidden width
            return self.value(k * self.hidden_emb(idx))
        raise ValueError(self.kind)


THIRD_ROUND_FFN = ["torch_embedding", "flat_ids_viewed", "index_select_view_as", "relu_written_twice", "cast_square",
                   "value_cast", "last_token"]


@pytest.mark.parametrize("kind", THIRD_ROUND_FFN)
def test_third_round_output_scale_spellings_match_eager(kind):
    torch.manual_seed(0)
    model = ThirdRoundFFN(kind)
    report = bcpt_compile.explain(model, *_inputs(6))
    assert [s.op for s in report.sites if s.family == "deepembed"] == ["bcpt.deepembed_linear"], str(report)
    _compare(model, *_inputs(7))
    if kind in ("flat_ids_viewed", "last_token"):  # the host-table path reads the same flat, contiguous ids
        _compare(model, *_inputs(7), deepembed_tables="cpu")


def test_rows_scaling_the_hidden_are_reported():
    torch.manual_seed(0)
    report = bcpt_compile.explain(ThirdRoundFFN("rows_scale_hidden"), *_inputs())
    assert report.counts["deepembed"] == 0
    assert [m.reason for m in report.misses if m.family == "deepembed"] == [
        "the rows scale the hidden relu(key(x)) ** 2 before the value projection (value(k * emb(idx))): "
        "no fused op for this form"]


def test_bf16_value_cast_up_to_an_fp32_table():
    """``value(k).float() * emb(idx)`` with a bf16 FFN and an fp32 table: eager's bf16 rounding of the
    value output is skipped, so the result agrees to bf16 precision and has eager's dtype."""
    torch.manual_seed(0)
    model = ThirdRoundFFN("value_cast")
    model.key.bfloat16(), model.value.bfloat16()
    x, idx = _inputs(9)
    x = x.bfloat16()
    assert bcpt_compile.explain(model, x, idx).counts["deepembed"] == 1
    torch._dynamo.reset()
    y = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager"})(x, idx)
    ye = model(x, idx)
    assert y.dtype == ye.dtype == torch.float32
    assert ((y.double() - ye.double()).norm() / ye.double().norm()).item() < 1e-2
    (gt,) = torch.autograd.grad(y.sum(), (model.deepemb.weight,))
    (et,) = torch.autograd.grad(ye.sum(), (model.deepemb.weight,))
    assert ((gt - et).norm() / et.norm()).item() < 2e-2


class TestThirdRoundSnapshots(expecttest.TestCase):
    def test_index_select_view_as(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(ThirdRoundFFN("index_select_view_as"), *_inputs()), """\
def forward(self, L_x_, L_self_modules_key_parameters_weight_, L_self_modules_value_parameters_weight_, L_self_modules_deepemb_parameters_weight_, L_idx_):
    l_x_ = L_x_
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    linear = torch._C._nn.linear(l_x_, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    k = relu ** 2
    flatten = l_idx_.flatten()
    row_plan_default = torch.ops.bcpt.row_plan.default(flatten, 10, False)
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(k, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, flatten, False, row_plan_default, False)
    getitem = deepembed_linear_default[0]
    return (getitem,)
""")

    def test_last_token(self):
        torch.manual_seed(0)
        self.assertExpectedInline(rewritten_graph(ThirdRoundFFN("last_token"), *_inputs()), """\
def forward(self, L_x_, L_self_modules_key_parameters_weight_, L_self_modules_value_parameters_weight_, L_idx_, L_self_modules_deepemb_parameters_weight_):
    l_x_ = L_x_
    l_self_modules_key_parameters_weight_ = L_self_modules_key_parameters_weight_
    l_self_modules_value_parameters_weight_ = L_self_modules_value_parameters_weight_
    l_idx_ = L_idx_
    l_self_modules_deepemb_parameters_weight_ = L_self_modules_deepemb_parameters_weight_
    getitem = l_x_[(slice(None, None, None), -1)]
    linear = torch._C._nn.linear(getitem, l_self_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    pow_1 = relu ** 2
    getitem_1 = l_idx_[(slice(None, None, None), -1)]
    contiguous = getitem_1.contiguous()
    row_plan_default = torch.ops.bcpt.row_plan.default(contiguous, 10, False)
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(pow_1, l_self_modules_value_parameters_weight_, None, l_self_modules_deepemb_parameters_weight_, contiguous, False, row_plan_default, False)
    getitem_2 = deepembed_linear_default[0]
    return (getitem_2,)
""")
