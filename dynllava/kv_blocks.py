"""Block bookkeeping of the paged K/V cache: which fixed-size blocks of cache slots each row holds.

A `BlockPool` hands out block ids of one layer group (layers < K or layers >= K: the two groups hold different
token sets, so each row has one `BlockTable` per group). Row slot s lives in block table[s // block_tokens] at
offset s % block_tokens. Blocks are taken as a row's slots grow and all returned when it leaves, so the slots a
pool has handed out follow the live rows, never a worst case. Pure host-side bookkeeping: no tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_SERIALS = itertools.count()


def next_serial() -> int:
    """A new table serial (a table whose block list was rewritten gets one, so cached layouts are rebuilt)."""
    return next(_SERIALS)


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the caller preempts a row or waits)."""


class BlockPool:
    """Block ids 0..n_blocks-1 of one layer group; `grow` adds ids (the cache grows its tensors to match).
    Freed ids are reused first (last freed, first reused), so live blocks stay low in the id range."""

    def __init__(self, n_blocks: int, block_tokens: int):
        if block_tokens < 1 or n_blocks < 0:
            raise ValueError(f"block_tokens must be >= 1 and n_blocks >= 0, got {block_tokens}, {n_blocks}")
        self.block_tokens = block_tokens
        self.n_blocks = n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self._free)

    def blocks_for(self, slots: int) -> int:
        """Blocks that hold `slots` slots."""
        return -(-slots // self.block_tokens)

    def allocate(self, n: int) -> list[int]:
        """n free block ids, or OutOfBlocks (nothing taken)."""
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks asked for, {len(self._free)} free of {self.n_blocks}")
        return [self._free.pop() for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        """Return blocks (a leaving row's). Freeing an id twice is a bug and raises."""
        if len(set(ids)) != len(ids) or any(not 0 <= i < self.n_blocks for i in ids):
            raise ValueError(f"bad block ids to free: {ids}")
        held = set(self._free)
        if any(i in held for i in ids):
            raise ValueError(f"block freed twice: {sorted(held.intersection(ids))}")
        self._free.extend(reversed(ids))

    def highest_used(self) -> int:
        """The highest block id held (-1 when none is)."""
        free = set(self._free)
        return next((i for i in range(self.n_blocks - 1, -1, -1) if i not in free), -1)

    def set_held(self, held: int) -> None:
        """After a compaction: ids [0, held) are held and the rest are free."""
        self._free = list(range(self.n_blocks - 1, held - 1, -1))

    def shrink(self, n_blocks: int) -> None:
        """Lower the pool to n_blocks ids; every id >= n_blocks must be free."""
        if n_blocks <= self.highest_used():
            raise ValueError(f"cannot shrink to {n_blocks} blocks: block {self.highest_used()} is held")
        self._free = [i for i in self._free if i < n_blocks]
        self.n_blocks = n_blocks

    def grow(self, n_blocks: int) -> None:
        """Raise the pool to n_blocks ids (the new ids are free)."""
        if n_blocks > self.n_blocks:
            self._free = list(range(n_blocks - 1, self.n_blocks - 1, -1)) + self._free
            self.n_blocks = n_blocks


@dataclass
class BlockTable:
    """One row's blocks in one layer group and how many of their slots it uses."""

    blocks: list[int] = field(default_factory=list)  # block ids, in slot order
    length: int = 0  # valid slots: [0, length)
    serial: int = field(default_factory=lambda: next(_SERIALS))  # unique per table: (serial, len(blocks)) names
    #                                                               its block list (blocks are only appended)

    def ensure(self, pool: BlockPool, slots: int) -> None:
        """Hold blocks for `slots` slots (taking more from `pool` if needed), or OutOfBlocks (nothing taken)."""
        missing = pool.blocks_for(slots) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(pool.allocate(missing))

    def release(self, pool: BlockPool) -> None:
        """Return every block (the row leaves or is preempted)."""
        pool.free(self.blocks)
        self.blocks, self.length, self.serial = [], 0, next(_SERIALS)

    def slot(self, index: int, block_tokens: int) -> int:
        """The pool-wide slot number of the row's slot `index` (block id * block_tokens + offset)."""
        return self.blocks[index // block_tokens] * block_tokens + index % block_tokens
