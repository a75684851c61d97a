"""The attention pass: which spellings become bcpt ops (snapshots), that compiled equals eager
(outputs and gradients, through aot_eager so the custom ops' own backward runs), and what
``explain`` says about sites it refuses."""

import math

import expecttest
import torch
import torch.nn.functional as F

pytestmark = __import__("pytest").mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")  # triton 3.6 interpreter

from bcpt_compile.explain import explain
from bcpt_compile.testing import rewritten_graph, rewritten_graphs

B, H, T, D, S = 1, 2, 40, 16, 16  # T is not a multiple of the block size
NB = math.ceil(T / S)
OPTS = {"inner_compiler": "aot_eager", "block_size": 16}


def _qkv(dtype=torch.float32, h=H, hkv=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, D, generator=g).to(dtype) for n in (h, hkv, hkv)]


def _importance(seed=1):
    """Block importance with the diagonal block always on top (as DynNSA keeps the local block)."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.randn(B, H, NB, NB, generator=g)
    return imp + 100 * torch.eye(NB)


# --------------------------------------------------------------------------- spellings

def dynnsa_repeat_interleave(q, k, v, imp):
    """Tiny-ONN DynNSA: top-k block mask, repeat_interleave twice, causal, -inf fill."""
    idx = imp.topk(2, dim=-1).indices
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, idx, True)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    m = bm.repeat_interleave(S, dim=-2).repeat_interleave(S, dim=-1)[..., :T, :T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~m, float("-inf")).masked_fill(~causal, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def kron_where_finite(q, k, v, bm):
    """kron expansion of a float block mask, torch.where with a finite fill, softmax in fp32."""
    m = torch.kron(bm.float(), torch.ones(S, S, device=q.device)).bool()[..., :T, :T]
    causal = torch.tril(torch.ones(T, T, device=q.device)).bool()
    s = q @ k.transpose(-2, -1) * 0.3
    s = torch.where(m & causal, s, -1e9)
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def expand_additive_variable_k(q, k, v, imp):
    """Per-query-block k (1 or 2), expand+reshape expansion, additive -inf bias, arange causal."""
    idx = torch.topk(imp, 2, dim=-1)[1]
    keep = torch.arange(2) < (torch.arange(NB) % 2 + 1)[:, None]
    bm = torch.zeros_like(imp, dtype=torch.bool)
    bm.scatter_(-1, idx, keep.expand_as(idx))
    big = bm[:, :, :, None, :, None].expand(B, H, NB, S, NB, S).reshape(B, H, NB * S, NB * S)
    i = torch.arange(T, device=q.device)
    mask = big[:, :, :T, :T] & (i[:, None] >= i[None, :])
    bias = torch.where(mask, 0.0, float("-inf"))
    p = F.softmax(q.matmul(k.mT) * D ** -0.5 + bias, dim=-1)
    return p @ v


def dynnsa_threshold_variable_k(q, k, v, imp):
    """Per-query-block variable k from an importance threshold, mask as a union under masked_fill."""
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    keep = imp.repeat_interleave(S, dim=2).repeat_interleave(S, dim=3)[:, :, :T, :T] >= 0.5
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(~keep | future, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def window_explicit(q, k, v):
    i = torch.arange(T, device=q.device)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 12)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    return s.masked_fill(~band, float("-inf")).softmax(dim=-1) @ v


def window_sdpa_tril_triu(q, k, v):
    band = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().triu(-(7 - 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def window_sdpa_gqa_additive(q, k, v):
    i = torch.arange(T, device=q.device)
    far = (i[None, :] > i[:, None]) | (i[:, None] - i[None, :] >= 20)
    bias = torch.zeros(T, T, device=q.device).masked_fill(far, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.2, enable_gqa=True)


def selected_sdpa_gqa(q, k, v, imp):
    """SDPA with a bool block mask shared by all heads (head dim 1), GQA 4:2, not causal."""
    idx = imp[:, :1].topk(1, dim=-1).indices
    bm = torch.zeros(B, 1, NB, NB, dtype=torch.bool).scatter(-1, idx, True)
    mask = bm.repeat_interleave(S, dim=2).repeat_interleave(S, dim=3)[:, :, :T, :T]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


TF = 64  # the per-token spellings below cut keys into T // S blocks
NBF = TF // S


def nsa_fine_einsum(q, k, v, imp):
    """native-sparse-attention's fine branch written by hand: top-2 blocks per token plus the
    token's own block (causal), gathered, 4-D einsums, one concatenated mask."""
    b, h, t, d = q.shape
    val, idx = imp.topk(2, dim=-1)
    own = (torch.arange(t) // S).view(1, 1, t, 1).expand(b, h, t, 1)
    gidx = torch.cat([idx, own], dim=-1)[..., None, None].expand(b, h, t, 3, S, d)
    kk = k.view(b, h, NBF, S, d).unsqueeze(2).expand(b, h, t, NBF, S, d).gather(3, gidx).flatten(3, 4)
    vv = v.view(b, h, NBF, S, d).unsqueeze(2).expand(b, h, t, NBF, S, d).gather(3, gidx).flatten(3, 4)
    s = torch.einsum("bhtd,bhtjd->bhtj", q, kk) * d ** -0.5
    tril = torch.ones(S, S, dtype=torch.bool).tril().repeat(NBF, 1).expand(b, h, t, S)
    keep = torch.cat([(val > 0.05).repeat_interleave(S, -1), tril], -1)
    return torch.einsum("bhtj,bhtjd->bhtd", s.masked_fill(~keep, float("-inf")).softmax(-1), vv)


def nsa_fine_matmul(q, k, v, imp):
    """Per-token top-2 blocks, no own block (non-causal), torch.gather, matmuls on (..., 1, D)
    rows, torch.where with a finite fill."""
    b, h, t, d = q.shape
    val, idx = torch.topk(imp, 2, dim=-1)
    gidx = idx.unsqueeze(-1).unsqueeze(-1).expand(b, h, t, 2, S, d)
    kk = torch.gather(k.view(b, h, 1, NBF, S, d).expand(b, h, t, NBF, S, d), 3, gidx).reshape(b, h, t, 2 * S, d)
    vv = torch.gather(v.view(b, h, 1, NBF, S, d).expand(b, h, t, NBF, S, d), 3, gidx).reshape(b, h, t, 2 * S, d)
    s = q.unsqueeze(-2) @ kk.transpose(-1, -2) / math.sqrt(d)
    keep = (val > 0.05).repeat_interleave(S, -1).unsqueeze(-2)
    return (torch.softmax(torch.where(keep, s, -1e9), dim=-1) @ vv).squeeze(-2)


def _per_token_inputs(dtype=torch.float32, seed=0):
    """q, k, v at T = TF and a per-token block importance whose best block is always valid."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, TF, D, generator=g).to(dtype) for _ in range(3))
    imp = torch.rand(B, H, TF, NBF, generator=g)
    imp[..., seed % NBF] = 0.9
    return [q, k, v], imp


def mistral_log_band(q, k, v):
    """Mistral's reference: log of a 0/1 tril/triu band as an additive bias (0 / -inf), broadcast
    with [None, None], softmax on scores.float() and cast back with type_as."""
    mask = torch.triu(torch.tril(torch.full((T, T), fill_value=1.0), diagonal=0), diagonal=-10)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D) + torch.log(mask)[None, None, ...]
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)


def llama_full_triu_window(q, k, v):
    """Two full(-inf) biases: triu(1) hides the future, tril(-w) the far past; they add up."""
    future = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    past = torch.full((T, T), float("-inf")).tril(diagonal=-9)
    s = q @ k.transpose(-2, -1) * D ** -0.5 + future + past
    return s.softmax(-1) @ v


def hf_broadcast_band_finfo(q, k, v):
    """HF eager style on (B, T, H, D) inputs: transposes, a bool band broadcast with
    [None, None, :, :], finfo.min fill, float32 softmax cast back, inactive dropout, p.matmul(v)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    i = torch.arange(T, device=q.device)
    mask = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 12))[None, None, :, :]
    attn = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    attn = attn.masked_fill(~mask, torch.finfo(attn.dtype).min)
    attn = F.dropout(F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype), p=0.0, training=False)
    return attn.matmul(v).transpose(1, 2)


def inplace_causal_fill(q, k, v, imp):
    """The causal mask written in place with masked_fill_ (later reads use the same node):
    it must be read, or the block mask alone would be attended."""
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, imp.topk(2, -1).indices, True)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    s.masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    s = torch.where(bm.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T], s, torch.tensor(float("-inf")))
    return s.softmax(-1) @ v


def per_token_key_expanded(q, k, v, imp_tok):
    """Per-token top-2 key blocks expanded along the keys only (query block 1), causal."""
    idx = imp_tok.topk(2, dim=-1).indices
    sel = torch.zeros_like(imp_tok, dtype=torch.bool).scatter(-1, idx, True)
    i = torch.arange(T)
    keep = sel.repeat_interleave(S, dim=-1)[..., :T] & (i[:, None] >= i[None, :])
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    return torch.einsum("bhij,bhjd->bhid", s.masked_fill(~keep, float("-inf")).softmax(-1), v)


def product_bias_plus_causal(q, k, v, imp):
    """A float block mask scattered with 1.0, times a tril of ones (a product of 0/1 masks),
    as (1 - m) * -1e9, plus a zeros.masked_fill causal bias: two biases added in turn."""
    bm = torch.zeros_like(imp).scatter(-1, imp.topk(2, -1).indices, 1.0)
    m = torch.kron(bm, torch.ones(S, S))[..., :T, :T] * torch.ones(T, T).tril()
    causal = torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    s = (q @ k.transpose(-1, -2)) * D ** -0.5 + (1.0 - m) * -1e9 + causal
    return s.softmax(-1) @ v


def tutorial_float_mask_sdpa(q, k, v):
    """The PyTorch tutorial's float mask: m.float().masked_fill(m == 0, -inf).masked_fill(m == 1, 0)."""
    i = torch.arange(T)
    m = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < 8)
    bias = m.float().masked_fill(m == 0, float("-inf")).masked_fill(m == 1, float(0.0))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).unsqueeze(0))


# --------------------------------------------------------------------------- other layouts

def _band(t=T, w=12):
    i = torch.arange(t)
    return (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)


