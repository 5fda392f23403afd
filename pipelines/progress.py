"""A caption job's live progress line: rows committed by this run, rows/s and the time left, from the checkpoint
files Ray Data commits (each new file's Parquet footer is read once; nothing else is read)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

import pyarrow.parquet as pq

from pipelines.output import OutputLocation


def progress_line(done: int, total: int | None, elapsed_s: float) -> str:
    """"1,234 / 5,000 rows  12.3 rows/s  ETA 5m06s" (no total: no ETA; no rows yet: no rate)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    head = f"{done:,}" + (f" / {total:,}" if total is not None else "") + " rows"
    if done == 0:
        return f"{head}  (starting, {elapsed_s:.0f} s)"
    line = f"{head}  {rate:.1f} rows/s"
    if total is not None and rate > 0:
        left = max(0, total - done) / rate
        line += f"  ETA {int(left // 60)}m{int(left % 60):02d}s"
    return line


class CommittedRows:
    """Counts the rows in checkpoint files committed since it was created (files present then are ignored)."""

    def __init__(self, out: OutputLocation, checkpoint_dir: str):
        self.out, self.checkpoint_dir = out, checkpoint_dir
        self.seen = set(out.committed_checkpoint_files(checkpoint_dir))
        self.rows = 0

    def poll(self) -> int:
        for path in self.out.committed_checkpoint_files(self.checkpoint_dir):
            if path not in self.seen:
                self.seen.add(path)
                try:
                    self.rows += pq.ParquetFile(path, filesystem=self.out.fs).metadata.num_rows
                except OSError:  # rewritten or removed meanwhile (a retry): counted at the next poll or never
                    self.seen.discard(path)
        return self.rows


class ProgressReporter:
    """Prints `progress_line` every `interval_s` on its own thread while the job runs: in place on a terminal,
    one line per report otherwise (logs)."""

    def __init__(self, count: Callable[[], int], total: int | None, interval_s: float = 10.0,
                 stream: TextIO | None = None):
        self.count, self.total, self.interval_s = count, total, interval_s
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caption-progress", daemon=True)

    def _emit(self, final: bool = False) -> None:
        try:
            line = progress_line(self.count(), self.total, time.monotonic() - self.started)
        except OSError as e:  # the filesystem is briefly unreachable: say so, the job goes on
            line = f"progress unavailable ({e})"
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._emit()

    def __enter__(self) -> "ProgressReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._emit(final=True)
