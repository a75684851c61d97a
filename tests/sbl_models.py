"""SBL masked-matmul spellings as client code writes them (Tiny-ONN, SparseProtoLinear, ...)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyOnnSBL(nn.Module):
    """Tiny-ONN's SBL layer: prototype keys, relu(scores - gate) routing, masked output."""

    def __init__(self, d_in=24, d_out=40):
        super().__init__()
        self.mu_weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.sigma_weight = nn.Parameter(torch.randn(d_out, d_in) * 0.5)
        self.gate_param = nn.Parameter(torch.randn(d_out) * 0.2 + 0.3)

    def forward(self, x):
        keys = self.mu_weight * F.softplus(self.sigma_weight)
        scores = torch.matmul(x, keys.t()) / math.sqrt(x.size(-1))
        raw = F.relu(scores - self.gate_param)
        out = F.linear(x, self.mu_weight) * raw
        return out, raw


class SparseProtoLinear(nn.Module):
    """SparseProtoLinear: silu input, normalised logits gated by relu."""

    def __init__(self, d_in=24, d_out=40, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)
        self.proto = nn.Parameter(torch.randn(d_out, d_in))
        self.eps = eps

    def forward(self, x):
        comp = F.linear(F.silu(x), self.weight, self.bias)
        logits = x @ self.proto.T
        raw = torch.relu(logits / (logits.abs().amax(-1, keepdim=True) + self.eps) - 0.3)
        return comp * raw


class ModuleLinearGate(nn.Module):
    """nn.Linear for both the value and the gate scores."""

    def __init__(self, d_in=24, d_out=40):
        super().__init__()
        self.value = nn.Linear(d_in, d_out)
        self.score = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.value(x) * nn.functional.relu(self.score(x))


def matmul_bias_before(x, w, b, s):
    return (x @ w.T + b) * torch.relu(s)


def gate_first(x, w, b, s):
    return F.relu(s) * F.linear(x, w, b)


def einsum_clamp(x, w, s):
    return torch.einsum("bti,oi->bto", x, w) * s.clamp(min=0)


def weight_in_out(x, w_in_out, s):
    return (x @ w_in_out) * s.relu()


def threshold_mul(x, w, s):
    return F.linear(x, w) * (s * (s > 0.1).float())


def where_tensor_threshold(x, w, s, t):
    return F.linear(x, w) * torch.where(s > t, s, 0.0)


def masked_fill_gate(x, w, s, m):
    return F.linear(x, w) * s.masked_fill(~m, 0)


def functional_threshold(x, w, s):
    return F.linear(x, w) * F.threshold(s, 0.2, 0.0)


def viewed_linear(x, w, s):
    b, t, _ = x.shape
    return F.linear(x.reshape(b * t, -1), w).view(b, t, -1) * torch.relu(s)


def bias_after_mask(x, w, b, s):
    return F.linear(x, w) * torch.relu(s) + b


def inplace_relu_gate(x, w, s):
    raw = F.relu(s * 1.0, inplace=True)  # Tiny-ONN-style memory saving
    return F.linear(x, w) * raw, raw.sum()


# near-misses
def gelu_gate(x, w, s):
    return F.linear(x, w) * F.gelu(s)


def broadcast_gate(x, w, s_col):
    return F.linear(x, w) * torch.relu(s_col)


def product_reused(x, w, s):
    y = F.linear(x, w)
    return y * torch.relu(s), y.sum()


# spellings found by red-teaming client-style layers
def einsum_weight_first(x, w, s):
    return torch.einsum("oi,bti->bto", w, x) * torch.relu(s)


def inplace_product(x, w, b, s):
    y = F.linear(x, w, b)
    y *= torch.relu(s)  # Dynamo: operator.imul on a fresh product nobody else reads
    return y


def mul_method_inplace(x, w, s):
    return F.linear(x, w).mul_(F.relu(s))


