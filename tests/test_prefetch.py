"""Host-resident DeepEmbed tables: prefetch hint placement, runtime gathers, cache, training."""

import expecttest
import pytest
import torch
from torch import nn

import bcpt_compile
from bcpt_compile import runtime
from bcpt_compile.runtime import engine
from bcpt_compile.runtime.plan import build_plan, views
from bcpt_compile.testing import rewritten_graph

D, HID, VOCAB = 8, 16, 12


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.key = nn.Linear(D, HID, bias=False)
        self.value = nn.Linear(HID, D, bias=False)
        self.deepemb = nn.Embedding(VOCAB, D)
        with torch.no_grad():
            self.deepemb.weight.uniform_(0.5, 1.5)

    def forward(self, x, idx):
        return x + self.value(torch.relu(self.key(x)) ** 2) * self.deepemb(idx)


class Stack(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, x, idx):
        for layer in self.layers:
            x = layer(x, idx)
        return x


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, D, generator=g), torch.randint(0, VOCAB, (2, 5), generator=g)


@pytest.fixture(autouse=True)
def _runtime_defaults():
    runtime.configure(cache_rows=0, overlap=True)
    runtime.reset_stats()
    yield
    runtime.configure(cache_rows=0, overlap=True)


class TestHintPlacement(expecttest.TestCase):
    def test_prefetches_at_graph_input_waits_before_use(self):
        model = Stack()
        moved = runtime.offload_tables(model)
        self.assertEqual(moved, ["layers.0.deepemb", "layers.1.deepemb"])
        self.assertExpectedInline(rewritten_graph(model, *_inputs(), options={"deepembed_tables": "cpu"}), """\
def forward(self, L_self_modules_layers_modules_0_modules_key_parameters_weight_, L_x_, L_self_modules_layers_modules_0_modules_value_parameters_weight_, L_self_modules_layers_modules_0_modules_deepemb_parameters_weight_, L_idx_, L_self_modules_layers_modules_1_modules_key_parameters_weight_, L_self_modules_layers_modules_1_modules_value_parameters_weight_, L_self_modules_layers_modules_1_modules_deepemb_parameters_weight_):
    l_self_modules_layers_modules_0_modules_key_parameters_weight_ = L_self_modules_layers_modules_0_modules_key_parameters_weight_
    l_x_ = L_x_
    l_self_modules_layers_modules_0_modules_value_parameters_weight_ = L_self_modules_layers_modules_0_modules_value_parameters_weight_
    l_self_modules_layers_modules_0_modules_deepemb_parameters_weight_ = L_self_modules_layers_modules_0_modules_deepemb_parameters_weight_
    l_idx_ = L_idx_
    l_self_modules_layers_modules_1_modules_key_parameters_weight_ = L_self_modules_layers_modules_1_modules_key_parameters_weight_
    l_self_modules_layers_modules_1_modules_value_parameters_weight_ = L_self_modules_layers_modules_1_modules_value_parameters_weight_
    l_self_modules_layers_modules_1_modules_deepemb_parameters_weight_ = L_self_modules_layers_modules_1_modules_deepemb_parameters_weight_
    row_plan_default = torch.ops.bcpt.row_plan.default(l_idx_, 12, False)
    prefetch_rows_default = torch.ops.bcpt.prefetch_rows.default([l_self_modules_layers_modules_0_modules_deepemb_parameters_weight_, l_self_modules_layers_modules_1_modules_deepemb_parameters_weight_], row_plan_default, 'cpu')
    linear = torch._C._nn.linear(l_x_, l_self_modules_layers_modules_0_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    pow_1 = relu ** 2
    wait_rows_default = torch.ops.bcpt.wait_rows.default(prefetch_rows_default, l_self_modules_layers_modules_0_modules_deepemb_parameters_weight_, row_plan_default, 'cpu', 'dense', 0)
    getitem = wait_rows_default[0]
    getitem_1 = wait_rows_default[1]
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(pow_1, l_self_modules_layers_modules_0_modules_value_parameters_weight_, None, getitem, getitem_1, False, row_plan_default, True)
    getitem_2 = deepembed_linear_default[0]
    x = l_x_ + getitem_2
    linear_2 = torch._C._nn.linear(x, l_self_modules_layers_modules_1_modules_key_parameters_weight_, None)
    relu_1 = torch.relu(linear_2)
    pow_2 = relu_1 ** 2
    wait_rows_default_1 = torch.ops.bcpt.wait_rows.default(prefetch_rows_default, l_self_modules_layers_modules_1_modules_deepemb_parameters_weight_, row_plan_default, 'cpu', 'dense', 1)
    getitem_3 = wait_rows_default_1[0]
    getitem_4 = wait_rows_default_1[1]
    deepembed_linear_default_1 = torch.ops.bcpt.deepembed_linear.default(pow_2, l_self_modules_layers_modules_1_modules_value_parameters_weight_, None, getitem_3, getitem_4, False, row_plan_default, True)
    getitem_5 = deepembed_linear_default_1[0]
    x_1 = x + getitem_5
    return (x_1,)
""")


