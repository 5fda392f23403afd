"""The training-time forward of Dynamic-LLaVA: layers < K as usual; at K the predictors make hard keep/drop
decisions with Gumbel-softmax straight-through (hard forward, soft backward); layers >= K use masked attention,
where a dropped token is hidden from every other token but still attends to itself (DynamicViT-style:
P_ij = G_ij exp(s_ij) / sum_k G_ik exp(s_ik), G_ij = keep_j for j != i, 1 for j = i)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynllava import ops
from dynllava.predictors import KEEP


@dataclass
class MaskedOutput:
    """logits [B, T, V]; image_keep [B, T] and text_keep [B, T]: straight-through keep decisions (1 keep / 0 drop,
    gradients of the soft probabilities) on image tokens and answer tokens, 0 elsewhere."""

    logits: torch.Tensor
    image_keep: torch.Tensor
    text_keep: torch.Tensor


def gumbel_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """[..., 2] logits -> [...] hard keep in {0, 1} with straight-through soft gradients."""
    return F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=-1)[..., KEEP]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     keep: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, T, D]; allowed: [B, 1, T, T] bool (causal & padding); keep: [B, T] float.
    Returns [B, H, T, D]."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))  # [B, H, T, T]
    t = q.shape[2]
    eye = torch.eye(t, dtype=torch.bool, device=q.device)
    gate = torch.where(eye, torch.ones((), device=q.device), keep[:, None, None, :].float())
    weights = weights * gate
    probs = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return torch.matmul(probs.to(v.dtype), v)


def masked_forward(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, valid: torch.Tensor,
                   answer_mask: torch.Tensor, layer_k: int, tau: float,
                   image_sizes: torch.Tensor | None = None) -> MaskedOutput:
    """One training forward of DynamicLlava `model` with its predictors (see module docstring).

    input_ids, valid, answer_mask: [B, T] (answer_mask marks output-text tokens, the text predictor's domain);
    pixel_values: [N_views, 3, H, W], one image per row; image_sizes: [B, 2], any-res only."""
    h = model.embed(input_ids, pixel_values, image_sizes, [1] * input_ids.shape[0])
    b, t, _ = h.shape
    positions = torch.arange(t, device=h.device).expand(b, t)
    cos, sin = model.rotary(h, positions)
    allowed = ops.causal_padding_mask(valid)
    for i in range(layer_k):
        h, _, _, _ = model.layer_full(i, h, cos, sin, allowed)
    image_mask = (input_ids == model.image_token_id) & valid
    predictors = model.predictors
    index, row_valid = ops.compact(image_mask)  # each row's image tokens, left-aligned: [B, N]
    tokens = ops.gather_tokens(h, index)
    image_logits = predictors.image(tokens.to(next(predictors.parameters()).dtype), row_valid)
    image_decision = gumbel_keep(image_logits, tau) * row_valid  # [B, N]
    image_keep = torch.zeros(b, t, device=h.device).scatter(1, index, image_decision)
    text_decision = gumbel_keep(predictors.text(h.to(next(predictors.parameters()).dtype)), tau)  # [B, T]
    text_keep = text_decision * answer_mask
    keep = torch.where(image_mask, image_keep, torch.where(answer_mask, text_keep, valid.float()))
    for i in range(layer_k, model.n_layers):
        layer = model.layers[i]
        q, k, v = model._project_qkv(layer, layer.input_layernorm(h), cos, sin)
        out = masked_attention(q, k, v, allowed, keep, model.scale)
        h = model._finish_layer(layer, h, out)
    logits = model.hf_model.lm_head(model.lm.norm(h))
    return MaskedOutput(logits, image_keep, text_keep)