def bthd_einsum_band(q, k, v):
    """(B, T, H, D) inputs, einsums that name the heads in place, finfo.min fill; output (B, T, H, D)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
    s = s.masked_fill(~_band(), torch.finfo(s.dtype).min)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(dim=-1), v)


def bthd_einsum_block_transposed_out(q, k, v, imp):
    """(B, T, H, D) inputs, other letters, a top-k block mask; output (B, H, T, D) transposed back."""
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, imp.topk(2, -1).indices, True)
    m = bm.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T] & torch.ones(T, T, dtype=torch.bool).tril()
    s = torch.einsum("nixc,njxc->nxij", q, k) / math.sqrt(D)
    return torch.einsum("nxij,njxc->nxic", s.masked_fill(~m, float("-inf")).softmax(-1), v).transpose(1, 2)


def grouped_gqa_einsum(q, k, v, imp):
    """q viewed (B, H_kv, G, T, D), einops' grouped einsums, a block mask shared by the group
    (its group dim is 1), causal."""
    b, h, t, d = q.shape
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, imp.topk(2, -1).indices, True)[:, :, None]
    m = bm.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T] & torch.ones(T, T, dtype=torch.bool).tril()
    s = torch.einsum("bhgid,bhjd->bhgij", q.view(b, k.shape[1], -1, t, d), k) * d ** -0.5
    out = torch.einsum("bhgij,bhjd->bhgid", s.masked_fill(~m, float("-inf")).softmax(-1), v)
    return out.reshape(b, h, t, d)


def ellipsis_einsum(q, k, v):
    s = torch.einsum("...id,...jd->...ij", q, k) / math.sqrt(D)
    return torch.einsum("...ij,...jd->...id", s.masked_fill(~_band(), float("-inf")).softmax(-1), v)


def bmm_repeated_band(q, k, v):
    """3-D bmm on (B*H, T, D), a (T, T) band repeated to (B*H, T, T)."""
    b, h, t, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5
    s = s.masked_fill(~_band().repeat(b * h, 1, 1), float("-inf"))
    return torch.bmm(s.softmax(-1), v3).view(b, h, t, d)


def bmm_block_per_head(q, k, v, imp):
    """3-D bmm, a (B*H, NB, NB) block mask expanded to (B*H, T, T), causal broadcast over B*H."""
    b, h, t, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, imp.topk(2, -1).indices, True).reshape(b * h, NB, NB)
    m = bm.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T] & torch.ones(T, T, dtype=torch.bool).tril()
    s = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5
    return torch.bmm(s.masked_fill(~m, float("-inf")).softmax(-1), v3).view(b, h, t, d)


def baddbmm_flattened_mask(q, k, v):
    """HF-style baddbmm(empty, q, k^T, beta=0, alpha=scale), a (B, H, T, T) band flattened to
    (B*H, T, T), torch.where with finfo.min."""
    b, h, t, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
    s = torch.baddbmm(torch.empty(b * h, t, t), q3, k3.transpose(1, 2), beta=0, alpha=d ** -0.5)
    m = _band()[None, None].expand(b, h, t, t).reshape(b * h, t, t)
    return torch.bmm(torch.where(m, s, torch.finfo(s.dtype).min).softmax(-1), v3).view(b, h, t, d)


def gpt2_upcast_reordered(q, k, v):
    """GPT-2's _upcast_and_reordered_attn: baddbmm on (B*H, T, D) in fp32, the scores reshaped to
    (B, H, T, T) before the mask, matmul with the 4-D v."""
    b, h, t, d = q.shape
    w = torch.empty(b * h, t, t, dtype=torch.float32)
    q3, k3 = q.reshape(-1, t, d), k.transpose(-1, -2).reshape(-1, d, t)
    w = torch.baddbmm(w, q3.float(), k3.float(), beta=0, alpha=1.0 / float(d) ** 0.5).reshape(b, h, t, t)
    w = torch.where(_band()[None, None], w, torch.finfo(w.dtype).min)
    return torch.matmul(w.softmax(dim=-1).type(v.dtype), v)


def bloom_baddbmm_view(q, k, v):
    """Bloom: bias.baddbmm(q, k, beta=1, alpha) with a zero bias (no ALiBi), scores viewed as
    (B, H, T, T) for the mask, probabilities viewed back to (B*H, T, T) for bmm."""
    b, h, t, d = q.shape
    q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, t, d).transpose(1, 2), v.reshape(b * h, t, d)
    s = torch.zeros(b * h, 1, t).baddbmm(q3, k3, beta=1.0, alpha=d ** -0.5)
    s = s.view(b, h, t, t).masked_fill(~_band()[None, None], torch.finfo(s.dtype).min)
    return torch.bmm(F.softmax(s, dim=-1).view(b * h, t, t), v3).view(b, h, t, d)


def hf_make_causal_mask_window(q, k, v):
    """HF 4.36's _make_causal_mask with a sliding window: full(min) with in-place masked_fill_ of the
    causal part and of the keys beyond the window, cast, expanded, cropped, added; fp32 softmax."""
    t = q.shape[-2]
    mask = torch.full((t, t), torch.finfo(q.dtype).min)
    cond = torch.arange(mask.size(-1))
    mask.masked_fill_(cond < (cond + 1).view(mask.size(-1), 1), 0)
    mask = mask.to(q.dtype)
    mask.masked_fill_(torch.tril(torch.ones_like(mask, dtype=torch.bool), diagonal=-11), torch.finfo(q.dtype).min)
    mask = mask[None, None, :, :].expand(q.shape[0], 1, t, t)
    w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask[:, :, :, :k.shape[-2]]
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(w, p=0.1, training=False), v)


def hf_cache_position_window(q, k, v):
    """HF 4.4x's cache-position mask: full(min) *= (future | beyond the window), bitwise_or_ in place."""
    t = q.shape[-2]
    cache_position = torch.arange(0, t)
    mask = torch.full((t, t), fill_value=torch.finfo(q.dtype).min, dtype=q.dtype)
    attend = torch.arange(t) > cache_position.reshape(-1, 1)
    attend.bitwise_or_(torch.arange(t) <= (cache_position.reshape(-1, 1) - 9))
    mask *= attend
    mask = mask[None, None, :, :].expand(q.shape[0], 1, -1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, :, :t])


def hf_vmap_mask_function_window(q, k, v):
    """HF 4.5x's ``masking_utils`` with torch >= 2.6: mask functions of (batch, head, q, kv)
    indices combined with ``&`` and mapped over a 4-D grid by nested ``torch.vmap``
    (causal and a sliding window of 12, as Mistral / Qwen2 build theirs)."""
    t = q.shape[-2]

    def causal(b, h, qi, kv):
        return kv <= qi

    def window(b, h, qi, kv):
        return kv > qi - 12

    def both(b, h, qi, kv):
        result = qi.new_ones((), dtype=torch.bool)
        for fn in (window, causal):
            result = result & fn(b, h, qi, kv).to(result.device)
        return result

    grid = both
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        grid = torch.vmap(grid, in_dims=dims, out_dims=0)
    mask = grid(torch.arange(q.shape[0]), torch.arange(1), torch.arange(t), torch.arange(t))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def index_grid_4d_window(q, k, v):
    """Mask-function style: 4-D broadcast index grids, kv <= q and kv > q - w, as an SDPA bool mask."""
    t = q.shape[-2]
    q_idx, kv_idx = torch.arange(t)[None, None, :, None], torch.arange(t)[None, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=((kv_idx <= q_idx) & (kv_idx > q_idx - 10)))


def loop_and_abs_window(q, k, v):
    """A mask filled row by row in a loop, and a causal bound next to ``abs(i - j) < w``."""
    t = q.shape[-2]
    m = torch.zeros(t, t, dtype=torch.bool)
    for r in range(t):
        m[r, max(0, r - 12): r + 1] = True
    pos = torch.arange(t)
    rel = pos[:, None] - pos[None, :]
    near = (rel >= 0) & (rel.abs() < 8)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    s = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~near, float("-inf"))
    return a + torch.softmax(s.float(), dim=-1).type_as(q) @ v


MOBA_T, MOBA_H = 64, 2


def moba_gate_bias(q, k, v):
    """MoBA's naive reference on (T, H, D): per-token gate over mean-pooled key chunks (future chunks
    -inf, own chunk +inf), top-k, where(keep, 0, -inf) repeated over each chunk's keys, a causal
    masked_fill_ in place on that bias, ``qk += gate; qk *= scale``."""
    S = 16
    t, h, d = q.shape
    gate = torch.einsum("shd,nhd->hsn", q.float(), k.view(t // S, S, h, d).mean(1).float())
    tok, blk = torch.arange(t)[:, None], torch.arange(t // S)[None, :]
    gate = gate.masked_fill(((blk + 1) * S > tok)[None], float("-inf")).masked_fill((blk == tok // S)[None], float("inf"))
    val, idx = torch.topk(gate, k=2, dim=-1)
    keep = (gate >= val.min(dim=-1).values.unsqueeze(-1)) & torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, idx, True)
    bias = torch.where(keep, 0.0, float("-inf")).repeat_interleave(S, dim=-1)[:, :, :t]
    bias.masked_fill_(torch.ones(t, t, dtype=torch.bool).tril().logical_not().unsqueeze(0), float("-inf"))
    qk = torch.einsum("xhd,yhd->hxy", q.float(), k.float())
    qk += bias
    qk *= d ** -0.5
    return torch.einsum("hxy,yhd->xhd", qk.softmax(dim=-1), v.float()).type_as(q)


def moba_setitem_gate(q, k, v):
    """MoBA's naive reference as published: the gate's future chunks -inf and own chunk +inf written
    in a Python loop, top-k, then ``gate[need] = 0; gate[~need] = -inf`` (every entry overwritten:
    where(need, 0, -inf)), repeated over each chunk's keys, a causal masked_fill_ built with
    ``ones_like(gate)``."""
    S = 16
    t, h, d = q.shape
    nb = t // S
    gate = torch.einsum("shd,nhd->hsn", q.float(), k.view(nb, S, h, d).mean(1).float())
    for i in range(nb):
        gate[:, : (i + 1) * S, i] = float("-inf")
        gate[:, i * S: (i + 1) * S, i] = float("inf")
    val, idx = torch.topk(gate, k=1, dim=-1, largest=True, sorted=False)
    need = gate >= val.min(dim=-1).values.unsqueeze(-1)
    need = need & torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, idx, True)
    gate[need] = 0
    gate[~need] = -float("inf")
    gate = gate.repeat_interleave(S, dim=-1)[:, :, :t]
    gate.masked_fill_(torch.ones_like(gate, dtype=torch.bool).tril().logical_not(), -float("inf"))
    qk = torch.einsum("xhd,yhd->hxy", q.float(), k.float())
    qk += gate
    qk *= d ** -0.5
    return torch.einsum("hxy,yhd->xhd", qk.softmax(dim=-1), v.float()).type_as(q)


def scores_setitem_masks(q, k, v, imp):
    """Masks written into the scores by setitem with bool masks (``s[~m] = -inf``, ``s[:, :, m] = -big``)."""
    idx = imp.topk(2, -1).indices
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, idx, True)
    m = bm.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T]
    i = torch.arange(T)
    s = q @ k.transpose(-1, -2) * 0.25
    s[~m] = float("-inf")
    s[:, :, i[:, None] < i[None, :]] = -1e9
    return s.softmax(-1) @ v


def scores_setitem_band(q, k, v):
    i = torch.arange(T)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 12)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s[..., ~band] = float("-inf")
    return s.softmax(-1) @ v


