"""One writer per output: a caption run holds `_lease.json` beside the output and renews it while it runs, so a
second run on the same output is refused, and a run resuming after a killed one first waits until the killed
run's workers are gone.

Why the wait: killing a job's driver does not stop its Ray workers at once. A write task already running can
commit an output file and its checkpoint entry after the driver is dead (measured: 0.8 s after the driver's
process group was killed, on a local cluster), and a resume that has loaded the checkpoint before then does
those rows again. A holder is alive while its beat counter moves; one whose counter has not moved for its
`ttl_s` died at least ttl_s - ttl_s / BEATS_PER_TTL ago. No clocks are compared, so hosts need not agree on time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Callable

from pipelines.output import OutputLocation

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
BEATS_PER_TTL = 5  # renewals per ttl: a holder is presumed dead after missing this many in a row


class OutputBusy(ValueError):
    """Another run is writing this output now."""


@dataclass(frozen=True)
class LeaseRecord:
    """What `_lease.json` holds."""

    owner: str  # random id of the holding run
    host: str  # where its driver runs (for the messages)
    pid: int  # its driver's process id (for the messages)
    beat: int  # renewals so far; a counter that stops moving means the holder is dead
    ttl_s: float  # how long a waiting run watches the counter before it presumes the holder dead

    def describe(self) -> str:
        return f"run {self.owner[:8]} (pid {self.pid} on {self.host})"


class OutputLease:
    """Hold an output for one run: `acquire` (waits out a dead holder, refuses a live one), renewal on a daemon
    thread, `release`. As a context manager it releases on success and on errors raised before `writing()` was
    called; after that an error leaves the lease to expire, because the run's own write tasks may still commit."""

    def __init__(self, out: OutputLocation, ttl_s: float, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        if not ttl_s > 0:
            raise ValueError(f"lease_s must be > 0, got {ttl_s!r}")
        self.out, self.ttl_s, self.sleep, self.clock = out, float(ttl_s), sleep, clock
        self.record = LeaseRecord(uuid.uuid4().hex, socket.gethostname(), os.getpid(), 0, self.ttl_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writing = False

    def read(self) -> LeaseRecord | None:
        """The lease on the output now, or None (a file that is not a lease counts as none, with a warning)."""
        text = self.out.read_text(LEASE_FILE)
        if text is None:
            return None
        try:
            return LeaseRecord(**json.loads(text))
        except (ValueError, TypeError) as e:
            log.warning("output %s: ignoring an unreadable %s (%s)", self.out.uri, LEASE_FILE, e)
            return None

    def _write(self) -> None:
        self.out.write_text(LEASE_FILE, json.dumps(asdict(self.record)) + "\n")

    def _wait_for_holder(self) -> None:
        held = self.read()
        if held is None:
            return
        log.warning("output %s: %s holds it; watching it for %.0f s (a dead run's workers may still be "
                    "committing files)", self.out.uri, held.describe(), held.ttl_s)
        deadline = self.clock() + held.ttl_s
        while self.clock() < deadline:
            self.sleep(min(held.ttl_s / BEATS_PER_TTL, max(0.0, deadline - self.clock())))
            now = self.read()
            if now is None:
                return  # released: it finished
            if now != held:
                raise OutputBusy(f"output {self.out.uri} is being written by {now.describe()}; wait for it to "
                                 "finish or choose another output")
        log.warning("output %s: %s stopped renewing its lease %.0f s ago; taking over", self.out.uri,
                    held.describe(), held.ttl_s)

    def acquire(self) -> None:
        """Wait out a dead holder, refuse a live one (OutputBusy), take the lease and start renewing it. Two runs
        starting at once both write; the one whose write landed last keeps it, the other sees that and refuses."""
        self._wait_for_holder()
        self._write()
        self.sleep(min(1.0, self.ttl_s / BEATS_PER_TTL))
        now = self.read()
        if now is None or now.owner != self.record.owner:
            raise OutputBusy(f"output {self.out.uri}: another run took it at the same moment "
                             f"({now.describe() if now else 'and released it'}); try again")
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / BEATS_PER_TTL):
            try:
                now = self.read()
                if now is not None and now.owner != self.record.owner:
                    log.error("output %s: %s took this run's lease; two runs are writing it", self.out.uri,
                              now.describe())
                    return
                self.record = replace(self.record, beat=self.record.beat + 1)
                self._write()
            except OSError as e:  # a storage hiccup: the next beat tries again (ttl allows several misses)
                log.warning("output %s: could not renew the lease (%s)", self.out.uri, e)

    def writing(self) -> None:
        """Mark that write tasks have started: from now on a failure leaves the lease to expire."""
        self._writing = True

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self.stop_renewing()
        now = self.read()
        if now is not None and now.owner == self.record.owner:
            self.out.fs.delete_file(self.out.join(LEASE_FILE))

    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or not self._writing:
            self.release()
        else:
            self.stop_renewing()
            log.warning("output %s: the run failed while writing; its lease expires in %.0f s, after which a "
                        "rerun may start (its write tasks may still be committing)", self.out.uri, self.ttl_s)