def test_offloaded_model_matches_eager_and_counts():
    model = Stack(3)
    runtime.offload_tables(model)
    x, idx = _inputs(1)
    report = bcpt_compile.explain(model, x, idx, options={"deepembed_tables": "cpu"})
    assert report.counts["deepembed"] == 3 and report.counts["prefetch"] == 3
    runtime.reset_stats()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": "cpu"})
    y = compiled(x, idx)
    s = runtime.stats()
    distinct = idx.unique().numel()
    assert (s.plans, s.prefetches, s.waits, s.sync_gathers) == (1, 3, 3, 0)  # one plan shared by 3 layers
    assert s.rows_requested == 3 * distinct and s.rows_copied == 3 * distinct
    torch.testing.assert_close(y, model(x, idx), rtol=1e-5, atol=1e-5)


def test_training_with_host_tables_updates_touched_rows_only():
    torch.manual_seed(0)
    model = Stack()
    ref = Stack()
    ref.load_state_dict(model.state_dict())
    runtime.offload_tables(model)
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": "cpu"})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, idx = _inputs(2)
    idx[idx == 3] = 4  # row 3 is never touched
    before = model.layers[0].deepemb.weight.detach().clone()
    for step in range(2):
        for m, o in ((compiled, opt), (ref, opt_ref)):
            o.zero_grad()
            m(x, idx).square().mean().backward()
            o.step()
    table = model.layers[0].deepemb.weight
    assert table.device.type == "cpu" and table.grad.device.type == "cpu"
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[idx.unique()] = False
    assert torch.equal(table.detach()[untouched], before[untouched])
    assert (table.detach()[~untouched] != before[~untouched]).any(dim=1).all()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5, msg=n)


def test_runtime_gather_and_tickets():
    table = torch.randn(VOCAB, 6)
    idx = torch.tensor([[5, 1, 5], [7, 1, 0]])
    plan = torch.ops.bcpt.row_plan(idx, VOCAB, False)
    v = views(plan)
    assert int(v.count) == 4 and v.uniq[:4].tolist() == [0, 1, 5, 7]
    assert torch.equal(v.uniq[v.inv], idx.reshape(-1))
    handle = torch.ops.bcpt.prefetch_rows([table], plan, "cpu")
    rows, pos = torch.ops.bcpt.wait_rows(handle, table, plan, "cpu")
    torch.testing.assert_close(rows[pos], table[idx.reshape(-1)], rtol=0, atol=0)
    # a ticket is used once; a second wait falls back to a synchronous gather
    rows2, pos2 = torch.ops.bcpt.wait_rows(handle, table, plan, "cpu")
    torch.testing.assert_close(rows2[pos2], table[idx.reshape(-1)], rtol=0, atol=0)
    s = runtime.stats()
    assert (s.prefetches, s.waits, s.sync_gathers) == (1, 2, 1)


