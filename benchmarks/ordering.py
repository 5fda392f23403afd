"""Run order for benchmark arms on a machine whose speed drifts: ABBA, so steady drift favours no arm."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def alternating(items: Sequence[T], rounds: int) -> list[list[T]]:
    """`rounds` passes over items, every other one reversed (A B C, C B A, A B C, ...): a machine that speeds
    up or slows down steadily over the passes favours none of the items."""
    return [list(items) if r % 2 == 0 else list(items)[::-1] for r in range(rounds)]
