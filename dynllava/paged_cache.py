"""The block-paged K/V cache: one pool of fixed-size blocks per layer group, shared by every row of an engine,
and per-row block tables (dynllava.kv_blocks).

Group 0 = layers [0, K) holds every token; group 1 = layers [K, L) only kept prompt tokens and admitted
generated ones, so the two groups have separate pools and each row a table in each. Each layer's K and V are
tensors [n_blocks, Hkv, block_tokens, D]. A row takes blocks as its slots grow and returns them when it leaves:
no other row's K/V moves when rows join or leave, and the bytes held follow the live rows. Decoding reads the
blocks where they lie (`ops.block_attention`).

`PagedKVCache` is one set of rows over a `PagedKVPool`, with SparseKVCache's interface (write_prefill,
reserve_step, commit_step, select, merge, lengths, bytes), so prefill, decoding and the engine's loop drive
either cache the same way.
"""

from __future__ import annotations

import torch

from dynllava.kv_blocks import BlockPool, BlockTable, OutOfBlocks, next_serial

PAGED_BLOCK_TOKENS = 32  # slots per block: a row's last block wastes 16 slots on average, and decoding at batch
#                          16 ran 1.08-1.10x padded at 32 against 1.12-1.14x at 16 (bench_paged, 2-core CPU)


class _PoolGroup:
    """One layer group's block tensors and the BlockPool of their ids."""

    def __init__(self, n_layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 block_tokens: int):
        self.n_layers, self.heads, self.head_dim = n_layers, heads, head_dim
        self.dtype, self.device, self.block_tokens = dtype, device, block_tokens
        self.blocks = BlockPool(0, block_tokens)
        self.k: list[torch.Tensor] = [self._alloc(0) for _ in range(n_layers)]
        self.v: list[torch.Tensor] = [self._alloc(0) for _ in range(n_layers)]

    def _alloc(self, n_blocks: int) -> torch.Tensor:
        return torch.zeros(n_blocks, self.heads, self.block_tokens, self.head_dim, dtype=self.dtype,
                           device=self.device)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across this group's layers (K and V)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.heads * self.block_tokens * self.head_dim * element

    def resize(self, n_blocks: int) -> None:
        """Reallocate the tensors at n_blocks (a copy of the blocks kept: rare, the pool grows geometrically).
        Shrinking drops only the free tail: n_blocks must be above every held block id."""
        old = self.blocks.n_blocks
        if n_blocks == old:
            return
        keep = min(old, n_blocks)
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                resized = self._alloc(n_blocks)
                resized[:keep] = t[:keep]
                store[i] = resized
        if n_blocks > old:
            self.blocks.grow(n_blocks)
        else:
            self.blocks.shrink(n_blocks)

    def trim(self) -> None:
        """Give back the free blocks above the highest held one."""
        self.resize(self.blocks.highest_used() + 1)


