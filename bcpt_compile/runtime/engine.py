"""BCPT-Runtime: row gathers from host-resident tables, overlapped with compute.

A *plan* (``plan.py``) lists the distinct rows of one ``idx`` on idx's device. A *gather*
moves those rows of one table to the compute device, into a slot-indexed ``(M, W)`` buffer
(slot u holds the plan's u-th distinct row; only the first U slots are written).

Fast path (CUDA, table in pinned host memory, no row cache): ``_gather_rows_kernel`` reads
the rows straight from the pinned table through its mapped device address (zero-copy /
UVA) and writes them to device memory, on the device's copy stream. The number of rows is
read by the kernel from the plan, so nothing waits for the host: the copy stream waits for
the compute stream (the plan is ready, earlier updates of the table are done), the kernel
runs, an event is recorded; ``wait`` makes the compute stream wait on that event. The
buffers are allocated on the compute stream, which only touches them after that wait, so
no ``record_stream`` is needed. No host sync, static shapes: CUDA-graph capturable. The same
kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (tests).

Fallback (a table that is not pinned, ``configure(uva=False)``, or a row cache): the plan's
distinct rows are copied to pinned host memory asynchronously (an event, not a sync, on the
launching thread); a per-device worker thread waits for it, ``index_select``s the rows the
cache misses into a pinned staging buffer (ring of two per table, reused only after its
previous copy finished) and copies them host-to-device on the copy stream; cache hits are
copied device-to-device. The worker owns caches and staging rings.

The cache is bounded (``configure(cache_rows=...)``, per table) and keyed by (table, row);
each slot keeps an access count and the step it was last used in, and eviction takes the
least recently used slots, fewest accesses first. A table's cache is dropped when the
table's version counter moves (an optimizer step writes the table in place), so cached
rows are never stale; in training this means the cache only helps within a step.

Counters: host-side for the fallback, device-side (int64, added by the kernel) for the fast
path; ``stats()`` reads both (a sync: call it outside hot loops).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
import warnings

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .plan import plan_tokens, views


@dataclasses.dataclass
class RuntimeStats:
    plans: int = 0
    prefetches: int = 0
    sync_gathers: int = 0
    waits: int = 0
    waits_ready: int = 0  # copy already complete when its wait ran (fully hidden)
    rows_requested: int = 0  # distinct rows asked for, summed over gathers
    rows_copied: int = 0  # rows that crossed from host to device memory
    bytes_copied: int = 0  # host-to-device bytes of table rows
    cache_hits: int = 0
    cache_misses: int = 0
    rows_updated: int = 0  # table rows written back by fused row optimizers
    uva_gathers: int = 0  # gathers done by the zero-copy kernel
    grad_bytes_to_host: int = 0  # device-to-host bytes of table gradients (dense / sparse modes)
    fused_updates: int = 0  # row updates applied by a fused row optimizer

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Config:
    cache_rows: int = 0  # per table; 0: no device cache (tables use no device memory)
    threaded: bool = True
    uva: bool = True  # zero-copy gathers from pinned tables on CUDA
    overlap: bool = True  # host-row kernels on the copy stream; False: on the compute stream (to measure the overlap)


_config = _Config()
_stats = RuntimeStats()
_lock = threading.Lock()


def configure(*, cache_rows: int | None = None, threaded: bool | None = None, uva: bool | None = None,
              overlap: bool | None = None) -> None:
    """Device cache size (rows per table; > 0 uses the host-bookkept fallback path), whether
    fallback gathers run in a worker thread, whether pinned tables use zero-copy gathers, and
    whether the zero-copy kernels overlap compute (``overlap=False`` runs them in line on the
    compute stream: what a step costs without the copy stream, for benchmarks)."""
    if cache_rows is not None:
        if cache_rows < 0:
            raise ValueError(f"cache_rows must be >= 0, got {cache_rows}")
        _config.cache_rows = int(cache_rows)
        _caches.clear()
    if threaded is not None:
        _config.threaded = bool(threaded)
    if uva is not None:
        _config.uva = bool(uva)
    if overlap is not None:
        _config.overlap = bool(overlap)


def side_stream(state: "_Device"):
    """The stream host-row kernels run on: the device's copy stream, or None (in line)."""
    return state.copy_stream if _config.overlap else None


def stats() -> RuntimeStats:
    out = dataclasses.replace(_stats)
    for state in list(_devices.values()):
        requested, copied, nbytes, updated = (int(v) for v in state.counters.tolist())
        out.rows_requested += requested
        out.rows_copied += copied
        out.bytes_copied += nbytes
        out.rows_updated += updated
    return out


def reset_stats() -> None:
    global _stats
    _stats = RuntimeStats()
    for state in list(_devices.values()):
        state.counters.zero_()


