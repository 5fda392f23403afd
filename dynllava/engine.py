"""Batched generation on DynamicLlava: prefill, then decode with the sparse KV cache or by recomputation.

A static batch runs prefill once and decodes every row in lock-step until all rows finish; finished rows stop
growing their cache. Per-request state (sampling generator, admission history, counters) lives in `DecodingRow`,
never on the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch

from dynllava import costs
from dynllava.cache import SparseKVCache
from dynllava.config import SparsityConfig
from dynllava.decode_step import CachedStep
from dynllava.paged_cache import PagedKVCache, PagedKVPool
from dynllava.scorers import TEXT_SCORERS, AdmissionState, TextInputs, decide_admission

CACHE_BLOCK_TOKENS = 64  # cache capacity grows in blocks of this many tokens (fewer re-allocations)
GRAPH_CACHE_BLOCK_TOKENS = 128  # with CUDA graphs each growth means a new capture: grow in larger blocks


@dataclass
class RequestStats:
    """Per-request measurements. Times in seconds, memory in bytes, FLOPs analytic (dynllava.costs)."""

    n_image_tokens: int = 0  # image tokens in the prompt
    n_image_kept: int = 0  # image tokens that ran through layers >= K
    n_text_generated: int = 0  # generated tokens returned (EOS excluded)
    n_text_admitted: int = 0  # generated tokens whose K/V entered layers >= K (the last one is never fed back)
    kv_bytes_peak: int = 0  # bytes of K/V this request held in the cache at its peak (0 in no_cache mode)
    kv_bytes_dense_equivalent: int = 0  # bytes a dense cache would hold for the same tokens
    prefill_s: float = 0.0  # the batch's prefill (model forward to first token; preprocessing excluded)
    decode_s: float = 0.0  # first token to this request's last token
    ttft_s: float = 0.0  # call start (preprocessing included) to first token
    flops_dense: float = 0.0  # analytic FLOPs of prefill + decoding without sparsification
    flops_sparse: float = 0.0  # analytic FLOPs as run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of a chosen token, and of the most likely alternatives at that step. They
    are the raw model distribution (log-softmax of the logits, before penalties, bias and temperature), as
    vLLM reports by default."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first; as many as were asked


@dataclass
class GenerationOutput:
    """One request's result. finish_reason: "stop" (EOS or a stop string) or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    sparsity: SparsityConfig
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them


@dataclass(frozen=True)
class LogitRules:
    """A request's changes to its next-token logits before the token is chosen (OpenAI's frequency and presence
    penalties and logit_bias, vLLM's min_tokens). Each depends only on the row's own answer, so a row chooses
    the same tokens alone or in any batch."""

    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time it occurs in the answer so far
    presence_penalty: float = 0.0  # subtracted once from the logit of every token the answer contains
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit), -100..100
    min_tokens: int = 0  # end-of-sequence cannot be chosen before the answer has this many tokens

    @property
    def active(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias or self.min_tokens)

    def check(self, vocab_size: int, max_new_tokens: int) -> None:
        """ValueError naming the first field out of range (checked before any work is queued)."""
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise ValueError(f"logit_bias: token id {token} is not in this model's vocabulary "
                                 f"(0..{vocab_size - 1})")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias!r}")
        if not 0 <= self.min_tokens <= max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={max_new_tokens}], got {self.min_tokens!r}")

    def apply(self, logits: torch.Tensor, answer: list[int], eos_ids: Sequence[int]) -> torch.Tensor:
        """[V] logits of one row -> adjusted copy, given the row's answer so far."""
        out = logits.clone()
        if answer and (self.frequency_penalty or self.presence_penalty):
            ids, counts = torch.tensor(answer, device=out.device).unique(return_counts=True)
            out[ids] -= (self.frequency_penalty * counts + self.presence_penalty).to(out.dtype)
        for token, bias in self.logit_bias:
            out[token] += bias
        if len(answer) < self.min_tokens and eos_ids:
            out[list(eos_ids)] = -float("inf")
        return out