def inplace_bias_before(x, w, b, s):
    y = x @ w.T
    y += b
    return y * torch.relu(s)


def detached_gate(x, w, s):
    return F.linear(x, w) * torch.relu(s).detach()


def cast_gate(x, w, s):
    return F.linear(x, w) * F.relu(s).to(x.dtype)


def scaled_gate(x, w, s):
    return F.linear(x, w) * (torch.relu(s) / 0.5)


def squared_gate(x, w, s):
    return F.linear(x, w) * F.relu(s).square()


def gain_gate(x, w, s, gain):
    return F.linear(x, w) * (torch.relu(s - 0.1) * gain)


def eval_dropout_gate(x, w, s):
    return F.dropout(F.linear(x, w), 0.1, training=False) * F.dropout(torch.relu(s), 0.1, training=False)


def where_zeros_like(x, w, s):
    with torch.no_grad():
        active = s > 0.2
    return F.linear(x, w) * torch.where(active, s, torch.zeros_like(s))


def relu6_gate(x, w, s):
    return F.linear(x, w) * F.relu6(s * 4)


def maximum_gate(x, w, s):
    return F.linear(x, w) * torch.maximum(s, torch.zeros_like(s))


# near-misses found by red-teaming
def relu_plus_eps_gate(x, w, s):
    return F.linear(x, w) * (torch.relu(s) + 1e-3)


def relu_then_exp_gate(x, w, s):
    return F.linear(x, w) * torch.exp(torch.relu(s))


# spellings found by the third red-team round (in-place gates, shrinkage gates, head views)
def clamp_inplace_gate(x, w, s):
    return F.linear(x, w) * (s - 0.1).clamp_(min=0)


def relu6_inplace_gate(x, w, s):
    return F.linear(x, w) * F.relu6(s * 4, inplace=True)


def threshold_inplace_gate(x, w, s):
    return F.linear(x, w) * F.threshold(s * 1.0, -0.2, 0.0, inplace=True)


def masked_fill_function_gate(x, w, s, m):
    return F.linear(x, w) * torch.masked_fill(s, ~m, 0.0)


def masked_fill_inplace_gate(x, w, s, m):
    return F.linear(x, w) * (s * 1.0).masked_fill_(~m, 0)


def scalar_tensor_zero_gate(x, w, s):
    return F.linear(x, w) * torch.where(s > 0.2, s, torch.tensor(0.0))


def max_scalar_tensor_gate(x, w, s):
    return F.linear(x, w) * torch.max(s, torch.tensor(0.0))


def hardshrink_gate(x, w, s):
    return F.linear(x, w) * F.hardshrink(s, 0.3)


def softshrink_gate(x, w, s):
    return F.linear(x, w) * F.softshrink(s, 0.3)


def addmm_unit_scales(x, w, b, s):
    return torch.addmm(b, x.flatten(0, 1), w.t(), beta=1, alpha=1) * torch.relu(s.flatten(0, 1))


def head_split_view(x, w, s):
    b, t, n = s.shape
    heads = F.linear(x, w).view(b, t, 4, n // 4)
    return heads * torch.relu(s.view(b, t, 4, n // 4))


def gate_viewed_after_relu(x, w, s):
    b, t, n = s.shape
    return (F.linear(x, w).view(b, t, 4, n // 4) * torch.relu(s).view(b, t, 4, n // 4)).flatten(2)


# near-misses of the third round
def downcast_product(x, w, s):
    return F.linear(x, w).bfloat16() * torch.relu(s).bfloat16()


def mask_broadcasts_gate_up(x, w, s, m):
    return F.linear(x, w) * torch.where(m, s, 0.0)


def parameter_scaled_product(x, w, gain):
    return F.linear(x, w) * gain


def masked_gate_viewed(x, w, s, m):
    b, t, n = s.shape
    return F.linear(x, w).view(b, t, 4, n // 4) * torch.where(m, s, 0.0).view(b, t, 4, n // 4)
