"""Engine events into the replica's event loop, with one loop wake-up per burst instead of one per event.

The engine thread produces an event per running request per step (hundreds per second with a full batch on a
small model). Handing each over with its own `call_soon_threadsafe` wakes the event loop, and takes the GIL
from the engine, once per event. The bridge queues them and schedules at most one flush at a time: everything
the engine posted before the loop got round to it moves in one go.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class EventBridge:
    """Thread-safe handoff of (queue, event) pairs from any thread into `loop`'s asyncio queues."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False
        self.flushes = 0  # loop wake-ups so far (for tests and profiling)
        self.events = 0  # events moved so far

    def post(self, queue: asyncio.Queue, event: Any) -> None:
        """Queue `event` for `queue` (any thread; cheap: a list append, and a wake-up only if none is pending)."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        self.flushes += 1
        self.events += len(pending)
        for queue, event in pending:
            queue.put_nowait(event)
