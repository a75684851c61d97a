"""Whole client models and training loops: a Tiny-ONN-style SBL stack and RWKV-8-style blocks
(a time-mix stand-in plus a DeepEmbed channel-mix), compiled as users compile them and
compared with an eager twin (deepcopy) after optimizer steps, on tables on the device and
in host memory."""

import copy
import functools
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import bcpt_compile
from bcpt_compile import runtime
from bcpt_compile.backend import bcpt_backend
from bcpt_compile.report import Report

D, HID, VOCAB = 8, 16, 12
AOT = {"inner_compiler": "aot_eager", "block_size": 16}
HOST = {**AOT, "deepembed_tables": "cpu"}


class SBLLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.mu = nn.Parameter(torch.randn(HID, D) / D**0.5)
        self.gate = nn.Parameter(torch.randn(HID) * 0.2 + 0.1)
        self.out = nn.Linear(HID, D)

    def forward(self, x):
        h = self.ln(x)
        return x + self.out(F.linear(h, self.mu) * F.relu(h @ self.mu.t() - self.gate))


class TimeMix(nn.Module):
    """Token shift and a cumulative-sum WKV: a stand-in for RWKV's time mixing."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.mix = nn.Parameter(torch.rand(1, 1, D))
        self.r, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x):
        h = self.ln(x)
        h = h + (F.pad(h, (0, 0, 1, -1)) - h) * self.mix
        k = self.k(h).clamp(max=10).exp()
        return x + self.o(torch.sigmoid(self.r(h)) * torch.cumsum(k * self.v(h), 1) / torch.cumsum(k, 1))


class ChannelMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.key = nn.Linear(D, 2 * D, bias=False)
        self.value = nn.Linear(2 * D, D, bias=False)
        self.deepemb = nn.Embedding(VOCAB, D)
        with torch.no_grad():
            self.deepemb.weight.uniform_(0.5, 1.5)

    def forward(self, x, idx):
        return x + self.value(torch.relu(self.key(self.ln(x))) ** 2) * self.deepemb(idx)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.att, self.ffn = TimeMix(), ChannelMix()

    def forward(self, x, idx):
        return self.ffn(self.att(x), idx)


class Mixed(nn.Module):
    """Token embedding, then (SBL layer, RWKV block) ``layers`` times, then a head."""

    def __init__(self, layers=2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.sbl = nn.ModuleList(SBLLayer() for _ in range(layers))
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for sbl, block in zip(self.sbl, self.blocks):
            x = block(sbl(x), idx)
        return self.head(x)


class CheckpointedMixed(Mixed):
    def forward(self, idx):
        x = self.emb(idx)
        for sbl, block in zip(self.sbl, self.blocks):
            x = checkpoint(sbl, x, use_reentrant=False)
            x = checkpoint(block.ffn, block.att(x), idx, use_reentrant=False)
        return self.head(x)


def _sites(layers=2, host=False, graphs=1):
    return {"sbl": graphs * layers, "deepembed": graphs * layers, "attention": 0,
            "prefetch": graphs * layers if host else 0}


def _model(cls=Mixed, host=False, layers=2):
    torch.manual_seed(0)
    model = cls(layers)
    twin = copy.deepcopy(model)
    if host:
        runtime.offload_tables(model)
        runtime.offload_tables(twin)
    return model, twin


def _batch(b=2, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g), torch.randint(0, VOCAB, (b, t), generator=g)


def _loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _compiled(model, options=AOT, **kwargs):
    """``torch.compile`` with the bcpt backend, collecting every graph's report."""
    report = Report()
    backend = functools.partial(bcpt_backend, options=options, report_sink=report)
    return torch.compile(model, backend=backend, **kwargs), report


def _tables(model):
    return [p for n, p in model.named_parameters() if "deepemb" in n]


def _others(model):
    return [p for n, p in model.named_parameters() if "deepemb" not in n]


def _assert_same(model, twin, what="param", tol=1e-4):
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if what == "grad":
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is None:
                continue
            p, q = (g.to_dense() if g.is_sparse else g for g in (p.grad, q.grad))
        torch.testing.assert_close(p.detach().float(), q.detach().float(), rtol=tol, atol=tol, msg=name)


def _train(pairs, steps=3, micro=2, clip=None, set_to_none=True, shapes=None):
    """``steps`` optimizer steps on each (model, optimizers), accumulating ``micro`` batches."""
    for step in range(steps):
        b, t = shapes[step] if shapes else (2, 6)
        for model, optimizers in pairs:
            for opt in optimizers:
                opt.zero_grad(set_to_none=set_to_none)
            for m in range(micro):
                idx, targets = _batch(b, t, seed=10 * step + m)
                (_loss(model(idx), targets) / micro).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
            for opt in optimizers:
                opt.step()


