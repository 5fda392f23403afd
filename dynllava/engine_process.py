"""The continuous engine in its own process, behind the engine's own interface (as vLLM's engine core).

A Serve replica's event loop, its image-decoding workers and Ray's threads all hold the replica process's GIL
at times; with the engine loop on a thread of the same process, a decoding step waited for it (measured: the
engine thread on a core 71% of its step time inside a replica, 97% alone). Here the loop runs on the main thread
of a child process that loads the model and owns every tensor; the replica keeps the model's tokenizer and
shapes (the meta device: no weights) to validate and prepare requests, and talks to the child over two pipes:

  replica -> engine: submit (prepared rows, no callbacks), cancel, set_keep, snapshot, stop
  engine -> replica: after each step one message with every event the step produced and the engine's
                     counters (a step without events: the counters, at most every 20 ms); replies to submit
                     and snapshot

The replica's reader thread hands each event to the request's `on_event`, as the engine thread did before.
The child exits when the pipe from the replica closes (the replica died or stopped it), so it never outlives
it; when the child dies, every request in flight fails with an error event and `alive` turns False.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

from dynllava.batching import EngineCounters, EngineRequest, StreamEvent
from dynllava.config import SparsityConfig
from dynllava.telemetry import TelemetrySnapshot

log = logging.getLogger(__name__)

COUNTERS_PERIOD_S = 0.02  # a step with no events still sends the counters when the last message is this old
CALL_TIMEOUT_S = 30.0  # a submit or snapshot the engine does not answer within this fails (it is stuck or gone)


@dataclass(frozen=True)
class EngineSpec:
    """What the child process builds: the model and the ContinuousEngine's keyword arguments."""

    model: str  # embedded name, local HF LLaVA directory, or model YAML (DynamicLlava.from_pretrained's source)
    device: str | None = None  # cuda | cpu (default: cuda when there is a GPU)
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    threads: int = 0  # torch CPU threads in the engine process (0: torch's default)
    engine: dict[str, Any] = field(default_factory=dict)  # ContinuousEngine(model, **engine)


