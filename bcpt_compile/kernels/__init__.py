"""Triton kernels. On CPU tensors they run only under ``TRITON_INTERPRET=1`` (tests)."""

from __future__ import annotations

import os

import torch


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor's device (CUDA, or CPU under the interpreter)."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
