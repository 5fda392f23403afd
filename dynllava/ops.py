"""Small pure tensor functions of the method, with shapes. No state, no I/O.

Notation: B batch, T tokens (padded), S cached slots, C hidden, H query heads, Hkv key/value heads,
G = H / Hkv query heads per key/value head, D head dim.
"""

from __future__ import annotations

import math

import torch


def keep_count(n_tokens: int, keep: float, rounding: str = "ceil") -> int:
    """How many of n_tokens image tokens to keep. "ceil": ceil(keep * n_tokens), robust to float noise (0.3 * 10
    is 3, not 4), at least 1 when n_tokens > 0. "floor": int(n_tokens * keep) exactly as the official
    Dynamic-LLaVA code computes it (576 at 0.2 keeps 115; it may keep none)."""
    if n_tokens <= 0:
        return 0
    if rounding == "floor":
        return min(n_tokens, int(n_tokens * keep))
    return max(1, min(n_tokens, math.ceil(round(keep * n_tokens, 6))))


def topk_keep_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, mark the k[b] highest-scoring candidate positions (ties: earlier position wins).

    scores: [B, T] float; candidates: [B, T] bool; k: [B] long (k[b] <= candidates[b].sum()).
    Returns keep: [B, T] bool with exactly k[b] True entries per row, all within candidates.
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # [B, T]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < k[:, None]) & candidates


def topk_keep_mask_grouped(scores: torch.Tensor, groups: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """topk_keep_mask within each group: per row b and group m, the k[b, m] highest-scoring positions whose
    groups[b, t] == m (e.g. each image of a row; ties: earlier position wins).

    scores: [B, T] float; groups: [B, T] long (-1: in no group); k: [B, M] long. Returns keep: [B, T] bool.
    One sort per group index (a row rarely holds more than a few images).
    """
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for m in range(k.shape[1]):
        keep |= topk_keep_mask(scores, groups == m, k[:, m])
    return keep


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that move each row's kept positions to the front, in original order.

    keep: [B, T] bool. Returns (index [B, T'] long, valid [B, T'] bool) with T' = max kept per row;
    gather with `index` and treat positions where valid is False as padding.
    """
    lengths = keep.sum(1)  # [B]
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept first, order kept
    width = int(lengths.max().item()) if keep.numel() else 0
    index = order[:, :width]
    valid = torch.arange(width, device=keep.device)[None, :] < lengths[:, None]
    return index, valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, T, ...], index: [B, T'] -> [B, T', ...] (x[b, index[b, t]])."""
    shape = index.shape + x.shape[2:]
    expanded = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return torch.gather(x, 1, expanded)


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Attention mask for right-padded rows: query t sees keys <= t that are valid. valid: [B, T] -> [B, 1, T, T].

    Right padding keeps every query row non-empty (a padding query still sees the valid prefix), so no NaN.
    """
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    return causal[None, None] & valid[:, None, None, :]


def attention_from_query(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention weights of one query per row over keys, averaged over heads.

    q: [B, H, D] (post-rotary), k: [B, Hkv, T, D], key_mask: [B, T] bool -> [B, T] (rows sum to 1).
    Used by FastV-style scoring (what the last prompt token attends to).
    """
    b, h, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv, d).float()
    logits = torch.einsum("bkgd,bktd->bkgt", qg, k.float()) * scale
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(dim=(1, 2))


def block_attention(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, owner: torch.Tensor,
                    bias: torch.Tensor, n_rows: int, scale: float,
                    with_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query per row over that row's cache blocks, read where they lie in the pool (no gather).

    Flash-decoding with the blocks as its splits: each block attends with its owner's query and gives its
    output (unnormalised) with its largest score and softmax mass, and each row's blocks are combined by those. Every block is read once,
    in place. Measured on CPU at batch 16 (660 and 200 slots a row): gathering each row's blocks into a padded
    [B, Hkv, S, D] copy first costs 4-5x the padded attention; PyTorch's fused CPU flash kernel (which returns
    the log-sum-exp) pays per (block, head) and costs 1.5x; these two batched matmuls cost about what padded
    attention does, and they are plain ops that a CUDA graph captures.

    q: [B, H, D]; k_blocks, v_blocks: [N, Hkv, bs, D] (the pool, or its first N blocks); owner: [N] long, the
    row of each block (n_rows: a block no row owns, e.g. a free one); bias: [N, bs] float, 0 on slots to attend
    and -inf elsewhere, at least one 0 per block. Returns [B, H, D] in q's dtype, and with_lse: each row's
    log-sum-exp [B, H] (float32) too.
    """
    n, hkv, bs, d = k_blocks.shape
    h = q.shape[1]
    # GQA: a kv head's G query heads are that block's G "queries", so K/V are never repeated
    # a block no row owns borrows row 0's query: its result lands in the unread row n_rows
    queries = (q * scale)[owner.clamp(max=n_rows - 1)].view(n, hkv, h // hkv, d)
    scores = torch.matmul(queries, k_blocks.transpose(-1, -2)).float() + bias[:, None, None, :]  # [N, Hkv, G, bs]
    peak = scores.amax(-1, keepdim=True)  # per block: finite, each block has a slot to attend
    p = torch.exp(scores - peak)
    out = torch.matmul(p.to(v_blocks.dtype), v_blocks).reshape(n, h, d).float()  # unnormalised, per block
    peak, mass = peak.reshape(n, h), p.sum(-1).reshape(n, h)
    top = torch.full((n_rows + 1, h), float("-inf"), device=q.device).scatter_reduce(
        0, owner[:, None].expand(n, h), peak, "amax")
    weight = torch.exp(peak - top[owner])  # [N, H]: each block's scale relative to its row's largest score
    total = torch.zeros(n_rows + 1, h, device=q.device).index_add_(0, owner, mass * weight)
    mixed = torch.zeros(n_rows + 1, h, d, device=q.device).index_add_(0, owner, out * weight[..., None])
    out = (mixed[:n_rows] / total[:n_rows, :, None]).to(q.dtype)
    return (out, top[:n_rows] + total[:n_rows].log()) if with_lse else out