def test_one_prefetch_serves_every_table_of_a_plan():
    tables = [torch.randn(VOCAB, 6), torch.randn(VOCAB, 4).double()]
    idx = torch.tensor([[5, 1, 5], [7, 1, 0]])
    plan = torch.ops.bcpt.row_plan(idx, VOCAB, False)
    runtime.reset_stats()
    handle = torch.ops.bcpt.prefetch_rows(tables, plan, "cpu")
    assert handle.shape == (2,) and handle[0] != handle[1]
    for slot in (1, 0):  # in any order
        rows, pos = torch.ops.bcpt.wait_rows(handle, tables[slot], plan, "cpu", "dense", slot)
        torch.testing.assert_close(rows[pos], tables[slot][idx.reshape(-1)], rtol=0, atol=0)
    s = runtime.stats()
    assert (s.prefetches, s.waits, s.sync_gathers) == (2, 2, 0)
    with pytest.raises(ValueError, match="slot 2 is outside the prefetch's 2 tables"):
        torch.ops.bcpt.wait_rows(handle, tables[0], plan, "cpu", "dense", 2)


def test_row_plan_rejects_bad_idx_like_eager():
    with pytest.raises(IndexError, match="index out of range in self"):
        torch.ops.bcpt.row_plan(torch.tensor([0, VOCAB]), VOCAB, False)
    with pytest.raises(IndexError, match=f"index -{VOCAB + 1} is out of bounds for dimension 0 with size {VOCAB}"):
        torch.ops.bcpt.row_plan(torch.tensor([0, -VOCAB - 1]), VOCAB, True)
    plan = torch.ops.bcpt.row_plan(torch.tensor([-1, 2]), VOCAB, True)  # wraps like weight[idx]
    assert views(plan).uniq[:int(views(plan).count)].tolist() == [2, VOCAB - 1]


def test_cache_hits_evicts_lru_and_drops_stale_rows():
    runtime.configure(cache_rows=3)
    table = torch.randn(VOCAB, 4)

    def gather(ids):
        plan = build_plan(torch.tensor(ids))
        rows, pos = engine.gather_now(table, plan, torch.device("cpu"))
        torch.testing.assert_close(rows[pos], table[torch.tensor(ids)], rtol=0, atol=0)

    gather([1, 2, 3])
    assert runtime.stats().cache_hits == 0 and runtime.stats().cache_misses == 3
    gather([2, 3, 2])
    assert runtime.stats().cache_hits == 2
    gather([4])  # evicts the least recently used row: 1
    gather([1, 4])
    s = runtime.stats()
    assert (s.cache_hits, s.cache_misses) == (3, 5)
    cache = engine._caches[table][torch.device("cpu")]
    assert sorted(cache.row_of.tolist()) == [1, 3, 4]  # row 2 tied with 3 on use and count; lower slot goes
    with torch.no_grad():
        table[4] += 1.0  # an optimizer step: the version moves, cached rows are stale
    gather([4])  # checks the fresh value
    assert runtime.stats().cache_hits == 3


# ------------------------------------------------------------------ how host tables' gradients are delivered

def _stack_pair(layers=2):
    torch.manual_seed(0)
    model = Stack(layers)
    ref = Stack(layers)
    ref.load_state_dict(model.state_dict())
    return model, ref


def _tables(m):
    return [layer.deepemb.weight for layer in m.layers]


def _dense_params(m):
    return [p for n, p in m.named_parameters() if "deepemb" not in n]