class PagedKVPool:
    """An engine's K/V memory: a block pool per layer group, grown on demand up to `max_bytes` (None: no cap).

    n_layers: L; layer_k: K; kv_heads / head_dim: Hkv, D."""

    def __init__(self, n_layers: int, layer_k: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, block_tokens: int = PAGED_BLOCK_TOKENS, max_bytes: int | None = None):
        if not 0 < layer_k <= n_layers:
            raise ValueError(f"layer K={layer_k} must be in [1, {n_layers}]")
        self.layer_k, self.block_tokens, self.max_bytes = layer_k, block_tokens, max_bytes
        self.groups = (_PoolGroup(layer_k, kv_heads, head_dim, dtype, device, block_tokens),
                       _PoolGroup(n_layers - layer_k, kv_heads, head_dim, dtype, device, block_tokens))

    def locate(self, layer: int) -> tuple[int, int]:
        """(group, index of the layer in its group)."""
        return (0, layer) if layer < self.layer_k else (1, layer - self.layer_k)

    def bytes_held(self) -> int:
        """Bytes of the blocks rows hold now (both groups)."""
        return sum(g.blocks.used_blocks * g.block_bytes for g in self.groups)

    def bytes_allocated(self) -> int:
        """Bytes of the pool's tensors (held and free blocks)."""
        return sum(g.blocks.n_blocks * g.block_bytes for g in self.groups if g.n_layers)

    def free_token_blocks(self) -> int:
        """How many more blocks of block_tokens tokens in every layer the budget leaves room for (-1: no cap)."""
        if self.max_bytes is None:
            return -1
        return max(self.max_bytes - self.bytes_held(), 0) // sum(g.block_bytes for g in self.groups)

    def take(self, group: int, table: BlockTable, slots: int) -> None:
        """Give `table` blocks for `slots` slots in `group`, growing the pool if it must and may (by a quarter at
        least, so growth copies are rare; under a cap, first taking back the groups' free tails); OutOfBlocks
        when the cap leaves no room (nothing taken)."""
        pool = self.groups[group]
        missing = pool.blocks.blocks_for(slots) - len(table.blocks) - pool.blocks.free_blocks
        if missing > 0 and pool.n_layers:
            want = max(pool.blocks.n_blocks + missing, pool.blocks.n_blocks * 5 // 4, 4)
            if self.max_bytes is not None:
                if self._room(group) < missing:
                    for g in self.groups:
                        g.trim()
                    missing = pool.blocks.blocks_for(slots) - len(table.blocks) - pool.blocks.free_blocks
                room = self._room(group)
                if room < missing:
                    raise OutOfBlocks(f"group {group}: {missing} more blocks needed, the KV budget leaves room for "
                                      f"{max(room, 0)}")
                want = min(want, pool.blocks.n_blocks + room)
            if missing > 0:
                pool.resize(want)
        table.ensure(pool.blocks, slots)

    def _room(self, group: int) -> int:
        """Blocks `group` may add under the cap."""
        return (self.max_bytes - self.bytes_allocated()) // self.groups[group].block_bytes


class PagedKVCache:
    """The K/V of one set of rows (a batch, in order) in a PagedKVPool: each row's block table per group."""

    def __init__(self, pool: PagedKVPool, batch: int):
        self.pool = pool
        self.layer_k = pool.layer_k
        self.block_tokens = pool.block_tokens
        self.tables: tuple[list[BlockTable], list[BlockTable]] = ([BlockTable() for _ in range(batch)],
                                                                   [BlockTable() for _ in range(batch)])
        self._prefill_index: dict[int, tuple[torch.Tensor, ...]] = {}  # group -> where a prefill's tokens go
        self._layout: dict[int, tuple] = {}  # group -> (tables key, owner, index in row, free) of the last step

    @property
    def batch(self) -> int:
        return len(self.tables[0])

    def group_of(self, layer: int) -> int:
        return 0 if layer < self.layer_k else 1

    # ------------------------------------------------------------------ writes
    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> None:
        """Store a right-padded prefill: k, v [B, Hkv, T, D]; row b's first lengths[b] slots are valid. The
        group's first layer takes the rows' blocks (OutOfBlocks if the pool cannot hold them)."""
        group, i = self.pool.locate(layer)
        store = self.pool.groups[group]
        if group not in self._prefill_index:
            tables = self.tables[group]
            for table, n in zip(tables, lengths):
                self.pool.take(group, table, n)
                table.length = n
            rows = [b for b, n in enumerate(lengths) for _ in range(n)]
            times = [t for n in lengths for t in range(n)]
            slots = [table.slot(t, self.block_tokens) for table, n in zip(tables, lengths) for t in range(n)]
            dev = k.device
            slot = torch.tensor(slots, dtype=torch.long, device=dev)
            self._prefill_index[group] = (torch.tensor(rows, dtype=torch.long, device=dev),
                                          torch.tensor(times, dtype=torch.long, device=dev),
                                          slot // self.block_tokens, slot % self.block_tokens)
        rows, times, blocks, offsets = self._prefill_index[group]
        store.k[i][blocks, :, offsets] = k.transpose(1, 2)[rows, times]
        store.v[i][blocks, :, offsets] = v.transpose(1, 2)[rows, times]
        if i == store.n_layers - 1:  # the group's last layer: the next prefill is another batch's
            self._prefill_index.pop(group)

    def reserve_step(self, group_index: int, active: list[bool]) -> None:
        """Blocks for this step's token in every active row (slot length[b]; call before the step)."""
        for table, a in zip(self.tables[group_index], active):
            if a:
                self.pool.take(group_index, table, table.length + 1)

    def commit_step(self, group_index: int, admit: list[bool]) -> None:
        """Advance the lengths of rows whose current token is admitted (after the step ran)."""
        for table, a in zip(self.tables[group_index], admit):
            table.length += int(a)

    # ------------------------------------------------------------------ rows joining and leaving
    def select(self, rows: list[int]) -> None:
        """Keep only rows `rows` (in that order); the others' blocks go back to the pool."""
        kept = set(rows)
        for group, tables in enumerate(self.tables):
            for b, table in enumerate(tables):
                if b not in kept:
                    table.release(self.pool.groups[group].blocks)
            tables[:] = [tables[b] for b in rows]

    def merge(self, other: "PagedKVCache") -> None:
        """Append another cache's rows (a newly prefilled group in the same pool): their tables, no copy."""
        if other.pool is not self.pool:
            raise ValueError("merge: caches must share one PagedKVPool")
        for mine, theirs in zip(self.tables, other.tables):
            mine.extend(theirs)

    def release(self) -> None:
        """Return every row's blocks (the batch is dropped)."""
        self.select([])

    def compact(self, group_index: int) -> bool:
        """Move the highest held blocks down into the holes free blocks leave below them (all layers of the
        group, K and V) and renumber the tables, so decoding reads no free block and the pool's tensors can
        shrink to exactly the blocks held (under a KV budget). It copies at most as many blocks as left. The cache's rows must be all the rows holding this pool's blocks (the
        engine's running batch); if other rows hold blocks of the pool, nothing moves. Returns whether it moved
        anything."""
        tables, store = self.tables[group_index], self.pool.groups[group_index]
        held = sorted(b for t in tables for b in t.blocks)
        span = held[-1] + 1 if held else 0
        if span == len(held) or len(held) != store.blocks.used_blocks:
            return False  # no holes, or another cache holds blocks of this pool too
        holes = sorted(set(range(len(held))) - set(held))
        movers = [b for b in held if b >= len(held)]
        moved = dict(zip(movers, holes))
        src = torch.tensor(movers, dtype=torch.long, device=store.device)
        dst = torch.tensor(holes, dtype=torch.long, device=store.device)
        for tensors in (store.k, store.v):
            for t in tensors:
                t[dst] = t[src]
        for table in tables:
            table.blocks = [moved.get(b, b) for b in table.blocks]
            table.serial = next_serial()
        store.blocks.set_held(len(held))
        return True

    # ------------------------------------------------------------------ reads
    def lengths(self, group_index: int) -> list[int]:
        """Valid slots per row in a group."""
        return [t.length for t in self.tables[group_index]]

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole (k, v) block tensors [n_blocks, Hkv, block_tokens, D]."""
        group, i = self.pool.locate(layer)
        return self.pool.groups[group].k[i], self.pool.groups[group].v[i]

    def step_index(self, group_index: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """For one decoding step of this group, with each row's current token at slot length[b]:
        (write block [B], write offset [B], owner [N], bias [N, bs]) over the first N blocks of the pool,
        N = the highest block a row holds + 1; blocks no row holds are owned by row B (see ops.block_attention).
        Which row owns which block changes only when a row takes a block, joins or leaves: that part is cached."""
        tables, bs = self.tables[group_index], self.block_tokens
        key = tuple((t.serial, len(t.blocks)) for t in tables)
        cached = self._layout.get(group_index)
        if cached is None or cached[0] != key:
            n = max((max(t.blocks) + 1 for t in tables if t.blocks), default=1)
            owner, index = [len(tables)] * n, [0] * n
            for b, table in enumerate(tables):
                for j, block in enumerate(table.blocks):
                    owner[block], index[block] = b, j
            owner_t = torch.tensor(owner, dtype=torch.long)
            cached = (key, owner_t, torch.tensor(index, dtype=torch.long), (owner_t == len(tables)))
            self._layout[group_index] = cached
        _, owner_t, index_t, free = cached
        upto = torch.tensor([t.length + 1 for t in tables] + [1], dtype=torch.long)  # valid slots + the current
        valid = (upto[owner_t] - index_t * bs).clamp_(1, bs).masked_fill_(free, 1)  # a free block: one slot
        bias = torch.zeros(len(owner_t), bs).masked_fill_(torch.arange(bs)[None, :] >= valid[:, None], float("-inf"))
        write = torch.tensor([t.slot(t.length, bs) for t in tables], dtype=torch.long)
        return tuple(x.to(device) for x in (write // bs, write % bs, owner_t, bias))

    # ------------------------------------------------------------------ accounting
    def bytes_in_use(self, row: int) -> int:
        """Bytes of K/V row `row` holds in valid slots (all layers)."""
        per_slot = [g.block_bytes // g.block_tokens for g in self.pool.groups]
        return sum(self.tables[g][row].length * per_slot[g] for g in (0, 1))

    def bytes_allocated(self) -> int:
        """Bytes of the blocks this cache's rows hold (valid slots plus each table's unused tail)."""
        return sum(len(t.blocks) * g.block_bytes for g, tables in zip(self.pool.groups, self.tables) for t in tables)
