"""Analytic FLOPs and KV bytes (the paper's per-layer form 32*N*C^2 + 4*N^2*C, extended to the real MLP width
and grouped K/V heads). Shared by the engine's RequestStats, the benchmarks and the controller.

A multiply-add counts 2 FLOPs. Attention counts the full N x N score and value products, as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """The sizes the cost formulas need (read from an HF LlavaConfig by `from_hf_config`)."""

    n_layers: int
    hidden: int  # C
    intermediate: int  # MLP width (gated: 3 matrices)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_tokens: int  # tokens through the tower per view: patches (+ CLS for CLIP, none for SigLIP)
    predictor_width: int = 512  # the image predictor's W (the paper's 512; see predictors.ImagePredictor)
    projector_tokens: int | None = None  # tokens through the projector per view (None: vision_tokens - 1)

    @classmethod
    def from_hf_config(cls, config) -> "ModelDims":
        t, v = config.text_config, config.vision_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        patches = (v.image_size // v.patch_size) ** 2
        cls_token = 0 if "siglip" in v.model_type else 1
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return cls(
            n_layers=t.num_hidden_layers, hidden=t.hidden_size, intermediate=t.intermediate_size,
            n_heads=t.num_attention_heads, n_kv_heads=t.num_key_value_heads, head_dim=head_dim,
            vocab=t.vocab_size, vision_layers=v.num_hidden_layers, vision_hidden=v.hidden_size,
            vision_intermediate=v.intermediate_size, vision_tokens=patches + cls_token,
            projector_tokens=patches + (cls_token if full else 0),
        )


def decoder_layer_flops(d: ModelDims, n_query: int, n_key: int) -> float:
    """One decoder layer: n_query tokens through projections + gated MLP, attending over n_key keys."""
    q_o = 2 * 2 * n_query * d.hidden * d.n_heads * d.head_dim
    k_v = 2 * 2 * n_query * d.hidden * d.n_kv_heads * d.head_dim
    mlp = 3 * 2 * n_query * d.hidden * d.intermediate
    attention = 2 * 2 * n_query * n_key * d.n_heads * d.head_dim
    return float(q_o + k_v + mlp + attention)


def vision_flops(d: ModelDims, n_views: int) -> float:
    """Vision tower (all layers) + 2-layer projector, for n_views views of vision_tokens each (LLaVA-1.5: one per
    image; any-res: each image's base view and tiles). The patch-embedding convolution (2 * patches * 3p^2 * c,
    under 0.3% of the tower), the any-res newline tokens (a copy) and OneVision's downscaling of large grids (an
    interpolation) are left out."""
    n, c, i = d.vision_tokens, d.vision_hidden, d.vision_intermediate
    per_layer = 8 * n * c * c + 4 * n * n * c + 4 * n * c * i
    projected = d.projector_tokens if d.projector_tokens is not None else n - 1
    projector = 2 * projected * (c * d.hidden + d.hidden * d.hidden)
    return float(n_views * (d.vision_layers * per_layer + projector))


def image_predictor_flops(d: ModelDims, n_image: int, blocks: int = 2) -> float:
    """The image predictor (width W = d.predictor_width, MLP 4W) over n_image tokens (stem, blocks, head)."""
    width, mlp = d.predictor_width, 4 * d.predictor_width
    stem = 2 * n_image * d.hidden * width
    block = 8 * n_image * width * width + 4 * n_image * n_image * width + 4 * n_image * width * mlp
    head = 2 * n_image * (width * 256 + 256 * 128 + 128 * 2)
    return float(stem + blocks * block + head)


def text_predictor_flops(d: ModelDims) -> float:
    """The paper's text predictor for one token."""
    return float(2 * (d.hidden * 512 + 512 * 256 + 256 * 128 + 128 * 2))


def lm_head_flops(d: ModelDims) -> float:
    return float(2 * d.hidden * d.vocab)


def prefill_flops(d: ModelDims, n_tokens: int, n_kept: int, layer_k: int, n_views: int,
                  n_image_tokens: int = 0, learned: bool = False) -> float:
    """Whole prefill: vision tower over n_views views, layers < K over n_tokens (image tokens, any-res newlines
    included), layers >= K over n_kept, last-token logits. Dense is n_kept == n_tokens. `learned` adds the image
    predictor's cost over the row's n_image_tokens."""
    total = vision_flops(d, n_views) + lm_head_flops(d)
    total += layer_k * decoder_layer_flops(d, n_tokens, n_tokens)
    total += (d.n_layers - layer_k) * decoder_layer_flops(d, n_kept, n_kept)
    if learned and n_kept < n_tokens:
        total += image_predictor_flops(d, n_image_tokens)
    return total


def decode_step_flops(d: ModelDims, ctx_dense: int, ctx_sparse: int, layer_k: int, mode: str = "kv_cache",
                      learned_text: bool = False) -> float:
    """One generated token. kv_cache: one query over ctx keys per layer (ctx includes the token itself);
    no_cache: a full recompute over ctx tokens. ctx_dense for layers < K, ctx_sparse for layers >= K."""
    if mode == "kv_cache":
        total = layer_k * decoder_layer_flops(d, 1, ctx_dense)
        total += (d.n_layers - layer_k) * decoder_layer_flops(d, 1, ctx_sparse)
    else:
        total = layer_k * decoder_layer_flops(d, ctx_dense, ctx_dense)
        total += (d.n_layers - layer_k) * decoder_layer_flops(d, ctx_sparse, ctx_sparse)
    return total + lm_head_flops(d) + (text_predictor_flops(d) if learned_text else 0.0)


def kv_bytes_per_token_layer(d: ModelDims, element_size: int) -> int:
    """K and V of one token in one layer."""
    return 2 * d.n_kv_heads * d.head_dim * element_size


def kv_bytes(d: ModelDims, tokens_dense_group: int, tokens_sparse_group: int, layer_k: int,
             element_size: int) -> int:
    """Cache bytes when layers < K hold tokens_dense_group tokens and layers >= K hold tokens_sparse_group."""
    per = kv_bytes_per_token_layer(d, element_size)
    return per * (layer_k * tokens_dense_group + (d.n_layers - layer_k) * tokens_sparse_group)
