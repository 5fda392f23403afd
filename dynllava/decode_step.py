"""The cached decoding step as a fixed-shape function of static buffers.

Every input of a step (token, position, per-group lengths) is copied into a preallocated tensor and every
cache buffer keeps its shape until the cache grows, so on CUDA the whole step (embedding, all layers, text
scorer, logits) is captured once per cache capacity as a CUDA graph and replayed per token: one launch instead
of ~60 per layer, which is what bounds small-batch decoding in eager PyTorch. On CPU the same function runs
eagerly. The admission decision is taken on the host after the step, from the scores the step returns.
"""

from __future__ import annotations

import torch

from dynllava.cache import SparseKVCache
from dynllava.paged_cache import PagedKVCache
from dynllava.scorers import TextInputs


class CachedStep:
    """Callable: (tokens, positions, dense lengths, sparse lengths) -> (logits [B, V], text scores [B] | None).

    One per set of rows (the engine makes a new one when rows join or leave). With graphs, a cache capacity's
    first step runs eagerly and its second captures; later ones replay. The returned tensors are reused by
    the next call (graph outputs): read them before calling again.
    """

    def __init__(self, model, cache: SparseKVCache | PagedKVCache, layer_k: int, text_scorer, score_text: bool,
                 use_graph: bool):
        dev, b = model.device, cache.batch
        self.model, self.cache, self.layer_k = model, cache, layer_k
        self.text_scorer, self.score_text = text_scorer, score_text
        self.needs_attention = score_text and text_scorer.needs_attention
        self.paged = isinstance(cache, PagedKVCache)
        self.use_graph = use_graph and dev.type == "cuda" and not self.paged  # paged graphs: not yet
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.lengths = (torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev))
        self.rows = torch.arange(b, device=dev)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple[int, int] | None = None
        self._seen_key: tuple[int, int] | None = None  # the shape of the previous eager step
        self._out: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.captures = 0  # how many graphs were captured (one per cache capacity)

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.paged:
            return self._forward_paged()
        m, cache, k_layer = self.model, self.cache, self.layer_k
        h = m.lm.embed_tokens(self.tokens)[:, None]  # [B, 1, C]
        cos, sin = m.rotary(h, self.positions)
        self_weight = score = None
        for group, lengths in enumerate(self.lengths):
            # valid slots plus the current token's own slot (= its row's length)
            mask = torch.arange(cache.capacity(group), device=h.device)[None, :] <= lengths[:, None]
            if group == 1 and self.score_text:
                score = self.text_scorer.score(TextInputs(h[:, 0], self_weight, m.predictors))
            for i in range(k_layer) if group == 0 else range(k_layer, m.n_layers):
                k_buf, v_buf = cache.buffers(i)
                h, weight = m.layer_step(i, h, cos, sin, k_buf, v_buf, mask, self.rows, lengths,
                                         want_self_weight=self.needs_attention and i == k_layer - 1)
                self_weight = weight if weight is not None else self_weight
        return m.logits(h[:, 0]), score

    def _forward_paged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        m, cache, k_layer = self.model, self.cache, self.layer_k
        h = m.lm.embed_tokens(self.tokens)[:, None]  # [B, 1, C]
        cos, sin = m.rotary(h, self.positions)
        self_weight = score = None
        for group in (0, 1):
            write_block, write_offset, owner, bias = cache.step_index(group, h.device)
            if group == 1 and self.score_text:
                score = self.text_scorer.score(TextInputs(h[:, 0], self_weight, m.predictors))
            for i in range(k_layer) if group == 0 else range(k_layer, m.n_layers):
                k_pool, v_pool = cache.buffers(i)
                h, weight = m.layer_step_paged(i, h, cos, sin, k_pool, v_pool, (write_block, write_offset), owner,
                                               bias, want_self_weight=self.needs_attention and i == k_layer - 1)
                self_weight = weight if weight is not None else self_weight
        return m.logits(h[:, 0]), score

    def __call__(self, tokens: list[int], positions: list[int], dense_lengths: list[int],
                 sparse_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.tokens.copy_(torch.tensor(tokens))
        self.positions.copy_(torch.tensor(positions)[:, None])
        self.lengths[0].copy_(torch.tensor(dense_lengths))
        self.lengths[1].copy_(torch.tensor(sparse_lengths))
        if not self.use_graph:
            return self._forward()
        key = (self.cache.capacity(0), self.cache.capacity(1))
        if key != self._graph_key:
            if key != self._seen_key:  # a new shape: run it eagerly once, capture only if it comes again (in the
                self._seen_key = key  # continuous loop, rows joining or leaving change it; a capture would be
                return self._forward()  # wasted on a shape that lasts one step)
            self._capture(key)
        self._graph.replay()
        return self._out

    def _capture(self, key: tuple[int, int]) -> None:
        """Capture the step for the current buffers (they were reallocated when the cache grew)."""
        self._graph = self._out = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy inits, cuBLAS workspaces
            self._forward()  # writes this step's K/V at the same slots the replay will: idempotent
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._forward()
        self._graph, self._graph_key = graph, key
        self.captures += 1