def test_sparse_embedding_host_tables_give_eager_sparse_grads():
    model, ref = _stack_pair()
    runtime.offload_tables(model, sparse=True)
    for layer in ref.layers:
        layer.deepemb.sparse = True
    report = bcpt_compile.explain(model, *_inputs(), options={"deepembed_tables": "cpu"})
    assert report.counts["deepembed"] == 2 and report.counts["prefetch"] == 2
    assert all(s.op == "bcpt.prefetch_rows[sparse]" for s in report.sites if s.family == "prefetch")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": "cpu"})
    x, idx = _inputs(3)
    y = compiled(x, idx)
    y.square().sum().backward()
    ye = ref(x, idx)
    ye.square().sum().backward()
    torch.testing.assert_close(y, ye, rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.layout == q.grad.layout
        if p.grad.is_sparse:
            # one entry per touched row, sorted (eager's has one per token); the coalesced flag
            # does not survive AOTAutograd, the layout does
            assert p.grad._nnz() == idx.unique().numel()
            got, want = p.grad.coalesce(), q.grad.coalesce()
            assert torch.equal(got.indices(), want.indices())
            torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    # SparseAdam takes it as it takes eager's
    opt = torch.optim.SparseAdam(_tables(model), lr=1e-2)
    opt.step()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("compiled_run", [True, False])
def test_fused_row_optimizer_equals_sparse_embedding_and_optimizer(kind, compiled_run):
    model, ref = _stack_pair()
    runtime.offload_tables(model)
    for layer in ref.layers:
        layer.deepemb.sparse = True
    fused = runtime.FusedRowOptimizer(_tables(model), kind=kind, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    ref_tables = (torch.optim.SGD(_tables(ref), lr=0.05) if kind == "sgd"
                  else torch.optim.SparseAdam(_tables(ref), lr=0.05, betas=(0.8, 0.95), eps=1e-6))
    opt, opt_ref = torch.optim.SGD(_dense_params(model), lr=0.1), torch.optim.SGD(_dense_params(ref), lr=0.1)
    run = model
    if compiled_run:
        report = bcpt_compile.explain(model, *_inputs(), options={"deepembed_tables": "cpu"})
        assert [s.op for s in report.sites if s.family == "prefetch"] == ["bcpt.prefetch_rows[fused]"] * 2
        torch._dynamo.reset()
        run = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": "cpu"})
    x, idx = _inputs(2)
    idx[idx == 3] = 4  # row 3 is never touched
    before = model.layers[0].deepemb.weight.detach().clone()
    runtime.reset_stats()
    for step in range(3):
        for m, o, extra in ((run, opt, None), (ref, opt_ref, ref_tables)):
            o.zero_grad()
            if extra is not None:
                extra.zero_grad()
            m(x, torch.where(idx == 2, 5, idx) if step % 2 else idx).square().mean().backward()
            o.step()
            if extra is not None:
                extra.step()
        assert all(t.grad is None for t in _tables(model))
    if compiled_run:
        assert runtime.stats().fused_updates == 6
    table = model.layers[0].deepemb.weight
    assert torch.equal(table.detach()[3], before[3])
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)
    if kind == "adam":
        torch.testing.assert_close(fused.state(table)["exp_avg"], ref_tables.state[_tables(ref)[0]]["exp_avg"],
                                   rtol=1e-5, atol=1e-7)
        assert fused.state(table)["step"] == 3
    fused.remove()


def test_fused_table_used_twice_in_a_graph_is_updated_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = Layer(), Layer()
            self.b.deepemb = self.a.deepemb  # one table, two sites

        def forward(self, x, idx):
            return self.b(self.a(x, idx), idx)

    model, ref = Tied(), Tied()
    ref.load_state_dict(model.state_dict())
    runtime.offload_tables(model, select=lambda name, mod: name == "a.deepemb")
    fused = runtime.FusedRowOptimizer(model.a.deepemb, kind="adam", lr=0.05)
    ref.a.deepemb.sparse = True
    ref_opt = torch.optim.SparseAdam([ref.a.deepemb.weight], lr=0.05)
    report = bcpt_compile.explain(model, *_inputs(), options={"deepembed_tables": "cpu"})
    assert report.counts["prefetch"] == 2 and any("used 2 times" in m.reason for m in report.misses)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": "cpu"})
    x, idx = _inputs(4)
    for _ in range(2):
        compiled(x, idx).square().mean().backward()
        ref_opt.zero_grad()
        ref(x, idx).square().mean().backward()
        ref_opt.step()
    assert model.a.deepemb.weight.grad is None
    torch.testing.assert_close(model.a.deepemb.weight.detach(), ref.a.deepemb.weight.detach(), rtol=1e-5, atol=1e-6)
    fused.remove()


def test_removed_fused_optimizer_is_an_error_not_a_silent_change():
    model = Stack()
    runtime.offload_tables(model)
    fused = runtime.FusedRowOptimizer(_tables(model), lr=0.1)
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": "cpu"})
    x, idx = _inputs()
    compiled(x, idx).sum().backward()
    fused.remove()
    with pytest.raises(RuntimeError, match="FusedRowOptimizer that has since been removed"):
        compiled(x, idx).sum().backward()
    with pytest.raises(ValueError, match="kind must be one of"):
        runtime.FusedRowOptimizer(_tables(model), kind="adagrad")


# ------------------------------------------------------------------ CUDA only (run with TRITON_INTERPRET=0)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with TRITON_INTERPRET=0)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_zero_copy_gather_matches_index_select(dtype):
    """The gather kernel reads a pinned host table through its mapped address; an unpinned
    table takes the host-bookkept path; both equal index_select."""
    torch.manual_seed(0)
    V, W = 5000, 384
    pinned = torch.randn(V, W).to(dtype).pin_memory()
    idx = torch.randint(0, V, (2, 700), device="cuda")
    idx[0, :200] = 3
    want = pinned[idx.cpu().reshape(-1)]
    for table, uva in ((pinned, 1), (pinned.clone(), 0)):
        assert table.is_pinned() == bool(uva)
        runtime.reset_stats()
        plan = torch.ops.bcpt.row_plan(idx, V, False)
        handle = torch.ops.bcpt.prefetch_rows([table], plan, "cuda")
        rows, pos = torch.ops.bcpt.wait_rows(handle, table, plan, "cuda", "dense")
        assert rows.is_cuda and pos.is_cuda
        assert torch.equal(rows[pos].cpu(), want)
        s = runtime.stats()
        assert (s.uva_gathers, s.sync_gathers) == (uva, 0)
        assert s.rows_copied == idx.unique().numel() and s.bytes_copied == s.rows_copied * W * pinned.element_size()


class _CudaStack(nn.Module):
    def __init__(self, d=256, hid=1024, vocab=1000, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"key": nn.Linear(d, hid, bias=False), "value": nn.Linear(hid, d, bias=False),
                           "deepemb": nn.Embedding(vocab, d)})
            for _ in range(layers))
        for layer in self.layers:
            nn.init.uniform_(layer.deepemb.weight, 0.5, 1.5)

    def forward(self, x, idx):
        for layer in self.layers:
            x = x + layer.value(torch.relu(layer.key(x)) ** 2) * layer.deepemb(idx)
        return x