@dataclass
class DecodingRow:
    """Mutable per-request decoding state: everything a request needs to be decoded in any batch."""

    prompt_len: int
    sparsity: SparsityConfig
    generator: torch.Generator | None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    rules: LogitRules = field(default_factory=LogitRules)  # penalties, logit bias, min_tokens
    eos_ids: tuple[int, ...] = ()  # the model's end-of-sequence ids (what min_tokens holds back)
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely alternatives
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when logprobs is set
    n_fed: int = 0  # generated tokens fed back through decoding (all but the last one sampled)
    finish_reason: str | None = None
    admission: AdmissionState = field(default_factory=AdmissionState)
    finished_at: float = 0.0
    flops_dense: float = 0.0  # decoding FLOPs so far (prefill's are added when the row finishes)
    flops_sparse: float = 0.0
    # set from the prefill that ran this row (StaticBatch.record_prefill)
    n_views: int = 0  # vision-tower passes (images; any-res: their tiles and base views)
    n_image: int = 0  # image tokens in the prompt
    n_image_kept: int = 0
    n_kept_prompt: int = 0  # prompt tokens in layers >= K
    prefill_flops: tuple[float, float] = (0.0, 0.0)  # (dense, as run)

    def rewind(self) -> None:
        """Back to before its prefill, its answer kept (tokens, logprobs, sampler state): a preempted row is
        prefilled again and its answer fed back as forced inputs (`replaying`), which rebuilds its K/V, its
        admission history and its FLOPs exactly as they were."""
        self.n_fed, self.admission = 0, AdmissionState()
        self.flops_dense = self.flops_sparse = 0.0

    @property
    def replaying(self) -> bool:
        """Whether the next input is a token of the answer already sent (after a preemption), not a new one."""
        return self.n_fed < len(self.tokens) - 1

    @property
    def n_admitted(self) -> int:
        """Generated tokens whose K/V entered layers >= K."""
        rate = self.sparsity.text_keep
        return self.n_fed if rate is not None and rate >= 1.0 else self.admission.n_admitted


SAMPLING_EPS = 1e-5  # temperatures below this decode greedily (as vLLM): dividing by ~0 would overflow the logits
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(seed: int | None, name: str = "seed") -> None:
    """ValueError unless `seed` is None or an integer a generator accepts (checked before any work is queued)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64 - 1], got {seed!r}")


def check_generation_args(model, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """ValueError unless the sampling arguments are usable (checked before any work is queued)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens >= model.max_context:
        raise ValueError(f"max_new_tokens {max_new_tokens} is not below the model's context of "
                         f"{model.max_context} tokens")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def per_row(value, n: int, name: str) -> list:
    """One value for each of n rows: a list or tuple must have n entries, anything else is repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def sample_next(logits: torch.Tensor, rows: list[DecodingRow], failed: dict[int, str] | None = None) -> list[int]:
    """Next token per row [B, V] -> B ids: the row's LogitRules first (when it has any), then greedy when its
    temperature is below SAMPLING_EPS, else temperature + nucleus sampling with the row's own generator (so a
    row chooses the same tokens alone or in any batch). With `failed`, a row whose choice raises is recorded
    there (row index -> message, its id is -1) and the other rows are chosen as usual; without it the error
    propagates."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, row in enumerate(rows):
        try:
            if row.rules.active:
                adjusted = row.rules.apply(logits[i], row.tokens, row.eos_ids)
                out.append(int(adjusted.argmax()) if row.temperature < SAMPLING_EPS else _sample_row(adjusted, row))
            else:
                out.append(greedy[i] if row.temperature < SAMPLING_EPS else _sample_row(logits[i], row))
            if row.logprobs is not None:
                row.token_logprobs.append(token_logprob(logits[i], out[-1], row.logprobs))
        except Exception as e:
            if failed is None:
                raise
            failed[i] = f"sampling failed: {type(e).__name__}: {e}"
            out.append(-1)
    return out


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """[V] logits -> the chosen token's log-probability and the k most likely tokens' (raw distribution)."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(k) if k else None
    return TokenLogprob(token, float(lp[token]),
                        tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ())


def _sample_row(logits: torch.Tensor, row: DecodingRow) -> int:
    probs = (logits / row.temperature).softmax(-1)
    if row.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > row.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=row.generator))


def model_dims(model) -> costs.ModelDims:
    """The cost model's dimensions of a loaded model (the loaded predictor width included)."""
    dims = costs.ModelDims.from_hf_config(model.config)
    if model.predictors is not None:
        dims = replace(dims, predictor_width=model.predictors.image.width)
    return dims


