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


def test_attention_from_query_equals_a_plain_softmax():
    """Per row and query head h: softmax over valid keys of q[h] . k[h // G] * scale (G = 2 query heads per
    key/value head), then the mean over the 4 heads; computed here one head at a time."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    w = ops.attention_from_query(q, k, mask, 8**-0.5)
    for b in range(2):
        n = int(mask[b].sum())
        per_head = [torch.softmax(torch.stack([q[b, h] @ k[b, h // 2, j] * 8**-0.5 for j in range(n)]), 0)
                    for h in range(4)]
        torch.testing.assert_close(w[b, :n], torch.stack(per_head).mean(0))
        assert (w[b, n:] == 0).all()
