"""The one generation loop: requests join the running batch at step boundaries and leave as soon as they finish.

Every path runs it: `DynamicLlava.generate` (submit the rows, step until they finish), the caption job's actors
and the Serve replicas (the loop on its own thread). One thread owns the model and calls `step()` (or runs
`start()`'s loop); any thread may `submit` and `cancel`. Each step is schedule -> execute -> update:
  1. take in submissions and cancellations (a cancelled request's row and K/V are freed at once); a queued
     request past its `admit_by` leaves with QUEUE_TIMEOUT (an overloaded server sheds it, not everyone);
  2. schedule (dynllava.scheduler, a pure function): which waiting requests join, in arrival order, within the
     batch size, the per-step prefill budgets and the KV budget;
  3. execute: prefill the joining requests together (one pass per vision scorer), merge them into the running
     batch, and run one decoding step for every running row;
  4. update: sample, check stops, stream events; finished rows leave.
Rows of the running batch share layer K, the mode and the text scorer (keep ratios and the vision scorer may
differ per request: the vision scorer acts only in the prefill, which runs per scorer group). A request that
needs another layer, mode or text scorer waits until the running batch drains; nothing behind it overtakes it.

The KV budget. With the paged cache (the default) admission counts the blocks rows hold now: a running row its
slots plus the next token's, a joining one its prompt's (kept at vision_keep in layers >= K), within the budget
less a watermark (`kv_watermark`) that leaves the running rows room to grow. Sparser rows hold fewer blocks,
so more of them run at once, and a row that stops early never held its max_new_tokens. When a step cannot get
a block, the youngest row is preempted: its blocks are freed and it goes back to the head of the queue with its
answer so far; when it is admitted again its prompt is prefilled again and its answer fed back as forced inputs
(not streamed again), which rebuilds its K/V and admission history, so it goes on with exactly the tokens it
would have produced. With the padded cache, or static batching, admission counts every row's worst case (prompt
kept at vision_keep, text admitted at text_keep, max_new_tokens generated) and never preempts. Either way a
request whose worst case alone exceeds the budget is refused at submit, so a row running alone always fits.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dynllava import ops, paged_cache
from dynllava.config import SparsityConfig
from dynllava.engine import (CACHE_BLOCK_TOKENS, GRAPH_CACHE_BLOCK_TOKENS, DecodingRow, GenerationOutput,
                             LogitRules, StaticBatch, TokenLogprob, check_generation_args, check_seed, check_stop,
                             decoding_bytes, finish_row, model_dims, new_row, per_row, release, row_step_flops,
                             sample_next)
from dynllava.image_layout import image_keep_counts
from dynllava.inputs import PreparedBatch, concat_prepared, split_prepared
from dynllava.kv_blocks import OutOfBlocks
from dynllava.paged_cache import PagedKVCache, PagedKVPool
from dynllava.scheduler import KVLayout, PagedLayout, Scheduled, SchedulerLimits, schedule
from dynllava.scorers import RATE_SLACK_TOKENS
from dynllava.telemetry import RequestWindow, TelemetrySnapshot, take_snapshot

log = logging.getLogger(__name__)


KV_WATERMARK = 0.05  # of the KV budget, left free at admission for the running rows' next blocks (paged cache)


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit: retry later (HTTP 429)."""


QUEUE_TIMEOUT = "queue_timeout"  # StreamEvent.code of a request still queued at its admit_by


@dataclass
class EngineRequest:
    """One request for the continuous engine. prepared: a single row from `model.prepare` (validated and
    tokenized by the caller's thread, so bad input fails before it queues)."""

    prepared: PreparedBatch
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    rules: LogitRules = field(default_factory=LogitRules)  # penalties, logit bias, min_tokens (checked by the caller)
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and its k most likely alternatives
    on_event: Callable[["StreamEvent"], None] | None = None  # called on the engine thread: keep it cheap
    stream: bool = True  # False: on_event gets only the final event
    arrived_at: float | None = None  # time.perf_counter() when the request arrived (TTFT's start; default: submit)
    follows_engine: bool = False  # the caller did not choose the keep ratios: run at the engine's keep setting
    #                               as of admission (set_keep), so a controller's order reaches the queue too
    admit_by: float | None = None  # time.perf_counter() by which it must be admitted; a request still queued
    #                                then leaves with error code QUEUE_TIMEOUT (an overloaded server sheds it
    #                                rather than serve everyone late). None: it waits as long as it takes


