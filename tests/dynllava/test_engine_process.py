"""The engine in its own process (dynllava.engine_process): the same tokens and events as in-process, refusals
and cancellation answered as the engine answers them, and no orphan: the child dies with its replica, and a
child that dies fails every request in flight instead of leaving it waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from dynllava.batching import EngineRequest, QueueFull, StreamEvent
from dynllava.config import SparsityConfig
from dynllava.engine_process import EngineProcess, EngineSpec
from dynllava.model import DynamicLlava
from tests.conftest import random_image
from tests.dynllava.test_batching import STAT_FIELDS

SPARSE = SparsityConfig(vision_keep=0.2, text_keep=0.5)
DENSE = SparsityConfig(vision_keep=1.0, text_keep=1.0)
PROMPTS = ["Describe the image.", "How many shapes are there?", "What colour is the largest shape?"]


@pytest.fixture(scope="module")
def front():
    """The replica's side: tiny's tokenizer and shapes on the meta device (no weights)."""
    return DynamicLlava.from_pretrained("tiny", device="meta")


@pytest.fixture(scope="module")
def engine():
    process = EngineProcess(EngineSpec("tiny", device="cpu", threads=1,
                                       engine=dict(max_batch=4, max_waiting=4, kv_budget_bytes=4 * 2**20)))
    yield process
    process.stop()


class Listener:
    """A request's events, and an Event set by its final one."""

    def __init__(self):
        self.events: list[StreamEvent] = []
        self.done = threading.Event()

    def __call__(self, event: StreamEvent) -> None:
        self.events.append(event)
        if event.final:
            self.done.set()

    def final(self, timeout_s: float = 60.0) -> StreamEvent:
        assert self.done.wait(timeout_s), "no final event"
        return self.events[-1]


def _request(front, i: int, sparsity: SparsityConfig, max_new: int, **kw) -> tuple[EngineRequest, Listener]:
    listener = Listener()
    prepared = front.prepare([random_image(i, (40 + 7 * i, 52))], [front.format_prompt(PROMPTS[i % 3])], max_new)
    return EngineRequest(prepared, sparsity, max_new, on_event=listener, **kw), listener


def test_the_meta_front_end_prepares_as_the_model_does(front):
    """The replica prepares requests with no weights loaded, exactly as the full model would."""
    model = DynamicLlava.from_pretrained("tiny", device="cpu")
    assert front.device.type == "meta" and front.predictors is not None
    image, prompt = random_image(3), front.format_prompt(PROMPTS[0])
    a, b = front.prepare([image], [prompt], 16), model.prepare([image], [prompt], 16)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert a.lengths == b.lengths and a.image_layouts == b.image_layouts


def test_rows_in_the_engine_process_decode_as_in_process(front, engine):
    """Three requests (dense and sparse, one sampled with a seed) submitted together: each one's streamed tokens
    and final output equal `generate` in this process; the counters and the snapshot come from the child."""
    model = DynamicLlava.from_pretrained("tiny", device="cpu")
    made = [_request(front, 0, SPARSE, 12), _request(front, 1, DENSE, 9),
            _request(front, 2, SPARSE, 10, temperature=0.8, seed=7)]
    tickets = engine.submit_many([r for r, _ in made])
    assert all(isinstance(t, int) for t in tickets) and len(set(tickets)) == 3
    for i, (request, listener) in enumerate(made):
        final = listener.final()
        assert final.error is None, final.error
        expected = model.generate([random_image(i, (40 + 7 * i, 52))], [front.format_prompt(PROMPTS[i])],
                                  sparsity=request.sparsity, max_new_tokens=request.max_new_tokens,
                                  temperature=request.temperature, seed=request.seed)[0]
        assert final.output.token_ids == expected.token_ids and final.output.text == expected.text
        assert all(getattr(final.output.stats, f) == getattr(expected.stats, f) for f in STAT_FIELDS)
        assert [t for e in listener.events for t in e.token_ids] == [t for t in expected.token_ids
                                                                     if t not in model.eos_token_ids]
    assert engine.counters.finished >= 3 and engine.counters.running == 0
    snap = engine.snapshot("test", "serve", SPARSE)
    assert snap.finished >= 3 and snap.kind == "serve" and snap.actor_id == "test"


def test_refusals_and_cancellation_come_back_as_the_engine_gives_them(front, engine):
    """A request over the KV budget is a ValueError, a fifth request beyond max_waiting 4 a QueueFull (both in
    the submit's reply, nothing streamed); a cancelled request ends with a "cancelled" error event."""
    too_big = _request(front, 0, DENSE, 512)
    five = [_request(front, i, SPARSE, 200, ignore_eos=True) for i in range(5)]
    results = engine.submit_many([too_big[0]] + [r for r, _ in five])
    assert isinstance(results[0], ValueError) and "budget" in str(results[0])
    assert isinstance(results[5], QueueFull)
    for ticket in results[1:5]:
        engine.cancel(ticket)
    for _, listener in five[:4]:
        assert listener.final().error == "cancelled"
    assert not too_big[1].events and not five[4][1].events
    assert engine.alive


def test_a_child_that_fails_to_start_says_why():
    with pytest.raises(RuntimeError, match="no-such-model"):
        EngineProcess(EngineSpec("/no-such-model", device="cpu"), start_timeout_s=120)


def test_a_dead_engine_fails_its_requests_and_refuses_new_ones(front):
    """The child killed mid-request: the request in flight gets a final error event, `alive` turns False, and a
    new submit fails at once (the replica answers 503) instead of waiting."""
    process = EngineProcess(EngineSpec("tiny", device="cpu", threads=1))
    try:
        request, listener = _request(front, 0, SPARSE, 400, ignore_eos=True)
        engine_ticket = process.submit_many([request])[0]
        assert isinstance(engine_ticket, int)
        deadline = time.monotonic() + 30
        while not listener.events and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(process.info["pid"], signal.SIGKILL)
        final = listener.final(30)
        assert final.error is not None and "engine process is gone" in final.error
        assert not process.alive
        with pytest.raises(RuntimeError, match="engine process is gone"):
            process.submit_many([_request(front, 1, SPARSE, 4)[0]])
    finally:
        process.stop()


def test_the_engine_process_dies_with_its_replica():
    """A replica process killed without a word (SIGKILL, as Ray kills a replica): its engine process exits too,
    instead of holding the model's memory forever."""
    script = textwrap.dedent("""
        import os, sys
        from dynllava.engine_process import EngineProcess, EngineSpec
        process = EngineProcess(EngineSpec("tiny", device="cpu", threads=1))
        print(process.info["pid"], flush=True)
        sys.stdin.read()
    """)
    replica = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    try:
        child = int(replica.stdout.readline())
        assert _running(child)
        replica.kill()
        replica.wait()
        deadline = time.monotonic() + 20
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the engine process outlived its replica"
    finally:
        replica.kill()


def _running(pid: int) -> bool:
    """Whether pid is alive (not a zombie: the orphan is reaped by init once it exits)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
