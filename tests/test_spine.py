"""The backend's spine: registration, options, explain, logging, fail-safe, snapshots."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase

import bcpt_compile
from bcpt_compile import passes
from bcpt_compile.testing import rewritten_graph

AOT = {"inner_compiler": "aot_eager", "block_size": 16}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def sigmoid_gated(x, w, k):
    return F.linear(x, w) * torch.sigmoid(x @ k.T)


def test_backend_resolves_without_import():
    code = textwrap.dedent(
        """
        import sys, torch
        assert "bcpt_compile" not in sys.modules
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="bcpt", options={"inner_compiler": "eager"})
        x = torch.randn(5)
        torch.testing.assert_close(f(x), torch.sin(x) * 2)
        assert "bcpt" in torch._dynamo.list_backends()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_unknown_option_lists_valid_ones():
    f = torch.compile(lambda x: x + 1, backend="bcpt", options={"blocksize": 64})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['blocksize'\].*block_size.*density_crossover"):
        f(torch.randn(3))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inner_compiler": "tvm"}, "inner_compiler must be one of"),
        ({"families": ["sbl", "moe"]}, r"unknown families \['moe'\]"),
        ({"block_size": 48}, "block_size must be a power of two"),
        ({"density_crossover": 1.5}, r"density_crossover must lie in \[0, 1\]"),
    ],
)
def test_bad_option_values(options, message):
    with pytest.raises(ValueError, match=message):
        bcpt_compile.BcptOptions.from_user(options)


def test_plain_mlp_explain_counts_zero():
    report = bcpt_compile.explain(MLP(), torch.randn(4, 16))
    assert report.counts == {"sbl": 0, "deepembed": 0, "attention": 0, "prefetch": 0}
    assert report.misses == [] and report.failures == []
    assert "rewritten sites: sbl=0, deepembed=0, attention=0, prefetch=0" in str(report)


def test_near_miss_has_reason_and_source_line():
    x, w, k = torch.randn(8, 16), torch.randn(32, 16), torch.randn(32, 16)
    report = bcpt_compile.explain(sigmoid_gated, x, w, k)
    assert report.counts["sbl"] == 0
    [miss] = report.misses
    assert miss.family == "sbl"
    assert "gate is not provably zero off the mask" in miss.reason and "sigmoid" in miss.reason
    assert "test_spine.py" in miss.source and "torch.sigmoid" in miss.source
    assert "near-misses: 1" in str(report)