@dataclass
class StreamEvent:
    """What a request produced since its previous event. The last event has `output` (or `error`) set.
    Events carry token ids only: turning them into text is the consumer's work (dynllava.streaming.TextStream),
    off the engine thread."""

    token_ids: list[int]  # new token ids (the EOS is never among them)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per new token id, when the request asked
    output: GenerationOutput | None = None
    error: str | None = None
    code: str | None = None  # with error: what kind, when the caller can act on it (QUEUE_TIMEOUT)

    @property
    def final(self) -> bool:
        return self.output is not None or self.error is not None


@dataclass
class EngineCounters:
    """Cumulative and current figures of one engine (for telemetry and tests)."""

    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    timed_out: int = 0  # requests that left the queue at their admit_by, never admitted
    tokens_generated: int = 0
    waiting: int = 0  # requests queued, not yet prefilled
    prefilling: int = 0  # requests in the prefill running now (admitted, no first token yet)
    running: int = 0  # rows in the running batch
    preempted: int = 0  # times a running row was preempted (its blocks freed, recomputed later)
    kv_bytes_in_use: int = 0  # K/V bytes the running rows hold (valid slots)
    kv_bytes_allocated: int = 0  # bytes the cache holds for them: blocks (paged) or padded tensors
    kv_bytes_reserved: int = 0  # bytes admission counts for the running rows (see the module docstring)
    kv_bytes_pool: int = 0  # bytes of the paged pool's tensors, free blocks included (0 with the padded cache)
    kv_blocks_free: int = -1  # blocks of PAGED_BLOCK_TOKENS tokens (every layer) the budget still leaves (-1: no
    #                           budget, or the padded cache)
    oldest_waiting_since: float | None = None  # perf_counter arrival of the longest-waiting queued request


@dataclass
class _Live:
    """A request inside the engine: its ticket, decoding row and streaming position."""

    ticket: int
    request: EngineRequest
    submitted_at: float
    row: DecodingRow | None = None
    sent_tokens: int = 0  # tokens already delivered in events
    prefill_s: float = 0.0
    first_token_at: float = 0.0
    reserve: tuple[int, int] = (0, 0)  # worst-case slots in the dense and sparse layer groups
    solo: bool = False  # prefill alone: a batched prefill with this request failed (out of memory or an error)
    error: str | None = None  # this row failed after its prefill (sampling, stop check): it leaves with this error
    resume: tuple[int, int] | None = None  # preempted: the slots it held (it holds them again once resumed)

    def scheduled(self, counted: tuple[int, int]) -> Scheduled:
        """As the scheduler sees it, with the cache slots admission counts for it."""
        s = self.request.sparsity
        return Scheduled(self.ticket, self.request.prepared.lengths[0], counted, _decoding_signature(s), self.solo)


def _decoding_signature(s: SparsityConfig) -> tuple:
    return s.layer, s.mode, s.text_scorer


def text_slots_bound(sparsity: SparsityConfig, max_new_tokens: int) -> int:
    """Most generated tokens a request can admit to layers >= K (the rate scorers stay within
    RATE_SLACK_TOKENS of text_keep * seen; the learned scorer's own decision and keep_all are unbounded)."""
    rate = sparsity.text_keep
    if rate is None or rate >= 1.0 or sparsity.text_scorer == "keep_all":
        return max_new_tokens
    return min(max_new_tokens, math.ceil(rate * max_new_tokens + RATE_SLACK_TOKENS) + 1)


def prompt_slots(model, request: EngineRequest) -> tuple[int, int]:
    """Cache slots a request's prefill fills: (dense group: the prompt, sparse group: the prompt with its image
    tokens kept at vision_keep). (0, 0) in no_cache mode, which holds no K/V."""
    p = request.prepared
    if request.sparsity.mode == "no_cache":
        return 0, 0
    s = request.sparsity
    kept = image_keep_counts([p.image_layouts], [s.vision_keep], [s.keep_rounding])[0]
    return p.lengths[0], p.lengths[0] - sum(x.length for x in p.image_layouts) + sum(kept)