@cuda
@pytest.mark.parametrize("kind,overlap", [("sgd", True), ("adam", True), ("sgd", False)])
def test_cuda_fused_host_tables_train_without_host_sync(kind, overlap):
    """Pinned host tables with a FusedRowOptimizer: a compiled (Inductor) training step runs
    with no host sync (torch.cuda.set_sync_debug_mode("error")), and outputs, gradients and the
    updated tables equal eager GPU tables with sparse=True + SGD / SparseAdam (fp32, 1e-4);
    also with the host-row kernels in line on the compute stream (``overlap=False``)."""
    runtime.configure(overlap=overlap)  # the fixture restores the default
    _train_host_tables_and_compare(kind)


def _train_host_tables_and_compare(kind):
    torch.manual_seed(0)
    ref = _CudaStack().cuda()
    model = _CudaStack().cuda()
    model.load_state_dict(ref.state_dict())
    runtime.offload_tables(model)
    for layer in ref.layers:
        layer.deepemb.sparse = True
    tables = [layer.deepemb for layer in model.layers]
    assert all(t.weight.is_pinned() for t in tables)
    fused = runtime.FusedRowOptimizer(tables, kind=kind, lr=1e-2, eps=1e-6)  # eps: bounds Adam's slope at g ~ 0
    ref_tables = [layer.deepemb.weight for layer in ref.layers]
    ref_opt = (torch.optim.SGD(ref_tables, lr=1e-2) if kind == "sgd"
               else torch.optim.SparseAdam(ref_tables, lr=1e-2, eps=1e-6))
    compiled = torch.compile(model, backend="bcpt", options={"deepembed_tables": "cpu"})
    x = torch.randn(2, 384, 256, device="cuda")
    idx = torch.randint(0, 1000, (2, 384), device="cuda")
    idx[0, :100] = 7
    runtime.reset_stats()
    for step in range(2):
        for p in model.parameters():
            p.grad = None
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            y = compiled(x, idx)
            y.square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for p in ref.parameters():
            p.grad = None
        ye = ref(x, idx)
        ye.square().mean().backward()
        ref_opt.step()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, ye, rtol=1e-4, atol=1e-4)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if "deepemb" in n:
            assert p.grad is None and p.device.type == "cpu"
            torch.testing.assert_close(p.detach(), q.detach().cpu(), rtol=1e-4, atol=1e-5, msg=n)
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    s = runtime.stats()
    assert s.uva_gathers == 6 and s.sync_gathers == 0 and s.fused_updates == 6
    assert s.rows_updated == 6 * idx.unique().numel() and s.grad_bytes_to_host == 0
    fused.remove()


