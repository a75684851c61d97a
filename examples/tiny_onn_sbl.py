"""Tiny-ONN-style SBL model under ``torch.compile(backend="bcpt")``: the main job.

    python examples/tiny_onn_sbl.py

Prints what bcpt rewrote (``bcpt_compile.explain``), checks that the compiled model's
outputs and gradients equal eager's on random inputs, and on a CUDA GPU times a
training step against eager and ``backend="inductor"``. The model is written in plain
PyTorch, as Tiny-ONN writes it: nothing in it knows about bcpt.
"""

import argparse
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bcpt_compile


class SBLBlock(nn.Module):
    """Prototype routing: relu(scores - gate) selects the features each token uses."""

    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.mu_weight = nn.Parameter(torch.randn(d_hidden, d_model) / math.sqrt(d_model))
        self.sigma_weight = nn.Parameter(torch.zeros(d_hidden, d_model))
        self.gate_param = nn.Parameter(torch.zeros(d_hidden))
        self.out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
        keys = self.mu_weight * F.softplus(self.sigma_weight)
        scores = x @ keys.t() / math.sqrt(x.size(-1))
        raw = F.relu(scores - self.gate_param)
        h = F.linear(x, self.mu_weight) * raw
        return x + self.out(h), raw


class TinyOnn(nn.Module):
    def __init__(self, d_model, d_hidden, layers):
        super().__init__()
        self.blocks = nn.ModuleList(SBLBlock(d_model, d_hidden) for _ in range(layers))

    def forward(self, x):
        aux = 0.0
        for block in self.blocks:
            x, raw = block(x)
            aux = aux + raw.float().abs().mean()
        return x.float().pow(2).mean() + 1e-3 * aux


def topic_routed(model, d_model, tokens, topics, device, dtype):
    """Inputs from a few topics and prototypes grouped by topic, so each token routes to
    about 1/topics of the features: the activation sparsity a trained Tiny-ONN shows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    centres = torch.randn(topics, d_model, generator=g)
    with torch.no_grad():
        for block in model.blocks:
            h = block.mu_weight.shape[0]
            group = torch.arange(h) * topics // h
            block.mu_weight.copy_((centres[group] + 0.5 * torch.randn(h, d_model, generator=g)) / math.sqrt(d_model))
            block.gate_param.fill_(0.35)
    topic = torch.arange(tokens) * topics // tokens
    x = centres[topic] + 0.5 * torch.randn(tokens, d_model, generator=g)
    return model.to(device, dtype), x.to(device, dtype)


def grads(model, x):
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    loss = model(xi)
    loss.backward()
    return [loss.detach()] + [xi.grad] + [p.grad for p in model.parameters()]


def step_ms(fn, model, x, iters):
    for _ in range(3):
        model(x).backward()
        fn(x).backward()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn(x).backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    d_model, d_hidden, tokens, layers = (2048, 8192, 8192, 2) if gpu else (64, 512, 512, 2)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    model, x = topic_routed(TinyOnn(d_model, d_hidden, layers), d_model, tokens, 10, args.device, dtype)

    report = bcpt_compile.explain(model, x)
    print(report)
    assert report.counts["sbl"] == layers, report.counts

    compiled = torch.compile(copy.deepcopy(model), backend="bcpt")
    want, got = grads(model, x), grads(compiled, x)
    names = ["loss", "x.grad"] + [f"{n}.grad" for n, _ in model.named_parameters()]
    worst = 0.0
    for name, a, b in zip(names, want, got):
        err = ((b.double() - a.double()).norm() / a.double().norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), f"{name}: relative error {err:.2e}"
    print(f"compiled == eager: loss and {len(names) - 1} gradients, worst relative error {worst:.1e}")

    if gpu:
        inductor = torch.compile(copy.deepcopy(model), backend="inductor")
        t_eager = step_ms(model, model, x, 20)
        t_ind = step_ms(inductor, model, x, 20)
        t_bcpt = step_ms(compiled, model, x, 20)
        print(f"training step ({tokens} tokens, d {d_model}, hidden {d_hidden}, {layers} layers, bf16): "
              f"eager {t_eager:.2f} ms, inductor {t_ind:.2f} ms, bcpt {t_bcpt:.2f} ms "
              f"-> {t_eager / t_bcpt:.2f}x eager, {t_ind / t_bcpt:.2f}x inductor")
    else:
        print("(no CUDA GPU: the SBL op ran its PyTorch reference path; run on a GPU for the speedup)")


if __name__ == "__main__":
    main()