def admit_tokens(text_scorer, scores: torch.Tensor | None, rows: list[DecodingRow], active: list[bool],
                 text_dense: bool) -> list[bool]:
    """Admission of each active row's current token to layers >= K, from its text score [B]."""
    if text_dense:
        return list(active)
    host_scores = scores.tolist()
    decisions = [False] * len(rows)
    idx = [i for i, a in enumerate(active) if a]
    made = decide_admission(text_scorer, [host_scores[i] for i in idx], [rows[i].sparsity.text_keep for i in idx],
                            [rows[i].admission for i in idx])
    for i, d in zip(idx, made):
        decisions[i] = d
    return decisions


def _is_text_dense(sparsities: Sequence[SparsityConfig]) -> bool:
    return all(s.text_keep is not None and s.text_keep >= 1.0 for s in sparsities)


class CachedDecoding:
    """Decoding of rows whose prompts are in a SparseKVCache: the cache, the step function and text admission.

    Rows can leave (`select`) and whole prefilled groups can join (`merge`) between steps: this is what
    continuous batching runs on. Rows must share layer K and the text scorer."""

    def __init__(self, model, cache: SparseKVCache | PagedKVCache, sparsities: list[SparsityConfig],
                 use_graphs: bool):
        self.model, self.cache, self.use_graphs = model, cache, use_graphs
        self.k = sparsities[0].layer
        self.text_scorer_name = sparsities[0].text_scorer
        self.text_scorer = TEXT_SCORERS[self.text_scorer_name]()
        self._set_rows(sparsities)

    def _set_rows(self, sparsities: list[SparsityConfig]) -> None:
        self.sparsities = sparsities
        self.text_dense = _is_text_dense(sparsities)
        self.decoder = CachedStep(self.model, self.cache, self.k, self.text_scorer, not self.text_dense,
                                  self.use_graphs)

    def kv_bytes(self, i: int) -> int:
        """Bytes of K/V row i holds now."""
        return self.cache.bytes_in_use(i)

    def reserve(self, active: list[bool]) -> None:
        """Take the cache slots this step's tokens need (call before `step`). A paged cache raises OutOfBlocks
        when its pool is full; a row's blocks are taken whole or not at all, so the caller may preempt a row and
        call again."""
        for group in (0, 1):
            self.cache.reserve_step(group, active)

    def compact(self) -> None:
        """A paged cache moves its rows' blocks down over the holes left by rows that left (decoding then reads
        no free block, and under a budget the pool never holds more than its rows); nothing for a padded one."""
        if isinstance(self.cache, PagedKVCache):
            for group in (0, 1):
                self.cache.compact(group)

    def step(self, tokens: list[int], rows: list[DecodingRow], active: list[bool]) -> torch.Tensor:
        """Feed each active row's last token (its slots taken by `reserve`); returns next-token logits [B, V]."""
        cache = self.cache
        positions = [r.prompt_len + r.n_fed for r in rows]  # the fed token is generated token n_fed
        logits, scores = self.decoder(tokens, positions, cache.lengths(0), cache.lengths(1))
        cache.commit_step(0, active)
        cache.commit_step(1, admit_tokens(self.text_scorer, scores, rows, active, self.text_dense))
        return logits

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order); the others' K/V is freed (a paged cache then fills the holes
        they left: decoding reads no free block, and under a budget the pool never holds more than its rows)."""
        self.cache.select(keep)
        self.compact()
        self._set_rows([self.sparsities[i] for i in keep])

    def merge(self, other: "CachedDecoding") -> None:
        """Append another group's rows (its cache is copied in; rows keep their slots' contents)."""
        if (other.k, other.text_scorer_name) != (self.k, self.text_scorer_name):
            raise ValueError("merge: rows must share layer K and the text scorer")
        self.cache.merge(other.cache)
        self._set_rows(self.sparsities + other.sparsities)


def row_step_flops(dims: costs.ModelDims, rows: list[DecodingRow], active: list[bool], mode: str,
                   text_scored: bool) -> None:
    """Add this step's analytic FLOPs (dense and as its own setting runs it) to each active row, before its
    counters move. A text-dense row is not charged for a text predictor that ran only for its batch-mates."""
    for row, a in zip(rows, active):
        if not a:
            continue
        learned = text_scored and row.sparsity.text_scorer == "learned" and not _is_text_dense([row.sparsity])
        ctx_dense = row.prompt_len + row.n_fed + 1  # the token being fed attends to itself
        ctx_sparse = row.n_kept_prompt + row.n_admitted + 1
        k = row.sparsity.layer
        row.flops_dense += costs.decode_step_flops(dims, ctx_dense, ctx_dense, k, mode)
        row.flops_sparse += costs.decode_step_flops(dims, ctx_dense, ctx_sparse, k, mode, learned)


class RecomputeDecoding:
    """Decoding without a KV cache (no_cache mode): each step re-runs the whole context, the kept prompt plus the
    admitted text, and drops the current token after it attended to itself if the text scorer does not admit it.

    Holds each row's embeddings [B, W, C], valid [B, W] and kept [B, W] slots; rows can leave (`select`) and whole
    prefilled groups can join (`merge`) between steps, like CachedDecoding."""

    cache = None  # no K/V is held

    def __init__(self, model, embeds: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor,
                 sparsities: list[SparsityConfig]):
        self.model = model
        self.embeds, self.valid, self.keep = embeds, valid, keep
        self.k = sparsities[0].layer
        self.text_scorer_name = sparsities[0].text_scorer
        self.text_scorer = TEXT_SCORERS[self.text_scorer_name]()
        self.sparsities = sparsities
        self.text_dense = _is_text_dense(sparsities)

    def kv_bytes(self, i: int) -> int:
        return 0

    def reserve(self, active: list[bool]) -> None:
        """Nothing to take: the context buffers widen inside `step`."""

    def compact(self) -> None:
        """Nothing to move: no K/V is held."""

    def step(self, tokens: list[int], rows: list[DecodingRow], active: list[bool]) -> torch.Tensor:
        """Feed each active row's last token; returns next-token logits [B, V]."""
        m, dev = self.model, self.model.device
        b = len(rows)
        needed = max(r.prompt_len + r.n_fed + 1 for r in rows)
        if needed > self.embeds.shape[1]:
            self._widen(needed)
        write_rows = [i for i, a in enumerate(active) if a]
        rows_t = torch.tensor(write_rows, device=dev, dtype=torch.long)
        at = torch.tensor([rows[i].prompt_len + rows[i].n_fed for i in write_rows], device=dev,
                          dtype=torch.long)
        if write_rows:
            self.embeds[rows_t, at] = m.lm.embed_tokens(torch.tensor([tokens[i] for i in write_rows], device=dev))
            self.valid[rows_t, at] = True
        width = int(self.valid.sum(1).max())
        valid = self.valid[:, :width]
        current = self.valid.sum(1) - 1  # [B] index of each row's last token
        index = torch.arange(b, device=dev)
        prompt_whole = all(r.n_kept_prompt == r.prompt_len for r in rows)

        def choose(hidden: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor | None:
            if self.text_dense and prompt_whole:
                return None
            self_att = attention[index, current] if attention is not None else None
            scores = None if self.text_dense else self.text_scorer.score(
                TextInputs(hidden[index, current], self_att, m.predictors))
            decided = torch.tensor(admit_tokens(self.text_scorer, scores, rows, active, self.text_dense), device=dev)
            self.keep[index, current] = decided
            keep = self.keep[:, :width].clone()
            keep[index, current] = True  # the current token always attends to itself
            return keep & valid

        need_attention = TEXT_SCORERS[self.text_scorer_name].needs_attention and not self.text_dense
        positions = torch.arange(width, device=dev).expand(b, width)
        res = m.run_context(self.embeds[:, :width], positions, valid, self.k, choose, need_attention)
        return m.logits(res.last_hidden)

    def _widen(self, width: int) -> None:
        pad = width - self.embeds.shape[1]
        self.embeds = torch.nn.functional.pad(self.embeds, (0, 0, 0, pad))
        self.valid = torch.nn.functional.pad(self.valid, (0, pad))
        self.keep = torch.nn.functional.pad(self.keep, (0, pad))

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order)."""
        index = torch.tensor(keep, dtype=torch.long, device=self.embeds.device)
        self.embeds, self.valid, self.keep = (t.index_select(0, index) for t in (self.embeds, self.valid, self.keep))
        self.sparsities = [self.sparsities[i] for i in keep]
        self.text_dense = _is_text_dense(self.sparsities)

    def merge(self, other: "RecomputeDecoding") -> None:
        """Append another group's rows (buffers padded to the wider of the two)."""
        if (other.k, other.text_scorer_name) != (self.k, self.text_scorer_name):
            raise ValueError("merge: rows must share layer K and the text scorer")
        width = max(self.embeds.shape[1], other.embeds.shape[1])
        for group in (self, other):
            if group.embeds.shape[1] < width:
                group._widen(width)
        self.embeds = torch.cat([self.embeds, other.embeds])
        self.valid = torch.cat([self.valid, other.valid])
        self.keep = torch.cat([self.keep, other.keep])
        self.sparsities = self.sparsities + other.sparsities
        self.text_dense = _is_text_dense(self.sparsities)