@cuda
def test_cuda_graph_captures_plan_prefetch_and_fused_op():
    """row_plan -> prefetch_rows -> wait_rows -> deepembed_linear in one CUDA graph; replays
    with new token ids gather the new rows from the pinned host table."""
    torch.manual_seed(0)
    V, d, hid, M = 2000, 256, 512, 768
    table = torch.rand(V, d).add_(0.5).pin_memory()
    w = torch.randn(d, hid, device="cuda") * hid ** -0.5
    h = torch.randn(M, hid, device="cuda")
    idx = torch.randint(0, V, (M,), device="cuda")

    def forward():
        plan = torch.ops.bcpt.row_plan(idx, V, False)
        handle = torch.ops.bcpt.prefetch_rows([table], plan, "cuda:0")
        rows, pos = torch.ops.bcpt.wait_rows(handle, table, plan, "cuda:0", "dense")
        return torch.ops.bcpt.deepembed_linear(h, w, None, rows, pos, False, plan, True)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        idx.copy_(torch.randint(0, V, (M,), device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        want = (h @ w.t()) * table[idx.cpu()].cuda()
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_fused_adam_on_a_raw_parameter_table_hidden_form():
    """RWKV-7's s_emb (a raw Parameter, hidden-scale form) with a fused Adam: compiled == eager
    (whose hook applies the same update to the rows with a gradient)."""
    from tests.test_deepembed_pass import HiddenScale, R

    class HostHidden(HiddenScale):
        def forward(self, x, idx):
            k = torch.relu(x @ self.K) ** 2
            rows = self.s_emb[idx.cpu()].to(x.device)
            mix = ((x @ self.s1).unsqueeze(-2) @ rows.view(*idx.shape, R, R)).squeeze(-2)
            return (k * (mix @ self.s2 + self.s0)) @ self.V

    model, ref = HostHidden(), HostHidden()
    fused = runtime.FusedRowOptimizer(model.s_emb, kind="adam", lr=0.02)
    fused_ref = runtime.FusedRowOptimizer(ref.s_emb, kind="adam", lr=0.02)
    compiled = torch.compile(model, backend="bcpt", options={"inner_compiler": "aot_eager", "deepembed_tables": "cpu"})
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        x, idx = torch.randn(2, 3, 8, generator=g), torch.randint(0, 10, (2, 3), generator=g)
        compiled(x, idx).square().mean().backward()
        ref(x, idx).square().mean().backward()
        assert model.s_emb.grad is None and ref.s_emb.grad is None
    torch.testing.assert_close(model.s_emb.detach(), ref.s_emb.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n != "s_emb":
            want = dict(ref.named_parameters())[n].grad
            assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max(), n
    fused.remove()
    fused_ref.remove()
