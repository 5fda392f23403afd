"""What every engine reports: a TelemetrySnapshot over a sliding window of finished requests, plus the engine's
current queue, batch, KV bytes, device memory and sparsity. Pure Python (the control plane ships it around).

Device memory comes from NVML (the `pynvml` module of nvidia-ml-py) on a GPU, else from the process's
resident memory against the machine's physical memory.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TelemetrySnapshot:
    """One engine's state at `timestamp`. Rates and percentiles are over the last `window_s` seconds of finished
    requests (None when none finished); counts and bytes are current."""

    actor_id: str  # who reports (a Serve replica id or a Ray Data actor id)
    kind: str  # "serve" or "data"
    timestamp: float  # unix seconds
    window_s: float  # length of the sliding window the rates and percentiles cover
    requests_per_s: float  # finished requests per second
    output_tokens_per_s: float  # generated tokens per second
    ttft_p50_s: float | None  # arrival to first token, median
    ttft_p95_s: float | None
    token_latency_p50_s: float | None  # per output token after the first, median over requests
    token_latency_p95_s: float | None
    latency_p95_s: float | None  # arrival to last token, p95
    queue_depth: int  # requests waiting for admission
    running: int  # rows in the running batch
    kv_bytes_in_use: int  # K/V bytes the running rows hold in valid slots
    kv_bytes_allocated: int  # bytes the cache holds for the running rows: their blocks (paged) or padded tensors
    device_memory_used: int  # bytes (GPU via NVML, else this process's resident memory)
    device_memory_total: int  # bytes (GPU total, else physical memory)
    sparsity: dict = field(default_factory=dict)  # the engine's current SparsityConfig as a dict
    finished: int = 0  # requests (rows) this engine finished since it started
    oldest_wait_s: float | None = None  # how long the head of the queue has waited (None: nothing waits). A
    #                                     leading signal: that request's TTFT is already at least this.
    kv_bytes_budget: int = 0  # the engine's KV budget (0: none); kv_bytes_allocated stays within it
    kv_blocks_free: int = -1  # blocks of tokens (every layer) the budget still leaves (-1: no budget or padded)
    preempted: int = 0  # rows preempted since the engine started (its KV budget was full)
    busy_fraction: float | None = None  # share of the window the engine spent in steps with work (None: not
    #                                     measured). Over admitted_per_s it is the engine's cost per request.
    admitted_per_s: float | None = None  # requests the engine admitted (prefilled) per second: the rate its queue
    #                                      drains at (finishes come in bursts, as rows decode together)
    prefilling: int = 0  # requests in the prefill running now: admitted, first token not yet out (the queue
    #                      waits for them too)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class RequestWindow:
    """Finished requests of the last `window_s` seconds (thread-safe; the clock is injectable for tests)."""

    def __init__(self, window_s: float = 30.0, clock=time.time):
        self.window_s, self.clock = window_s, clock
        self.started = clock()  # a window younger than window_s divides by its age, not by window_s
        self._items: collections.deque[tuple[float, float, float | None, float, int]] = collections.deque()
        self._busy: collections.deque[tuple[float, float]] = collections.deque()  # (when, seconds) of busy steps
        self._admitted: collections.deque[tuple[float, int]] = collections.deque()  # (when, requests admitted)
        self._lock = threading.Lock()
        self.total = 0  # requests added since the window was made

    def add(self, ttft_s: float, latency_s: float, n_tokens: int) -> None:
        """One finished request: time to first token, end-to-end latency (s), generated tokens."""
        per_token = (latency_s - ttft_s) / (n_tokens - 1) if n_tokens > 1 else None
        with self._lock:
            self._append(self._items, (self.clock(), ttft_s, per_token, latency_s, n_tokens))
            self.total += 1

    def add_busy(self, seconds: float, admitted: int = 0) -> None:
        """One engine step that had work to do took `seconds` (the window's utilisation) and admitted (prefilled)
        `admitted` requests. Recorded together when the step ends, so busy / admitted never counts a request
        whose prefill time is not in yet."""
        with self._lock:
            now = self.clock()
            self._append(self._busy, (now, seconds))
            if admitted:
                self._append(self._admitted, (now, admitted))

    def _append(self, events: collections.deque, event: tuple) -> None:
        """Add an event and drop those older than the window (under the lock): an engine nobody asks for
        snapshots (an offline job without a controller) steps for hours, and must not keep every step."""
        events.append(event)
        self._prune(events, event[0])

    def _prune(self, events: collections.deque, now: float) -> None:
        while events and events[0][0] < now - self.window_s:
            events.popleft()

    def stats(self) -> dict[str, float | None]:
        now = self.clock()
        with self._lock:
            for events in (self._items, self._busy, self._admitted):
                self._prune(events, now)
            items = list(self._items)
            busy, admitted = sum(b[1] for b in self._busy), sum(a[1] for a in self._admitted)
        ttft = [i[1] for i in items]
        per_token = [i[2] for i in items if i[2] is not None]
        latency = [i[3] for i in items]
        span = min(self.window_s, max(now - self.started, 1.0))
        return {"requests_per_s": len(items) / span, "output_tokens_per_s": sum(i[4] for i in items) / span,
                "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
                "token_latency_p50_s": percentile(per_token, 50), "token_latency_p95_s": percentile(per_token, 95),
                "latency_p95_s": percentile(latency, 95), "finished": self.total,
                "busy_fraction": min(1.0, busy / span), "admitted_per_s": admitted / span}


def device_memory(device_index: int | None) -> tuple[int, int]:
    """(used, total) bytes: the GPU's through NVML when device_index is given, else this process's resident
    memory and the machine's physical memory."""
    if device_index is not None:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_index))
        return int(info.used), int(info.total)
    return resident_bytes(), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def take_snapshot(actor_id: str, kind: str, window: RequestWindow, device, sparsity: dict, queue_depth: int = 0,
                  running: int = 0, kv_bytes_in_use: int = 0, kv_bytes_allocated: int = 0,
                  oldest_wait_s: float | None = None, kv_bytes_budget: int = 0, kv_blocks_free: int = -1,
                  preempted: int = 0, prefilling: int = 0) -> TelemetrySnapshot:
    """A snapshot now: the window's figures, the given current counts, and `device`'s memory (a torch.device:
    NVML for CUDA, else this process)."""
    used, total = device_memory((device.index or 0) if device.type == "cuda" else None)
    return TelemetrySnapshot(actor_id=actor_id, kind=kind, timestamp=time.time(), window_s=window.window_s,
                             **window.stats(), queue_depth=queue_depth, running=running,
                             kv_bytes_in_use=kv_bytes_in_use, kv_bytes_allocated=kv_bytes_allocated,
                             device_memory_used=used, device_memory_total=total, sparsity=sparsity,
                             oldest_wait_s=oldest_wait_s, kv_bytes_budget=kv_bytes_budget,
                             kv_blocks_free=kv_blocks_free, preempted=preempted, prefilling=prefilling)