def release(decoding) -> None:
    """Give a dropped decoding group's K/V back: a paged cache's blocks return to their pool (a padded cache is
    freed with its tensors)."""
    cache = getattr(decoding, "cache", None)
    if isinstance(cache, PagedKVCache):
        cache.release()


def decoding_bytes(decoding) -> tuple[int, int]:
    """(bytes in use, bytes allocated) of a decoding group's K/V; (0, 0) without a cache."""
    cache = decoding.cache if decoding is not None else None
    if cache is None:
        return 0, 0
    return sum(cache.bytes_in_use(i) for i in range(cache.batch)), cache.bytes_allocated()


class StaticBatch:
    """One prefilled batch: `prefill()` runs the prompts and leaves `decoding` (a CachedDecoding or a
    RecomputeDecoding, by mode) ready for `step()`. The engine's loop merges it into the running batch; tests and
    benchmarks may drive it directly or time `prefill()` alone."""

    def __init__(self, model, prepared, sparsities: list[SparsityConfig], max_new_tokens: int,
                 cuda_graphs: bool = True, kv_pool: PagedKVPool | None = None):
        self.model = model
        self.kv_pool = kv_pool  # the rows' K/V go into this pool's blocks (None: a padded SparseKVCache)
        self.use_graphs = cuda_graphs and model.device.type == "cuda"
        self.cfg = sparsities[0]
        self.k = self.cfg.layer
        self.dims = model_dims(model)
        dev = model.device
        self.input_ids = prepared.input_ids.to(dev)
        self.valid = prepared.valid.to(dev)
        self.prepared = prepared
        self.sparsities = sparsities
        self.max_new_tokens = max_new_tokens
        self.image_mask = (self.input_ids == model.image_token_id) & self.valid
        self.cache: SparseKVCache | PagedKVCache | None = None
        self.decoding: CachedDecoding | RecomputeDecoding | None = None

    @property
    def block_tokens(self) -> int:
        """The cache's growth block (larger with CUDA graphs: each growth is a new capture)."""
        return GRAPH_CACHE_BLOCK_TOKENS if self.use_graphs else CACHE_BLOCK_TOKENS

    # ---------------------------------------------------------------- prefill
    def prefill(self) -> torch.Tensor:
        """Run the prompt; returns next-token logits [B, V]."""
        m, b, t = self.model, *self.input_ids.shape
        p = self.prepared
        h = m.embed(self.input_ids, p.pixel_values, p.image_sizes, p.n_images)
        positions = torch.arange(t, device=h.device).expand(b, t)
        choose, need_attention = m.vision_keep_fn(self.image_mask, self.valid,
                                                  [s.vision_keep for s in self.sparsities], self.cfg.vision_scorer,
                                                  [s.keep_rounding for s in self.sparsities], p.layouts_by_row())
        if self.cfg.mode == "kv_cache":
            self.cache = PagedKVCache(self.kv_pool, b) if self.kv_pool is not None else SparseKVCache(
                m.n_layers, self.k, b, m.n_kv_heads, m.head_dim, m.dtype, h.device, self.block_tokens)
            self.decoding = CachedDecoding(m, self.cache, list(self.sparsities), self.use_graphs)
        res = m.run_context(h, positions, self.valid, self.k, choose, need_attention, self.cache)
        self.prompt_keep = res.keep
        self.n_kept_prompt = res.keep.sum(1).tolist()
        if self.cfg.mode == "no_cache":
            width = t + self.max_new_tokens
            embeds = torch.zeros(b, width, h.shape[-1], dtype=m.dtype, device=h.device)
            embeds[:, :t] = h
            valid = torch.zeros(b, width, dtype=torch.bool, device=h.device)
            valid[:, :t] = self.valid
            keep = torch.zeros_like(valid)
            keep[:, :t] = res.keep
            self.decoding = RecomputeDecoding(m, embeds, valid, keep, list(self.sparsities))
        return m.logits(res.last_hidden)

    def record_prefill(self, rows: list[DecodingRow]) -> None:
        """Store on each row what its prefill kept and cost (rows may then be decoded in other batches)."""
        n_image = self.image_mask.sum(1).tolist()
        n_image_kept = (self.prompt_keep & self.image_mask).sum(1).tolist()
        for i, (row, layouts) in enumerate(zip(rows, self.prepared.layouts_by_row())):
            row.n_views = sum(x.n_tiles for x in layouts)
            row.n_image, row.n_image_kept, row.n_kept_prompt = n_image[i], n_image_kept[i], self.n_kept_prompt[i]
            learned = row.sparsity.vision_scorer == "learned" and row.n_image_kept < row.n_image
            row.prefill_flops = (
                costs.prefill_flops(self.dims, row.prompt_len, row.prompt_len, self.k, row.n_views),
                costs.prefill_flops(self.dims, row.prompt_len, row.n_kept_prompt, self.k, row.n_views,
                                    row.n_image, learned))

    # ---------------------------------------------------------------- decode
    def step(self, tokens: list[int], rows: list[DecodingRow], active: list[bool]) -> torch.Tensor:
        """Feed each row's last token; returns next-token logits [B, V]."""
        self.decoding.reserve(active)
        return self.decoding.step(tokens, rows, active)