class EngineProcess:
    """A ContinuousEngine in a child process (see the module docstring), used as one: `submit_many`, `cancel`,
    `set_keep`, `snapshot`, `counters`, `alive`, `has_work`, `stop`. Tickets are this object's own.

    start_timeout_s bounds the child's start (importing torch and loading the model); a child that fails to
    start raises RuntimeError here with its traceback."""

    def __init__(self, spec: EngineSpec, start_timeout_s: float = 900.0):
        to_child, from_child = os.pipe(), os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the replica's imports
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from dynllava.engine_process import child_main; child_main()",
             str(to_child[0]), str(from_child[1])], pass_fds=(to_child[0], from_child[1]), env=env)
        os.close(to_child[0])
        os.close(from_child[1])
        self._out = Connection(to_child[1], readable=False)
        self._in = Connection(from_child[0], writable=False)
        self._send_lock = threading.Lock()
        self._ids = itertools.count()  # tickets and call ids
        self._listeners: dict[int, Callable[[StreamEvent], None] | None] = {}  # ticket -> on_event, while in flight
        self._calls: dict[int, concurrent.futures.Future] = {}  # call id -> its reply
        self._lock = threading.Lock()  # _listeners, _calls and _closed
        self._closed = False
        self._stopping = False  # stop() was called: the child's exit is expected
        self.counters = EngineCounters()  # the child's, updated in place with every message from it
        self.exit_reason: str | None = None  # why the child is gone, once it is
        self._send(spec)
        self.info = self._wait_ready(start_timeout_s)  # {"pid", "device"}
        self._reader = threading.Thread(target=self._read, name="dynllava-engine-reader", daemon=True)
        self._reader.start()
        log.info("engine process %d ready on %s", self._process.pid, self.info["device"])

    # ------------------------------------------------------------------ the engine's interface
    def submit_future(self, requests: Sequence[EngineRequest]) -> concurrent.futures.Future:
        """Queue requests in the engine; the future's result is a ticket, or the ValueError / QueueFull that refused
        it, per request (the child's reply). Their `on_event` run on this object's reader thread."""
        with self._lock:
            tickets = [next(self._ids) for _ in requests]
            self._listeners.update((t, r.on_event) for t, r in zip(tickets, requests))
        future = self._call("submit", [(t, dataclasses.replace(r, on_event=None)) for t, r in zip(tickets, requests)])

        def forget_refused(done: concurrent.futures.Future) -> None:
            refused = tickets if done.exception() is not None else \
                [t for t, r in zip(tickets, done.result()) if isinstance(r, Exception)]
            with self._lock:
                for ticket in refused:
                    self._listeners.pop(ticket, None)

        future.add_done_callback(forget_refused)
        return future

    def submit_many(self, requests: Sequence[EngineRequest]) -> list[int | Exception]:
        """As ContinuousEngine.submit_many (blocks for the child's reply)."""
        return self.submit_future(requests).result(CALL_TIMEOUT_S)

    def cancel(self, ticket: int) -> None:
        """Drop a request; its slot and K/V are freed at the engine's next step. Unknown tickets: nothing."""
        self._post(("cancel", ticket))

    def set_keep(self, vision_keep: float, text_keep: float | None) -> None:
        """As ContinuousEngine.set_keep."""
        self._post(("set_keep", vision_keep, text_keep))

    def snapshot(self, actor_id: str, kind: str, sparsity: SparsityConfig) -> TelemetrySnapshot:
        """The engine's TelemetrySnapshot (taken in the child, where its window and memory are)."""
        return self._call("snapshot", actor_id, kind, sparsity).result(CALL_TIMEOUT_S)

    def has_work(self) -> bool:
        """Whether the engine had requests waiting or running at its last message."""
        c = self.counters
        return c.waiting + c.prefilling + c.running > 0

    @property
    def alive(self) -> bool:
        """Whether the child is running its loop."""
        return not self._closed and self._process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop after its current step and end the child (killed if it has not exited in timeout_s)."""
        self._stopping = True
        self._post(("stop",))
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._shut("stopped")
        self._reader.join(timeout_s)

    # ------------------------------------------------------------------ plumbing
    def _send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self._out.send_bytes(data)

    def _post(self, message: tuple) -> None:
        """Send, ignoring a child that is already gone (its requests have already failed)."""
        try:
            self._send(message)
        except OSError:
            pass

    def _call(self, kind: str, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError(f"the engine process is gone ({self.exit_reason})"))
                return future
            call = next(self._ids)
            self._calls[call] = future
        try:
            self._send((kind, call, *args))
        except OSError as e:
            self._shut(f"could not reach it: {e}")
        return future

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self._in.poll(0.2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._process.kill()
                raise RuntimeError(f"the engine process did not start (exit code {self._process.poll()}; its "
                                   "stderr, in this replica's log, says why)")
        kind, payload = pickle.loads(self._in.recv_bytes())
        if kind != "ready":
            self._process.wait()
            raise RuntimeError(f"the engine process failed to start:\n{payload}")
        return payload

    def _read(self) -> None:
        """Reader thread: the child's messages, until its pipe closes."""
        try:
            while True:
                kind, body, counters = pickle.loads(self._in.recv_bytes())
                self.counters.__dict__.update(counters.__dict__)
                if kind == "events":
                    for ticket, event in body:
                        self._dispatch(ticket, event)
                else:  # "reply": (call id, result)
                    call, result = body
                    with self._lock:
                        future = self._calls.pop(call, None)
                    if future is None:
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        except (EOFError, OSError):
            pass
        if not self._stopping:
            self._shut(f"it exited (code {self._process.wait()}); the replica's log has its stderr")

    def _dispatch(self, ticket: int, event: StreamEvent) -> None:
        with self._lock:
            listener = self._listeners.pop(ticket, None) if event.final else self._listeners.get(ticket)
        if listener is None:
            return
        try:
            listener(event)
        except Exception:
            log.exception("on_event callback failed; cancelling ticket %d", ticket)
            self.cancel(ticket)

    def _shut(self, reason: str) -> None:
        """Mark the engine gone: pending calls fail, requests in flight get a final error event."""
        with self._lock:
            if self._closed and self.exit_reason is not None:
                return
            self._closed, self.exit_reason = True, reason
            calls, self._calls = self._calls, {}
            listeners, self._listeners = self._listeners, {}
        if reason != "stopped":
            log.error("engine process %d: %s", self._process.pid, reason)
        for future in calls.values():
            future.set_exception(RuntimeError(f"the engine process is gone ({reason})"))
        for listener in listeners.values():
            if listener is not None:
                with contextlib.suppress(Exception):
                    listener(StreamEvent([], error=f"the engine process is gone ({reason})"))
        for conn in (self._out, self._in):
            with contextlib.suppress(Exception):
                conn.close()


