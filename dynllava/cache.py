"""SparseKVCache: append-only K/V buffers in two layer groups with per-row lengths and exact byte accounting.

Group "dense" = layers [0, K): every token is cached. Group "sparse" = layers [K, L): only kept prompt tokens
and admitted generated tokens. Each group holds one buffer per layer, [B, Hkv, capacity, D], rows
right-padded; row b's valid slots are [0, length[b]). A decoding step writes each row's current token at slot
length[b] and advances length[b] only if the token is admitted, so lengths (and the bytes a request holds)
grow only with admitted tokens; capacity grows in blocks of `block_tokens`, one slot ahead of the longest row.
"""

from __future__ import annotations

import torch


class _Group:
    """One layer group's buffers and per-row lengths (host ints: they drive growth and slicing)."""

    def __init__(self, n_layers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.n_layers, self.batch, self.heads, self.head_dim = n_layers, batch, heads, head_dim
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.lengths = [0] * batch
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.zeros(self.batch, self.heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)

    def reserve(self, needed: int, block_tokens: int) -> None:
        if needed <= self.capacity or self.n_layers == 0:
            return
        capacity = -(-needed // block_tokens) * block_tokens
        old = self.capacity
        for store in (self.k, self.v):
            for i in range(self.n_layers):
                grown = self._alloc(capacity)
                if i < len(store):
                    grown[:, :, :old] = store[i][:, :, :old]
                    store[i] = grown
                else:
                    store.append(grown)
        self.capacity = capacity

    def select(self, rows: list[int], block_tokens: int) -> None:
        """Keep rows `rows` in that order; capacity shrinks to what the longest kept row needs."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        lengths = [self.lengths[r] for r in rows]
        capacity = min(self.capacity, -(-(max(lengths, default=0) + 1) // block_tokens) * block_tokens)
        for store in (self.k, self.v):
            store[:] = [t[:, :, :capacity].index_select(0, index) for t in store]
        self.batch, self.lengths = len(rows), lengths
        self.capacity = capacity if self.n_layers else 0

    def merge(self, other: "_Group") -> None:
        """Append other's rows below this group's (capacity: the larger of the two)."""
        capacity = max(self.capacity, other.capacity)
        for store, theirs in ((self.k, other.k), (self.v, other.v)):
            for i in range(self.n_layers):
                merged = torch.zeros(self.batch + other.batch, self.heads, capacity, self.head_dim, dtype=self.dtype,
                                     device=self.device)
                merged[: self.batch, :, : self.capacity] = store[i]
                merged[self.batch:, :, : other.capacity] = theirs[i]
                store[i] = merged
        self.batch += other.batch
        self.lengths = self.lengths + other.lengths
        self.capacity = capacity

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one token occupies in one row across this group's layers (K and V)."""
        return 2 * self.n_layers * self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class SparseKVCache:
    """Per-layer-group, per-row K/V cache for one batch of requests.

    n_layers: L decoder layers; layer_k: K (first sparse layer); batch: B rows; kv_heads/head_dim: Hkv, D.
    """

    def __init__(self, n_layers: int, layer_k: int, batch: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, block_tokens: int = 64):
        if not 0 < layer_k <= n_layers:
            raise ValueError(f"layer K={layer_k} must be in [1, {n_layers}]")
        self.layer_k = layer_k
        self.block_tokens = block_tokens
        self.groups = (
            _Group(layer_k, batch, kv_heads, head_dim, dtype, device),
            _Group(n_layers - layer_k, batch, kv_heads, head_dim, dtype, device),
        )

    def _locate(self, layer: int) -> tuple[_Group, int]:
        return (self.groups[0], layer) if layer < self.layer_k else (self.groups[1], layer - self.layer_k)

    def group_of(self, layer: int) -> int:
        return 0 if layer < self.layer_k else 1

    # ------------------------------------------------------------------ writes
    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> None:
        """Store a right-padded prefill: k, v [B, Hkv, T, D]; row b's first lengths[b] slots are valid."""
        group, i = self._locate(layer)
        t = k.shape[2]
        group.reserve(t, self.block_tokens)
        group.k[i][:, :, :t] = k
        group.v[i][:, :, :t] = v
        group.lengths = list(lengths)

    def reserve_step(self, group_index: int, active: list[bool]) -> None:
        """Make room for this step's token in every active row (call before the step).

        The step writes each row's current token at slot length[b] whether or not it will be admitted (it must
        attend to itself); an unadmitted token's slot is simply overwritten by the next one. So a group needs
        one slot past each active row's length.
        """
        group = self.groups[group_index]
        needed = max((n + 1 for n, a in zip(group.lengths, active) if a), default=0)
        group.reserve(needed, self.block_tokens)

    def commit_step(self, group_index: int, admit: list[bool]) -> None:
        """Advance the lengths of rows whose current token is admitted (after the step ran)."""
        group = self.groups[group_index]
        group.lengths = [n + int(a) for n, a in zip(group.lengths, admit)]

    # ------------------------------------------------------------------ rows joining and leaving
    def select(self, rows: list[int]) -> None:
        """Keep only rows `rows` (in that order): finished or cancelled requests free their K/V."""
        for group in self.groups:
            group.select(rows, self.block_tokens)

    def merge(self, other: "SparseKVCache") -> None:
        """Append another cache's rows (a newly prefilled group) after this cache's rows. Both must have the same
        layers, K, heads, head size and dtype; buffers are reallocated once at the larger capacity."""
        for mine, theirs in zip(self.groups, other.groups):
            if (mine.n_layers, mine.heads, mine.head_dim, mine.dtype) != (theirs.n_layers, theirs.heads,
                                                                          theirs.head_dim, theirs.dtype):
                raise ValueError("merge: caches differ in layers, heads, head size or dtype")
            mine.merge(theirs)

    @property
    def batch(self) -> int:
        return self.groups[0].batch

    # ------------------------------------------------------------------ reads
    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole (k, v) buffers [B, Hkv, capacity, D]; fixed until the group grows."""
        group, i = self._locate(layer)
        return group.k[i], group.v[i]

    def capacity(self, group_index: int) -> int:
        return self.groups[group_index].capacity

    def lengths(self, group_index: int) -> list[int]:
        """Valid slots per row in a group."""
        return list(self.groups[group_index].lengths)

    # ------------------------------------------------------------------ accounting
    def bytes_in_use(self, row: int) -> int:
        """Bytes of K/V that row `row` holds (its valid slots, all layers)."""
        return sum(g.lengths[row] * g.bytes_per_slot for g in self.groups)

    def bytes_allocated(self) -> int:
        """Bytes the cache tensors occupy (all rows, padding and headroom included)."""
        return sum(t.numel() * t.element_size() for g in self.groups for t in (*g.k, *g.v))