def new_row(prompt_len: int, sparsity: SparsityConfig, device: torch.device, max_new_tokens: int,
            temperature: float, top_p: float, seed: int | None, stop: Sequence[str] | None,
            ignore_eos: bool, rules: LogitRules = LogitRules(), eos_ids: Sequence[int] = (),
            logprobs: int | None = None) -> DecodingRow:
    """A request's decoding state; its sampler is seeded (or from OS entropy) only when it samples."""
    generator = None
    if temperature >= SAMPLING_EPS:  # a row's own generator, never torch's global RNG
        generator = torch.Generator(device=device)
        generator.seed() if seed is None else generator.manual_seed(seed)
    return DecodingRow(prompt_len, sparsity, generator, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, stop=[s for s in (stop or []) if s], ignore_eos=ignore_eos, rules=rules,
                       eos_ids=tuple(sorted(eos_ids)), logprobs=logprobs)


def check_stop(model, row: DecodingRow) -> None:
    """Set row.finish_reason after a new token: EOS ("stop", the EOS is dropped), a stop string, or length."""
    token = row.tokens[-1]
    if token in model.eos_token_ids and not row.ignore_eos:
        row.tokens.pop()
        del row.token_logprobs[len(row.tokens):]  # the EOS is not part of the answer, nor its logprob
        row.finish_reason = "stop"
    elif row.stop:
        tail = model.processor.tokenizer.decode(row.tokens[-(4 * max(map(len, row.stop)) + 4):],
                                                skip_special_tokens=True)
        if any(s in tail for s in row.stop):
            row.finish_reason = "stop"
    if row.finish_reason is None and len(row.tokens) >= row.max_new_tokens:
        row.finish_reason = "length"


