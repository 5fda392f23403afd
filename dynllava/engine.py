"""Batched generation on DynamicLlava: prefill, then decode with the sparse KV cache or by recomputation.

A static batch runs prefill once and decodes every row in lock-step until all rows finish; finished rows stop
growing their cache. Per-request state (sampling generator, admission history, counters) lives in `_Row`,
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


@dataclass
class GenerationOutput:
    """One request's result. finish_reason: "stop" (EOS or a stop string) or "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    sparsity: SparsityConfig


@dataclass
class _Row:
    """Mutable per-request decoding state."""

    prompt_len: int
    sparsity: SparsityConfig
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    n_fed: int = 0  # generated tokens fed back through decoding (all but the last one sampled)
    finish_reason: str | None = None
    stop_at: int | None = None  # character index where a stop string begins
    admission: AdmissionState = field(default_factory=AdmissionState)
    finished_at: float = 0.0
    flops_dense: float = 0.0
    flops_sparse: float = 0.0


def _check_args(model, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens >= model.max_context:
        raise ValueError(f"max_new_tokens {max_new_tokens} is not below the model's context of "
                         f"{model.max_context} tokens")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _sample(logits: torch.Tensor, rows: list[_Row], temperature: float, top_p: float) -> list[int]:
    """Greedy when temperature == 0, else temperature + nucleus sampling with each row's own generator."""
    if temperature == 0.0:
        return logits.argmax(-1).tolist()
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return [int(torch.multinomial(probs[i], 1, generator=row.generator)) for i, row in enumerate(rows)]


class StaticBatch:
    """One static batch in flight: rows, their cache or recompute buffers, and the decode step.

    `prefill()` then repeated `step()`; `generate()` drives it, benchmarks may time `prefill()` alone."""

    def __init__(self, model, prepared, sparsities: list[SparsityConfig], max_new_tokens: int,
                 cuda_graphs: bool = True):
        self.model = model
        self.use_graphs = cuda_graphs and model.device.type == "cuda"
        self.cfg = sparsities[0]
        self.k = self.cfg.layer
        self.dims = costs.ModelDims.from_hf_config(model.config)
        if model.predictors is not None:
            self.dims = replace(self.dims, predictor_width=model.predictors.image.width)
        dev = model.device
        self.input_ids = prepared.input_ids.to(dev)
        self.valid = prepared.valid.to(dev)
        self.prepared = prepared
        self.sparsities = sparsities
        self.text_scorer = TEXT_SCORERS[self.cfg.text_scorer]()
        self.text_rates = [s.text_keep for s in sparsities]
        self.text_dense = all(r is not None and r >= 1.0 for r in self.text_rates)
        self.image_mask = (self.input_ids == model.image_token_id) & self.valid
        self.cache: SparseKVCache | None = None
        b, t = self.input_ids.shape
        self.rows_index = torch.arange(b, device=dev)
        if self.cfg.mode == "no_cache":
            width = t + max_new_tokens
            self.embeds = torch.zeros(b, width, model.lm.config.hidden_size, dtype=model.dtype, device=dev)
            self.full_valid = torch.zeros(b, width, dtype=torch.bool, device=dev)
            self.full_valid[:, :t] = self.valid
            self.full_keep = torch.zeros_like(self.full_valid)
            self.positions = torch.arange(width, device=dev).expand(b, width)

    # ---------------------------------------------------------------- prefill
    def prefill(self) -> torch.Tensor:
        """Run the prompt; returns next-token logits [B, V]."""
        m, b, t = self.model, *self.input_ids.shape
        h = m.embed(self.input_ids, self.prepared.pixel_values)
        positions = torch.arange(t, device=h.device).expand(b, t)
        choose, need_attention = m.vision_keep_fn(self.image_mask, self.valid,
                                                  [s.vision_keep for s in self.sparsities], self.cfg.vision_scorer)
        if self.cfg.mode == "kv_cache":
            block = GRAPH_CACHE_BLOCK_TOKENS if self.use_graphs else CACHE_BLOCK_TOKENS
            self.cache = SparseKVCache(m.n_layers, self.k, b, m.n_kv_heads, m.head_dim, m.dtype, h.device, block)
            self.decoder = CachedStep(m, self.cache, self.k, self.text_scorer, not self.text_dense, self.use_graphs)
        res = m.run_context(h, positions, self.valid, self.k, choose, need_attention, self.cache)
        self.prompt_keep = res.keep
        self.n_kept_prompt = res.keep.sum(1).tolist()
        if self.cfg.mode == "no_cache":
            self.embeds[:, :t] = h
            self.full_keep[:, :t] = res.keep
        return m.logits(res.last_hidden)

    # ---------------------------------------------------------------- decode
    def _admit(self, scores: torch.Tensor | None, rows: list[_Row], active: list[bool]) -> list[bool]:
        """Admission of each active row's current token to layers >= K, from its text score [B]."""
        if self.text_dense:
            return list(active)
        host_scores = scores.tolist()
        decisions = [False] * len(rows)
        idx = [i for i, a in enumerate(active) if a]
        made = decide_admission(self.text_scorer, [host_scores[i] for i in idx], [self.text_rates[i] for i in idx],
                                [rows[i].admission for i in idx])
        for i, d in zip(idx, made):
            decisions[i] = d
        return decisions

    def step(self, tokens: list[int], rows: list[_Row], active: list[bool]) -> torch.Tensor:
        """Feed each row's last token; returns next-token logits [B, V]."""
        if self.cfg.mode == "kv_cache":
            return self._step_cached(tokens, rows, active)
        return self._step_recompute(tokens, rows, active)

    def _step_cached(self, tokens, rows, active) -> torch.Tensor:
        cache = self.cache
        for group in (0, 1):
            cache.reserve_step(group, active)
        positions = [r.prompt_len + len(r.tokens) - 1 for r in rows]
        logits, scores = self.decoder(tokens, positions, cache.lengths(0), cache.lengths(1))
        cache.commit_step(0, active)
        cache.commit_step(1, self._admit(scores, rows, active))
        return logits

    def _step_recompute(self, tokens, rows, active) -> torch.Tensor:
        m, dev = self.model, self.model.device
        write_rows = [i for i, a in enumerate(active) if a]
        rows_t = torch.tensor(write_rows, device=dev, dtype=torch.long)
        at = torch.tensor([rows[i].prompt_len + len(rows[i].tokens) - 1 for i in write_rows], device=dev,
                          dtype=torch.long)
        if write_rows:
            self.embeds[rows_t, at] = m.lm.embed_tokens(torch.tensor([tokens[i] for i in write_rows], device=dev))
            self.full_valid[rows_t, at] = True
        width = int(self.full_valid.sum(1).max())
        valid = self.full_valid[:, :width]
        current = self.full_valid.sum(1) - 1  # [B] index of each row's last token

        def choose(hidden: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor | None:
            if self.text_dense and self.n_kept_prompt == self.prepared.lengths:
                return None
            self_att = attention[self.rows_index, current] if attention is not None else None
            scores = None if self.text_dense else self.text_scorer.score(
                TextInputs(hidden[self.rows_index, current], self_att, m.predictors))
            admit = self._admit(scores, rows, active)
            decided = torch.tensor(admit, device=dev)
            self.full_keep[self.rows_index, current] = decided
            keep = self.full_keep[:, :width].clone()
            keep[self.rows_index, current] = True  # the current token always attends to itself
            return keep & valid

        need_attention = TEXT_SCORERS[self.cfg.text_scorer].needs_attention and not self.text_dense
        res = m.run_context(self.embeds[:, :width], self.positions[:, :width], valid, self.k, choose,
                            need_attention)
        return m.logits(res.last_hidden)

    # ---------------------------------------------------------------- accounting
    def step_flops(self, rows: list[_Row], active: list[bool]) -> None:
        """Add this step's analytic FLOPs (dense and as run) to each active row, before its counters move."""
        learned = self.cfg.text_scorer == "learned" and not self.text_dense
        for i, (row, a) in enumerate(zip(rows, active)):
            if not a:
                continue
            admitted_before = row.n_fed if self.text_dense else row.admission.n_admitted
            ctx_dense = row.prompt_len + row.n_fed + 1  # the token being fed attends to itself
            ctx_sparse = self.n_kept_prompt[i] + admitted_before + 1
            row.flops_dense += costs.decode_step_flops(self.dims, ctx_dense, ctx_dense, self.k, self.cfg.mode)
            row.flops_sparse += costs.decode_step_flops(self.dims, ctx_dense, ctx_sparse, self.k, self.cfg.mode,
                                                        learned)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A row's own sampling generator: seeded, or from OS entropy (never touching torch's global RNG)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _check_stop(model, row: _Row, stop: Sequence[str], ignore_eos: bool, max_new_tokens: int) -> None:
    token = row.tokens[-1]
    if token in model.eos_token_ids and not ignore_eos:
        row.tokens.pop()
        row.finish_reason = "stop"
    elif stop:
        tail = model.processor.tokenizer.decode(row.tokens[-(4 * max(map(len, stop)) + 4):],
                                                skip_special_tokens=True)
        if any(s in tail for s in stop):
            row.finish_reason = "stop"
    if row.finish_reason is None and len(row.tokens) >= max_new_tokens:
        row.finish_reason = "length"


@torch.inference_mode()
def generate(model, images: Sequence[Any], prompts: Sequence[str],
             sparsity: SparsityConfig | Sequence[SparsityConfig] | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
             stop: Sequence[str] | None = None, ignore_eos: bool = False,
             cuda_graphs: bool = True) -> list[GenerationOutput]:
    """Generate for a static batch. `sparsity` may be one config or one per row; rows of one batch must share
    layer, mode and scorers (keep ratios may differ). `seed` (int or per row) seeds each row's sampler, so a
    row samples the same tokens alone or in any batch. On CUDA the cached decoding step runs as a CUDA graph
    unless cuda_graphs=False. Returns one GenerationOutput per prompt, in order."""
    start = time.perf_counter()
    _check_args(model, max_new_tokens, temperature, top_p)
    n = len(prompts)
    sparsities = _per_row(sparsity or SparsityConfig(), n, "sparsity")
    first = sparsities[0]
    for s in sparsities:
        if (s.layer, s.mode, s.vision_scorer, s.text_scorer) != (first.layer, first.mode, first.vision_scorer,
                                                                   first.text_scorer):
            raise ValueError("sparsity: rows of one batch must share layer, mode and scorers")
        model.check_scorers(s)
    stop = [s for s in (stop or []) if s]
    prepared = model.prepare(images, prompts, max_new_tokens)
    prefill_start = time.perf_counter()
    seeds = _per_row(seed, n, "seed")
    dev = model.device
    rows = [_Row(prompt_len, s, _generator(dev, sd) if temperature > 0 else None)
            for prompt_len, s, sd in zip(prepared.lengths, sparsities, seeds)]
    batch = StaticBatch(model, prepared, sparsities, max_new_tokens, cuda_graphs)
    logits = batch.prefill()
    tokens = _sample(logits, rows, temperature, top_p)
    first_token_at = time.perf_counter()  # _sample synchronised the device (token ids are on the host)
    prefill_s, ttft_s = first_token_at - prefill_start, first_token_at - start
    for row, tok in zip(rows, tokens):
        row.tokens.append(tok)
        _check_stop(model, row, stop, ignore_eos, max_new_tokens)
        row.finished_at = first_token_at
    while True:
        active = [r.finish_reason is None for r in rows]
        if not any(active):
            break
        batch.step_flops(rows, active)
        logits = batch.step(tokens, rows, active)
        for row, a in zip(rows, active):
            row.n_fed += int(a)
        new = _sample(logits, rows, temperature, top_p)
        now = time.perf_counter()
        for i, row in enumerate(rows):
            if active[i]:
                row.tokens.append(new[i])
                tokens[i] = new[i]
                _check_stop(model, row, stop, ignore_eos, max_new_tokens)
                row.finished_at = now
    return [_finish(model, batch, i, row, prefill_s, ttft_s, first_token_at, stop) for i, row in enumerate(rows)]


def _finish(model, batch: StaticBatch, i: int, row: _Row, prefill_s: float, ttft_s: float,
            first_token_at: float, stop: list[str]) -> GenerationOutput:
    tokenizer = model.processor.tokenizer
    text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    if stop:
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
    dims, k = batch.dims, batch.k
    n_image = int(batch.image_mask[i].sum())
    n_kept_image = int((batch.prompt_keep[i] & batch.image_mask[i]).sum())
    n_fed = row.n_fed
    element = torch.empty((), dtype=model.dtype).element_size()
    dense_kv = costs.kv_bytes(dims, row.prompt_len + n_fed, row.prompt_len + n_fed, k, element)
    learned_vision = row.sparsity.vision_scorer == "learned" and n_kept_image < n_image
    prefill_dense = costs.prefill_flops(dims, row.prompt_len, row.prompt_len, k, batch.prepared.n_images[i])
    prefill_sparse = costs.prefill_flops(dims, row.prompt_len, batch.n_kept_prompt[i], k,
                                         batch.prepared.n_images[i], n_image, learned_vision)
    stats = RequestStats(
        n_image_tokens=n_image,
        n_image_kept=n_kept_image,
        n_text_generated=len(row.tokens),
        n_text_admitted=n_fed if batch.text_dense else row.admission.n_admitted,
        kv_bytes_peak=batch.cache.bytes_in_use(i) if batch.cache is not None else 0,
        kv_bytes_dense_equivalent=dense_kv,
        prefill_s=prefill_s,
        decode_s=row.finished_at - first_token_at,
        ttft_s=ttft_s,
        flops_dense=prefill_dense + row.flops_dense,
        flops_sparse=prefill_sparse + row.flops_sparse,
    )
    return GenerationOutput(text, list(row.tokens), row.finish_reason or "length", stats, row.sparsity)


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
    rows = [_Row(length, sparsity, None) for length in prepared.lengths]
    logits = batch.prefill()
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
