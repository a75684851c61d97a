"""Triton kernels. On CPU tensors they run only under ``TRITON_INTERPRET=1`` (tests)."""

from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor's device (CUDA, or CPU under the interpreter)."""
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def launchable(kernel, t: torch.Tensor):
    """``kernel`` ready for ``[grid](...)``. While a ``triton_op``'s body is traced (fake or
    functional CUDA tensors), through ``torch.library.wrap_triton``, so that AOTAutograd puts
    the launch in the graph and Inductor runs it with its own launcher (and CUDA graphs);
    otherwise the kernel itself: eager calls skip the higher-order-op dispatch, and the
    interpreter's kernels (CPU) cannot be traced at all.

    A launch must never pass a tensor it writes under two argument names (say, as an unused
    placeholder pointer): functionalization clones each name separately and keeps one.
    """
    if traced(t):
        return torch.library.wrap_triton(kernel)
    return kernel


def traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a CUDA tensor seen while a graph is traced (fake or functional), not a
    real one: host-side decisions that need real data must be made another way."""
    return t.device.type == "cuda" and (type(t) is not torch.Tensor or _get_current_dispatch_mode() is not None)


def ensure_triton_allocator() -> None:
    """Give Triton an allocator for kernels that need global scratch (device-side TMA
    descriptors), unless the user set one. Inductor launches such kernels with Triton's own
    launcher (its static launcher declines them), which allocates the scratch through it;
    from PyTorch's caching allocator, on the launch stream, it is CUDA-graph safe.

    Triton keeps the allocator in a ContextVar, so ``triton.set_allocator`` reaches one thread
    only, and the autograd engine's threads (where a checkpointed forward is recomputed) start
    without it. Ours becomes the variable's default instead, seen by every thread;
    ``triton.set_allocator`` still overrides it where it is called."""
    import contextvars

    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        _allocation._allocator = contextvars.ContextVar("_allocator", default=_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tile_state_size(M, N, block_size: int):
    """Length of the int32 BCAT state (tile bits, then the active count) for an (M, N) gate.

    Here, not in bcat_cluster, because the CPU reference path sizes it without Triton.
    """
    return ((M + block_size - 1) // block_size) * ((((N + block_size - 1) // block_size) + 31) // 32) + 1