def reserved_slots(model, request: EngineRequest) -> tuple[int, int]:
    """Worst-case cache slots of one request: (dense group: every token, sparse group: kept prompt + admitted
    text). One extra slot each for the token being fed. (0, 0) in no_cache mode, which holds no K/V."""
    if request.sparsity.mode == "no_cache":
        return 0, 0
    dense, kept_prompt = prompt_slots(model, request)
    return (dense + request.max_new_tokens + 1,
            kept_prompt + text_slots_bound(request.sparsity, request.max_new_tokens) + 1)


class ContinuousEngine:
    """The generation loop over one DynamicLlava (see the module docstring).

    max_batch: most rows decoding together; max_prefill_batch / max_prefill_tokens: most requests / prompt
    tokens prefilled in one step (None: no token cap); kv_budget_bytes: cap on the K/V the rows hold (None: no
    cap); kv_watermark: the fraction of it that admission leaves free for running rows to grow into (paged cache;
    see the module docstring); max_waiting: queue length beyond which `submit` raises QueueFull.
    join_running=False makes it a static batcher: a new batch starts only when the running one has entirely
    finished (the baseline to compare with). refill_at: while rows decode, admit only once this many places are
    free (fuller prefills; 1, the default: at once). cuda_graphs: on CUDA, replay the decoding
    step as a CUDA graph.
    isolate_failures: a failing prefill or step fails only its requests and the loop goes on (a server); False
    re-raises (a caller that owns every request, as `generate`). clock: unix seconds for the telemetry window.
    paged: the running rows' K/V live in one block pool (capped at kv_budget_bytes) instead of a padded cache
    (default: yes, unless CUDA graphs run). on_step: called on the loop's thread after every step (after its
    events), e.g. to send them on in one message (dynllava.engine_process).
    """

    def __init__(self, model, max_batch: int = 32, max_prefill_batch: int = 8, kv_budget_bytes: int | None = None,
                 max_waiting: int = 256, join_running: bool = True, telemetry_window_s: float = 30.0,
                 clock: Callable[[], float] = time.time, max_prefill_tokens: int | None = None,
                 cuda_graphs: bool = True, isolate_failures: bool = True, paged: bool | None = None,
                 kv_watermark: float = KV_WATERMARK, on_step: Callable[[], None] | None = None,
                 refill_at: int = 1):
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.model = model
        self.kv_budget_bytes, self.max_waiting = kv_budget_bytes, max_waiting
        self.use_graphs = cuda_graphs and model.device.type == "cuda"
        # K/V in a block pool (dynllava.paged_cache) or the padded SparseKVCache. Default: paged, except where CUDA
        # graphs run (the paged step is not captured yet, and on a GPU the graphs matter more for now)
        self.paged = paged if paged is not None else not self.use_graphs
        # admission on the blocks rows hold now (and preemption when they run out), or on every row's worst case
        self.on_demand = self.paged and join_running
        self.limits = SchedulerLimits(max_batch, max_prefill_batch, max_prefill_tokens, kv_budget_bytes,
                                      join_running, kv_watermark if self.on_demand else 0.0, refill_at)
        self.isolate_failures = isolate_failures
        self.dims = model_dims(model)
        element = torch.empty((), dtype=model.dtype).element_size()
        slot_bytes = 2 * model.n_kv_heads * model.head_dim * element
        self.kv_layout = PagedLayout(model.n_layers, slot_bytes, paged_cache.PAGED_BLOCK_TOKENS) if self.paged \
            else KVLayout(model.n_layers, slot_bytes, GRAPH_CACHE_BLOCK_TOKENS if self.use_graphs else CACHE_BLOCK_TOKENS)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: collections.deque[_Live] = collections.deque()
        self._cancelled: set[int] = set()
        self._tickets = itertools.count()
        self._waiting: collections.deque[_Live] = collections.deque()
        self._running: list[_Live] = []
        self._decoding = None  # the running rows' CachedDecoding or RecomputeDecoding
        self._pool: PagedKVPool | None = None  # the block pool, made for the running rows' layer K
        self._tokens: list[int] = []  # each running row's last sampled token (fed at the next step)
        self.counters = EngineCounters()
        self.window = RequestWindow(telemetry_window_s, clock)  # finished requests, for telemetry snapshots
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._keep: tuple[float, float | None] | None = None  # set_keep's (vision_keep, text_keep)
        self.on_step = on_step

    # ------------------------------------------------------------------ any thread
    def submit(self, request: EngineRequest) -> int:
        """Queue a request; returns its ticket. ValueError if it can never run here, QueueFull if the queue is
        at its limit."""
        result = self.submit_many([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def submit_many(self, requests: Sequence[EngineRequest]) -> list[int | Exception]:
        """Queue several requests at once (they reach the scheduler together, e.g. one static batch). Returns a
        ticket, or the ValueError / QueueFull that refused it, per request."""
        checked: list[_Live | Exception] = []
        for request in requests:
            try:
                checked.append(self._check(request))
            except ValueError as e:
                checked.append(e)
        results: list[int | Exception] = []
        with self._lock:
            for item in checked:
                if isinstance(item, Exception):
                    results.append(item)
                elif len(self._inbox) + self.counters.waiting >= self.max_waiting:
                    results.append(QueueFull(f"{self.max_waiting} requests are already waiting"))
                else:
                    item.ticket = next(self._tickets)
                    item.submitted_at = item.request.arrived_at or time.perf_counter()
                    self._inbox.append(item)
                    self.counters.submitted += 1
                    results.append(item.ticket)
            self._wake.notify()
        return results

    def submit_future(self, requests: Sequence[EngineRequest]) -> concurrent.futures.Future:
        """submit_many's results as a done future: the interface an engine process shares (its reply comes later)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(self.submit_many(requests))
        return future

    def _check(self, request: EngineRequest) -> _Live:
        if request.prepared.input_ids.shape[0] != 1:
            raise ValueError("EngineRequest.prepared must hold exactly one row")
        self.model.check_scorers(request.sparsity)
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        reserve = reserved_slots(self.model, request)
        need = self._allocation([reserve], request.sparsity.layer)
        if self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            raise ValueError(f"this request alone needs {need} bytes of KV cache (prompt {request.prepared.lengths[0]}"
                             f" tokens + max_new_tokens {request.max_new_tokens}), over the engine's budget of "
                             f"{self.kv_budget_bytes} bytes")
        return _Live(-1, request, 0.0, reserve=reserve)

    def set_keep(self, vision_keep: float, text_keep: float | None) -> None:
        """The keep ratios for requests that follow the engine (`follows_engine`) and are not admitted yet,
        queued ones included. Any thread; takes effect at the next admission."""
        self._keep = (vision_keep, text_keep)

    def cancel(self, ticket: int) -> None:
        """Drop a request (e.g. its client disconnected); its slot and K/V are freed at the next step boundary.
        Cancelling a finished or unknown ticket does nothing."""
        with self._lock:
            self._cancelled.add(ticket)
            self._wake.notify()

    def start(self) -> None:
        """Run the engine loop on a daemon thread (idle waits cost nothing)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self.run, name="dynllava-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the loop thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the loop thread after its current step (queued requests stay queued)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ engine thread
    def run(self) -> None:
        """The engine loop on the calling thread, until `stop()` (idle waits cost nothing). `start()` runs it on
        a daemon thread; an engine process runs it on its main thread."""
        while True:
            with self._lock:
                while not self._stopping and not self._inbox and not self._cancelled and not self.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def snapshot(self, actor_id: str, kind: str, sparsity: SparsityConfig) -> TelemetrySnapshot:
        """This engine's TelemetrySnapshot (any thread): window rates and percentiles, queue, batch, KV, memory."""
        c = self.counters
        with self._lock:  # the inbox counts now: a long step (a dense prefill) would hide its arrivals until it ends
            inbox, inbox_since = len(self._inbox), self._inbox[0].submitted_at if self._inbox else None
            waiting, waiting_since, prefilling = c.waiting, c.oldest_waiting_since, c.prefilling
        since = min((t for t in (waiting_since, inbox_since) if t is not None), default=None)
        return take_snapshot(actor_id, kind, self.window, self.model.device, sparsity.to_dict(), waiting + inbox,
                             c.running, c.kv_bytes_in_use, c.kv_bytes_allocated,
                             None if since is None else time.perf_counter() - since, self.kv_budget_bytes or 0,
                             c.kv_blocks_free, c.preempted, prefilling)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling step (see the module docstring). Returns whether anything is still waiting or running."""
        started = time.perf_counter()
        self._take_inbox()
        group = self._admit()
        with self._lock:  # before the long work: a snapshot taken during it must still see who waits
            self._count_waiting()
            self.counters.prefilling = len(group)
        worked = bool(group or self._running)
        if group:
            self._prefill(group)
        self.counters.prefilling = 0
        if self._running:
            self._decode()
        self._update_counters()
        if worked:  # the step's admissions and its time together: cost per request = busy / admitted, and
            # counting a long prefill's admission before its time made a dense request look half as dear
            self.window.add_busy(time.perf_counter() - started, admitted=len(group))
        if self.on_step is not None:
            self.on_step()
        return self.has_work()

    def run_until_idle(self) -> None:
        """Step until nothing waits or runs (for callers that drive the engine themselves)."""
        while self.step():
            pass

    def _take_inbox(self) -> None:
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            self._count_waiting()  # under the lock: a snapshot sees them in the inbox or in the count, never neither
            cancelled, self._cancelled = self._cancelled, set()
        self._shed_late()
        if not cancelled:
            return
        gone = [live for live in itertools.chain(self._waiting, self._running) if live.ticket in cancelled]
        self._waiting = collections.deque(live for live in self._waiting if live.ticket not in cancelled)
        leaving = [i for i, live in enumerate(self._running) if live.ticket in cancelled]
        if leaving:
            self._drop(leaving)
        for live in gone:
            self.counters.cancelled += 1
            self._deliver(live, StreamEvent([], error="cancelled"))

    def _shed_late(self) -> None:
        """Queued requests past their admit_by leave with QUEUE_TIMEOUT (a preempted row, which has streamed
        tokens already, always stays)."""
        now = time.perf_counter()
        late = [live for live in self._waiting if live.resume is None and live.request.admit_by is not None
                and now > live.request.admit_by]
        if not late:
            return
        gone = {id(live) for live in late}
        self._waiting = collections.deque(live for live in self._waiting if id(live) not in gone)
        for live in late:
            self.counters.timed_out += 1
            waited = now - live.submitted_at
            self._deliver(live, StreamEvent([], error=f"not admitted in time: queued {waited:.2f} s behind "
                                            f"{len(self._running)} running requests; retry later", code=QUEUE_TIMEOUT))
        with self._lock:
            self._count_waiting()

    def _allocation(self, reserves: list[tuple[int, int]], layer_k: int) -> int:
        return self.kv_layout.allocation_bytes(reserves, layer_k)

    def _admit(self) -> list[_Live]:
        """The waiting requests the scheduler admits this step (the head of the queue)."""
        candidates = list(itertools.islice(self._waiting, self.limits.max_prefill_batch))
        for live in candidates:
            self._follow_keep(live)
        plan = schedule([live.scheduled(self._joining_slots(live)) for live in candidates],
                        [live.scheduled(slots) for live, slots in zip(self._running, self._running_slots())],
                        self.limits, self.kv_layout)
        return [self._waiting.popleft() for _ in plan.admit]

    def _joining_slots(self, live: _Live) -> tuple[int, int]:
        """Slots admission counts for a waiting request: its worst case, or (on demand) what its prefill, the
        replay of its answer so far (a preempted row) and its next token take."""
        if not self.on_demand or live.reserve == (0, 0):
            return live.reserve
        if live.resume is not None:
            return live.resume
        dense, kept = prompt_slots(self.model, live.request)
        return dense + 1, kept + 1

    def _running_slots(self) -> list[tuple[int, int]]:
        """Slots admission counts for each running row: its worst case, or (on demand) what it holds plus the
        next token."""
        if not self.on_demand or not isinstance(getattr(self._decoding, "cache", None), PagedKVCache):
            return [live.reserve for live in self._running]
        tables = self._decoding.cache.tables
        return [(t0.length + 1, t1.length + 1) for t0, t1 in zip(*tables)]

    def _follow_keep(self, live: _Live) -> None:
        """Move a following request to the engine's current keep ratios (and re-reserve its slots), unless the
        new setting alone would not fit the KV budget."""
        keep = self._keep
        s = live.request.sparsity
        if not live.request.follows_engine or keep is None or keep == (s.vision_keep, s.text_keep) \
                or live.resume is not None:  # a preempted row goes on with the setting its answer began with
            return
        request = dataclasses.replace(live.request, sparsity=s.replace(vision_keep=keep[0], text_keep=keep[1]))
        reserve = reserved_slots(self.model, request)
        if self.kv_budget_bytes is None or self._allocation([reserve], s.layer) <= self.kv_budget_bytes:
            live.request, live.reserve = request, reserve

    def _prefill(self, group: list[_Live]) -> None:
        """Prefill the joining requests (one pass per vision scorer), emit their first tokens, merge their caches.
        A pass that fails (out of memory or any error) is retried with each request alone, first in the queue,
        so only a request that fails by itself fails."""
        by_scorer: dict[str, list[_Live]] = {}
        for live in group:
            by_scorer.setdefault(live.request.sparsity.vision_scorer, []).append(live)
        for members in by_scorer.values():
            try:
                self._prefill_group(members)
            except Exception as e:  # a bad request must not take the engine or its batch-mates down
                if not self.isolate_failures:
                    raise
                members = [m for m in members if not any(m is r for r in self._running)]  # merged rows go on
                if not members:
                    log.exception("after the prefill merged its rows")
                    continue
                oom = isinstance(e, torch.OutOfMemoryError)
                if oom:
                    self._free_device_memory()
                if len(members) > 1:
                    log.warning("prefill of %d requests failed (%s); retrying each alone", len(members),
                                type(e).__name__)
                    for live in reversed(members):
                        live.solo = True
                        self._waiting.appendleft(live)
                    continue
                if not oom:
                    log.exception("prefill failed for request %d", members[0].ticket)
                message = f"{type(e).__name__}: {e}" if oom else f"prefill failed: {type(e).__name__}: {e}"
                self._fail(members[0], message)

    @staticmethod
    def _free_device_memory() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _pool_for(self, sparsity: SparsityConfig) -> PagedKVPool | None:
        """The block pool for rows of this layer K (a new one when K changed: the running batch is empty then, as
        rows of different K never run together); None when the cache is padded or the mode keeps no cache."""
        if not self.paged or sparsity.mode != "kv_cache":
            return None
        if self._pool is None or self._pool.layer_k != sparsity.layer:
            m = self.model
            self._pool = PagedKVPool(m.n_layers, sparsity.layer, m.n_kv_heads, m.head_dim, m.dtype, m.device,
                                     paged_cache.PAGED_BLOCK_TOKENS, max_bytes=self.kv_budget_bytes)
        return self._pool

    def _prefill_group(self, members: list[_Live]) -> None:
        model = self.model
        started = time.perf_counter()
        prepared = concat_prepared([live.request.prepared for live in members])
        sparsities = [live.request.sparsity for live in members]
        for live in members:
            r = live.request
            if live.resume is None:
                live.row = new_row(r.prepared.lengths[0], r.sparsity, model.device, r.max_new_tokens, r.temperature,
                                   r.top_p, r.seed, r.stop, r.ignore_eos, r.rules, model.eos_token_ids, r.logprobs)
        rows = [live.row for live in members]
        fresh = [i for i, live in enumerate(members) if live.resume is None]  # the others resume (answer replayed)
        batch = StaticBatch(model, prepared, sparsities, max(r.max_new_tokens for r in rows),
                            cuda_graphs=self.use_graphs, kv_pool=self._pool_for(sparsities[0]))
        try:
            logits = batch.prefill()
            batch.record_prefill(rows)
            failed: dict[int, str] = {}
            sampled = sample_next(logits[fresh], [rows[i] for i in fresh], failed if self.isolate_failures else None)
        except BaseException:
            release(batch.decoding)  # the rows' blocks go back to the pool
            if self._decoding is not None:  # and the running rows' blocks move down over the holes they left
                self._decoding.compact()
            raise
        now = time.perf_counter()
        tokens = [live.row.tokens[0] if live.resume else -1 for live in members]  # a resumed row: its answer's first
        for j, (i, tok) in enumerate(zip(fresh, sampled)):
            live, tokens[i] = members[i], tok
            live.prefill_s, live.first_token_at = now - started, now
            self._take_token(live, tok, now, failed.get(j))
        for live in members:
            live.resume = None
        # merge every new row (finished ones leave right after, through the same path as all others)
        if self._decoding is None:
            self._decoding = batch.decoding
        else:
            self._decoding.merge(batch.decoding)
        self._running.extend(members)
        self._tokens.extend(tokens)
        self._emit_and_retire()

    def _decode(self) -> None:
        try:
            self._reserve_blocks()
            rows = [live.row for live in self._running]
            active = [True] * len(rows)
            sampling = [i for i, row in enumerate(rows) if not row.replaying]
            row_step_flops(self.dims, rows, active, rows[0].sparsity.mode, not self._decoding.text_dense)
            logits = self._decoding.step(self._tokens, rows, active)
            for row in rows:
                row.n_fed += 1
            failed: dict[int, str] = {}
            new = sample_next(logits[sampling], [rows[i] for i in sampling], failed if self.isolate_failures else None)
        except Exception as e:  # the shared step failed: fail the running requests, keep serving
            if not self.isolate_failures:
                raise
            if isinstance(e, torch.OutOfMemoryError):
                self._free_device_memory()
            log.exception("decoding step failed for %d request(s)", len(rows))
            for live in self._running:
                self._fail(live, f"decoding failed: {type(e).__name__}: {e}")
            release(self._decoding)
            self._running, self._tokens, self._decoding = [], [], None
            return
        now = time.perf_counter()
        for i, row in enumerate(rows):
            if row.n_fed < len(row.tokens):  # replaying: the answer's next token is fed next
                self._tokens[i] = row.tokens[row.n_fed]
        for j, (i, tok) in enumerate(zip(sampling, new)):
            self._tokens[i] = tok
            self._take_token(self._running[i], tok, now, failed.get(j))
        self._emit_and_retire()

    def _reserve_blocks(self) -> None:
        """Take the cache slots this step's tokens need; while a paged pool cannot give them, preempt the youngest
        row (the last admitted). A row alone always fits: its worst case was checked against the budget at
        submit."""
        while True:
            try:
                self._decoding.reserve([True] * len(self._running))
                return
            except OutOfBlocks:
                if len(self._running) == 1:
                    raise
                self._preempt(len(self._running) - 1)

    def _preempt(self, index: int) -> None:
        """Free a running row's blocks and put it back at the head of the queue with its answer so far (see the
        module docstring); nothing more is streamed until it produces new tokens."""
        live = self._running[index]
        tables = self._decoding.cache.tables
        live.resume = (tables[0][index].length + 1, tables[1][index].length + 1)
        log.info("preempting request %d after %d tokens (the KV budget is full)", live.ticket, len(live.row.tokens))
        self._drop([index])
        live.row.rewind()
        self._waiting.appendleft(live)
        self.counters.preempted += 1


    def _take_token(self, live: _Live, token: int, now: float, error: str | None) -> None:
        """Append a row's new token and check whether it finished; a row whose sampling or stop check failed
        is marked to leave with its error (its batch-mates go on)."""
        row = live.row
        row.finished_at = now
        if error is not None:
            live.error, row.finish_reason = error, "error"
            return
        row.tokens.append(token)
        try:
            check_stop(self.model, row)
        except Exception as e:
            if not self.isolate_failures:
                raise
            log.exception("stop check failed for request %d", live.ticket)
            live.error, row.finish_reason = f"stop check failed: {type(e).__name__}: {e}", "error"

    def _emit_and_retire(self) -> None:
        """Stream every running row's new text; finished rows get their final event and leave the batch."""
        done = []
        for i, live in enumerate(self._running):
            row = live.row
            if live.error is not None:
                self._fail(live, live.error)
                done.append(i)
            elif row.finish_reason is not None:
                output = finish_row(self.model, self.dims, row, self._decoding.kv_bytes(i), live.prefill_s,
                                    live.first_token_at - live.submitted_at, live.first_token_at)
                self._send(live, output)
                self.counters.finished += 1
                self.counters.tokens_generated += len(row.tokens)
                self.window.add(live.first_token_at - live.submitted_at, row.finished_at - live.submitted_at,
                                len(row.tokens))
                done.append(i)
            elif live.request.on_event is not None and live.request.stream:
                self._send(live, None)
        if done:
            self._drop(done)

    def _send(self, live: _Live, output: GenerationOutput | None) -> None:
        new_tokens = live.row.tokens[live.sent_tokens:]
        if not new_tokens and output is None:
            return
        sent, live.sent_tokens = live.sent_tokens, len(live.row.tokens)
        logprobs = live.row.token_logprobs[sent: live.sent_tokens]
        self._deliver(live, StreamEvent(new_tokens, logprobs, output=output))

    def _deliver(self, live: _Live, event: StreamEvent) -> None:
        if live.request.on_event is None:
            return
        try:
            live.request.on_event(event)
        except Exception:  # a broken consumer must not stop the engine; its request is cancelled
            log.exception("on_event callback failed; cancelling ticket %d", live.ticket)
            with self._lock:
                self._cancelled.add(live.ticket)

    def _fail(self, live: _Live, message: str) -> None:
        self.counters.failed += 1
        self._deliver(live, StreamEvent([], error=message))

    def _drop(self, indices: list[int]) -> None:
        """Remove running rows at `indices`; their K/V is freed."""
        gone = set(indices)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in keep]
        self._tokens = [self._tokens[i] for i in keep]
        if not keep:
            release(self._decoding)
            self._decoding = None
        else:
            self._decoding.select(keep)

    def _count_waiting(self) -> None:
        self.counters.waiting = len(self._waiting)
        self.counters.oldest_waiting_since = self._waiting[0].submitted_at if self._waiting else None

    def _update_counters(self) -> None:
        c = self.counters
        self._count_waiting()
        c.running = len(self._running)
        c.kv_bytes_in_use, c.kv_bytes_allocated = decoding_bytes(self._decoding)
        c.kv_bytes_reserved = self._allocation(self._running_slots(), self._running[0].request.sparsity.layer) \
            if self._running else 0
        pool = self._pool
        c.kv_bytes_pool = pool.bytes_allocated() if pool is not None else 0
        c.kv_blocks_free = pool.free_token_blocks() if pool is not None else -1


