"""Host-resident DeepEmbed tables: prefetch hint placement, runtime gathers, cache, training."""

import expecttest
import pytest
import torch
import torch.nn as nn

import bcpt_compile
from bcpt_compile import runtime
from bcpt_compile.runtime import engine
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
    runtime.configure(cache_rows=0)
    runtime.reset_stats()
    yield
    runtime.configure(cache_rows=0)


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
    prefetch_rows_default = torch.ops.bcpt.prefetch_rows.default(l_self_modules_layers_modules_0_modules_deepemb_parameters_weight_, row_plan_default, 'cpu')
    prefetch_rows_default_1 = torch.ops.bcpt.prefetch_rows.default(l_self_modules_layers_modules_1_modules_deepemb_parameters_weight_, row_plan_default, 'cpu')
    linear = torch._C._nn.linear(l_x_, l_self_modules_layers_modules_0_modules_key_parameters_weight_, None)
    relu = torch.relu(linear)
    pow_1 = relu ** 2
    wait_rows_default = torch.ops.bcpt.wait_rows.default(prefetch_rows_default, l_self_modules_layers_modules_0_modules_deepemb_parameters_weight_, row_plan_default, 'cpu')
    getitem = wait_rows_default[0]
    getitem_1 = wait_rows_default[1]
    deepembed_linear_default = torch.ops.bcpt.deepembed_linear.default(pow_1, l_self_modules_layers_modules_0_modules_value_parameters_weight_, None, getitem, getitem_1, False)
    getitem_2 = deepembed_linear_default[0]
    x = l_x_ + getitem_2
    linear_2 = torch._C._nn.linear(x, l_self_modules_layers_modules_1_modules_key_parameters_weight_, None)
    relu_1 = torch.relu(linear_2)
    pow_2 = relu_1 ** 2
    wait_rows_default_1 = torch.ops.bcpt.wait_rows.default(prefetch_rows_default_1, l_self_modules_layers_modules_1_modules_deepemb_parameters_weight_, row_plan_default, 'cpu')
    getitem_3 = wait_rows_default_1[0]
    getitem_4 = wait_rows_default_1[1]
    deepembed_linear_default_1 = torch.ops.bcpt.deepembed_linear.default(pow_2, l_self_modules_layers_modules_1_modules_value_parameters_weight_, None, getitem_3, getitem_4, False)
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
    plan = engine.make_plan(idx.reshape(-1))
    uniq, inv = engine.split_plan(plan)
    assert uniq.tolist() == [0, 1, 5, 7] and torch.equal(uniq[inv], idx.reshape(-1))
    handle = torch.ops.bcpt.prefetch_rows(table, plan, "cpu")
    rows, pos = torch.ops.bcpt.wait_rows(handle, table, plan, "cpu")
    torch.testing.assert_close(rows[pos], table[idx.reshape(-1)], rtol=0, atol=0)
    # a ticket is used once; a second wait falls back to a synchronous gather
    rows2, pos2 = torch.ops.bcpt.wait_rows(handle, table, plan, "cpu")
    torch.testing.assert_close(rows2[pos2], table[idx.reshape(-1)], rtol=0, atol=0)
    s = runtime.stats()
    assert (s.prefetches, s.waits, s.sync_gathers) == (1, 2, 1)


def test_row_plan_rejects_bad_idx_like_eager():
    with pytest.raises(IndexError, match="index out of range in self"):
        torch.ops.bcpt.row_plan(torch.tensor([0, VOCAB]), VOCAB, False)
    with pytest.raises(IndexError, match=f"index -{VOCAB + 1} is out of bounds for dimension 0 with size {VOCAB}"):
        torch.ops.bcpt.row_plan(torch.tensor([0, -VOCAB - 1]), VOCAB, True)
    plan = torch.ops.bcpt.row_plan(torch.tensor([-1, 2]), VOCAB, True)  # wraps like weight[idx]
    assert engine.split_plan(plan)[0].tolist() == [2, VOCAB - 1]


def test_cache_hits_evicts_lru_and_drops_stale_rows():
    runtime.configure(cache_rows=3)
    table = torch.randn(VOCAB, 4)

    def gather(ids):
        plan = engine.make_plan(torch.tensor(ids))
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
