"""The small tensor functions, against plain references."""

from __future__ import annotations

import torch

from dynllava import ops


def test_keep_count_is_ceil_without_float_noise():
    assert ops.keep_count(576, 0.2) == 116
    assert ops.keep_count(10, 0.3) == 3
    assert ops.keep_count(16, 0.25) == 4
    assert ops.keep_count(5, 0.01) == 1
    assert ops.keep_count(0, 0.5) == 0


def test_topk_ties_prefer_earlier_positions():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    keep = ops.topk_keep_mask(scores, torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]))
    assert keep.tolist() == [[True, True, False, False]]


def test_compact_keeps_order_and_pads_right():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = ops.compact(keep)
    assert index[0].tolist() == [0, 2, 3] and index[1, 0].item() == 1
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_attention_from_query_rows_sum_to_one_over_valid_keys():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    w = ops.attention_from_query(q, k, mask, 8**-0.5)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert (w[1, 2:] == 0).all()
