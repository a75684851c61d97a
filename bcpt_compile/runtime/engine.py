"""BCPT-Runtime: row gathers from host-resident tables, overlapped with compute.

A *plan* is the host-side index bookkeeping for one ``idx``: its distinct rows (sorted) and
each token's position among them. A *gather* moves those rows of one table to the compute
device. On CUDA it runs in a per-device worker thread and copy stream:

1. ``index_select`` of the missing rows into a pinned staging buffer (host; the thread
   releases the GIL, so the Python thread that launches kernels keeps going);
2. an async host-to-device copy on the device's copy stream; rows already held by the
   device cache are copied device-to-device on the same stream;
3. an event recorded after the copy. ``wait`` makes the compute stream wait on that
   event and calls ``record_stream`` on the results, which were allocated on the copy
   stream and are used and freed on the compute stream.

Staging buffers come in a ring of two per table and are reused only after their previous
copy's event has completed, so a copy never reads a buffer that is being refilled.
On CPU devices every step is a plain gather, which is what makes this path testable there.

The cache is bounded (``configure(cache_rows=...)``, per table) and keyed by (table, row);
each slot keeps an access count and the step it was last used in, and eviction takes the
least recently used slots, fewest accesses first. A table's cache is dropped when the
table's version counter moves (an optimizer step writes the table in place), so cached
rows are never stale; in training this means the cache only helps within a step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


@dataclasses.dataclass
class RuntimeStats:
    plans: int = 0
    prefetches: int = 0
    sync_gathers: int = 0
    waits: int = 0
    waits_ready: int = 0  # copy already complete when its wait ran (fully hidden)
    rows_requested: int = 0  # distinct rows asked for, summed over gathers
    rows_copied: int = 0  # rows that crossed from host to device memory
    bytes_copied: int = 0  # host-to-device bytes (rows and token positions)
    cache_hits: int = 0
    cache_misses: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Config:
    cache_rows: int = 0  # per table; 0: no device cache (tables use no device memory)
    threaded: bool = True


_config = _Config()
_stats = RuntimeStats()
_lock = threading.Lock()


def configure(*, cache_rows: Optional[int] = None, threaded: Optional[bool] = None) -> None:
    """Set the device cache size (rows per table) and whether CUDA gathers run in a worker thread."""
    if cache_rows is not None:
        if cache_rows < 0:
            raise ValueError(f"cache_rows must be >= 0, got {cache_rows}")
        _config.cache_rows = int(cache_rows)
        _caches.clear()
    if threaded is not None:
        _config.threaded = bool(threaded)


def stats() -> RuntimeStats:
    return dataclasses.replace(_stats)


def reset_stats() -> None:
    global _stats
    _stats = RuntimeStats()


def _count(**kw: int) -> None:
    with _lock:
        for k, v in kw.items():
            setattr(_stats, k, getattr(_stats, k) + v)


# ------------------------------------------------------------------ plans

def make_plan(flat_idx_cpu: Tensor) -> Tensor:
    """[U, uniq (padded to M), inverse (M)] as one int64 CPU tensor of length 2M + 1."""
    m = flat_idx_cpu.numel()
    plan = torch.zeros(2 * m + 1, dtype=torch.int64)
    if m:
        uniq, inv = torch.unique(flat_idx_cpu.to(torch.int64), sorted=True, return_inverse=True)
        plan[0] = uniq.numel()
        plan[1:1 + uniq.numel()] = uniq
        plan[1 + m:] = inv
    _count(plans=1)
    return plan


def split_plan(plan: Tensor) -> tuple[Tensor, Tensor]:
    m = (plan.numel() - 1) // 2
    u = int(plan[0])
    return plan[1:1 + u], plan[1 + m:]


# ------------------------------------------------------------------ device cache

class RowCache:
    def __init__(self, table: Tensor, device: torch.device, capacity: int):
        self.version = table._version
        self.slot_of = torch.full((table.shape[0],), -1, dtype=torch.int64)
        self.row_of = torch.full((capacity,), -1, dtype=torch.int64)
        self.count = torch.zeros(capacity, dtype=torch.int64)
        self.last_use = torch.full((capacity,), -1, dtype=torch.int64)
        self.buf = torch.empty((capacity, table.shape[1]), dtype=table.dtype, device=device)
        self.step = 0

    def lookup(self, uniq: Tensor) -> Tensor:
        self.step += 1
        slots = self.slot_of[uniq]
        hit = slots >= 0
        self.count[slots[hit]] += 1
        self.last_use[slots[hit]] = self.step
        return slots

    def admit(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Slots for as many of ``rows`` as fit, evicting slots not used in this step."""
        free = (self.last_use < self.step).nonzero().flatten()
        if free.numel() == 0 or rows.numel() == 0:
            return rows[:0], free[:0]
        # least recently used first, fewer accesses first among equals
        key = self.last_use[free] * (1 << 32) + self.count[free].clamp(max=(1 << 31))
        victims = free[torch.argsort(key, stable=True)][: rows.numel()]
        take = rows[: victims.numel()]
        old = self.row_of[victims]
        self.slot_of[old[old >= 0]] = -1
        self.row_of[victims] = take
        self.slot_of[take] = victims
        self.count[victims] = 1
        self.last_use[victims] = self.step
        return take, victims


