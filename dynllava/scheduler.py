"""The engine's scheduler: a pure function from the queue and the running batch to one step's plan.

No torch, no model, no clock of its own: `ContinuousEngine` describes its waiting and running requests as
`Scheduled` records and executes the `StepPlan` it gets back, so the policy is tested on plain records
(tests/dynllava/test_scheduler.py). The rules, in order:

- Arrival order. Waiting requests are admitted from the head of the queue only; nothing overtakes a head
  that cannot join yet (a different decoding signature, no room in the batch or in the KV budget), so no
  request starves: the running rows finish, and then it goes.
- Rows decoding together share a decoding signature (layer K, mode, text scorer).
- Budgets per step: at most `max_prefill_batch` requests and `max_prefill_tokens` prompt tokens are
  prefilled, so a burst of arrivals stalls the running rows' next token by one bounded prefill, not by the
  whole burst (the first request always goes, however long its prompt, or it could never run).
- The KV budget: the bytes every running row and the joining ones take, as the layout counts them, stay within
  kv_budget_bytes less a watermark. What a row counts is the engine's choice (`Scheduled.reserve`): with the
  padded cache, its worst case (`KVLayout`: rows padded to the longest), so a running row never runs out;
  with the paged cache, the slots it holds now plus the next token's (`PagedLayout`: whole blocks per row),
  and the watermark leaves room for the running rows to grow until the engine preempts one.
- `join_running=False` is static batching: a new batch starts only when the running one has finished.
- `refill_at`: while rows decode, the batch is refilled only once that many of its places are free, so rows
  are prefilled in fuller groups instead of one per step as each finishes. 1 (the default everywhere) refills
  at once; any value lets the queue's head in at the latest when the running rows finish. (The caption job
  measured worse at 8: README, "One engine per actor".)
- A `solo` request (its group's prefill ran out of memory) is prefilled alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class KVLayout:
    """How the padded KV cache allocates memory; the one place a slot's bytes are turned into a budget."""

    n_layers: int  # decoder layers L
    slot_bytes_per_layer: int  # K and V of one token in one layer, bytes
    block_tokens: int  # a row's capacity grows in blocks of this many slots

    def allocation_bytes(self, reserves: Sequence[tuple[int, int]], layer_k: int) -> int:
        """Bytes the padded cache allocates for rows with these worst-case slots (dense group, sparse group):
        every row padded to the longest, capacity rounded up to whole blocks."""
        if not reserves:
            return 0
        layers = (layer_k, self.n_layers - layer_k)
        total = 0
        for group in (0, 1):
            capacity = -(-max(r[group] for r in reserves) // self.block_tokens) * self.block_tokens
            total += len(reserves) * capacity * layers[group] * self.slot_bytes_per_layer
        return total


@dataclass(frozen=True)
class PagedLayout:
    """How the paged KV cache allocates memory: each row whole blocks of its own, per layer group."""

    n_layers: int  # decoder layers L
    slot_bytes_per_layer: int  # K and V of one token in one layer, bytes
    block_tokens: int  # slots per block

    def allocation_bytes(self, reserves: Sequence[tuple[int, int]], layer_k: int) -> int:
        """Bytes of the blocks rows holding these slots (dense group, sparse group) take."""
        layers = (layer_k, self.n_layers - layer_k)
        blocks = [sum(-(-r[group] // self.block_tokens) for r in reserves) for group in (0, 1)]
        return sum(b * self.block_tokens * n * self.slot_bytes_per_layer for b, n in zip(blocks, layers))


@dataclass(frozen=True)
class Scheduled:
    """A request as the scheduler sees it (waiting or running)."""

    ticket: int  # the engine's id for the request
    prompt_tokens: int  # tokens its prefill runs
    reserve: tuple[int, int]  # cache slots admission counts: (layers < K, layers >= K); (0, 0) in no_cache mode
    signature: tuple  # (layer K, mode, text scorer): rows that decode together share it
    solo: bool = False  # prefill this request alone (a batched prefill with it ran out of memory)


@dataclass(frozen=True)
class SchedulerLimits:
    """The policy's knobs (configs/serve.yaml and the caption config carry them)."""

    max_batch: int  # most rows decoding together
    max_prefill_batch: int  # most requests prefilled in one step
    max_prefill_tokens: int | None  # most prompt tokens prefilled in one step (None: no cap)
    kv_budget_bytes: int | None  # cap on the cache's allocation as the layout counts the rows (None: none)
    join_running: bool = True  # False: static batching (the baseline)
    kv_watermark: float = 0.0  # fraction of kv_budget_bytes admission leaves free for the running rows to grow
    refill_at: int = 1  # while rows decode, admit only once this many of max_batch places are free

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prefill_batch < 1:
            raise ValueError("max_batch and max_prefill_batch must be >= 1")
        if isinstance(self.refill_at, bool) or not isinstance(self.refill_at, int) or \
                not 1 <= self.refill_at <= self.max_batch:
            raise ValueError(f"refill_at must be an integer in [1, max_batch={self.max_batch}], got {self.refill_at!r}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 or None, got {self.max_prefill_tokens}")
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")

    @property
    def admission_bytes(self) -> int | None:
        """The cap admission checks: the budget less the watermark (None: no cap)."""
        if self.kv_budget_bytes is None:
            return None
        return int(self.kv_budget_bytes * (1.0 - self.kv_watermark))


@dataclass(frozen=True)
class StepPlan:
    """What one engine step does."""

    admit: tuple[int, ...]  # tickets to prefill this step, a prefix of the queue (arrival order)
    prefill_tokens: int  # prompt tokens those prefills run
    decode: bool  # whether a decoding step follows (rows are running, or join this step)
    waiting_on: str | None  # why the queue's head (if any) was not admitted: "batch", "kv_budget", "signature",
    #                         "static", "refill", "prefill_batch", "prefill_tokens", "solo"; None if admitted


def schedule(waiting: Sequence[Scheduled], running: Sequence[Scheduled], limits: SchedulerLimits,
             layout: KVLayout | PagedLayout) -> StepPlan:
    """One step's plan: which waiting requests join (see the module docstring for the rules) and whether the
    running rows decode. Pure: the same inputs always give the same plan."""
    admit: list[int] = []
    tokens = 0
    reason = None
    signature = running[0].signature if running else None
    reserves = [r.reserve for r in running]
    for head in waiting:
        if running and not limits.join_running:
            reason = "static"
        elif len(running) + len(admit) >= limits.max_batch:
            reason = "batch"
        elif not admit and running and limits.max_batch - len(running) < limits.refill_at:
            reason = "refill"
        elif len(admit) >= limits.max_prefill_batch:
            reason = "prefill_batch"
        elif admit and (head.solo or waiting[0].solo):
            reason = "solo"
        elif signature is not None and head.signature != signature:
            reason = "signature"
        elif admit and limits.max_prefill_tokens is not None and \
                tokens + head.prompt_tokens > limits.max_prefill_tokens:
            reason = "prefill_tokens"
        elif limits.kv_budget_bytes is not None and \
                layout.allocation_bytes(reserves + [head.reserve], head.signature[0]) > limits.admission_bytes:
            reason = "kv_budget"
        if reason is not None:
            break
        signature = head.signature
        reserves.append(head.reserve)
        admit.append(head.ticket)
        tokens += head.prompt_tokens
    return StepPlan(tuple(admit), tokens, bool(running or admit), reason)
