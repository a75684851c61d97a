"""Record realistic SBL routing masks R != 0 from a briefly trained Tiny-ONN-style model.

Tokens come from a few latent topics; two SBL layers learn to route them through
prototype keys with relu(scores - gate) and an L1 pressure on the routing, as Tiny-ONN
does. The masks (bool, tokens x features) become a small test fixture for BCAT's
clustering (fill ratio of fixed-grid vs reordered tiling).

    python benchmarks/record_sbl_masks.py  # writes tests/fixtures/sbl_masks.pt (CPU, ~1 min)
"""

import math
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
D, H, TOKENS, TOPICS = 64, 256, 256, 12


class SBL(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.mu_weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.sigma_weight = nn.Parameter(torch.zeros(d_out, d_in))
        self.gate_param = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        keys = self.mu_weight * F.softplus(self.sigma_weight)
        raw = F.relu(x @ keys.t() / math.sqrt(x.size(-1)) - self.gate_param)
        return F.linear(x, self.mu_weight) * raw, raw


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = SBL(D, H), SBL(H, D)

    def forward(self, x):
        h, r1 = self.l1(x)
        y, r2 = self.l2(F.silu(h))
        return y, (r1, r2)


def batch(centres, teacher):
    topic = torch.randint(0, TOPICS, (TOKENS,))
    x = centres[topic] + 0.3 * torch.randn(TOKENS, D)
    return x, torch.tanh(x @ teacher)


def main():
    centres = torch.randn(TOPICS, D)
    teacher = torch.randn(D, D) / math.sqrt(D)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(400):
        x, target = batch(centres, teacher)
        y, raws = net(x)
        loss = F.mse_loss(y, target) + 0.05 * sum(r.abs().mean() for r in raws)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, _ = batch(centres, teacher)
        _, (r1, r2) = net(x)
    masks = {"layer1": (r1 != 0).cpu(), "layer2": (r2 != 0).cpu()}
    for k, m in masks.items():
        print(f"{k}: shape {tuple(m.shape)} density {m.float().mean():.3f}, final loss {loss.item():.4f}")
    out = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sbl_masks.pt"
    torch.save(masks, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