_caches = WeakIdKeyDictionary()  # tensors compare elementwise, so key by identity


def _cache_for(table: Tensor, device: torch.device) -> Optional[RowCache]:
    if _config.cache_rows <= 0:
        return None
    per_table = _caches.setdefault(table, {})
    cache = per_table.get(device)
    if cache is None or cache.version != table._version or cache.buf.shape[0] != _config.cache_rows:
        cache = per_table[device] = RowCache(table, device, _config.cache_rows)
    return cache


# ------------------------------------------------------------------ per-device machinery

class _Device:
    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bcpt-copy-{device}")
        self.staging = WeakIdKeyDictionary()

    def staging_for(self, table: Tensor, rows: int) -> Tensor:
        """A pinned buffer of at least ``rows`` rows whose previous copy has finished."""
        ring = self.staging.setdefault(table, [[None, None], [None, None], 0])
        slot = ring[ring[2]]
        ring[2] ^= 1
        buf, event = slot
        if event is not None:
            event.synchronize()
        if buf is None or buf.shape[0] < rows or buf.dtype != table.dtype or buf.shape[1] != table.shape[1]:
            buf = torch.empty((max(rows, 1), table.shape[1]), dtype=table.dtype, pin_memory=True)
            slot[0] = buf
        return buf

    def mark_staging(self, table: Tensor, buf: Tensor, event) -> None:
        for slot in self.staging[table][:2]:
            if slot[0] is buf:
                slot[1] = event


_devices: dict[torch.device, _Device] = {}


def _device_state(device: torch.device) -> _Device:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    state = _devices.get(device)
    if state is None:
        state = _devices[device] = _Device(device)
    return state


