"""Move DeepEmbed tables to (pinned) host memory while keeping the model runnable in eager.

A table on the host cannot be indexed by a device ``idx`` in eager PyTorch, so an offloaded
``nn.Embedding`` gathers on the table's device and moves the rows to ``idx``'s device:
``F.embedding(idx.to(w.device), w).to(idx.device)``. That is also the spelling the
``deepembed`` pass recognises for ``deepembed_tables="cpu"``, so eager and compiled runs
are the same program.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class OffloadedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose weight lives on the host; same state_dict keys as the original."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.embedding(idx.to(w.device), w, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse).to(idx.device)


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    host = t.detach().to("cpu")
    if pin and torch.cuda.is_available():
        host = host.pin_memory()
    return host


def offload_tables(model: nn.Module, select: Callable[[str, nn.Module], bool] | None = None,
                   pin: bool = True, sparse: bool | None = None) -> list[str]:
    """Turn the selected ``nn.Embedding`` submodules into host-resident ``OffloadedEmbedding``.

    ``select(name, module)`` picks the tables (default: every embedding whose name does not
    end in ``emb``/``wte``/``tok``, i.e. not the token embedding of the model's input).
    The parameter object is kept (its ``.data`` moves), so optimizers built before or after
    see the same parameter. ``pin`` (default) puts the tables in pinned memory, which the
    zero-copy gathers need. ``sparse=True`` sets ``nn.Embedding.sparse``: the tables' gradient
    becomes a sparse COO tensor of the touched rows (eager and compiled alike), for
    ``torch.optim.SparseAdam`` / ``SGD``, instead of a dense (vocab x d) host tensor.
    Returns the qualified names moved.
    """
    if select is None:
        def select(name: str, mod: nn.Module) -> bool:
            leaf = name.rsplit(".", 1)[-1]
            return leaf not in ("emb", "wte", "tok", "embed_tokens")
    moved = []
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Embedding and select(name, mod):
            mod.weight.data = _host_copy(mod.weight.data, pin)
            mod.__class__ = OffloadedEmbedding
            if sparse is not None:
                mod.sparse = bool(sparse)
            moved.append(name)
    return moved