def count(**kw: int) -> None:
    with _lock:
        for k, v in kw.items():
            setattr(_stats, k, getattr(_stats, k) + v)


def host_plan(plan: Tensor) -> tuple[int, Tensor]:
    """(U, the U distinct rows on the host): a sync when the plan is on a GPU."""
    v = views(plan)
    u = int(v.count)
    return u, v.uniq[:u].to("cpu")


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


def _cache_for(table: Tensor, device: torch.device) -> RowCache | None:
    from .fused import mode_for

    if _config.cache_rows <= 0 or mode_for(table) is not None:  # fused updates do not move the version
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
        # high priority: the few programs of a host-row kernel take the first SM slots a
        # compute kernel frees, rather than queueing behind all of its blocks
        self.copy_stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"bcpt-copy-{device}")
        self.staging = WeakIdKeyDictionary()
        # device-side counters: rows requested, rows copied, bytes copied, rows updated
        self.counters = torch.zeros(4, dtype=torch.int64, device=device)
        self.uva_failed = False

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


def normal_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_state(device: torch.device) -> _Device:
    device = normal_device(device)
    state = _devices.get(device)
    if state is None:
        state = _devices[device] = _Device(device)
    return state


def _kernel_path(table: Tensor, device: torch.device) -> bool:
    """Whether the gather kernel serves this table: a pinned host table on CUDA (zero-copy), or
    any CPU table under the Triton interpreter; never with a row cache."""
    if _config.cache_rows > 0 or table.dim() != 2:
        return False
    if device.type == "cuda":
        return (_config.uva and table.device.type == "cpu" and table.is_pinned()
                and not device_state(device).uva_failed)
    from ..kernels import triton_runs_on

    return table.device == device and triton_runs_on(table)


def _plan_on(plan: Tensor, device: torch.device) -> Tensor:
    return plan if plan.device == device else plan.to(device, non_blocking=True)


def _kernel_gathers(tables: list[Tensor], plan: Tensor, device: torch.device) -> list:
    """[(rows, pos, event)] per table: the zero-copy gathers, started in order on the copy
    stream (CUDA) behind one wait for the compute stream; one event per table, so the
    first layer waits for its own rows only."""
    from ..kernels.deepembed import gather_rows_into

    state = device_state(device)
    plan = _plan_on(plan, state.device)
    m = plan_tokens(plan)
    inv = views(plan).inv
    jobs = [(torch.empty((m, t.shape[1]), dtype=t.dtype, device=state.device), inv.clone()) for t in tables]
    copy_stream = side_stream(state)
    if copy_stream is None:
        for table, (rows, _) in zip(tables, jobs):
            gather_rows_into(table, plan, rows, state.counters)
        count(uva_gathers=len(tables))
        return [(rows, pos, None) for rows, pos in jobs]
    out = []
    compute = torch.cuda.current_stream(state.device)
    copy_stream.wait_stream(compute)  # the plan is ready; earlier writes to the tables are done
    with torch.cuda.device(state.device), torch.cuda.stream(copy_stream):
        for table, (rows, pos) in zip(tables, jobs):
            gather_rows_into(table, plan, rows, state.counters)
            event = torch.cuda.Event()
            event.record(copy_stream)
            out.append((rows, pos, event))
    count(uva_gathers=len(tables))
    return out


@torch.no_grad()  # a data move: the table's gradient comes from the ops' own backward
def _host_gather(table: Tensor, uniq_host, inv: Tensor, device: torch.device):
    """(rows (M, W), pos (M,), event or None) through host bookkeeping. ``uniq_host``: the
    distinct rows on the host, or a callable returning them (waits for their copy)."""
    if callable(uniq_host):
        uniq_host = uniq_host()
    m, u = inv.numel(), uniq_host.numel()
    width, esize = table.shape[1], table.element_size()
    state = device_state(device) if device.type == "cuda" else None
    if state is None:
        rows = torch.empty((m, width), dtype=table.dtype, device=device)
        cache = _cache_for(table, device)
    else:
        # allocated on the copy stream, which writes them; finish() hands them to the compute
        # stream with record_stream, so the allocator never reuses them under a pending copy
        with torch.cuda.device(device), torch.cuda.stream(state.copy_stream):
            rows = torch.empty((m, width), dtype=table.dtype, device=device)
            cache = _cache_for(table, device)
    slots = cache.lookup(uniq_host) if cache is not None else torch.full((u,), -1, dtype=torch.int64)
    hit = slots >= 0
    miss_pos = (~hit).nonzero().flatten()
    miss_ids = uniq_host[miss_pos]
    n_miss, n_hit = miss_ids.numel(), int(hit.sum())
    count(rows_requested=u, cache_hits=n_hit if cache is not None else 0,
          cache_misses=n_miss if cache is not None else 0)
    if state is None:  # host compute: the copies are plain gathers
        rows[miss_pos] = table.index_select(0, miss_ids).to(device)
        if n_hit:
            rows[hit.nonzero().flatten()] = cache.buf[slots[hit]]
        if cache is not None:
            take, new_slots = cache.admit(miss_ids)
            cache.buf[new_slots] = table.index_select(0, take).to(device)
        count(rows_copied=n_miss, bytes_copied=n_miss * width * esize)
        return rows, inv.to(device, copy=True), None
    staging = state.staging_for(table, n_miss)
    torch.index_select(table, 0, miss_ids, out=staging[:n_miss])
    with torch.cuda.device(device), torch.cuda.stream(state.copy_stream):
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
    count(rows_copied=n_miss, bytes_copied=n_miss * width * esize)
    return rows, inv, event


