"""BCAT clustering and the SBL block-GEMM Triton kernels (interpreter), against float64."""

import pytest
import torch
import torch.nn.functional as F

from bcpt_compile.kernels import bcat_cluster as bc
from bcpt_compile.kernels import sbl_block_gemm as bg
from bcpt_compile.lowering import sbl as sbl_op  # noqa: F401  registers the ops



def op(*args):
    return torch.ops.bcpt.sbl_masked_linear(*args)[0]


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output (and G') starts as NaN: unwritten elements cannot hide."""
    monkeypatch.setattr(bg, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def _inputs(M, N, K, dtype, seed, density_shift=0.3, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    s = (torch.randn(M, N, generator=g) - density_shift).to(dtype)
    return x, w, b, s


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(x, w, b, s, mask=None, threshold=0.0, block=16, crossover=1.0, reorder=False, tol=1e-5, save_product=True,
           keep_layout=False):
    """keep_layout: the leaves keep the inputs' strides and storage offsets (no clone)."""
    leaf = (lambda t: t.detach().requires_grad_()) if keep_layout else (lambda t: t.detach().clone().requires_grad_())
    leaves = [leaf(t) for t in (x, w, s)] + ([leaf(b)] if b is not None else [])
    xl, wl, sl = leaves[:3]
    bl = leaves[3] if b is not None else None
    y = op(xl, wl, bl, sl, mask, threshold, block, crossover, reorder, save_product)
    assert torch.isfinite(y).all()
    d = [t.detach().double().requires_grad_() for t in leaves]
    keep = mask if mask is not None else d[2] > threshold
    ref = F.linear(d[0], d[1], d[3] if b is not None else None) * torch.where(keep, d[2], 0)
    assert _rel(y, ref) < tol
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, cot)
    ref_grads = torch.autograd.grad(ref, d, cot.double())
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert _rel(got, want) < tol


@pytest.mark.parametrize("reorder", [False, True], ids=["fixed", "reordered"])
@pytest.mark.parametrize("M, N, K", [(37, 50, 24), (64, 32, 40), (5, 70, 16), (32, 48, 32)])
def test_fp32_matches_float64(poisoned, M, N, K, reorder):
    _check(*_inputs(M, N, K, torch.float32, seed=M * N), reorder=reorder)


@pytest.mark.parametrize("save_product", [True, False], ids=["saved", "recomputed"])
def test_gate_gradient_saved_or_recomputed_matches_float64(poisoned, save_product):
    """The gate's gradient from the forward's saved product or from a recomputed SDDMM,
    also through the backward's dense crossover and with reordering."""
    _check(*_inputs(37, 50, 24, torch.float32, seed=3), save_product=save_product)
    _check(*_inputs(37, 50, 24, torch.float32, seed=4), crossover=0.3, reorder=True, save_product=save_product)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_matches_float64(poisoned, dtype):
    _check(*_inputs(40, 48, 32, dtype, seed=3), tol=1e-2, reorder=True)


def test_explicit_mask_threshold_and_no_bias(poisoned):
    x, w, _, s = _inputs(33, 40, 24, torch.float32, seed=5, bias=False)
    mask = torch.rand(33, 40, generator=torch.Generator().manual_seed(2)) < 0.2
    _check(x, w, None, s, mask=mask)
    _check(x, w, None, s, threshold=0.7)


@pytest.mark.parametrize("shift", [50.0, -50.0], ids=["empty", "full"])
def test_empty_and_full_masks(poisoned, shift):
    _check(*_inputs(30, 40, 24, torch.float32, seed=9, density_shift=shift))


@pytest.mark.parametrize("reorder", [False, True], ids=["fixed", "reordered"])
@pytest.mark.parametrize("M, N, K", [(30, 40, 24), (37, 70, 40)])
def test_dense_path_above_crossover_matches(poisoned, M, N, K, reorder):
    """crossover 0: the forward's wide-tile dense kernel and the backward's dense loops run
    (the device-side test), with inactive tiles inside wide tiles and ragged edges."""
    x, w, b, s = _inputs(M, N, K, torch.float32, seed=11, density_shift=1.5)
    s[:16, 16:32] = -1.0  # tile (0, 1) inactive, beside the active (0, 0) in one wide tile
    assert not bc.bcat_cluster(s, None, 0.0, 16).tile_active.all()
    _check(x, w, b, s, crossover=0.0, reorder=reorder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K", [(30, 40, 24), (37, 70, 40), (50, 33, 56)])
def test_dense_path_tma_loads_match(poisoned, monkeypatch, M, N, K, dtype):
    """The dense forward's tensor-descriptor loads (Hopper), forced on under the interpreter:
    edge tiles are zero-filled by the descriptor, not masked."""
    monkeypatch.setattr(bg, "DENSE_TMA", True)
    x, w, b, s = _inputs(M, N, K, dtype, seed=12, density_shift=1.5)
    s[:16, 16:32] = -1.0
    bcat = bc.empty_bcat(s, 16, 0.0)
    assert bg._dense_tma((x, w), bcat) and not bg._dense_tma((x.float(), w.float()), bcat)
    assert not bg._dense_tma((x[:, 1:], w[:, 1:]), bcat), "misaligned rows must take pointer loads"
    _check(x, w, b, s, crossover=0.0, tol=1e-2)


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, constexpr kwargs) of each launch from sbl_block_gemm, in order."""
    seen = []

    def recording(kernel, t):
        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append((kernel.fn.__name__, kwargs))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()

    monkeypatch.setattr(bg, "launchable", recording)
    return seen


def _tma_flags(launches):
    return {name: kwargs["TMA"] for name, kwargs in launches if "TMA" in kwargs}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K", [(37, 40, 24), (50, 56, 40)])
def test_dense_backward_tma_loads_match(poisoned, monkeypatch, launches, M, N, K, dtype):
    """crossover 0: the backward's dense dx / dW loops load G', W and x through tensor
    descriptors (forced on under the interpreter); ragged edges are zero-filled by the
    descriptors, and db is summed from the loaded G' tiles."""
    monkeypatch.setattr(bg, "DENSE_TMA", True)
    x, w, b, s = _inputs(M, N, K, dtype, seed=13, density_shift=1.5)
    s[:16, 16:32] = -1.0  # an inactive tile: G' is zero there, the dense loops still read it
    bcat = bc.empty_bcat(s, 16, 0.0)
    g = torch.empty(M, N, dtype=dtype)  # G', as the backward allocates it
    assert bg._dense_tma((g, w), bcat) and bg._dense_tma((g, x), bcat)
    _check(x, w, b, s, crossover=0.0, tol=1e-2)
    assert _tma_flags(launches) == {"_dense_forward_kernel": True, "_dx_kernel": True, "_dw_kernel": True}


@pytest.mark.parametrize("misaligned", ["g", "x"])
def test_dense_backward_refuses_tma_on_misaligned_operands(poisoned, monkeypatch, launches, misaligned):
    """G' rows of N = 70 bf16 elements (140 bytes), or x at a 2-byte storage offset, are not
    16-byte aligned: the kernels loading them take pointer loads, and stay right."""
    monkeypatch.setattr(bg, "DENSE_TMA", True)
    if misaligned == "g":
        x, w, b, s = _inputs(37, 70, 24, torch.bfloat16, seed=14, density_shift=1.5)
        expected = {"_dense_forward_kernel": True, "_dx_kernel": False, "_dw_kernel": False}
    else:
        x, w, b, s = _inputs(37, 40, 24, torch.bfloat16, seed=15, density_shift=1.5)
        x = torch.cat([torch.zeros(37, 1, dtype=x.dtype), x, torch.zeros(37, 7, dtype=x.dtype)], 1)[:, 1:25]
        assert x.stride() == (32, 1) and x.storage_offset() == 1
        expected = {"_dense_forward_kernel": False, "_dx_kernel": True, "_dw_kernel": False}
    bcat = bc.empty_bcat(s, 16, 0.0)
    g = torch.empty(s.shape, dtype=x.dtype)
    assert bg._dense_tma((g, w), bcat) == expected["_dx_kernel"]
    assert not bg._dense_tma((g, x), bcat)
    _check(x, w, b, s, crossover=0.0, tol=1e-2, keep_layout=True)
    assert _tma_flags(launches) == expected


def test_block_diagonal_mask_runs_at_block_diagonal_cost(poisoned):
    M = N = 64
    x, w, b, s = _inputs(M, N, 24, torch.float32, seed=4, density_shift=-0.5)
    diag = torch.block_diag(*[torch.ones(16, 16, dtype=torch.bool)] * 4)
    s = torch.where(diag, s.abs() + 0.1, -1.0)
    bcat = bc.bcat_cluster(s, None, 0.0, 16)
    assert bcat.tile_active.equal(torch.eye(4, dtype=torch.bool))
    assert int(bcat.num_blocks) == 4
    row_counts, row_cols, col_counts, col_rows = bcat.block_lists()
    assert row_counts.tolist() == [1] * 4 and col_counts.tolist() == [1] * 4
    assert row_cols[:, 0].tolist() == [0, 1, 2, 3] and col_rows[:, 0].tolist() == [0, 1, 2, 3]
    _check(x, w, b, s)


def test_block_meta_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(45, 70, generator=g) - 2.0  # sparse: some tiles empty
    bcat = bc.bcat_cluster(s, None, 0.0, 16)
    meta = bcat.block_meta(trim=False)
    n = int(bcat.num_blocks)
    expected = []
    for r in range(0, 45, 16):
        for c in range(0, 70, 16):
            if (s[r:r + 16, c:c + 16] > 0).any():
                expected.append([r, c, min(16, 45 - r), min(16, 70 - c)])
    assert meta[:n].tolist() == expected
    assert not meta[n:].any()
    row_counts, row_cols, col_counts, col_rows = bcat.block_lists()
    active = bcat.tile_active
    for r in range(active.shape[0]):
        cols = active[r].nonzero().flatten().tolist()
        assert row_counts[r] == len(cols) and row_cols[r].tolist() == cols + sorted(set(range(active.shape[1])) - set(cols))
    for c in range(active.shape[1]):
        rows = active[:, c].nonzero().flatten().tolist()
        assert col_counts[c] == len(rows) and col_rows[c, :len(rows)].tolist() == rows
    trimmed = bcat.block_meta(trim=True)[:n]
    for (r0, c0, rl, cl), (r, c, _, _) in zip(trimmed.tolist(), expected):
        rows = (s[r:r + 16, c:c + 16] > 0).any(1).nonzero().flatten()
        assert (r0, rl) == (r + rows.min().item(), (rows.max() - rows.min()).item() + 1) and c0 == c
    values = bcat.block_values(torch.relu(s))
    for k, (r, c, rl, cl) in enumerate(expected):
        assert values[k, :rl, :cl].equal(torch.relu(s)[r:r + rl, c:c + cl])


def test_clustering_is_deterministic():
    s = torch.randn(200, 130, generator=torch.Generator().manual_seed(1)) - 1.0
    a, b = bc.bcat_cluster(s, None, 0.0, 16, reorder=True), bc.bcat_cluster(s, None, 0.0, 16, reorder=True)
    for field in ("tile_bits", "count", "perm", "col_perm"):
        assert getattr(a, field).equal(getattr(b, field)), field
    for la, lb in zip(a.block_lists(), b.block_lists()):
        assert la.equal(lb)


def test_reordering_raises_fill_on_recorded_tiny_onn_masks():
    """Masks recorded from a briefly trained Tiny-ONN-style model (benchmarks/record_sbl_masks.py)."""
    import pathlib

    masks = torch.load(pathlib.Path(__file__).parent / "fixtures" / "sbl_masks.pt")
    r = masks["layer1"].float()
    fixed = bc.bcat_cluster(r, None, 0.0, 16).fill_ratio(r, trim=False)
    defrag = bc.bcat_cluster(r, None, 0.0, 16, reorder=True)
    assert defrag.fill_ratio(r) > 1.8 * fixed, (defrag.fill_ratio(r), fixed)
    # the permutation is a permutation, and R is recovered from the blocks
    assert sorted(defrag.perm.tolist()) == list(range(r.shape[0]))
    assert sorted(defrag.col_perm.tolist()) == list(range(r.shape[1]))


def test_reordering_never_adds_active_tiles_to_a_grid_aligned_mask():
    """Block-structured masks already aligned to the tiles keep the identity order."""
    g = torch.Generator().manual_seed(3)
    tiles = torch.rand(6, 5, generator=g) < 0.3
    s = torch.where(tiles.repeat_interleave(16, 0).repeat_interleave(16, 1), torch.rand(96, 80, generator=g) + 0.1, -1.0)
    fixed = bc.bcat_cluster(s, None, 0.0, 16)
    defrag = bc.bcat_cluster(s, None, 0.0, 16, reorder=True)
    assert int(defrag.num_blocks) == int(fixed.num_blocks) == int(tiles.sum())
    assert defrag.perm.tolist() == list(range(96)) and defrag.col_perm.tolist() == list(range(80))


def test_nan_gate_propagates_like_relu():
    x, w, b, s = _inputs(20, 20, 16, torch.float32, seed=2)
    s[3, 4] = float("nan")
    y = op(x, w, b, s, None, 0.0, 16, 1.0, False)
    ref = F.linear(x, w, b) * torch.relu(s)
    assert torch.isnan(y[3, 4]) and torch.isnan(ref[3, 4])
    keep = ~torch.isnan(ref)
    torch.testing.assert_close(y[keep], ref[keep])


def test_inf_product_off_the_mask_is_zero_not_nan():
    """Documented divergence: eager computes inf * 0 = NaN where R is 0; the block kernels
    never compute the product off R's tiles, so y is 0 there (inside an active tile the
    product is taken and gives NaN, as in eager)."""
    x, w, b, s = _inputs(20, 20, 16, torch.float32, seed=3, density_shift=3.0)
    s[0:16, 0:16] = -1.0  # tile (0, 0) inactive
    s[16:, 0:16] = -1.0
    s[19, 3] = 1.0  # tile (1, 0) active through one element
    x[2, :] = float("inf")
    x[17, :] = float("inf")
    y = op(x, w, b, s, None, 0.0, 16, 0.0, False)
    eager = F.linear(x, w, b) * torch.relu(s)
    assert (y[2, :16] == 0).all() and torch.isnan(eager[2, :16]).all()
    assert torch.isnan(y[17, :16]).all() and torch.isnan(eager[17, :16]).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda x, w, b, s: (x, w[0], b, s, None), "weight must be 2-D"),
        (lambda x, w, b, s: (x[:, :-1], w, b, s, None), "does not match weight's in-features"),
        (lambda x, w, b, s: (x, w, b, s[:, :-1], None), "gate shape .* must equal the output shape"),
        (lambda x, w, b, s: (x, w, b[:-1], s, None), "bias must have shape"),
        (lambda x, w, b, s: (x, w, b, s, s.float()), "mask must be bool"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        op(*args(*_inputs(8, 8, 8, torch.float32, seed=0)), 0.0, 16, 1.0, False)


def test_activation_checkpointing_recomputes_the_same_blocks(poisoned):
    """Checkpointing re-runs the forward in the backward: the recomputed tile state must be
    the one the forward used (deterministic clustering), so gradients equal the plain run."""
    from torch.utils.checkpoint import checkpoint

    x, w, b, s = _inputs(40, 48, 32, torch.float32, seed=8)

    def layer(x, w, b, s):
        return torch.ops.bcpt.sbl_masked_linear(x, w, b, s, None, 0.0, 16, 1.0, True)[0]

    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    plain = torch.autograd.grad(layer(*leaves).square().sum(), leaves)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    ckpt = torch.autograd.grad(checkpoint(layer, *leaves, use_reentrant=False).square().sum(), leaves)
    for a, c in zip(plain, ckpt):
        assert torch.equal(a, c)


def test_float32_gate_with_bfloat16_operands(poisoned):
    """Scores often stay in float32 while the product is bf16: y is float32 (type promotion,
    as eager's ``linear(x, W) * relu(s)``), gradients keep each input's dtype."""
    x, w, b, _ = _inputs(33, 40, 32, torch.bfloat16, seed=12)
    s = torch.randn(33, 40, generator=torch.Generator().manual_seed(4)) - 0.3
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    y = op(*leaves, None, 0.0, 16, 1.0, False)
    assert y.dtype == torch.float32
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    ref = F.linear(*ref_leaves[:3]) * torch.relu(ref_leaves[3])
    assert _rel(y, ref.double()) < 1e-2
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    for got, want, leaf in zip(torch.autograd.grad(y, leaves, cot), torch.autograd.grad(ref, ref_leaves, cot), leaves):
        assert got.dtype == leaf.dtype and _rel(got, want.double()) < 2e-2


def test_backward_gets_no_zero_filled_aux_gradients():
    """The op's aux outputs (tile state, permutations, saved product) take no gradient:
    autograd must not materialise zeros for them (an (M, N) memset per backward)."""
    from torch.profiler import profile

    x, w, b, s = (t.requires_grad_() for t in _inputs(32, 48, 16, torch.float32, seed=1))
    y = op(x, w, b, s, None, 0.0, 16, 1.0, False, True)
    with profile() as prof:
        torch.autograd.grad(y, (x, w, b, s), torch.randn_like(y))
    assert not [e.key for e in prof.key_averages() if e.key in ("aten::zeros", "aten::zero_", "aten::zeros_like")]


def test_triton_allocator_reaches_every_thread(monkeypatch):
    """Device-side descriptors need Triton's scratch allocator in whichever thread launches
    them: the autograd engine's threads recompute checkpointed forwards."""
    import threading

    from triton.runtime import _allocation

    from bcpt_compile import kernels

    import contextvars

    # a process where nobody set one (restored after the test)
    monkeypatch.setattr(_allocation, "_allocator", contextvars.ContextVar("_allocator", default=_allocation._NULL_ALLOCATOR))
    kernels.ensure_triton_allocator()
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_allocation._allocator.get()))
    worker.start()
    worker.join()
    assert seen == [kernels._torch_scratch]

    def mine(size, alignment, stream):
        return None

    import triton

    triton.set_allocator(mine)  # the user's choice still wins, in its thread
    assert _allocation._allocator.get() is mine
    kernels.ensure_triton_allocator()
    assert _allocation._allocator.get() is mine