def constant_block_local_causal(q, k, v):
    """A block-diagonal causal mask from index arithmetic (T = 40: the last block is partial)."""
    i = torch.arange(T)
    local = ((i[:, None] // S) == (i[None, :] // S)) & (i[:, None] >= i[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=local)


def bigbird_like_bias(q, k, v):
    """A fixed BigBird/Longformer-like block layout (own block + a global first block) filled in a
    Python loop, expanded with kron, as a (1 - mask) * -10000 bias; not causal."""
    layout = torch.zeros(NB, NB)
    for r in range(NB):
        layout[r, r] = 1
    layout[0, :] = 1
    layout[:, 0] = 1
    mask = torch.kron(layout, torch.ones(S, S))[:T, :T]
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + (1.0 - mask) * -10000.0
    return torch.softmax(s, -1) @ v


def tril_block_layout_per_head(q, k, v):
    """A per-head block layout: ``ones.tril()`` edited in place (head 0 skips block 0 but its own),
    expanded with repeat_interleave, under a causal bound."""
    layout = torch.ones(H, NB, NB, dtype=torch.bool).tril()
    layout[0, 1:, 0] = False
    m = layout.repeat_interleave(S, 1).repeat_interleave(S, 2)[:, :T, :T]
    s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~m, float("-inf"))
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def llama4_chunked_causal(q, k, v):
    """Llama 4's chunked attention: causal inside chunks of 32 tokens (block size 32, not the 16 the
    other spellings use)."""
    i = torch.arange(TF)
    m = (i[:, None] // 32 == i[None, :] // 32) & (i[None, :] <= i[:, None])
    s = q @ k.transpose(-2, -1) / math.sqrt(D)
    return s.masked_fill(~m, torch.finfo(s.dtype).min).softmax(-1) @ v


def einops_repeat_block_mask(q, k, v, imp):
    """einops.repeat of a top-k block mask ('b h i j -> b h (i s1) (j s2)'): Dynamo's unsqueeze,
    expand, reshape."""
    import einops

    idx = imp.topk(2, -1).indices
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, idx, True)
    m = einops.repeat(bm, "b h i j -> b h (i s1) (j s2)", s1=S, s2=S)[..., :T, :T]
    s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * D ** -0.5
    s = s.masked_fill(~(m & torch.ones(T, T, dtype=torch.bool).tril()), -torch.finfo(s.dtype).max)
    return torch.einsum("b h i j, b h j d -> b h i d", s.softmax(-1), v)


def _per_token_importance(seed=5):
    """(B, H, T, NB) per-token block importance whose first block is always selected."""
    imp = torch.rand(B, H, T, NB, generator=torch.Generator().manual_seed(seed))
    imp[..., 0] = 2.0
    return imp


# --------------------------------------------------------------------------- helpers

def _compiled_vs_eager(fn, tensors, extra=(), rtol=1e-4):
    ins = [t.clone().requires_grad_(True) for t in tensors]
    ref = [t.clone().requires_grad_(True) for t in tensors]
    g = torch.Generator().manual_seed(42)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="bcpt", options=OPTS)(*ins, *extra)
    expected = fn(*ref, *extra)
    assert torch.isfinite(expected).all(), "the test inputs must keep eager defined (no empty rows)"
    grad = torch.randn(expected.shape, generator=g).to(expected.dtype)
    out.backward(grad)
    expected.backward(grad)
    pairs = [("out", out, expected)] + [(f"grad{i}", a.grad, b.grad) for i, (a, b) in enumerate(zip(ins, ref))]
    for name, a, b in pairs:
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        assert err <= rtol, (name, err)


def _sites(fn, *args):
    _, report = rewritten_graphs(fn, *args)
    return report


class TestAttentionPass(expecttest.TestCase):
    def test_dynnsa_repeat_interleave_uses_the_topk_indices(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(dynnsa_repeat_interleave, q, k, v, _importance()), """\
def forward(self, L_imp_, L_q_, L_k_, L_v_):
    l_imp_ = L_imp_
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    topk = l_imp_.topk(2, dim = -1)
    idx = topk[1]
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(idx, 1, 2)
    getitem_3 = topk_to_indices[0]
    getitem_4 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_3, getitem_4, 16, 16, True, 0.25)
    getitem_5 = nsa_selected_attention_default[0]
    return (getitem_5,)
""")
        _compiled_vs_eager(dynnsa_repeat_interleave, [q, k, v], (_importance(),))

    def test_kron_where_finite_fill_converts_the_block_mask_on_device(self):
        q, k, v = _qkv()
        bm = torch.rand(B, H, NB, NB, generator=torch.Generator().manual_seed(3)) < 0.5
        bm |= torch.eye(NB, dtype=torch.bool)
        self.assertExpectedInline(rewritten_graph(kron_where_finite, q, k, v, bm), """\
def forward(self, L_bm_, L_q_, L_k_, L_v_):
    l_bm_ = L_bm_
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    block_mask_to_indices = bcpt_compile_lowering_attention_block_mask_to_indices(l_bm_, 1, 2)
    getitem_1 = block_mask_to_indices[0]
    getitem_2 = block_mask_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_1, getitem_2, 16, 16, True, 0.3)
    getitem_3 = nsa_selected_attention_default[0]
    return (getitem_3,)
""")
        _compiled_vs_eager(kron_where_finite, [q, k, v], (bm,))

    def test_expand_reshape_additive_bias_variable_k(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(expand_additive_variable_k, q, k, v, _importance()), """\
def forward(self, L_imp_, L_q_, L_k_, L_v_):
    l_imp_ = L_imp_
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    topk = torch.topk(l_imp_, 2, dim = -1)
    idx = topk[1]
    arange = torch.arange(2)
    arange_1 = torch.arange(3)
    mod = arange_1 % 2
    add = mod + 1
    getitem_2 = add[(slice(None, None, None), None)]
    keep = arange < getitem_2
    bm = torch.zeros_like(l_imp_, dtype = torch.bool)
    expand_as = keep.expand_as(idx)
    scatter_ = bm.scatter_(-1, idx, expand_as)
    where_1 = torch.where(expand_as, idx, -1)
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(where_1, 1, 2)
    getitem_7 = topk_to_indices[0]
    getitem_8 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_7, getitem_8, 16, 16, True, 0.25)
    getitem_9 = nsa_selected_attention_default[0]
    return (getitem_9,)
""")
        _compiled_vs_eager(expand_additive_variable_k, [q, k, v], (_importance(),))

    def test_dynnsa_threshold_variable_k(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(dynnsa_threshold_variable_k, q, k, v, _importance()), """\
def forward(self, L_k_, L_q_, L_imp_, L_v_):
    l_k_ = L_k_
    l_q_ = L_q_
    l_imp_ = L_imp_
    l_v_ = L_v_
    ge_1 = torch.ge(l_imp_, 0.5)
    block_mask_to_indices = bcpt_compile_lowering_attention_block_mask_to_indices(ge_1, 1, 2)
    getitem_1 = block_mask_to_indices[0]
    getitem_2 = block_mask_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_1, getitem_2, 16, 16, True, 0.25)
    getitem_3 = nsa_selected_attention_default[0]
    return (getitem_3,)
""")
        _compiled_vs_eager(dynnsa_threshold_variable_k, [q, k, v], (_importance(),))

    def test_dynnsa_bf16(self):
        q, k, v = _qkv(torch.bfloat16)
        _compiled_vs_eager(dynnsa_repeat_interleave, [q, k, v], (_importance(),), rtol=1e-2)

    def test_selected_sdpa_gqa_block_mask_shared_by_heads(self):
        q, k, v = _qkv(h=4, hkv=2)
        self.assertExpectedInline(rewritten_graph(selected_sdpa_gqa, q, k, v, _importance()), """\
def forward(self, L_imp_, L_q_, L_k_, L_v_):
    l_imp_ = L_imp_
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    getitem = l_imp_[(slice(None, None, None), slice(None, 1, None))]
    topk = getitem.topk(1, dim = -1)
    idx = topk[1]
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(idx, 1, 2)
    getitem_4 = topk_to_indices[0]
    getitem_5 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_4, getitem_5, 16, 16, False, 0.25)
    getitem_6 = nsa_selected_attention_default[0]
    return (getitem_6,)
""")
        _compiled_vs_eager(selected_sdpa_gqa, [q, k, v], (_importance(),))

    def test_window_explicit_softmax(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(window_explicit, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 12, 0.25)
    getitem_4 = sliding_window_attention_default[0]
    return (getitem_4,)
""")
        _compiled_vs_eager(window_explicit, [q, k, v])

    def test_window_sdpa_bool_band_from_tril_triu(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(window_sdpa_tril_triu, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 7, 0.25)
    getitem = sliding_window_attention_default[0]
    return (getitem,)
""")
        _compiled_vs_eager(window_sdpa_tril_triu, [q, k, v])

    def test_window_sdpa_gqa_additive_mask(self):
        q, k, v = _qkv(h=4, hkv=2)
        self.assertExpectedInline(rewritten_graph(window_sdpa_gqa_additive, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 20, 0.2)
    getitem_4 = sliding_window_attention_default[0]
    return (getitem_4,)
""")
        _compiled_vs_eager(window_sdpa_gqa_additive, [q, k, v])

    def test_per_token_selection_gathered_einsum_becomes_own_block_selected_attention(self):
        """The gathers, the concatenated mask and the own block's tril are proven on probes;
        the op gets the top-k indices (invalid entries -1) and sees the own block itself."""
        (q, k, v), imp = _per_token_inputs()
        self.assertExpectedInline(rewritten_graph(nsa_fine_einsum, q, k, v, imp), """\
def forward(self, L_q_, L_imp_, L_k_, L_v_):
    l_q_ = L_q_
    l_imp_ = L_imp_
    l_k_ = L_k_
    l_v_ = L_v_
    topk = l_imp_.topk(2, dim = -1)
    val = topk[0]
    idx = topk[1]
    gt = val > 0.05
    where = torch.where(gt, idx, -1)
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(where, 1, 2)
    getitem_3 = topk_to_indices[0]
    getitem_4 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_3, getitem_4, 16, 1, False, 0.25, True)
    getitem_5 = nsa_selected_attention_default[0]
    return (getitem_5,)
""")
        _compiled_vs_eager(nsa_fine_einsum, [q, k, v], (imp,))

    def test_per_token_selection_gathered_matmul_without_own_block(self):
        (q, k, v), imp = _per_token_inputs(seed=1)
        self.assertExpectedInline(rewritten_graph(nsa_fine_matmul, q, k, v, imp), """\
def forward(self, L_q_, L_imp_, L_k_, L_v_):
    l_q_ = L_q_
    l_imp_ = L_imp_
    l_k_ = L_k_
    l_v_ = L_v_
    topk = torch.topk(l_imp_, 2, dim = -1)
    val = topk[0]
    idx = topk[1]
    gt = val > 0.05
    where_1 = torch.where(gt, idx, -1)
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(where_1, 1, 2)
    getitem_2 = topk_to_indices[0]
    getitem_3 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_2, getitem_3, 16, 1, False, 0.25, False)
    getitem_4 = nsa_selected_attention_default[0]
    return (getitem_4,)
