"""Device time per call of each CUDA kernel that a callable launches, from torch.profiler:
the per-kernel breakdown the ``profile_*`` scripts print."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_times_ms(fn, calls: int = 5, warmup: int = 1) -> list[tuple[str, float]]:
    """[(kernel name, ms per call)], slowest first."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = [(e.key, e.self_device_time_total / calls / 1e3) for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(times, key=lambda kv: -kv[1])
