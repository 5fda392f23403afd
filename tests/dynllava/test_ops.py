"""The small tensor functions, against plain references."""

from __future__ import annotations

import pytest
import torch

from dynllava import ops


def test_keep_count_is_ceil_without_float_noise():
    assert ops.keep_count(576, 0.2) == 116
    assert ops.keep_count(10, 0.3) == 3
    assert ops.keep_count(16, 0.25) == 4
    assert ops.keep_count(5, 0.01) == 1
    assert ops.keep_count(0, 0.5) == 0


def test_keep_count_floor_is_the_official_int():
    """The official code keeps int(n * rate) image tokens, float noise and all."""
    assert ops.keep_count(576, 0.2, "floor") == 115 == int(576 * 0.2)
    assert ops.keep_count(100, 0.29, "floor") == int(100 * 0.29) == 28  # 28.999999999999996
    assert ops.keep_count(5, 0.1, "floor") == 0
    assert ops.keep_count(16, 1.0, "floor") == 16


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


@pytest.mark.parametrize("heads,kv_heads,block", [(4, 4, 4), (8, 2, 16), (4, 1, 1)])
def test_block_attention_equals_attention_over_each_rows_padded_slots(heads, kv_heads, block):
    """Rows' slots scattered over a pool's blocks in random order, free blocks between them: attention over the
    blocks where they lie equals SDPA over each row's slots copied out in order."""
    import torch.nn.functional as F

    from dynllava.ops import block_attention

    torch.manual_seed(0)
    rows, d = 5, 8
    lengths = [1, block, block + 1, 3 * block - 1, 7]
    n_blocks = sum(-(-n // block) for n in lengths) + 3
    order = torch.randperm(n_blocks).tolist()
    k_pool, v_pool = torch.randn(n_blocks, kv_heads, block, d), torch.randn(n_blocks, kv_heads, block, d)
    owner = torch.full((n_blocks,), rows, dtype=torch.long)
    bias = torch.full((n_blocks, block), float("-inf"))
    bias[:, 0] = 0.0  # free blocks: one slot to keep the kernel finite; no row owns them
    ks, vs = [], []
    for r, n in enumerate(lengths):
        blocks = [order.pop() for _ in range(-(-n // block))]
        for i, b in enumerate(blocks):
            used = min(block, n - i * block)
            owner[b] = r
            bias[b] = float("-inf")
            bias[b, :used] = 0.0
        ks.append(torch.cat([k_pool[b, :, : min(block, n - i * block)] for i, b in enumerate(blocks)], 1))
        vs.append(torch.cat([v_pool[b, :, : min(block, n - i * block)] for i, b in enumerate(blocks)], 1))
    q = torch.randn(rows, heads, d)
    got, lse = block_attention(q, k_pool, v_pool, owner, bias, rows, d ** -0.5, with_lse=True)
    for r in range(rows):
        want = F.scaled_dot_product_attention(q[r][None, :, None], ks[r][None], vs[r][None], scale=d ** -0.5,
                                              enable_gqa=heads != kv_heads)[0, :, 0]
        assert torch.allclose(got[r], want, atol=1e-5), (r, (got[r] - want).abs().max())
        scores = torch.einsum("hd,hsd->hs", q[r], ks[r].repeat_interleave(heads // kv_heads, 0)) * d ** -0.5
        assert torch.allclose(lse[r], torch.logsumexp(scores, -1), atol=1e-5)