""")
        _compiled_vs_eager(nsa_fine_matmul, [q, k, v], (imp,))

    def test_per_token_selection_bf16(self):
        (q, k, v), imp = _per_token_inputs(torch.bfloat16, seed=2)
        _compiled_vs_eager(nsa_fine_einsum, [q, k, v], (imp,), rtol=1e-2)

    def test_per_token_near_misses_name_their_reason(self):
        (q, k, v), imp = _per_token_inputs(seed=3)

        def misses(q, k, v, imp):
            b, h, t, d = q.shape
            val, idx = imp.topk(2, dim=-1)
            own = (torch.arange(t) // S).view(1, 1, t, 1).expand(b, h, t, 1)
            gidx = torch.cat([idx, own], dim=-1)[..., None, None].expand(b, h, t, 3, S, d)
            kk = k.view(b, h, 1, NBF, S, d).expand(b, h, t, NBF, S, d).gather(3, gidx).flatten(3, 4)
            vv = v.view(b, h, 1, NBF, S, d).expand(b, h, t, NBF, S, d).gather(3, gidx).flatten(3, 4)
            valid = (val > 0.05).repeat_interleave(S, -1)
            tril = torch.ones(S, S, dtype=torch.bool).tril().repeat(NBF, 1).expand(b, h, t, S)
            ones = torch.ones(b, h, t, S, dtype=torch.bool)

            def attend(kk, keep):
                s = torch.einsum("bhtd,bhtjd->bhtj", q, kk).masked_fill(~keep, float("-inf"))
                return torch.einsum("bhtj,bhtjd->bhtd", s.softmax(-1), vv)

            return (attend(kk, torch.cat([valid, ones], -1)),                        # own block whole
                    attend(kk * 2.0, torch.cat([valid, tril], -1)),                  # keys scaled after the gather
                    attend(kk, torch.cat([valid.roll(S, -1), tril], -1)))            # validity of another slot

        report = explain(misses, q, k, v, imp)
        self.assertEqual(report.counts["attention"], 0)
        self.assertExpectedInline("\n".join(sorted(m.reason for m in report.misses)), """\
gathered attention: a constant key block is visible that is not the query's own block up to itself
gathered attention: a selected slot is not masked by its own entry's validity
gathered attention: the values are gathered but the keys are computed on after their gather (e.g. differentiable top-k gates)""")

    def test_per_token_selection_with_zero_padded_keys(self):
        """T = 56 is padded to 4 blocks of 16 with F.pad: the op masks the padding, eager
        attends it (score 0, value 0) when the partial block is selected, so a top-k that can
        pick it is refused and one over the 3 whole blocks is rewritten."""
        g = torch.Generator().manual_seed(6)
        q, k, v = (torch.randn(B, H, 56, D, generator=g) for _ in range(3))
        imp = torch.rand(B, H, 56, 4, generator=g)

        def padded(q, k, v, imp, blocks):
            b, h, t, d = q.shape
            k, v = (F.pad(x, (0, 0, 0, 64 - t)) for x in (k, v))
            idx = imp[..., :blocks].topk(2, dim=-1).indices[..., None, None].expand(b, h, t, 2, S, d)
            kk = k.view(b, h, 1, 4, S, d).expand(b, h, t, 4, S, d).gather(3, idx).flatten(3, 4)
            vv = v.view(b, h, 1, 4, S, d).expand(b, h, t, 4, S, d).gather(3, idx).flatten(3, 4)
            return torch.einsum("bhtj,bhtjd->bhtd", torch.einsum("bhtd,bhtjd->bhtj", q, kk).softmax(-1), vv)

        def all_blocks(q, k, v, imp):
            return padded(q, k, v, imp, 4)

        def whole_blocks(q, k, v, imp):
            return padded(q, k, v, imp, 3)

        report = explain(all_blocks, q, k, v, imp)
        self.assertEqual([m.reason for m in report.misses], [
            "gathered attention: the last, partial key block can be selected, and eager attends its zero padding"])
        self.assertEqual(report.counts["attention"], 0)
        torch._dynamo.reset()
        self.assertEqual([s.op for s in explain(whole_blocks, q, k, v, imp).sites], ["bcpt.nsa_selected_attention"])
        _compiled_vs_eager(whole_blocks, [q, k, v], (imp,))

    def test_explain_counts_per_token_sites(self):
        (q, k, v), imp = _per_token_inputs(seed=4)

        def model(q, k, v, imp):
            return nsa_fine_einsum(q, k, v, imp) + nsa_fine_matmul(q, k, v, imp) + F.scaled_dot_product_attention(
                q, k, v, attn_mask=torch.ones(TF, TF, dtype=torch.bool).tril().triu(-15))

        report = explain(model, q, k, v, imp)
        self.assertEqual(report.counts["attention"], 3)
        self.assertEqual([s.op for s in report.sites], ["bcpt.nsa_selected_attention", "bcpt.nsa_selected_attention",
                                                        "bcpt.sliding_window_attention"])
        self.assertEqual(report.misses, [])

    def test_plain_and_causal_attention_stay_dense_and_are_not_reported(self):
        q, k, v = _qkv()

        def plain(q, k, v):
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            b = (q @ k.mT).masked_fill(~causal, float("-inf")).softmax(-1) @ v
            return a + b + F.scaled_dot_product_attention(q, k, v)

        report = _sites(plain, q, k, v)
        self.assertEqual(report.counts["attention"], 0)
        self.assertEqual([m for m in report.misses if m.family == "attention"], [])

    def test_near_misses_name_their_reason(self):
        q, k, v = _qkv()
        q4 = torch.randn(B, 4, T, D)
        k2 = torch.randn(B, 2, T, D)

        def misses(q, k, v, user_mask, q4, k2, imp):
            i = torch.arange(T)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=user_mask)         # graph input
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 9)
            probs = (q @ k.mT).masked_fill(~band, float("-inf")).softmax(-1)
            b = probs @ v                                                             # probs returned
            sym = (i[:, None] - i[None, :]).abs() < 5                                 # two-sided band
            c = F.scaled_dot_product_attention(q, k, v, attn_mask=sym)
            bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, imp.topk(2, -1).indices, True)
            m8 = bm.repeat_interleave(8, -2).repeat_interleave(8, -1)                 # block 8 (T=40 -> 5 x 5)
            d = F.scaled_dot_product_attention(q, k, v, attn_mask=m8[..., :T, :T])
            e = F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=0.1)
            bm4 = torch.zeros(B, 4, NB, NB, dtype=torch.bool).scatter(-1, torch.zeros(B, 4, NB, 1, dtype=torch.long), True)
            m4 = bm4.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T]
            f = F.scaled_dot_product_attention(q4, k2, k2, attn_mask=m4, enable_gqa=True)
            return a, b, probs, c, d, e, f

        imp5 = torch.randn(B, H, 5, 5)
        report = explain(misses, q, k, v, torch.ones(T, T, dtype=torch.bool).tril(), q4, k2, imp5)
        self.assertEqual(report.counts["attention"], 0)
        reasons = sorted(m.reason for m in report.misses if m.family == "attention")
        self.assertExpectedInline("\n".join(reasons), """\
block mask has 4 heads but K/V have 2: the query heads of a KV group do not share one selection
block size 8 is not a power of two >= 16
diagonal band -4 <= j - i <= 4 is not a causal sliding window (keys up to i+4 visible: the window kernel is causal only)
dropout_p=0.1 is not supported
mask term 'L_user_mask_' is a graph input (passed in, or built before a graph break), its pattern cannot be read at compile time
the attention probabilities have other users (the dense T x T matrix is needed anyway)""")

    def test_mistral_log_band_bias(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(mistral_log_band, q, k, v), """\
def forward(self, L_k_, L_q_, L_v_):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 11, 0.25)
    getitem_1 = sliding_window_attention_default[0]
    return (getitem_1,)
""")
        _compiled_vs_eager(mistral_log_band, [q, k, v])

    def test_llama_full_triu_and_tril_biases_add_up_to_a_window(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(llama_full_triu_window, q, k, v), """\
def forward(self, L_k_, L_q_, L_v_):
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 9, 0.25)
    getitem = sliding_window_attention_default[0]
    return (getitem,)