def _host_gather_job(table: Tensor, plan: Tensor, device: torch.device):
    """Start a fallback gather: a job (future or result) giving (rows, pos, event)."""
    device = normal_device(device)
    inv = views(plan).inv
    if plan.device.type == "cuda":
        # the distinct rows reach the host asynchronously; the worker waits for their event
        m = plan_tokens(plan)
        head = torch.empty(1 + m, dtype=torch.int64, pin_memory=True)
        head.copy_(plan[:1 + m], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(plan.device))

        def uniq_host():
            ready.synchronize()
            return head[1:1 + int(head[0])]
    else:
        _, uniq = host_plan(plan)

        def uniq_host():
            return uniq
    pos = inv.to(device, non_blocking=True) if inv.device != device else inv.clone()
    if device.type == "cuda" and _config.threaded:
        fut = device_state(device).pool.submit(_host_gather, table, uniq_host, pos, device)
        return fut
    return _host_gather(table, uniq_host, pos, device)


def _start_jobs(tables: list[Tensor], plan: Tensor, device: torch.device) -> list:
    """Per table, ("kernel", (rows, pos, event)) or ("host", a future of or the result of
    _host_gather). The kernel-path tables share one plan transfer and one stream switch."""
    device = normal_device(device)
    fast = [_kernel_path(t, device) for t in tables]
    jobs: list = [None] * len(tables)
    if any(fast):
        picked = [t for t, f in zip(tables, fast) if f]
        try:
            done = iter(_kernel_gathers(picked, plan, device))
            jobs = [("kernel", next(done)) if f else None for f in fast]
        except ValueError as exc:  # Triton could not map the host pointer: use the fallback
            if device.type != "cuda":
                raise
            device_state(device).uva_failed = True
            warnings.warn(f"bcpt.runtime: zero-copy gather from pinned host memory failed ({exc}); "
                          "falling back to host-side gathers (one sync per step)")
    return [job if job is not None else ("host", _host_gather_job(t, plan, device)) for job, t in zip(jobs, tables)]


def _result(job) -> tuple[Tensor, Tensor]:
    kind, payload = job
    if isinstance(payload, concurrent.futures.Future):
        payload = payload.result()
    rows, pos, event = payload
    if event is not None:
        stream = torch.cuda.current_stream(rows.device)
        if not torch.cuda.is_current_stream_capturing():
            count(waits_ready=int(event.query()))
        stream.wait_event(event)
        if kind == "host":  # allocated on the copy stream, used and freed on this one
            rows.record_stream(stream)
    else:
        count(waits_ready=1)
    return rows, pos


# ------------------------------------------------------------------ tickets (prefetch handles)

_tickets: dict[int, object] = {}
_next_ticket = itertools.count(1)
_MAX_TICKETS = 4096


def start(tables: list[Tensor], plan: Tensor, device: torch.device) -> list[int]:
    """Begin gathering ``plan``'s rows of each table to ``device``, in order; returns a
    ticket per table for ``finish``."""
    jobs = _start_jobs(tables, plan, device)
    tickets = [next(_next_ticket) for _ in tables]
    with _lock:
        for ticket, job, table in zip(tickets, jobs, tables):
            _tickets[ticket] = (job, table, plan, device)
        while len(_tickets) > _MAX_TICKETS:  # a graph that raised between prefetch and wait
            _tickets.pop(next(iter(_tickets)))
    count(prefetches=len(tables))
    return tickets


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.device == b.device)


def finish(ticket: int, table: Tensor, plan: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """The rows of ``start``; gathers synchronously when the ticket is unknown."""
    with _lock:
        entry = _tickets.pop(ticket, None)
    count(waits=1)
    if entry is None or not _same(entry[1], table) or not _same(entry[2], plan):
        return gather_now(table, plan, device)
    return _result(entry[0])


def gather_now(table: Tensor, plan: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    count(sync_gathers=1)
    return _result(_start_jobs([table], plan, device)[0])