@pytest.mark.parametrize("optimizer, set_to_none", [
    (functools.partial(torch.optim.AdamW, lr=1e-2), True),
    (functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), False),
])
def test_training_loop_with_accumulation_and_clipping_matches_eager(optimizer, set_to_none):
    model, twin = _model()
    compiled, report = _compiled(model)
    _train([(compiled, [optimizer(model.parameters())]), (twin, [optimizer(twin.parameters())])],
           clip=0.5, set_to_none=set_to_none)
    assert report.graphs == 1 and report.counts == _sites() and report.failures == []
    _assert_same(model, twin)


@pytest.mark.parametrize("mode", ["dense", "sparse", "fused"])
def test_host_table_training_matches_eager(mode):
    """AdamW over dense host gradients; SparseAdam over sparse ones; fused Adam rows (no
    accumulation: documented, the table is updated at each backward, eager's hook alike)."""
    model, twin = _model(host=True)
    pairs, fused = [], []
    for m in (model, twin):
        if mode == "sparse":
            for mod in m.modules():
                if isinstance(mod, runtime.OffloadedEmbedding):
                    mod.sparse = True
            opts = [torch.optim.SparseAdam(_tables(m), lr=1e-2), torch.optim.AdamW(_others(m), lr=1e-2)]
        elif mode == "fused":
            fused.append(runtime.FusedRowOptimizer(_tables(m), kind="adam", lr=5e-2))
            opts = [torch.optim.AdamW(_others(m), lr=1e-2)]
        else:
            opts = [torch.optim.AdamW(m.parameters(), lr=1e-2)]
        pairs.append((m, opts))
    compiled, report = _compiled(model, HOST)
    pairs[0] = (compiled, pairs[0][1])
    try:
        _train(pairs, micro=1 if mode == "fused" else 2, clip=None if mode == "sparse" else 1.0)
    finally:
        for f in fused:
            f.remove()
    assert report.counts == _sites(host=True) and report.failures == []
    assert all(s.op == f"bcpt.prefetch_rows[{mode}]" for s in report.sites if s.family == "prefetch")
    _assert_same(model, twin)
    if mode == "fused":
        assert all(p.grad is None for p in _tables(model))


def test_variable_lengths_batch_one_and_a_single_token():
    """Automatic dynamic shapes, then B = 1 and T = 1 (specialised): every graph keeps its sites."""
    model, twin = _model(host=True, layers=1)
    compiled, report = _compiled(model, HOST)
    for b, t in ((2, 6), (2, 9), (2, 4), (1, 1)):
        idx, targets = _batch(b, t, seed=t)
        model.zero_grad()
        twin.zero_grad()
        out, ref = compiled(idx), twin(idx)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        _loss(out, targets).backward()
        _loss(ref, targets).backward()
        _assert_same(model, twin, "grad")
    assert report.graphs == 3 and report.failures == []  # static, dynamic T, then T = 1
    assert report.counts == _sites(1, host=True, graphs=3)


def test_mark_dynamic_and_dynamic_true_compile_once():
    model, twin = _model(layers=1)
    for kwargs in ({"dynamic": True}, {}):
        torch._dynamo.reset()
        compiled, report = _compiled(model, **kwargs)
        for t in (6, 9):
            idx, _ = _batch(2, t, seed=t)
            if not kwargs:
                torch._dynamo.mark_dynamic(idx, 1)
            torch.testing.assert_close(compiled(idx), twin(idx), rtol=1e-4, atol=1e-4)
        # dynamic=True: Dynamo traces the frame twice (its float arguments, e.g. LayerNorm's eps,
        # start symbolic and are specialised on a restart); each trace is rewritten
        assert report.graphs == (2 if kwargs else 1), (kwargs, report)
        assert report.counts == _sites(1, graphs=report.graphs)


def test_eval_no_grad_inference_mode_then_train_again():
    model, twin = _model(host=True, layers=1)
    compiled, report = _compiled(model, HOST)
    opt, opt_twin = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    _train([(compiled, [opt]), (twin, [opt_twin])], steps=1, micro=1)
    idx, targets = _batch(seed=7)
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), twin(idx), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        out = compiled(idx)
        torch.testing.assert_close(out, twin(idx), rtol=1e-4, atol=1e-4)
    assert out.is_inference()
    model.train()
    twin.train()
    _train([(compiled, [opt]), (twin, [opt_twin])], steps=1, micro=1)
    _assert_same(model, twin)
    assert report.graphs == 3 and report.counts == _sites(1, host=True, graphs=3)