""")
        _compiled_vs_eager(llama_full_triu_window, [q, k, v])

    def test_hf_broadcast_band_on_bthd_inputs(self):
        q, k, v = (t.transpose(1, 2).contiguous() for t in _qkv())
        self.assertExpectedInline(rewritten_graph(hf_broadcast_band_finfo, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q = l_q_.transpose(1, 2)
    k = l_k_.transpose(1, 2)
    v = l_v_.transpose(1, 2)
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(q, k, v, 12, 0.25)
    getitem_5 = sliding_window_attention_default[0]
    transpose_4 = getitem_5.transpose(1, 2)
    return (transpose_4,)
""")
        _compiled_vs_eager(hf_broadcast_band_finfo, [q, k, v])

    def test_inplace_masked_fill_is_part_of_the_mask(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(inplace_causal_fill, q, k, v, _importance()), """\
def forward(self, L_imp_, L_k_, L_q_, L_v_):
    l_imp_ = L_imp_
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    topk = l_imp_.topk(2, -1)
    getitem_1 = topk[1]
    transpose = l_k_.transpose(-1, -2)
    matmul = l_q_ @ transpose
    s = matmul * 0.25
    ones = torch.ones(40, 40, dtype = torch.bool)
    tril = ones.tril()
    invert = ~tril
    masked_fill_ = s.masked_fill_(invert, -inf)
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(getitem_1, 1, 2)
    getitem_3 = topk_to_indices[0]
    getitem_4 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_3, getitem_4, 16, 16, True, 0.25)
    getitem_5 = nsa_selected_attention_default[0]
    return (getitem_5,)
""")
        _compiled_vs_eager(inplace_causal_fill, [q, k, v], (_importance(),))

    def test_per_token_key_expanded_mask_is_query_block_one(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(per_token_key_expanded, q, k, v, _per_token_importance()), """\
def forward(self, L_imp_tok_, L_q_, L_k_, L_v_):
    l_imp_tok_ = L_imp_tok_
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    topk = l_imp_tok_.topk(2, dim = -1)
    idx = topk[1]
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(idx, 1, 2)
    getitem_5 = topk_to_indices[0]
    getitem_6 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_5, getitem_6, 16, 1, True, 0.25)
    getitem_7 = nsa_selected_attention_default[0]
    return (getitem_7,)
""")
        _compiled_vs_eager(per_token_key_expanded, [q, k, v], (_per_token_importance(),))

    def test_product_mask_and_nested_biases(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(product_bias_plus_causal, q, k, v, _importance()), """\
def forward(self, L_imp_, L_k_, L_q_, L_v_):
    l_imp_ = L_imp_
    l_k_ = L_k_
    l_q_ = L_q_
    l_v_ = L_v_
    topk = l_imp_.topk(2, -1)
    getitem_1 = topk[1]
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(getitem_1, 1, 2)
    getitem_3 = topk_to_indices[0]
    getitem_4 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_3, getitem_4, 16, 16, True, 0.25)
    getitem_5 = nsa_selected_attention_default[0]
    return (getitem_5,)
""")
        _compiled_vs_eager(product_bias_plus_causal, [q, k, v], (_importance(),))

    def test_tutorial_float_mask_sdpa(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(tutorial_float_mask_sdpa, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 8, 0.25)
    getitem_4 = sliding_window_attention_default[0]
    return (getitem_4,)
""")
        _compiled_vs_eager(tutorial_float_mask_sdpa, [q, k, v])

    def test_in_place_writes_and_false_biases_are_near_misses(self):
        """Writes the pass cannot read (setitem on the scores, a mask or its ones edited in place,
        the probabilities zeroed in place) and biases that are not 0 / -big are refused."""
        q, k, v = _qkv()

        def misses(q, k, v):
            i = torch.arange(T)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 10)
            s = (q @ k.transpose(-1, -2)).masked_fill(~band, float("-inf"))
            s[..., 3] = float("-inf")                                               # a key column by setitem
            a = s.softmax(-1) @ v
            m = band.clone()
            m[:, :4] = True                                                         # the mask edited in place
            b = (q @ k.mT).masked_fill(~m, float("-inf")).softmax(-1) @ v
            c = ((q @ k.mT) + (1 - band.float()) * float("-inf")).softmax(-1) @ v   # 0 * -inf is NaN
            keeps_ones = band.float().masked_fill(band == 0, float("-inf"))         # 1.0 where visible
            d = F.scaled_dot_product_attention(q, k, v, attn_mask=keeps_ones)
            p = (q @ k.mT).masked_fill(~band, float("-inf")).softmax(-1).float()
            p.masked_fill_(torch.eye(T, dtype=torch.bool), 0.0)                     # probabilities edited
            return a, b, c, d, p @ v

        report = explain(misses, q, k, v)
        self.assertEqual(report.counts["attention"], 0)
        self.assertExpectedInline("\n".join(sorted(m.reason for m in report.misses if m.family == "attention")),
                                  """\
constant additive mask call_method masked_fill holds values other than 0 and -inf / -big (a positional bias, not a mask)
constant additive mask mul holds NaN (e.g. a 0/1 mask times -inf)
constant mask invert (evaluated) is neither a diagonal band lo <= j - i <= hi nor whole 64/32/16-token blocks (optionally under the causal bound)
the attention probabilities have other users (the dense T x T matrix is needed anyway)
the scores are written in place by setitem (read as masking only as s[m] = -inf or -big with a bool mask m over the trailing dims)""")

    def test_hf_in_place_constant_masks_are_evaluated(self):
        """HF's masks written in place (masked_fill_ on full(min), ``*=`` with bitwise_or_) depend on no
        input: the pass evaluates them and reads the window off the values."""
        q, k, v = _qkv()
        for fn, window in ((hf_make_causal_mask_window, 11), (hf_cache_position_window, 9)):
            code = rewritten_graph(fn, q, k, v)
            calls = [line.split("(", 1)[1] for line in code.splitlines() if "bcpt." in line]
            self.assertEqual(calls, [f"l_q_, l_k_, l_v_, {window}, 0.25)"])
            _compiled_vs_eager(fn, [q, k, v])

    def test_vmap_mask_functions_are_evaluated(self):
        """transformers' mask functions under nested vmap (checked against MistralModel and
        Qwen2Model of transformers 4.57 with sliding_window=16: 5e-7 from eager): the replay runs
        the vmap level calls, which no mask node depends on, and closes any level it opened."""
        q, k, v = _qkv()
        code = rewritten_graph(hf_vmap_mask_function_window, q, k, v)
        calls = [line.strip() for line in code.splitlines() if "bcpt." in line]
        self.assertEqual(len(calls), 1)
        self.assertIn("sliding_window_attention.default(l_q_, l_k_, l_v_, 12, 0.25)", calls[0])
        _compiled_vs_eager(hf_vmap_mask_function_window, [q, k, v])
        self.assertIsNone(torch._C._functorch.maybe_current_level())

    def test_index_grids_loops_and_abs_bands_are_evaluated(self):
        q, k, v = _qkv(h=4, hkv=4)
        report = _sites(index_grid_4d_window, q, k, v)
        self.assertEqual([s.op for s in report.sites], ["bcpt.sliding_window_attention"])
        _compiled_vs_eager(index_grid_4d_window, [q, k, v])
        report = _sites(loop_and_abs_window, q, k, v)
        self.assertEqual([s.op for s in report.sites], ["bcpt.sliding_window_attention"] * 2)
        _compiled_vs_eager(loop_and_abs_window, [q, k, v])

    def test_moba_gate_bias_is_per_token_selection(self):
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(MOBA_T, MOBA_H, D, generator=g) for _ in range(3))
        code = rewritten_graph(moba_gate_bias, q, k, v)
        self.assertIn("block_mask_to_indices", code)
        self.assertExpectedInline([line for line in code.splitlines() if "nsa_selected" in line][0].strip(), """nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(reshape, reshape_1, reshape_2, getitem_9, getitem_10, 16, 1, True, 0.25)""")
        _compiled_vs_eager(moba_gate_bias, [q, k, v])

    def test_moba_setitem_gate_is_per_token_selection(self):
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(32, 1, D, generator=g) for _ in range(3))
        code = rewritten_graph(moba_setitem_gate, q, k, v)
        self.assertExpectedInline("\n".join(line.strip() for line in code.splitlines() if "bcpt" in line), """\
block_mask_to_indices = bcpt_compile_lowering_attention_block_mask_to_indices(need_1, 1, 1)
nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(reshape, reshape_1, reshape_2, getitem_5, getitem_6, 16, 1, True, 0.25)""")
        _compiled_vs_eager(moba_setitem_gate, [q, k, v])

    def test_setitem_masks_on_the_scores(self):
        q, k, v = _qkv()
        self.assertEqual([s.op for s in _sites(scores_setitem_band, q, k, v).sites], ["bcpt.sliding_window_attention"])
        _compiled_vs_eager(scores_setitem_band, [q, k, v])
        self.assertEqual([s.op for s in _sites(scores_setitem_masks, q, k, v, _importance()).sites],
                         ["bcpt.nsa_selected_attention"])
        _compiled_vs_eager(scores_setitem_masks, [q, k, v], (_importance(),))

    def test_constant_block_layouts_are_selected_attention(self):
        """Constant masks that are whole blocks (optionally under the causal bound) become selected
        attention with the layout sampled from the mask (``m[..., ::S, ::S]``)."""
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(constant_block_local_causal, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    i = torch.arange(40)
    getitem = i[(slice(None, None, None), None)]
    floordiv = getitem // 16
    getitem_1 = i[(None, slice(None, None, None))]
    floordiv_1 = getitem_1 // 16
    eq = floordiv == floordiv_1
    getitem_2 = i[(slice(None, None, None), None)]
    getitem_3 = i[(None, slice(None, None, None))]
    ge = getitem_2 >= getitem_3
    local = eq & ge
    getitem_4 = local[(Ellipsis, slice(None, None, 16), slice(None, None, 16))]
    ne = torch.ne(getitem_4, 0)
    block_mask_to_indices = bcpt_compile_lowering_attention_block_mask_to_indices(ne, 1, 2)
    getitem_5 = block_mask_to_indices[0]
    getitem_6 = block_mask_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_5, getitem_6, 16, 16, True, 0.25)
    getitem_7 = nsa_selected_attention_default[0]
    return (getitem_7,)
""")
        _compiled_vs_eager(constant_block_local_causal, [q, k, v])
        for fn in (bigbird_like_bias, tril_block_layout_per_head):
            self.assertEqual([s.op for s in _sites(fn, q, k, v).sites], ["bcpt.nsa_selected_attention"])
            _compiled_vs_eager(fn, [q, k, v])

    def test_llama4_chunked_attention_is_block_size_32(self):
        q, k, v = (torch.randn(B, H, TF, D, generator=torch.Generator().manual_seed(2)) for _ in range(3))
        code = rewritten_graph(llama4_chunked_causal, q, k, v)
        self.assertIn("nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_5, getitem_6, 32, 32, True", code)
        _compiled_vs_eager(llama4_chunked_causal, [q, k, v])

    def test_einops_repeat_block_mask(self):
        pytest = __import__("pytest")
        pytest.importorskip("einops")
        q, k, v = _qkv()
        self.assertEqual([s.op for s in _sites(einops_repeat_block_mask, q, k, v, _importance()).sites],
                         ["bcpt.nsa_selected_attention"])
        _compiled_vs_eager(einops_repeat_block_mask, [q, k, v], (_importance(),))

    def test_constant_mask_near_misses_name_their_reason(self):
        """Constant masks are evaluated only when their value is unambiguous, and must be a band."""
        q, k, v = _qkv()

        def misses(q, k, v):
            band = torch.ones(T, T, dtype=torch.bool).tril().triu(-9)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
            band[:, 0] = True                                                    # written between readers
            b = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
            m = torch.ones(T, T, dtype=torch.bool).tril().triu(-9)
            m.to(torch.bool)[:, 0] = q[0, 0, :, 0] > 0                           # through an alias, by data
            c = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            i = torch.arange(T)
            strided = ((i[:, None] // 16) == (i[None, :] // 16)) | (i[None, :] % 16 == 15)
            strided = strided & (i[:, None] >= i[None, :])
            d = F.scaled_dot_product_attention(q, k, v, attn_mask=strided)       # Sparse Transformer's fixed pattern
            rel = (i[None, :] - i[:, None]).float()
            e = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(rel <= 0, rel * 0.5, float("-inf")))
            s = q @ k.transpose(2, 3) * 0.25
            near = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 10)
            s = torch.tanh(s / 50.0) * 50.0 + torch.where(near, 0.0, torch.finfo(s.dtype).min)
            f = F.softmax(s, dim=-1, dtype=torch.float32) @ v                    # Gemma 2 soft-capping
            return a + b + c + d + e + f

        report = explain(misses, q, k, v)
        self.assertEqual(report.counts["attention"], 0)
        self.assertExpectedInline("\n".join(sorted(m.reason for m in report.misses if m.family == "attention")), """\
constant additive mask where holds values other than 0 and -inf / -big (a positional bias, not a mask)
constant mask and_ (evaluated) is neither a diagonal band lo <= j - i <= hi nor whole 64/32/16-token blocks (optionally under the causal bound)
constant mask call_method triu is written in place between its readers
constant mask call_method triu is written in place between its readers
constant mask call_method triu is written in place by a computed value
the scores are computed on by tanh between q k^T and the mask (e.g. Gemma 2's tanh soft-capping): only constant scales are supported""")

    def test_explain_counts_each_site(self):
        q, k, v = _qkv()

        def model(q, k, v, imp):
            x = dynnsa_repeat_interleave(q, k, v, imp)
            y = window_explicit(q, k, v)
            z = window_sdpa_tril_triu(q, k, v)
            return x + y + z + F.scaled_dot_product_attention(q, k, v, is_causal=True)

        report = explain(model, q, k, v, _importance())
        self.assertEqual(report.counts["attention"], 3)
        self.assertEqual(sorted(s.op for s in report.sites if s.family == "attention"),
                         ["bcpt.nsa_selected_attention", "bcpt.sliding_window_attention",
                          "bcpt.sliding_window_attention"])
        self.assertIn("test_attention_pass.py", report.sites[0].source)