def final_text(model, row: DecodingRow) -> str:
    """The row's text so far, cut before the first stop string."""
    text = model.processor.tokenizer.decode(row.tokens, skip_special_tokens=True)
    cut = min((text.find(s) for s in row.stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def finish_row(model, dims: costs.ModelDims, row: DecodingRow, kv_bytes: int, prefill_s: float, ttft_s: float,
               first_token_at: float) -> GenerationOutput:
    """A finished row's output and stats (kv_bytes: what it holds in its cache now, i.e. at its peak)."""
    element = torch.empty((), dtype=model.dtype).element_size()
    n_ctx = row.prompt_len + row.n_fed
    stats = RequestStats(
        n_image_tokens=row.n_image,
        n_image_kept=row.n_image_kept,
        n_text_generated=len(row.tokens),
        n_text_admitted=row.n_admitted,
        kv_bytes_peak=kv_bytes,
        kv_bytes_dense_equivalent=costs.kv_bytes(dims, n_ctx, n_ctx, row.sparsity.layer, element),
        prefill_s=prefill_s,
        decode_s=row.finished_at - first_token_at,
        ttft_s=ttft_s,
        flops_dense=row.prefill_flops[0] + row.flops_dense,
        flops_sparse=row.prefill_flops[1] + row.flops_sparse,
    )
    return GenerationOutput(final_text(model, row), list(row.tokens), row.finish_reason or "length", stats,
                            row.sparsity, list(row.token_logprobs) if row.logprobs is not None else None)


@torch.inference_mode()
def teacher_forced_nll(model, images: Sequence[Any], prompts: Sequence[str], targets: Sequence[Sequence[int]],
                       sparsity: SparsityConfig | None = None) -> list[tuple[float, int]]:
    """Negative log-likelihood of given continuations (token ids), fed through the engine exactly as generation
    would feed them (same pruning, same admission). Returns (nll_sum, n_tokens) per row: perplexity under
    sparsification."""
    sparsity = sparsity or SparsityConfig()
    model.check_scorers(sparsity)
    longest = max(len(t) for t in targets)
    prepared = model.prepare(images, prompts, longest)
    n = len(prompts)
    batch = StaticBatch(model, prepared, [sparsity] * n, longest)
    rows = [DecodingRow(length, sparsity, None) for length in prepared.lengths]
    logits = batch.prefill()
    batch.record_prefill(rows)
    nll = [0.0] * n
    for t in range(longest):
        logp = logits.log_softmax(-1)
        for i, target in enumerate(targets):
            if t < len(target):
                nll[i] -= float(logp[i, target[t]])
        if t + 1 == longest:
            break
        active = [t + 1 < len(target) for target in targets]
        tokens = [target[t] if t < len(target) else 0 for target in targets]
        for row, tok, a in zip(rows, tokens, active):
            if a:
                row.tokens.append(tok)
        logits = batch.step(tokens, rows, active)
        for row, a in zip(rows, active):
            row.n_fed += int(a)
    return [(nll[i], len(targets[i])) for i in range(n)]
