"""The output lease without Ray: a live holder is refused, a dead one is waited out for its whole ttl, a released
one is not waited for, and a failure after writing started leaves the lease to expire."""

from __future__ import annotations

import json
import time

import pytest

from pipelines.lease import LEASE_FILE, OutputBusy, OutputLease
from pipelines.output import open_output


class FakeTime:
    """A clock that advances only when slept on."""

    def __init__(self):
        self.now, self.slept = 0.0, 0.0

    def sleep(self, s: float) -> None:
        self.now += s
        self.slept += s

    def clock(self) -> float:
        return self.now


def test_a_free_output_is_taken_at_once_renewed_and_released(tmp_path):
    out = open_output(tmp_path / "out")
    with OutputLease(out, ttl_s=0.5) as lease:
        first = lease.read()
        assert first is not None and first.owner == lease.record.owner and first.ttl_s == 0.5
        time.sleep(0.35)  # renewals every 0.1 s
        assert lease.read().beat > first.beat
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_a_dead_holder_is_waited_out_for_its_ttl(tmp_path):
    out = open_output(tmp_path / "out")
    dead = OutputLease(out, ttl_s=30)
    dead._write()  # a run that was killed: its lease stays, never renewed
    fake = FakeTime()
    lease = OutputLease(out, ttl_s=10, sleep=fake.sleep, clock=fake.clock)
    lease.acquire()
    try:
        assert 30 <= fake.slept <= 30 + 1.0  # the holder's ttl, not ours; then one short confirmation wait
        assert lease.read().owner == lease.record.owner
    finally:
        lease.release()


def test_a_live_holder_is_refused_and_keeps_its_lease(tmp_path):
    out = open_output(tmp_path / "out")
    with OutputLease(out, ttl_s=0.5) as holder:
        with pytest.raises(OutputBusy, match="being written by run"):
            OutputLease(out, ttl_s=0.5).acquire()
        assert holder.read().owner == holder.record.owner


def test_a_holder_that_finishes_meanwhile_is_not_waited_for(tmp_path):
    out = open_output(tmp_path / "out")
    holder = OutputLease(out, ttl_s=30)
    holder._write()
    fake = FakeTime()

    def sleep(s: float) -> None:
        fake.sleep(s)
        if (tmp_path / "out" / LEASE_FILE).exists() and json.loads((tmp_path / "out" / LEASE_FILE).read_text())[
                "owner"] == holder.record.owner:
            holder.release()  # finishes during the first wait

    lease = OutputLease(out, ttl_s=10, sleep=sleep, clock=fake.clock)
    lease.acquire()
    lease.release()
    assert fake.slept < 30 / 5 + 1.5


def test_a_failure_after_writing_started_leaves_the_lease_to_expire(tmp_path):
    out = open_output(tmp_path / "out")
    with pytest.raises(ValueError, match="before writing"):
        with OutputLease(out, ttl_s=0.5):
            raise ValueError("before writing")
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    with pytest.raises(RuntimeError, match="while writing"):
        with OutputLease(out, ttl_s=0.5) as lease:
            lease.writing()
            raise RuntimeError("while writing")
    left = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
    assert left["owner"] == lease.record.owner
    time.sleep(0.3)
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text()) == left  # no longer renewed