@torch.no_grad()  # a data move: the table's gradient comes from the ops' own backward
def _gather(table: Tensor, plan: Tensor, device: torch.device):
    """(rows (M, W) on device, inverse (M,) on device, event or None). Rows past U are unset."""
    uniq, inv = split_plan(plan)
    m, u = inv.numel(), uniq.numel()
    width, esize = table.shape[1], table.element_size()
    state = _device_state(device) if device.type == "cuda" else None
    if state is None:
        rows = torch.empty((m, width), dtype=table.dtype, device=device)
        cache = _cache_for(table, device)
    else:
        # allocated on the copy stream, which writes them; wait() hands them to the compute
        # stream with record_stream, so the allocator never reuses them under a pending copy
        with torch.cuda.device(device), torch.cuda.stream(state.copy_stream):
            rows = torch.empty((m, width), dtype=table.dtype, device=device)
            cache = _cache_for(table, device)
    slots = cache.lookup(uniq) if cache is not None else torch.full((u,), -1, dtype=torch.int64)
    hit = slots >= 0
    miss_pos = (~hit).nonzero().flatten()
    miss_ids = uniq[miss_pos]
    n_miss, n_hit = miss_ids.numel(), int(hit.sum())
    _count(rows_requested=u, cache_hits=n_hit if cache is not None else 0,
           cache_misses=n_miss if cache is not None else 0)
    if state is None:  # host compute: the copies are plain gathers
        rows[miss_pos] = table.index_select(0, miss_ids).to(device)
        if n_hit:
            rows[hit.nonzero().flatten()] = cache.buf[slots[hit]]
        if cache is not None:
            take, new_slots = cache.admit(miss_ids)
            cache.buf[new_slots] = table.index_select(0, take).to(device)
        _count(rows_copied=n_miss)
        return rows, inv.to(device, copy=True), None
    staging = state.staging_for(table, n_miss)
    torch.index_select(table, 0, miss_ids, out=staging[:n_miss])
    inv_pinned = inv.pin_memory()
    with torch.cuda.device(device), torch.cuda.stream(state.copy_stream):
        inv_dev = inv_pinned.to(device, non_blocking=True)
        if n_hit == 0 and cache is None:
            rows[:u].copy_(staging[:n_miss], non_blocking=True)
        else:
            fresh = staging[:n_miss].to(device, non_blocking=True)
            rows[miss_pos.to(device)] = fresh
            if n_hit:
                hit_pos = hit.nonzero().flatten()
                rows[hit_pos.to(device)] = cache.buf[slots[hit].to(device)]
            take, new_slots = cache.admit(miss_ids)
            if take.numel():
                cache.buf[new_slots.to(device)] = fresh[: take.numel()]
        event = torch.cuda.Event()
        event.record(state.copy_stream)
    state.mark_staging(table, staging, event)
    _count(rows_copied=n_miss, bytes_copied=n_miss * width * esize + inv.numel() * 8)
    return rows, inv_dev, event


def _finish(rows: Tensor, inv: Tensor, event) -> tuple[Tensor, Tensor]:
    if event is not None:
        ready = event.query()
        _count(waits_ready=int(ready))
        stream = torch.cuda.current_stream(rows.device)
        stream.wait_event(event)
        rows.record_stream(stream)
        inv.record_stream(stream)
    return rows, inv


# ------------------------------------------------------------------ tickets (prefetch handles)

_tickets: dict[int, object] = {}
_next_ticket = itertools.count(1)
_MAX_TICKETS = 4096


def start(table: Tensor, plan: Tensor, device: torch.device) -> int:
    """Begin gathering ``plan``'s rows of ``table`` to ``device``; returns a ticket for ``finish``."""
    ticket = next(_next_ticket)
    if device.type == "cuda" and _config.threaded:
        job = _device_state(device).pool.submit(_gather, table, plan, device)
    else:
        job = _gather(table, plan, device)
    with _lock:
        _tickets[ticket] = (job, table, plan, device)
        while len(_tickets) > _MAX_TICKETS:  # a graph that raised between prefetch and wait
            _tickets.pop(next(iter(_tickets)))
    _count(prefetches=1)
    return ticket


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.device == b.device)


def finish(ticket: int, table: Tensor, plan: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """The rows of ``start``; gathers synchronously when the ticket is unknown."""
    with _lock:
        entry = _tickets.pop(ticket, None)
    _count(waits=1)
    if entry is None or not _same(entry[1], table) or not _same(entry[2], plan):
        return gather_now(table, plan, device)
    job = entry[0]
    result = job.result() if isinstance(job, concurrent.futures.Future) else job
    return _finish(*result)


def gather_now(table: Tensor, plan: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    _count(sync_gathers=1)
    if device.type == "cuda" and _config.threaded:  # the worker owns the caches and staging rings
        return _finish(*_device_state(device).pool.submit(_gather, table, plan, device).result())
    return _finish(*_gather(table, plan, device))