def test_autocast_and_bf16_model_train_like_eager():
    """bf16 tolerance: the ops round once where eager rounds the product first (docs/patterns.md)."""
    model, twin = _model(layers=1)
    compiled, report = _compiled(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for step in range(2):
        idx, targets = _batch(seed=step)
        for m, opt in zip((compiled, twin), opts):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(idx)
            _loss(out, targets).backward()
            opt.step()
    assert report.counts == _sites(1) and report.failures == []
    _assert_same(model, twin, tol=2e-2)

    torch._dynamo.reset()
    model, twin = (m.to(torch.bfloat16) for m in _model(host=True, layers=1))
    compiled, report = _compiled(model, HOST)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    _train([(compiled, opts[:1]), (twin, opts[1:])], steps=2, micro=1)
    assert report.counts == _sites(1, host=True)
    assert model.blocks[0].ffn.deepemb.weight.dtype == torch.bfloat16
    _assert_same(model, twin, tol=3e-2)


@pytest.mark.parametrize("entry", ["fullgraph", "module.compile", "submodule", "forward", "kwargs"])
def test_entry_points(entry):
    model, twin = _model(layers=1)
    report = Report()
    backend = functools.partial(bcpt_backend, options=AOT, report_sink=report)
    call, expected = model, _sites(1)
    if entry == "fullgraph":
        call = torch.compile(model, backend=backend, fullgraph=True)
    elif entry == "module.compile":
        model.compile(backend=backend)
    elif entry == "submodule":
        model.blocks[0] = torch.compile(model.blocks[0], backend=backend)
        expected = {**_sites(1), "sbl": 0}
    elif entry == "forward":
        call = torch.compile(model.forward, backend=backend)
    else:
        compiled = torch.compile(model, backend=backend)
        call = lambda idx: compiled(idx=idx)  # noqa: E731
    idx, targets = _batch(seed=4)
    out, ref = call(idx), twin(idx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    _loss(out, targets).backward()
    _loss(ref, targets).backward()
    _assert_same(model, twin, "grad")
    assert report.graphs == 1 and report.counts == expected


def test_freezing_and_unfreezing_between_steps():
    """``requires_grad_`` on a table and an SBL weight recompiles; the sites stay and match eager."""
    model, twin = _model(layers=1)
    compiled, report = _compiled(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for step, frozen in enumerate((False, True, False)):
        for m in (model, twin):
            m.blocks[0].ffn.deepemb.weight.requires_grad_(not frozen)
            m.sbl[0].mu.requires_grad_(not frozen)
        _train([(compiled, opts[:1]), (twin, opts[1:])], steps=1, micro=1)
        assert (model.sbl[0].mu.grad is None) == (twin.sbl[0].mu.grad is None)
    _assert_same(model, twin)
    assert report.graphs == 2 and report.counts == _sites(1, graphs=2)


def test_checkpointed_layers_with_fused_host_tables():
    """Checkpoint bodies take tables in place (no prefetch there); the fused optimizer's eager
    hook applies the rows, as on the twin."""
    model, twin = _model(CheckpointedMixed, host=True, layers=1)
    fused = [runtime.FusedRowOptimizer(_tables(m), kind="sgd", lr=5e-2) for m in (model, twin)]
    compiled, report = _compiled(model, HOST)
    try:
        _train([(compiled, [torch.optim.SGD(_others(model), lr=0.1)]),
                (twin, [torch.optim.SGD(_others(twin), lr=0.1)])], micro=1)
    finally:
        for f in fused:
            f.remove()
    assert report.counts == _sites(1) and report.failures == []
    _assert_same(model, twin)
    assert all(p.grad is None for p in _tables(model))


def test_state_dict_round_trip_of_host_tables_and_deepcopy():
    model, twin = _model(host=True, layers=1)
    fused = [runtime.FusedRowOptimizer(_tables(m), kind="adam", lr=5e-2) for m in (model, twin)]
    compiled, report = _compiled(model, HOST)
    opts = [torch.optim.SGD(_others(m), lr=0.1) for m in (model, twin)]
    try:
        _train([(compiled, opts[:1]), (twin, opts[1:])], steps=1, micro=1)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        assert [k for k in model.state_dict() if "deepemb" in k] == ["blocks.0.ffn.deepemb.weight"]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        buf.seek(0)
        model.load_state_dict(torch.load(buf))  # in place: the fused optimizer keeps its tables
        _train([(compiled, opts[:1]), (twin, opts[1:])], steps=2, micro=1)
    finally:
        for f in fused:
            f.remove()
    _assert_same(model, twin)
    assert report.graphs == 1

    torch._dynamo.reset()
    fresh = Mixed(layers=1)
    fresh.load_state_dict(twin.state_dict())  # host tables load into a plain model
    copied = copy.deepcopy(torch.compile(fresh, backend="bcpt", options=HOST))
    idx, _ = _batch(seed=9)
    torch.testing.assert_close(copied(idx), twin(idx), rtol=1e-4, atol=1e-4)


class _TwoSpellings(nn.Module):
    """The token embedding and the DeepEmbed table index ``idx`` with different rules."""

    def __init__(self, tok_indexing):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.ffn = ChannelMix()
        self.tok_indexing = tok_indexing

    def forward(self, idx):
        x = self.tok.weight[idx] if self.tok_indexing else self.tok(idx)
        h = self.ffn.ln(x)
        rows = self.ffn.deepemb(idx) if self.tok_indexing else self.ffn.deepemb.weight[idx]
        return x + self.ffn.value(torch.relu(self.ffn.key(h)) ** 2) * rows


@pytest.mark.parametrize("options", [AOT, HOST], ids=["device", "host"])
@pytest.mark.parametrize("tok_indexing", [False, True])
@pytest.mark.parametrize("bad", [VOCAB, -VOCAB - 1])
def test_bad_idx_raises_the_first_lookups_error(options, tok_indexing, bad):
    """The row plan checks idx, so it must run after the lookups eager runs first (the token
    embedding): it ran at the graph input and raised the DeepEmbed spelling's message."""
    torch.manual_seed(0)
    model = _TwoSpellings(tok_indexing)
    if options is HOST:
        runtime.offload_tables(model, select=lambda name, mod: name == "ffn.deepemb")
    compiled, report = _compiled(model, options)
    idx, _ = _batch(seed=1)
    torch.testing.assert_close(compiled(idx), model(idx))
    assert report.counts["deepembed"] == 1
    idx[1, 2] = bad
    with pytest.raises(IndexError) as eager:
        model(idx)
    with pytest.raises(IndexError) as compiled_error:
        compiled(idx)
    assert str(compiled_error.value) == str(eager.value)


def test_active_dropout_on_the_value_projection_is_reported():
    class DropoutChannelMix(ChannelMix):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)

        def forward(self, x, idx):
            return x + self.drop(self.value(torch.relu(self.key(self.ln(x))) ** 2)) * self.deepemb(idx)

    torch.manual_seed(0)
    layer = DropoutChannelMix()
    x, idx = torch.randn(2, 6, D), _batch()[0]
    report = bcpt_compile.explain(layer, x, idx)
    assert report.counts["deepembed"] == 0
    assert [m.reason for m in report.misses] == [
        "dropout on the value projection is active (training): its random mask is not modelled"]
    torch._dynamo.reset()
    layer.eval()
    report = bcpt_compile.explain(layer, x, idx)
    assert report.counts["deepembed"] == 1 and report.misses == []


def test_prefetch_stays_at_the_graph_input_after_a_same_rule_token_embedding():
    """A token embedding with the tables' size and spelling raises the plan's own message, so
    the plan (and the host rows' prefetch) is not moved after it."""
    from bcpt_compile.testing import rewritten_graph

    model, _ = _model(host=True, layers=1)
    lines = rewritten_graph(model, _batch()[0], options=HOST).splitlines()
    first = {name: next(i for i, line in enumerate(lines) if name in line)
             for name in ("row_plan", "prefetch_rows", "embedding", "layer_norm")}
    assert first["row_plan"] < first["prefetch_rows"] < first["embedding"] < first["layer_norm"], lines


def test_host_table_in_a_checkpointed_body_says_why_it_is_not_prefetched():
    """Inside a checkpoint body tables are used where they live: a host table there must not
    be told to set deepembed_tables='cpu', which the user did."""
    import dataclasses

    from bcpt_compile.options import BcptOptions
    from bcpt_compile.passes import deepembed as de_pass

    body = dataclasses.replace(BcptOptions(deepembed_tables="cpu"), deepembed_tables="cpu-no-prefetch")
    reason = de_pass._where(torch.empty(4, 4), torch.device("cuda"), body)
    assert reason.startswith("table is in host memory inside a checkpointed")
    assert de_pass._where(torch.empty(4, 4), torch.device("cuda"), BcptOptions()) == (
        "table is in host memory; deepembed_tables='cpu' prefetches its rows")
