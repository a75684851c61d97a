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