def test_plain_mlp_matches_inductor_and_trains():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 16)
    ref = torch.compile(model, backend="inductor")(x)
    out = torch.compile(model, backend="bcpt")(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert model.fc1.weight.grad is not None and torch.isfinite(model.fc1.weight.grad).all()


def _tiny_sbl(x, w, k, g):
    return F.linear(x, w) * F.relu(x @ k.T - g)


def _sbl_args():
    return torch.randn(8, 16), torch.randn(32, 16), torch.randn(32, 16), torch.randn(32)


def test_failing_pass_is_logged_and_graph_left_unmodified(monkeypatch, caplog):
    def broken(gm, opts, report):
        next(iter(gm.graph.nodes)).name = "corrupted"
        raise RuntimeError("boom")

    monkeypatch.setattr(passes, "PASSES", [("sbl", broken)])
    args = _sbl_args()
    with caplog.at_level(logging.WARNING, logger="bcpt_compile"):
        report = bcpt_compile.explain(_tiny_sbl, *args)
    assert report.failures == ["sbl: RuntimeError: boom"]
    assert any("the sbl pass failed" in r.getMessage() for r in caplog.records)
    out = torch.compile(_tiny_sbl, backend="bcpt", options=AOT)(*args)
    torch.testing.assert_close(out, _tiny_sbl(*args))


def test_strict_raises(monkeypatch):
    def broken(gm, opts, report):
        raise RuntimeError("boom")

    monkeypatch.setattr(passes, "PASSES", [("sbl", broken)])
    with pytest.raises(Exception, match="boom"):
        torch.compile(_tiny_sbl, backend="bcpt", options={**AOT, "strict": True})(*_sbl_args())


def test_families_option_turns_a_family_off():
    report = bcpt_compile.explain(_tiny_sbl, *_sbl_args(), options={"families": ["attention"]})
    assert report.counts["sbl"] == 0


def test_logging_switch(caplog):
    bcpt_compile.set_logging(True)
    try:
        with caplog.at_level(logging.INFO, logger="bcpt_compile"):
            bcpt_compile.explain(sigmoid_gated, torch.randn(8, 16), torch.randn(32, 16), torch.randn(32, 16))
        assert any("near-miss [sbl]" in r.getMessage() for r in caplog.records)
    finally:
        bcpt_compile.set_logging(False)
    assert bcpt_compile._logging.log.level == logging.WARNING


class SnapshotTest(TestCase):
    def test_unmatched_graph_is_unchanged(self):
        self.assertExpectedInline(
            rewritten_graph(sigmoid_gated, torch.randn(8, 16), torch.randn(32, 16), torch.randn(32, 16)),
            """\
def forward(self, L_x_, L_w_, L_k_):
    l_x_ = L_x_
    l_w_ = L_w_
    l_k_ = L_k_
    linear = torch._C._nn.linear(l_x_, l_w_)
    getattr_1 = l_k_.T
    matmul = l_x_ @ getattr_1
    sigmoid = torch.sigmoid(matmul)
    mul = linear * sigmoid
    return (mul,)
""",
        )


def test_backward_of_a_rewritten_op_is_its_own_sparse_formula():
    """AOTAutograd traces the op's registered autograd: the backward graph calls
    bcpt.sbl_masked_linear_backward (here its CPU op) and holds no dense matmul for dx or dW."""
    from torch._functorch.aot_autograd import aot_module_simplified

    from bcpt_compile.options import BcptOptions
    from bcpt_compile.passes import run_passes

    graphs = {}

    def capture(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return gm.forward
        return compiler

    def backend(gm, example_inputs):
        run_passes(gm, BcptOptions.from_user({"block_size": 16}))
        return aot_module_simplified(gm, example_inputs, fw_compiler=capture("fw"), bw_compiler=capture("bw"))

    x, w, k, g = (t.requires_grad_() for t in _sbl_args())
    out = torch.compile(_tiny_sbl, backend=backend)(x, w, k, g)
    out.sum().backward()
    bw_targets = {str(n.target) for n in graphs["bw"].graph.nodes if n.op == "call_function"}
    fw_targets = {str(n.target) for n in graphs["fw"].graph.nodes if n.op == "call_function"}
    # both are triton_ops: AOTAutograd decomposes them, on CPU into their opaque CPU ops
    # (on CUDA into the Triton launches themselves: tests/test_cuda_sbl.py)
    assert "bcpt.sbl_masked_linear_backward_cpu.default" in bw_targets
    assert "bcpt.sbl_masked_linear_cpu.default" in fw_targets
    # the only matmuls left are the dense score product x @ k.T and its gradient
    assert sum(t.startswith("aten.mm") for t in fw_targets) <= 1
    dense_bw = [n for n in graphs["bw"].graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.mm")]
    assert len(dense_bw) == 2, [str(n) for n in dense_bw]  # d(x @ k.T) wrt x and k only
    assert x.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()


def test_torch_logs_switch_prints_decisions():
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        def f(x, w, k):
            return F.linear(x, w) * torch.sigmoid(x @ k.T)
        torch.compile(f, backend="bcpt", options={"inner_compiler": "eager"})(
            torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 8))
        """
    )
    env = {**__import__("os").environ, "TORCH_LOGS": "bcpt_compile"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "near-miss [sbl] gate is not provably zero off the mask (call_function sigmoid)" in out.stderr
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "near-miss" not in quiet.stderr  # off by default


def test_source_line_skips_library_frames():
    """A site reached through einops points at the model's line, not einops' internals."""
    from bcpt_compile.report import user_source_line

    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["stack_trace"] = (
        '  File "/home/u/model.py", line 12, in forward\n    out = einsum(p, v, "b h i j, b h j d -> b h i d")\n'
        '  File "/venv/lib/python3.12/site-packages/einops/einops.py", line 907, in einsum\n'
        "    return get_backend(tensors[0]).einsum(pattern, *tensors)\n"
    )
    assert user_source_line(node) == 'model.py:12  out = einsum(p, v, "b h i j, b h j d -> b h i d")'
    node.meta["stack_trace"] = '  File "/venv/site-packages/torch/nn/functional.py", line 3, in linear\n    pass\n'
    assert user_source_line(node) == "functional.py:3  pass"  # only library frames: the last one


class _CheckpointedLM(nn.Module):
    """Tiny-ONN SBL, RWKV DeepEmbed FFN and sliding-window attention, each block wrapped in
    ``torch.utils.checkpoint`` (use_reentrant=False), the SBL block called twice."""

    def __init__(self, d=16, n=32, vocab=20):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.mu = nn.Parameter(torch.randn(n, d, generator=g) / d**0.5)
        self.gate = nn.Parameter(torch.randn(n, generator=g) * 0.2)
        self.out = nn.Linear(n, d)
        self.key = nn.Linear(d, 2 * d, bias=False)
        self.value = nn.Linear(2 * d, d, bias=False)
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)

    def sbl(self, x):
        h = self.ln(x)
        return x + self.out(F.linear(h, self.mu) * F.relu(h @ self.mu.T - self.gate))

    def ffn(self, x, idx):
        return x + self.value(torch.relu(self.key(x)) ** 2) * self.emb(idx)

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        i = torch.arange(t, device=x.device)
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 6)
        s = (q @ k.transpose(-2, -1)) * (d // 2) ** -0.5
        return x + (s.masked_fill(~band, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)

    def forward(self, idx):
        from torch.utils.checkpoint import checkpoint

        x = self.tok(idx)
        x = checkpoint(self.sbl, x, use_reentrant=False)
        x = checkpoint(self.ffn, x, idx, use_reentrant=False)
        x = checkpoint(self.attn, x, use_reentrant=False)
        x = checkpoint(self.sbl, x, use_reentrant=False)
        return x


def test_checkpointed_blocks_are_rewritten_and_match_eager():
    """Dynamo puts a checkpointed block in a subgraph (tag_activation_checkpoint's body): the
    passes go into it (they skipped it: no site in a checkpointed model), and the rewritten
    ops are recomputed in the backward like any other op of the body."""
    import copy

    model = _CheckpointedLM()
    idx = torch.randint(0, 20, (2, 20), generator=torch.Generator().manual_seed(1))
    report = bcpt_compile.explain(model, idx, options={"block_size": 16})
    assert report.counts == {"sbl": 2, "deepembed": 1, "attention": 1, "prefetch": 0}, report
    assert report.graphs == 1 and report.misses == [] and report.failures == []
    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    out = torch.compile(model, backend="bcpt", options=AOT)(idx)
    expected = ref(idx)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    expected.backward(grad)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_triton_helpers_keep_their_own_names():
    """Inductor compiles a traced kernel (a ``triton_op``'s launch) from source, writing each
    ``@triton.jit`` helper it calls under the helper's own ``__name__``: a helper imported under
    an alias (``import grouped_tile as _grouped_tile``) is then undefined there, and the compile
    fails (``NameError``, seen on the H200 when the DeepEmbed forward's fused GEMM won)."""
    import importlib
    import pkgutil

    import bcpt_compile.kernels as kernels

    aliased = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"bcpt_compile.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and callable(fn) and fn.__name__ != name:
                aliased.append(f"{info.name}.{name} is {fn.__name__}")
    assert not aliased, aliased