# ---------------------------------------------------------------------- the child
class _Outbox:
    """The child's side: events collected on the engine thread, sent with the counters once per step; and the
    replica's tickets of the requests in flight."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.send_lock = threading.Lock()  # one writer at a time on the pipe (engine thread, command thread)
        self.events: list[tuple[int, StreamEvent]] = []  # appended and flushed on the engine thread only
        self.engine = None
        self.sent_at = 0.0  # monotonic time of the last message from the engine thread
        self.tickets: dict[int, int] = {}  # the replica's ticket -> the engine's, while in flight
        self.tickets_lock = threading.Lock()  # a request's final event waits until its ticket is recorded

    def listener(self, ticket: int) -> Callable[[StreamEvent], None]:
        def on_event(event: StreamEvent) -> None:
            self.events.append((ticket, event))
            if event.final:
                with self.tickets_lock:
                    self.tickets.pop(ticket, None)
        return on_event

    def submit(self, wire: list[tuple[int, EngineRequest]]) -> list[int | Exception]:
        """Queue the replica's requests in the engine; a ticket (the replica's) or the refusal per request."""
        requests = [dataclasses.replace(r, on_event=self.listener(t)) for t, r in wire]
        with self.tickets_lock:
            results = self.engine.submit_many(requests)
            for (ticket, _), result in zip(wire, results):
                if not isinstance(result, Exception):
                    self.tickets[ticket] = result
        return [r if isinstance(r, Exception) else t for (t, _), r in zip(wire, results)]

    def cancel(self, ticket: int) -> None:
        with self.tickets_lock:
            ours = self.tickets.get(ticket)
        if ours is not None:
            self.engine.cancel(ours)

    def send(self, kind: str, body: Any) -> None:
        data = pickle.dumps((kind, body, self.engine.counters), protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            self.conn.send_bytes(data)

    def flush(self) -> None:
        """After each engine step: everything it produced, in one message; a step that produced nothing sends
        only the counters, at most every COUNTERS_PERIOD_S (the replica's /health and metrics read them)."""
        now = time.monotonic()
        if self.events or now - self.sent_at >= COUNTERS_PERIOD_S:
            events, self.events, self.sent_at = self.events, [], now
            self.send("events", events)


def child_main() -> None:
    """The engine process (started by EngineProcess): argv holds its two pipe descriptors."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(message)s")
    commands = Connection(int(sys.argv[1]), writable=False)
    outbox = _Outbox(Connection(int(sys.argv[2]), readable=False))
    spec: EngineSpec = pickle.loads(commands.recv_bytes())
    try:
        import torch

        from dynllava.batching import ContinuousEngine
        from dynllava.model import DynamicLlava

        if spec.threads:
            torch.set_num_threads(spec.threads)
        model = DynamicLlava.from_pretrained(spec.model, device=spec.device, dtype=spec.dtype)
        outbox.engine = ContinuousEngine(model, on_step=outbox.flush, **spec.engine)
    except BaseException:
        outbox.conn.send_bytes(pickle.dumps(("failed", traceback.format_exc())))
        raise
    outbox.conn.send_bytes(pickle.dumps(("ready", {"pid": os.getpid(), "device": str(model.device)})))
    threading.Thread(target=_serve_commands, args=(commands, outbox), name="dynllava-commands", daemon=True).start()
    outbox.engine.run()
    log.info("engine stopped")


def _serve_commands(commands: Connection, outbox: _Outbox) -> None:
    """The child's command thread: the replica's messages, until "stop" or the pipe closes (then exit at once:
    the replica is gone, and so is everyone waiting for this engine)."""
    engine = outbox.engine
    try:
        while True:
            kind, *args = pickle.loads(commands.recv_bytes())
            if kind == "stop":
                break
            try:
                if kind == "submit":
                    call, wire = args
                    outbox.send("reply", (call, outbox.submit(wire)))
                elif kind == "snapshot":
                    call, actor_id, actor_kind, sparsity = args
                    outbox.send("reply", (call, engine.snapshot(actor_id, actor_kind, sparsity)))
                elif kind == "cancel":
                    outbox.cancel(args[0])
                elif kind == "set_keep":
                    engine.set_keep(*args)
            except OSError:
                raise
            except Exception as e:  # a bug: the caller's call fails with it, the engine goes on
                log.exception("engine process: %s failed", kind)
                if kind in ("submit", "snapshot"):
                    outbox.send("reply", (args[0], e))
    except (EOFError, OSError):
        os._exit(0)
    engine.stop()
