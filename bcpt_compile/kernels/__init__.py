"""Triton kernels. On CPU tensors they run only under ``TRITON_INTERPRET=1`` (tests)."""

from __future__ import annotations

import os

import torch


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor's device (CUDA, or CPU under the interpreter)."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def launchable(kernel, t: torch.Tensor):
    """``kernel`` ready for ``[grid](...)``: on CUDA through ``torch.library.wrap_triton``,
    so that a ``triton_op`` traced by AOTAutograd hands the launch to Inductor (its own
    launcher, CUDA graphs) instead of hiding it in an opaque op; on CPU the interpreter's
    kernel itself (it cannot be traced with fake tensors)."""
    if t.device.type == "cuda":
        return torch.library.wrap_triton(kernel)
    return kernel


def tile_state_size(M, N, block_size: int):
    """Length of the int32 BCAT state (tile bits, then the active count) for an (M, N) gate.

    Here, not in bcat_cluster, because the CPU reference path sizes it without Triton.
    """
    return ((M + block_size - 1) // block_size) * ((((N + block_size - 1) // block_size) + 31) // 32) + 1
