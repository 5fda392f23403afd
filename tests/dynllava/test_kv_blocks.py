"""The paged cache's block bookkeeping against a reference model: random sequences of rows joining, growing,
leaving and the pool growing; no block is ever held twice, the accounting always adds up, and it returns to
zero when every row has left."""

from __future__ import annotations

import random

import pytest

from dynllava.kv_blocks import BlockPool, BlockTable, OutOfBlocks


def test_a_table_takes_blocks_as_slots_grow_and_maps_slots_into_them():
    pool = BlockPool(4, block_tokens=16)
    table = BlockTable()
    table.ensure(pool, 1)
    table.ensure(pool, 16)
    assert table.blocks == [0] and pool.free_blocks == 3
    table.ensure(pool, 17)
    assert table.blocks == [0, 1]
    assert table.slot(0, 16) == 0 and table.slot(15, 16) == 15 and table.slot(16, 16) == 16
    other = BlockTable()
    other.ensure(pool, 20)
    assert other.blocks == [2, 3] and other.slot(17, 16) == 3 * 16 + 1
    with pytest.raises(OutOfBlocks):
        table.ensure(pool, 33)
    assert table.blocks == [0, 1] and pool.free_blocks == 0  # a failed ensure takes nothing
    table.release(pool)
    assert pool.free_blocks == 2 and table.blocks == []
    other.ensure(pool, 40)
    assert other.blocks == [2, 3, 0]  # freed ids come back, lowest first


def test_freeing_a_block_twice_or_one_it_never_had_raises():
    pool = BlockPool(2, block_tokens=4)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(ValueError, match="twice"):
        pool.free(ids)
    with pytest.raises(ValueError):
        pool.free([7])


def test_random_joins_growth_leaves_and_pool_growth_match_a_reference_model():
    rng = random.Random(0)
    for trial in range(20):
        block_tokens = rng.choice([1, 4, 16])
        pool = BlockPool(rng.randint(0, 12), block_tokens)
        tables: dict[int, BlockTable] = {}
        wanted: dict[int, int] = {}  # reference: row -> slots it asked for
        next_row = 0
        for _ in range(300):
            action = rng.random()
            if action < 0.35 or not tables:  # a row joins with a prompt
                slots = rng.randint(1, 40)
                table = BlockTable()
                try:
                    table.ensure(pool, slots)
                except OutOfBlocks:
                    assert -(-slots // block_tokens) > pool.free_blocks
                    continue
                tables[next_row], wanted[next_row] = table, slots
                next_row += 1
            elif action < 0.75:  # a row grows by a step's token
                row = rng.choice(list(tables))
                try:
                    tables[row].ensure(pool, wanted[row] + 1)
                    wanted[row] += 1
                except OutOfBlocks:
                    assert pool.free_blocks == 0 and wanted[row] % block_tokens == 0
            elif action < 0.95:  # a row leaves (finished, cancelled or preempted)
                row = rng.choice(list(tables))
                tables.pop(row).release(pool)
                del wanted[row]
            else:
                pool.grow(pool.n_blocks + rng.randint(0, 4))
            held = [b for t in tables.values() for b in t.blocks]
            assert len(held) == len(set(held)), "a block is held by two rows"
            assert all(0 <= b < pool.n_blocks for b in held)
            assert pool.used_blocks == len(held) == sum(-(-w // block_tokens) for w in wanted.values())
            for row, table in tables.items():  # every slot of a row maps into its own blocks, none shared
                slots = {table.slot(i, block_tokens) for i in range(wanted[row])}
                assert len(slots) == wanted[row] and {s // block_tokens for s in slots} <= set(table.blocks)
        for table in tables.values():
            table.release(pool)
        assert pool.used_blocks == 0 and pool.free_blocks == pool.n_blocks, trial


def test_compaction_moves_the_highest_blocks_into_the_holes_and_every_row_reads_the_same_slots():
    import torch

    from dynllava.paged_cache import PagedKVCache, PagedKVPool

    pool = PagedKVPool(3, 1, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                       block_tokens=4)
    cache = PagedKVCache(pool, 6)
    lengths = [5, 9, 3, 12, 7, 4]
    k = torch.randn(6, 2, 12, 4)
    for layer in range(3):
        cache.write_prefill(layer, k + layer, -k - layer, lengths)

    def row_slots(group: int, row: int, layer: int) -> torch.Tensor:
        table, (keys, _) = cache.tables[group][row], cache.buffers(layer)
        return torch.stack([keys[table.slot(t, 4) // 4, :, t % 4] for t in range(table.length)], 1)

    cache.select([1, 3, 5])  # rows 0, 2 and 4 leave holes
    before = {(g, r, layer): row_slots(g, r, layer) for g, layer in ((0, 0), (1, 1), (1, 2)) for r in range(3)}
    assert cache.compact(0) and cache.compact(1)
    for g in (0, 1):
        held = sorted(b for t in cache.tables[g] for b in t.blocks)
        assert held == list(range(len(held))), "the held blocks are now the lowest ids"
        assert pool.groups[g].blocks.used_blocks == len(held)
    for (g, r, layer), slots in before.items():
        assert torch.equal(row_slots(g, r, layer), slots)
    assert not cache.compact(0), "nothing left to move"
    other = PagedKVCache(pool, 1)
    other.write_prefill(0, k[:1], k[:1], [10])  # another cache's rows in the pool: compaction must not move
    cache.select([0])
    assert not cache.compact(0)