@torch.inference_mode()
def generate(model, images: Sequence[Any], prompts: Sequence[str],
             sparsity: SparsityConfig | Sequence[SparsityConfig] | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
             stop: Sequence[str] | None = None, ignore_eos: bool = False, cuda_graphs: bool = True,
             max_batch: int | None = None, join_running: bool = True, refill_at: int = 1) -> list[GenerationOutput]:
    """Generate for a list of rows through the engine's loop: submit them all, step until every one finished.

    `sparsity` may be one config or one per row (rows that need another layer, mode or text scorer run after
    the others). `seed` (int or per row) seeds each row's sampler, so a row samples the same tokens alone or in
    any batch. max_batch: most rows decoding at once (default: all); join_running=False runs static batches of
    max_batch instead of refilling freed places; refill_at: refill only once that many places are free (see
    scheduler). On CUDA the decoding step replays as a CUDA graph unless
    cuda_graphs=False. Every row is validated before any runs (ValueError). Returns one GenerationOutput per
    prompt, in order."""
    start = time.perf_counter()
    check_generation_args(model, max_new_tokens, temperature, top_p)
    n = len(prompts)
    sparsities = per_row(sparsity or SparsityConfig(), n, "sparsity")
    for s in sparsities:
        model.check_scorers(s)
    seeds = per_row(seed, n, "seed")
    for i, sd in enumerate(seeds):
        check_seed(sd, f"seed[{i}]" if isinstance(seed, (list, tuple)) else "seed")
    prepared = split_prepared(model.prepare(images, prompts, max_new_tokens))
    width = max_batch or n
    engine = ContinuousEngine(model, max_batch=width, max_prefill_batch=width, max_waiting=n,
                              join_running=join_running, cuda_graphs=cuda_graphs, isolate_failures=False,
                              refill_at=min(refill_at, width))
    outputs: dict[int, GenerationOutput] = {}

    def collect(index: int) -> Callable[[StreamEvent], None]:
        def on_event(event: StreamEvent) -> None:
            if event.output is not None:
                outputs[index] = event.output
        return on_event

    requests = [EngineRequest(p, s, max_new_tokens, temperature, top_p, sd, tuple(stop or ()), ignore_eos,
                              on_event=collect(i), stream=False, arrived_at=start)
                for i, (p, s, sd) in enumerate(zip(prepared, sparsities, seeds))]
    for result in engine.submit_many(requests):
        if isinstance(result, Exception):
            raise result
    engine.run_until_idle()
    return [outputs[i] for i in range(n)]


__all__ = ["generate", "ContinuousEngine", "EngineRequest", "StreamEvent", "EngineCounters", "QueueFull", "text_slots_bound",
           "reserved_slots", "prompt_slots", "KV_WATERMARK"]