class TestAttentionLayouts(expecttest.TestCase):
    """q k^T and P @ V in other layouts: read as einsum letters, q, k, v permuted/reshaped to the
    ops' (B, H, T, D) and the output back to the user's layout."""

    def _check(self, fn, tensors, extra=(), op="bcpt.sliding_window_attention"):
        torch._dynamo.reset()
        report = _sites(fn, *tensors, *extra)
        self.assertEqual([s.op for s in report.sites if s.family == "attention"], [op])
        _compiled_vs_eager(fn, tensors, extra)

    def test_bthd_einsums(self):
        q, k, v = (t.transpose(1, 2).contiguous() for t in _qkv())
        self.assertExpectedInline(rewritten_graph(bthd_einsum_band, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    permute = l_q_.permute(0, 2, 1, 3)
    permute_1 = l_k_.permute(0, 2, 1, 3)
    permute_2 = l_v_.permute(0, 2, 1, 3)
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(permute, permute_1, permute_2, 12, 0.25)
    getitem_4 = sliding_window_attention_default[0]
    permute_3 = getitem_4.permute(0, 2, 1, 3)
    return (permute_3,)
""")
        self._check(bthd_einsum_band, [q, k, v])

    def test_bthd_einsum_block_mask_output_transposed(self):
        q, k, v = (t.transpose(1, 2).contiguous() for t in _qkv())
        self.assertExpectedInline(rewritten_graph(bthd_einsum_block_transposed_out, q, k, v, _importance()), """\
def forward(self, L_imp_, L_q_, L_k_, L_v_):
    l_imp_ = L_imp_
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    topk = l_imp_.topk(2, -1)
    getitem_1 = topk[1]
    permute = l_q_.permute(0, 2, 1, 3)
    permute_1 = l_k_.permute(0, 2, 1, 3)
    permute_2 = l_v_.permute(0, 2, 1, 3)
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(getitem_1, 1, 2)
    getitem_3 = topk_to_indices[0]
    getitem_4 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(permute, permute_1, permute_2, getitem_3, getitem_4, 16, 16, True, 0.25)
    getitem_5 = nsa_selected_attention_default[0]
    transpose = getitem_5.transpose(1, 2)
    return (transpose,)
""")
        self._check(bthd_einsum_block_transposed_out, [q, k, v], (_importance(),), "bcpt.nsa_selected_attention")

    def test_grouped_gqa_einsums(self):
        q, k, v = _qkv(h=4, hkv=2)
        self.assertExpectedInline(rewritten_graph(grouped_gqa_einsum, q, k, v, _importance()), """\
def forward(self, L_q_, L_imp_, L_k_, L_v_):
    l_q_ = L_q_
    l_imp_ = L_imp_
    l_k_ = L_k_
    l_v_ = L_v_
    zeros_like = torch.zeros_like(l_imp_, dtype = torch.bool)
    topk = l_imp_.topk(2, -1)
    getitem_1 = topk[1]
    scatter = zeros_like.scatter(-1, getitem_1, True)
    bm = scatter[(slice(None, None, None), slice(None, None, None), None)]
    view = l_q_.view(1, 2, -1, 40, 16)
    reshape_1 = view.reshape((1, 4, 40, 16))
    reshape_2 = bm.reshape((1, 2, 3, 3))
    block_mask_to_indices = bcpt_compile_lowering_attention_block_mask_to_indices(reshape_2, 1, 2)
    getitem_4 = block_mask_to_indices[0]
    getitem_5 = block_mask_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(reshape_1, l_k_, l_v_, getitem_4, getitem_5, 16, 16, True, 0.25)
    getitem_6 = nsa_selected_attention_default[0]
    reshape_3 = getitem_6.reshape((1, 2, 2, 40, 16))
    reshape = reshape_3.reshape(1, 4, 40, 16)
    return (reshape,)
""")
        self._check(grouped_gqa_einsum, [q, k, v], (_importance(),), "bcpt.nsa_selected_attention")

    def test_ellipsis_einsums(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(ellipsis_einsum, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(l_q_, l_k_, l_v_, 12, 0.25)
    getitem_4 = sliding_window_attention_default[0]
    return (getitem_4,)
""")
        self._check(ellipsis_einsum, [q, k, v])

    def test_bmm_with_a_repeated_band(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(bmm_repeated_band, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q3 = l_q_.reshape(2, 40, 16)
    k3 = l_k_.reshape(2, 40, 16)
    v3 = l_v_.reshape(2, 40, 16)
    reshape_3 = q3.reshape((1, 2, 40, 16))
    reshape_4 = k3.reshape((1, 2, 40, 16))
    reshape_5 = v3.reshape((1, 2, 40, 16))
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(reshape_3, reshape_4, reshape_5, 12, 0.25)
    getitem_4 = sliding_window_attention_default[0]
    reshape_6 = getitem_4.reshape((2, 40, 16))
    view = reshape_6.view(1, 2, 40, 16)
    return (view,)
""")
        self._check(bmm_repeated_band, [q, k, v])

    def test_bmm_with_a_per_head_block_mask(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(bmm_block_per_head, q, k, v, _importance()), """\
def forward(self, L_q_, L_k_, L_v_, L_imp_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    l_imp_ = L_imp_
    q3 = l_q_.reshape(2, 40, 16)
    k3 = l_k_.reshape(2, 40, 16)
    v3 = l_v_.reshape(2, 40, 16)
    zeros_like = torch.zeros_like(l_imp_, dtype = torch.bool)
    topk = l_imp_.topk(2, -1)
    getitem_1 = topk[1]
    scatter = zeros_like.scatter(-1, getitem_1, True)
    bm = scatter.reshape(2, 3, 3)
    reshape_4 = q3.reshape((1, 2, 40, 16))
    reshape_5 = k3.reshape((1, 2, 40, 16))
    reshape_6 = v3.reshape((1, 2, 40, 16))
    block_mask_to_indices = bcpt_compile_lowering_attention_block_mask_to_indices(bm, 1, 2)
    getitem_3 = block_mask_to_indices[0]
    getitem_4 = block_mask_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(reshape_4, reshape_5, reshape_6, getitem_3, getitem_4, 16, 16, True, 0.25)
    getitem_5 = nsa_selected_attention_default[0]
    reshape_7 = getitem_5.reshape((2, 40, 16))
    view = reshape_7.view(1, 2, 40, 16)
    return (view,)
""")
        self._check(bmm_block_per_head, [q, k, v], (_importance(),), "bcpt.nsa_selected_attention")

    def test_baddbmm_beta_zero_with_a_flattened_mask(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(baddbmm_flattened_mask, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q3 = l_q_.reshape(2, 40, 16)
    k3 = l_k_.reshape(2, 40, 16)
    v3 = l_v_.reshape(2, 40, 16)
    reshape_4 = q3.reshape((1, 2, 40, 16))
    reshape_5 = k3.reshape((1, 2, 40, 16))
    reshape_6 = v3.reshape((1, 2, 40, 16))
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(reshape_4, reshape_5, reshape_6, 12, 0.25)
    getitem_5 = sliding_window_attention_default[0]
    reshape_7 = getitem_5.reshape((2, 40, 16))
    view = reshape_7.view(1, 2, 40, 16)
    return (view,)
""")
        self._check(baddbmm_flattened_mask, [q, k, v])

    def test_gpt2_scores_reshaped_before_the_mask(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(gpt2_upcast_reordered, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q3 = l_q_.reshape(-1, 40, 16)
    transpose = l_k_.transpose(-1, -2)
    k3 = transpose.reshape(-1, 16, 40)
    float_1 = q3.float()
    float_2 = k3.float()
    reshape_3 = float_1.reshape((1, 2, 40, 16))
    permute = float_2.permute(0, 2, 1)
    reshape_4 = permute.reshape((1, 2, 40, 16))
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(reshape_3, reshape_4, l_v_, 12, 0.25)
    getitem_5 = sliding_window_attention_default[0]
    return (getitem_5,)
""")
        self._check(gpt2_upcast_reordered, [q, k, v])

    def test_bloom_baddbmm_and_views(self):
        q, k, v = _qkv()
        self.assertExpectedInline(rewritten_graph(bloom_baddbmm_view, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    q3 = l_q_.reshape(2, 40, 16)
    reshape_1 = l_k_.reshape(2, 40, 16)
    v3 = l_v_.reshape(2, 40, 16)
    reshape_3 = q3.reshape((1, 2, 40, 16))
    reshape_4 = reshape_1.reshape((1, 2, 40, 16))
    reshape_5 = v3.reshape((1, 2, 40, 16))
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(reshape_3, reshape_4, reshape_5, 12, 0.25)
    getitem_5 = sliding_window_attention_default[0]
    reshape_6 = getitem_5.reshape((2, 40, 16))
    view_2 = reshape_6.view(1, 2, 40, 16)
    return (view_2,)
""")
        self._check(bloom_baddbmm_view, [q, k, v])

    def test_layout_near_misses_name_their_reason(self):
        """Per-query-head selection inside a KV group, a block mask reshaped across its leading
        dims (its heads are not tracked), broadcast heads (MQA by einsum broadcasting)."""
        q, k, v = _qkv(h=4, hkv=2)
        q2, k2, v2 = _qkv(seed=3)
        imp4 = torch.randn(B, 4, NB, NB, generator=torch.Generator().manual_seed(2)) + 100 * torch.eye(NB)

        def misses(q, k, v, q2, k2, v2, imp4, imp):
            b, h, t, d = q.shape
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            bm = torch.zeros_like(imp4, dtype=torch.bool).scatter(-1, imp4.topk(2, -1).indices, True)
            m = bm.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T].view(b, 2, 2, t, t) & causal
            s = torch.einsum("bhgid,bhjd->bhgij", q.view(b, 2, 2, t, d), k).masked_fill(~m, float("-inf"))
            x = torch.einsum("bhgij,bhjd->bhgid", s.softmax(-1), v)                 # mask viewed per group
            bm2 = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, imp.topk(2, -1).indices, True)
            m2 = (bm2.repeat_interleave(S, -2).repeat_interleave(S, -1)[..., :T, :T] & causal).reshape(2, t, t)
            s2 = torch.bmm(q2.reshape(2, t, d), k2.reshape(2, t, d).mT).masked_fill(~m2, float("-inf"))
            y = torch.bmm(s2.softmax(-1), v2.reshape(2, t, d))                       # (B, H) mask flattened
            s3 = torch.einsum("bhqd,bhkd->bhqk", q, k[:, :1]).masked_fill(~_band(), float("-inf"))
            z = torch.einsum("bhqk,bhkd->bhqd", s3.softmax(-1), v[:, :1])            # heads broadcast
            return x, y, z

        report = explain(misses, q, k, v, q2, k2, v2, imp4, _importance())
        self.assertEqual(report.counts["attention"], 0)
        self.assertExpectedInline("\n".join(sorted(m.reason for m in report.misses if m.family == "attention")), """\
block mask moved across its leading dims by call_method reshape: its heads cannot be matched to the scores'
block mask moved across its leading dims by call_method view: its heads cannot be matched to the scores'
dim 'h' of q k^T / P @ V has sizes 4 and 1 (broadcast batch or heads)""")


if __name__ == "__main__":
    expecttest.run_tests()


# --------------------------------------------------------------------------- packages (optional)

class TestAttentionPackages(expecttest.TestCase):
    """local-attention and native-sparse-attention-pytorch, when installed: windowed layouts
    recognised by evaluating their gathers on position probes."""

    def setUp(self):
        import pytest

        self.la = pytest.importorskip("local_attention")

    def _module_vs_eager(self, mod, *inputs, rtol=1e-4):
        ins = [t.clone().requires_grad_(True) for t in inputs]
        ref = [t.clone().requires_grad_(True) for t in inputs]
        torch._dynamo.reset()
        out = torch.compile(mod, backend="bcpt", options=OPTS)(*ins)
        expected = mod(*ref)
        grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
        out.backward(grad)
        expected.backward(grad)
        for name, a, b in [("out", out, expected)] + [(f"grad{i}", x.grad, y.grad) for i, (x, y) in enumerate(zip(ins, ref))]:
            err = ((a - b).abs().max() / b.abs().max()).item()
            self.assertLessEqual(err, rtol, name)

    def test_local_attention_block_local_is_selected_attention(self):
        mod = self.la.LocalAttention(window_size=16, causal=True, look_backward=1).eval()
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(B, H, 64, D, generator=g) for _ in range(3))  # needs T % 16 == 0
        self.assertExpectedInline(rewritten_graph(mod, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    local_block_table = bcpt_compile_lowering_attention_local_block_table(l_k_, 16, 1, 0)
    getitem_1 = local_block_table[0]
    getitem_2 = local_block_table[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_1, getitem_2, 16, 16, True, 0.25)
    getitem_3 = nsa_selected_attention_default[0]
    return (getitem_3,)
""")
        self._module_vs_eager(mod, q, k, v)

    def test_local_attention_exact_window_autopad_3d(self):
        mod = self.la.LocalAttention(window_size=16, causal=True, look_backward=1, exact_windowsize=True,
                                     autopad=True).eval()
        q, k, v = (t.reshape(B * H, T, D) for t in _qkv(seed=8))  # T = 40: padded to 48 inside
        self.assertExpectedInline(rewritten_graph(mod, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    reshape_12 = torch.reshape(l_q_, (1, -1, 40, 16))
    reshape_13 = torch.reshape(l_k_, (1, -1, 40, 16))
    reshape_14 = torch.reshape(l_v_, (1, -1, 40, 16))
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(reshape_12, reshape_13, reshape_14, 17, 0.25)
    getitem_2 = sliding_window_attention_default[0]
    reshape_15 = torch.reshape(getitem_2, (2, 40, 16))
    getitem_1 = reshape_15[(slice(0, 2, None),)]
    out_2 = getitem_1.reshape((2, 40, 16))
    return (out_2,)
""")
        self._module_vs_eager(mod, q, k, v)

    def test_local_attention_look_forward_is_block_local_selected_attention(self):
        """causal=False attends whole key blocks W-L..W+F around the query's block: selected
        attention with a static table and no causal bound."""
        mod = self.la.LocalAttention(window_size=16, causal=False, look_backward=1, look_forward=1).eval()
        g = torch.Generator().manual_seed(4)
        q, k, v = (torch.randn(B, H, 64, D, generator=g) for _ in range(3))
        self.assertExpectedInline(rewritten_graph(mod, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    seq = torch.arange(64, device = device(type='cpu'))
    tensor = seq.reshape([4, 16])
    tensor_1 = tensor.reshape([1, 4, 16])
    tensor_5 = tensor_1.reshape([1, 4, 16, 1])
    local_block_table = bcpt_compile_lowering_attention_local_block_table(l_k_, 16, 1, 1)
    getitem_1 = local_block_table[0]
    getitem_2 = local_block_table[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_1, getitem_2, 16, 16, False, 0.25)
    getitem_3 = nsa_selected_attention_default[0]
    return (getitem_3,)
""")
        self._module_vs_eager(mod, q, k, v)

    def test_local_attention_look_forward_rotary_3d(self):
        mod = self.la.LocalAttention(dim=D, window_size=16, causal=False, look_backward=0, look_forward=1).eval()
        g = torch.Generator().manual_seed(6)
        q, k, v = (torch.randn(B * H, 32, D, generator=g) for _ in range(3))
        self.assertEqual([s.op for s in _sites(mod, q, k, v).sites], ["bcpt.nsa_selected_attention"])
        self._module_vs_eager(mod, q, k, v)

    def test_local_attention_token_level_look_forward_is_a_near_miss(self):
        mod = self.la.LocalAttention(window_size=16, causal=False, look_backward=1, look_forward=1,
                                     exact_windowsize=True).eval()
        g = torch.Generator().manual_seed(4)
        report = explain(mod, *(torch.randn(B, H, 64, D, generator=g) for _ in range(3)))
        self.assertEqual(report.counts["attention"], 0)
        self.assertExpectedInline("\n".join(m.reason for m in report.misses), """\
windowed attention looks ahead of the query (keys up to i+16) at token level: the sliding-window kernel is causal only, and the window is not whole key blocks (selected attention)""")

    def test_local_attention_rotary_moves_to_token_space(self):
        """``LocalAttention(dim=...)`` (the package's README usage) rotates the window-gathered q
        and k (keys at slots 0..m-1, queries at the last n): plain RoPE is relative, so the
        same rotary at token positions (shared inv_freq, arange over T) goes before the op."""
        mod = self.la.LocalAttention(dim=D, window_size=16, causal=True, look_backward=1).eval()
        g = torch.Generator().manual_seed(11)
        q, k, v = (torch.randn(B, H, 64, D, generator=g) for _ in range(3))
        self.assertExpectedInline(rewritten_graph(mod, q, k, v), """\
def forward(self, L_q_, L_k_, L_v_, L_self_modules_rel_pos_buffers_inv_freq_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    l_self_modules_rel_pos_buffers_inv_freq_ = L_self_modules_rel_pos_buffers_inv_freq_
    _enter_autocast = torch.amp.autocast_mode._enter_autocast('cuda', torch.float16, False, True)
    _exit_autocast = torch.amp.autocast_mode._exit_autocast(_enter_autocast)
    _enter_autocast_1 = torch.amp.autocast_mode._enter_autocast('cuda', torch.float16, False, True)
    _exit_autocast_1 = torch.amp.autocast_mode._exit_autocast(_enter_autocast_1)
    arange_2 = torch.arange(0, 64, device = device(type='cpu'))
    type_as_1 = arange_2.type_as(l_self_modules_rel_pos_buffers_inv_freq_)
    outer = torch.outer(type_as_1, l_self_modules_rel_pos_buffers_inv_freq_)
    cat_6 = torch.cat((outer, outer), dim = -1)
    cos_2 = cat_6.cos()
    sin_2 = cat_6.sin()
    getitem_6 = l_q_[(Ellipsis, slice(None, 8, None))]
    getitem_7 = l_q_[(Ellipsis, slice(8, None, None))]
    neg_2 = -getitem_7
    cat_7 = torch.cat((neg_2, getitem_6), dim = -1)
    mul_9 = l_q_ * cos_2
    mul_10 = cat_7 * sin_2
    add_2 = mul_9 + mul_10
    getitem_8 = l_k_[(Ellipsis, slice(None, 8, None))]
    getitem_9 = l_k_[(Ellipsis, slice(8, None, None))]
    neg_3 = -getitem_9
    cat_8 = torch.cat((neg_3, getitem_8), dim = -1)
    mul_11 = l_k_ * cos_2
    mul_12 = cat_8 * sin_2
    add_3 = mul_11 + mul_12
    local_block_table = bcpt_compile_lowering_attention_local_block_table(add_3, 16, 1, 0)
    getitem_10 = local_block_table[0]
    getitem_11 = local_block_table[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(add_2, add_3, l_v_, getitem_10, getitem_11, 16, 16, True, 0.25)
    getitem_12 = nsa_selected_attention_default[0]
    return (getitem_12,)
""")
        self._module_vs_eager(mod, q, k, v)

    def test_local_attention_rotary_exact_window_autopad_3d(self):
        mod = self.la.LocalAttention(dim=D, window_size=16, causal=True, look_backward=1, exact_windowsize=True,
                                     autopad=True).eval()
        q, k, v = (t.reshape(B * H, T, D) for t in _qkv(seed=12))  # T = 40: padded to 48 inside
        report = explain(mod, q, k, v)
        self.assertEqual([s.op for s in report.sites], ["bcpt.sliding_window_attention"])
        self.assertEqual(report.misses, [])
        self._module_vs_eager(mod, q, k, v)

    def test_local_attention_rotary_lookback_2(self):
        mod = self.la.LocalAttention(dim=D, window_size=16, causal=True, look_backward=2).eval()
        g = torch.Generator().manual_seed(13)
        q, k, v = (torch.randn(B, H, 64, D, generator=g) for _ in range(3))
        report = explain(mod, q, k, v)
        self.assertEqual([s.op for s in report.sites], ["bcpt.nsa_selected_attention"])
        self._module_vs_eager(mod, q, k, v)

    def test_local_attention_rotary_near_misses(self):
        """xpos scales q and k by position (not purely relative); positions other than the
        window-frame arange break relativity; look-forward stays refused as without rotary."""
        from local_attention.rotary import SinusoidalEmbeddings

        class Doubled(SinusoidalEmbeddings):
            def forward(self, x):
                t = (torch.arange(x.shape[-2], device=x.device) * 2).type_as(self.inv_freq)
                freqs = torch.einsum("i , j -> i j", t, self.inv_freq)
                return torch.cat((freqs, freqs), dim=-1), torch.ones(1, device=x.device)

        doubled = self.la.LocalAttention(dim=D, window_size=16, causal=True).eval()
        doubled.rel_pos = Doubled(D)
        g = torch.Generator().manual_seed(14)
        q, k, v = (torch.randn(B, H, 64, D, generator=g) for _ in range(3))
        reasons = []
        for mod in (self.la.LocalAttention(dim=D, window_size=16, causal=True, use_xpos=True).eval(), doubled,
                    self.la.LocalAttention(dim=D, window_size=16, causal=False, look_forward=1,
                                           exact_windowsize=True).eval()):
            torch._dynamo.reset()
            report = explain(mod, q, k, v)
            self.assertEqual(report.counts["attention"], 0)
            reasons += [m.reason for m in report.misses]
        self.assertExpectedInline("\n".join(reasons), """\
windowed attention: rotary embedding on the window-gathered q/k is scaled by a computed factor (e.g. xpos): not purely relative
windowed attention: the rotary positions of the window-gathered q/k are not the token positions up to one shift (not purely relative)
windowed attention looks ahead of the query (keys up to i+16) at token level: the sliding-window kernel is causal only, and the window is not whole key blocks (selected attention)""")

    def _nsa(self, **kw):
        import pytest

        nsa = pytest.importorskip("native_sparse_attention_pytorch")
        torch.manual_seed(0)
        args = {"dim": 32, "dim_head": 16, "heads": 4, "kv_heads": 2, "sliding_window_size": 16,
                "compress_block_size": 16, "compress_block_sliding_stride": 8, "selection_block_size": 16,
                "num_selected_blocks": 2, "causal": True}
        return nsa.SparseAttention(**{**args, **kw}).eval()

    def test_native_sparse_attention_fine_and_sliding_branches_gqa(self):
        """SparseAttention(causal=True), GQA 4:2, T = 70 (padded to 80 inside): the fine branch
        (per-token top-k gathers + own block under a tril) becomes per-token selected attention
        with its top-k indices, the sliding branch the window kernel; the compressed branch
        stays. The snapshot is the rewritten region of the (long) graph."""
        mod = self._nsa()
        x = torch.randn(1, 70, 32, generator=torch.Generator().manual_seed(9))
        graphs, report = rewritten_graphs(mod, x)
        lines = graphs[0].splitlines()
        first = next(i for i, line in enumerate(lines) if line.strip().startswith("topk ="))
        last = next(i for i, line in enumerate(lines) if "sliding_window_attention" in line)
        self.assertExpectedInline("\n".join(lines[first:last + 1]), """\
    topk = importance_scores_5.topk(2, dim = -1)
    selected_importance_values = topk[0]
    selected_block_indices = topk[1]
    fmask = selected_importance_values > 1e-10
    where = torch.where(fmask, selected_block_indices, -1)
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(where, 1, 2)
    getitem_30 = topk_to_indices[0]
    getitem_31 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(rotated_q_1, rotated_k_1, tensor_5, getitem_30, getitem_31, 16, 1, False, 0.25, True)
    getitem_32 = nsa_selected_attention_default[0]
    sliding_window_attention_default = torch.ops.bcpt.sliding_window_attention.default(rotated_q_1, rotated_k_1, tensor_5, 17, 0.25)""")
        shapes = "float32[1,4,70,16] float32[1,2,70,16] float32[1,2,70,16]"
        self.assertEqual([(s.op, s.shapes) for s in report.sites],
                         [("bcpt.nsa_selected_attention", shapes), ("bcpt.sliding_window_attention", shapes)])
        self.assertEqual(report.misses, [])
        self._module_vs_eager(mod, x)

    def test_native_sparse_attention_non_causal_fine_branch(self):
        """causal=False (the package default): no own block, the selected blocks only; the
        non-causal sliding window is a near-miss."""
        mod = self._nsa(causal=False, compress_block_sliding_stride=16, heads=2, kv_heads=2)
        x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(3))
        report = explain(mod, x)
        self.assertEqual([s.op for s in report.sites], ["bcpt.nsa_selected_attention"])
        self.assertEqual([m.reason for m in report.misses],
                         ["windowed attention looks ahead of the query (keys up to i+16) at token level: the "
                          "sliding-window kernel is causal only, and the window is not whole key blocks "
                          "(selected attention)"])
        torch._dynamo.reset()
        self._module_vs_eager(mod, x)

    def test_native_sparse_attention_fine_branch_near_misses(self):
        """Differentiable top-k gates scale the gathered keys; per-query-head selection under GQA
        has more selections than the kernel's KV groups."""
        x = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(4))
        reasons = []
        for kw in ({"use_diff_topk": True}, {"query_heads_share_selected_kv": False}):
            torch._dynamo.reset()
            _, report = rewritten_graphs(self._nsa(**kw), x)
            self.assertEqual([s.op for s in report.sites], ["bcpt.sliding_window_attention"])
            reasons += [m.reason for m in report.misses]
        self.assertExpectedInline("\n".join(reasons), """\
gathered attention: the values are gathered but the keys are computed on after their gather (e.g. differentiable top-k gates)
gathered attention: each of the 4 query heads selects its own blocks, but K/V have 2 heads (the kernel serves a KV group with one selection)""")


def _banded_sdpa_autocast(q, k, v):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        i = torch.arange(q.shape[2])
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 16)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)


def test_autocast_region_keeps_eager_dtype():
    """The attention ops are not autocast-aware: q, k, v are cast to the dtype the replaced
    attention produced, so the result keeps eager's dtype."""
    import bcpt_compile

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    assert bcpt_compile.explain(_banded_sdpa_autocast, q, k, v).counts["attention"] == 1
    eager = _banded_sdpa_autocast(q, k, v)
    out = torch.compile(_banded_sdpa_autocast, backend="bcpt", options={"inner_compiler": "aot_eager"})(q, k, v)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert ((out.double() - eager.double()).norm() / eager.double().norm()).item() < 1e-2


def _window_any_t(q, k, v):
    t = q.shape[-2]
    i = torch.arange(t, device=q.device)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 12)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    return s.masked_fill(~band, float("-inf")).softmax(dim=-1) @ v


# --------------------------------------------------------------------------- dynamic shapes
#
# Training calls a model with varying sequence lengths: after the second distinct shape Dynamo
# recompiles with symbolic T (and batch). The masks below are built from the symbolic T, and
# the pass reads them from the graph, so the dynamic graphs stay rewritten.

def _dyn_nsa_topk(q, k, v):
    """DynNSA with block importance pooled from q and k: ceil(T / S) blocks (T symbolic, S
    constant), top-2 scattered into a block mask, repeat_interleave'd and cropped to T, causal
    tril of ones(T, T)."""
    b, h, t, d = q.shape
    nb = -(-t // S)
    pad = nb * S - t
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, nb, S, d).mean(3)
    kb = F.pad(k, (0, 0, 0, pad)).view(b, h, nb, S, d).mean(3)
    imp = (qb @ kb.transpose(-1, -2)).detach() + 100 * torch.eye(nb)  # the own block is always selected
    bm = torch.zeros_like(imp, dtype=torch.bool).scatter(-1, imp.topk(2, dim=-1).indices, True)
    m = bm.repeat_interleave(S, dim=-2).repeat_interleave(S, dim=-1)[..., :t, :t]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
    s = s.masked_fill(~m, float("-inf")).masked_fill(~causal, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def _dyn_window_sdpa(q, k, v):
    """SDPA with a bool band from tril/triu of ones(T, T), T symbolic, window 7 constant."""
    t = q.shape[-2]
    band = torch.ones(t, t, dtype=torch.bool, device=q.device).tril().triu(-6)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def _dyn_expand_kron_sdpa(q, k, v):
    """SDPA with an additive bias from a kron-expanded float block mask (first and own block)
    and an arange causal bound, T symbolic."""
    t = q.shape[-2]
    nb = (t + S - 1) // S
    blk = torch.arange(nb)
    bm = ((blk[:, None] == blk[None, :]) | (blk[None, :] == 0)).float()
    i = torch.arange(t)
    keep = torch.kron(bm, torch.ones(S, S))[:t, :t].bool() & (i[:, None] >= i[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(keep, 0.0, float("-inf")))


def _dyn_symbolic_window(q, k, v):
    t = q.shape[-2]
    i = torch.arange(t)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < t // 3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def _dyn_symbolic_block(q, k, v):
    """A block size that is a symbolic size (T // 2): the block geometry is not a constant."""
    b, h, t, d = q.shape
    bm = torch.ones(b, h, 2, 2, dtype=torch.bool).tril()
    m = bm.repeat_interleave(t // 2, dim=-2).repeat_interleave(t // 2, dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


_DYN_CALLS = ((1, 40), (1, 24), (2, 57), (2, 33))  # T not a multiple of S; the third call makes B dynamic too


def _dynamic_vs_eager(fn, calls=_DYN_CALLS):
    """Compile once, call with several (B, T): outputs and gradients equal eager's on every call."""
    import functools

    import bcpt_compile

    torch._dynamo.reset()
    report = bcpt_compile.Report()
    backend = functools.partial(bcpt_compile.bcpt_backend, report_sink=report, options=OPTS)
    compiled = torch.compile(fn, backend=backend)
    for n, (b, t) in enumerate(calls):
        g = torch.Generator().manual_seed(100 + n)
        ins = [torch.randn(b, H, t, D, generator=g).requires_grad_() for _ in range(3)]
        ref = [x.detach().clone().requires_grad_() for x in ins]
        out, expected = compiled(*ins), fn(*ref)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        grad = torch.randn(expected.shape, generator=g)
        out.backward(grad)
        expected.backward(grad)
        for a, e in zip(ins, ref):
            torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)
    return report


def _symbols(report) -> None:
    """The run went dynamic (a static graph, then symbolic T, then symbolic B: the fourth call
    reuses the third graph, so nothing guarded T) and every graph was rewritten once."""
    assert report.graphs == 3, report.graphs
    assert report.counts["attention"] == report.graphs, (report.counts, report.misses)
    assert not report.misses, report.misses


def test_dynamic_shapes_window_stays_rewritten_and_matches_eager():
    _symbols(_dynamic_vs_eager(_window_any_t))


def test_dynamic_shapes_nsa_topk_stays_rewritten_and_matches_eager():
    _symbols(_dynamic_vs_eager(_dyn_nsa_topk))


def test_dynamic_shapes_sdpa_band_and_block_masks_stay_rewritten():
    _symbols(_dynamic_vs_eager(_dyn_window_sdpa))
    _symbols(_dynamic_vs_eager(_dyn_expand_kron_sdpa, _DYN_CALLS[:3]))


def test_dynamic_shapes_symbolic_window_or_block_size_is_refused_and_matches_eager():
    """A window or block size that is itself a symbolic size is not a constant geometry: refused
    (under dynamic shapes only; the first, static graph is rewritten), and eager still holds."""
    for fn, what in ((_dyn_symbolic_window, "window"), (_dyn_symbolic_block, "block size")):
        report = _dynamic_vs_eager(fn, ((1, 32), (1, 48), (1, 64)))
        assert report.graphs == 2 and report.counts["attention"] == 1, (report.counts, report.misses)
        assert len(report.misses) == 1 and "symbolic size" in report.misses[0].reason \
            and f"constant {what}" in report.misses[0].reason, report.misses


class TestAttentionDynamic(expecttest.TestCase):
    def test_dynamic_nsa_graph_reads_sizes_from_the_graph(self):
        """Symbolic T and batch: the block count stays the graph's ceil(T / S), the table is
        expanded to the batch read from q (``size(0)``), no size is baked in."""
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, H, 40, D, generator=g) for _ in range(3))
        for x in (q, k, v):
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 2)
        self.assertExpectedInline(rewritten_graph(_dyn_nsa_topk, q, k, v), """\
def forward(self, s85, s0, L_q_, s69, L_k_, s33, L_v_):
    l_q_ = L_q_
    l_k_ = L_k_
    l_v_ = L_v_
    neg = -s0
    floordiv = neg // 16
    neg_1 = -floordiv
    mul = neg_1 * 16
    sub = mul - s0
    pad = torch._C._nn.pad(l_q_, (0, 0, 0, sub), 'constant', None)
    view = pad.view(s33, 2, neg_1, 16, 16)
    qb = view.mean(3)
    pad_1 = torch._C._nn.pad(l_k_, (0, 0, 0, sub), 'constant', None)
    view_1 = pad_1.view(s33, 2, neg_1, 16, 16)
    kb = view_1.mean(3)
    transpose = kb.transpose(-1, -2)
    matmul = qb @ transpose
    detach = matmul.detach()
    eye = torch.eye(neg_1)
    mul_1 = 100 * eye
    imp = detach + mul_1
    topk = imp.topk(2, dim = -1)
    getitem_5 = topk[1]
    size_1 = l_q_.size(0)
    topk_to_indices = bcpt_compile_lowering_attention_topk_to_indices(getitem_5, size_1, 2)
    getitem_7 = topk_to_indices[0]
    getitem_8 = topk_to_indices[1]
    nsa_selected_attention_default = torch.ops.bcpt.nsa_selected_attention.default(l_q_, l_k_, l_v_, getitem_7, getitem_8, 16, 16, True, 0.25)
    getitem_9 = nsa_selected_attention_default[0]
    return (getitem_9,)
""")
