"""DynamicLlava: an explicit forward over a transformers LLaVA model's own modules, with Dynamic-LLaVA
sparsification at layer K. No copied modeling file and no use of transformers' cache or mask plumbing.

Rows are right-padded; every function takes explicit position ids, so kept tokens keep their original RoPE
positions after the sequence is cut at layer K.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dynllava import ops
from dynllava.cache import SparseKVCache
from dynllava.config import ModelSpec, SparsityConfig
from dynllava.image_layout import (ANYRES_FAMILIES, ImageLayout, anyres_layouts, image_groups, image_keep_counts,
                                   newline_mask)
from dynllava.inputs import IMAGE_PART, PreparedBatch, chat_prompt, prepare_batch
from dynllava.loading import build_random, default_sparsity, load_directory, resolve_source
from dynllava.predictors import Predictors
from dynllava.scorers import TEXT_SCORERS, VISION_SCORERS, VisionInputs, require_predictors


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class ContextResult:
    """Output of one pass over whole rows (prefill, or a no-cache decoding step).

    last_hidden: [B, C] final-norm input at each row's last token; keep: [B, T] bool, the positions that ran
    through layers >= K; sparse_lengths: tokens per row in layers >= K.
    """

    last_hidden: torch.Tensor
    keep: torch.Tensor
    sparse_lengths: list[int]


class DynamicLlava:
    """A LLaVA model run with Dynamic-LLaVA sparsification: transformers' LlavaForConditionalGeneration
    (LLaVA-1.5), LlavaNextForConditionalGeneration or LlavaOnevisionForConditionalGeneration (any resolution).

    hf_model: the transformers model it runs on; processor: its HF processor (tokenizer + image processor);
    predictors: learned image/text predictors, or None (then only training-free scorers are available).
    """

    def __init__(self, hf_model, processor, predictors: Predictors | None = None, name: str = "llava"):
        self.hf_model = hf_model
        self.processor = processor
        self.predictors = predictors
        self.name = name
        self.default_sparsity: SparsityConfig | None = None  # the checkpoint's own setting (dynllava convert)
        config = hf_model.config
        self.config = config
        self.family = config.model_type  # llava | llava_next | llava_onevision
        self.anyres = self.family in ANYRES_FAMILIES
        self.lm = hf_model.model.language_model
        self.layers = self.lm.layers
        self.n_layers = len(self.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.n_heads = config.text_config.num_attention_heads
        self.n_kv_heads = config.text_config.num_key_value_heads
        self.image_token_id = config.image_token_id
        self.max_context = config.text_config.max_position_embeddings
        window = getattr(config.text_config, "sliding_window", None)
        if window and getattr(config.text_config, "use_sliding_window", True):
            # the explicit forward attends over the whole context: equal to the model only within its window
            self.max_context = min(self.max_context, window)
        eos = getattr(hf_model.generation_config, "eos_token_id", None)
        eos = eos if eos is not None else processor.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> "DynamicLlava":
        """Load a local HF-format LLaVA directory, or build random weights from a model YAML / known name.

        Predictor weights load from `predictors.safetensors` beside the model when present.
        """
        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or default_dtype(device)
        path = resolve_source(source)
        if path.suffix in (".yaml", ".yml"):
            spec = ModelSpec.from_yaml(path)
            hf_model, processor = build_random(spec, device, dtype)
            return cls(hf_model, processor, None, name=spec.name)  # random weights: no trained predictors
        hf_model, processor = load_directory(path, device, dtype)
        model = cls(hf_model, processor, Predictors.load(path, device, dtype), name=path.name)
        model.default_sparsity = default_sparsity(path)
        return model

    @property
    def device(self) -> torch.device:
        return self.lm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.embed_tokens.weight.dtype

    def format_prompt(self, text: str, n_images: int = 1) -> str:
        """Wrap a user message in the model's chat template (inputs.chat_prompt), with n_images images before
        the text unless the text holds its own placeholders."""
        if self.processor.image_token in text:
            n_images = 0
        return chat_prompt(self.processor, [("user", [IMAGE_PART] * n_images + [text])])

    def prepare(self, images: Sequence[Any], prompts: Sequence[str], max_new_tokens: int) -> PreparedBatch:
        """Validate and tokenize a batch (see inputs.prepare_batch)."""
        return prepare_batch(self.processor, images, prompts, self.max_context, max_new_tokens,
                             self.image_layouts if self.anyres else None)

    def image_layouts(self, image_sizes: torch.Tensor, n_images: list[int]) -> list[ImageLayout]:
        """Each any-res image's run of `<image>` slots (image_layout.anyres_layouts)."""
        return anyres_layouts(self.hf_model, image_sizes, n_images)

    # ------------------------------------------------------------------ building blocks
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_sizes: torch.Tensor | None = None, n_images: Sequence[int] | None = None) -> torch.Tensor:
        """Token embeddings with projected image features scattered into the `<image>` slots.

        input_ids: [B, T]; pixel_values: [N_views, 3, H, W] (PreparedBatch's) -> [B, T, C]. The any-res
        families also need image_sizes [N_img, 2] and n_images (images per row).
        """
        h = self.lm.embed_tokens(input_ids)
        image_slots = input_ids == self.image_token_id
        if pixel_values is None:
            if image_slots.any():
                raise ValueError("prompts hold image placeholders but no image was given")
            return h
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.anyres:
            if image_sizes is None or n_images is None:
                raise ValueError(f"a {self.family} model needs image_sizes and n_images with its pixels")
            extra = {"batch_num_images": list(n_images)} if self.family == "llava_onevision" else {}
            feats = torch.cat(self.hf_model.model.get_image_features(
                pixel_values=pixel_values, image_sizes=image_sizes.to(self.device), **extra).pooler_output)
        else:
            feats = self.image_features(pixel_values).flatten(0, 1)  # [N_img * P, C]
        if int(image_slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(image_slots.sum())} image placeholder tokens for {feats.shape[0]} image "
                             "feature tokens")
        return h.masked_scatter(image_slots[..., None], feats.to(h.dtype))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower -> selected hidden layer(s) -> projector. [N, 3, H, W] -> [N, P, C]."""
        config = self.config
        out = self.hf_model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = config.vision_feature_layer
        picked = [out.hidden_states[i] for i in (layers if isinstance(layers, (list, tuple)) else [layers])]
        if config.vision_feature_select_strategy == "default":
            picked = [x[:, 1:] for x in picked]
        return self.hf_model.model.multi_modal_projector(torch.cat(picked, dim=-1))

    def rotary(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, D] for explicit positions [B, T] (the LM's own rotary module)."""
        return self.lm.rotary_emb(h, positions)

    def _project_qkv(self, layer, x: torch.Tensor, cos, sin):
        attn = layer.self_attn
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, -1, self.head_dim)
        k = attn.k_proj(x).view(b, t, -1, self.head_dim)
        v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v  # [B, H, T, D], [B, Hkv, T, D], [B, Hkv, T, D]

    def _finish_layer(self, layer, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attn_out.shape
        h = h + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, t, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def layer_full(self, index: int, h: torch.Tensor, cos, sin, mask: torch.Tensor):
        """Decoder layer over whole rows. h: [B, T, C], mask: [B, 1, T, T] -> (h, q, k, v)."""
        layer = self.layers[index]
        q, k, v = self._project_qkv(layer, layer.input_layernorm(h), cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self._finish_layer(layer, h, out), q, k, v

    def layer_step(self, index: int, h: torch.Tensor, cos, sin, k_buf: torch.Tensor, v_buf: torch.Tensor,
                   mask: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, want_self_weight: bool = False):
        """Decoder layer for one new token per row, over a layer's whole cache buffers (fixed shapes, so a CUDA
        graph can capture it). The token's K/V is written at slots[b]; mask must include that slot, so the token
        always attends to itself, admitted or not.

        h: [B, 1, C]; k_buf, v_buf: [B, Hkv, S, D]; mask: [B, S] bool; rows, slots: [B] long.
        Returns (h, self_weight [B] = attention on itself, heads averaged, or None).
        """
        layer = self.layers[index]
        q, k, v = self._project_qkv(layer, layer.input_layernorm(h), cos, sin)
        k_buf[rows, :, slots] = k[:, :, 0]
        v_buf[rows, :, slots] = v[:, :, 0]
        out = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask[:, None, None, :], scale=self.scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        self_weight = None
        if want_self_weight:
            self_weight = ops.attention_from_query(q[:, :, 0], k_buf, mask, self.scale)[rows, slots]
        return self._finish_layer(layer, h, out), self_weight

    def layer_step_paged(self, index: int, h: torch.Tensor, cos, sin, k_pool: torch.Tensor, v_pool: torch.Tensor,
                         write: tuple[torch.Tensor, torch.Tensor], owner: torch.Tensor, bias: torch.Tensor,
                         want_self_weight: bool = False):
        """layer_step over a paged cache: the token's K/V goes to (block, offset) = write[0][b], write[1][b],
        and each row attends to its blocks where they lie in the pool (ops.block_attention).

        h: [B, 1, C]; k_pool, v_pool: [n_blocks, Hkv, bs, D]; owner: [N] long; bias: [N, bs] (see
        PagedKVCache.step_index). Returns (h, self_weight [B] or None) as layer_step does."""
        layer = self.layers[index]
        q, k, v = self._project_qkv(layer, layer.input_layernorm(h), cos, sin)
        k_pool[write[0], :, write[1]] = k[:, :, 0]
        v_pool[write[0], :, write[1]] = v[:, :, 0]
        n = bias.shape[0]
        out, lse = ops.block_attention(q[:, :, 0], k_pool[:n], v_pool[:n], owner, bias, h.shape[0], self.scale,
                                       with_lse=True)
        self_weight = None
        if want_self_weight:  # the token's weight on itself: exp(q . k_self * scale - lse), heads averaged
            g = self.n_heads // self.n_kv_heads
            own = (q[:, :, 0].float() * k[:, :, 0].float().repeat_interleave(g, 1)).sum(-1) * self.scale
            self_weight = torch.exp(own - lse).mean(1)
        return self._finish_layer(layer, h, out[:, :, None]), self_weight

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """[B, C] -> [B, V] float32 next-token logits."""
        return self.hf_model.lm_head(self.lm.norm(last_hidden)).float()

    # ------------------------------------------------------------------ passes
    def run_context(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor,
        layer_k: int,
        choose_keep: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None],
        need_attention: bool = False,
        cache: SparseKVCache | None = None,
    ) -> ContextResult:
        """All layers over right-padded rows; at layer K, keep only choose_keep(hidden, last_attention).

        h: [B, T, C] embeddings; positions: [B, T]; valid: [B, T] bool. choose_keep returns keep [B, T] bool
        (None = keep every valid token). With a cache, each layer's K/V is stored (group 0 full, group 1 kept).
        """
        mask = ops.causal_padding_mask(valid)
        cos, sin = self.rotary(h, positions)
        lengths = valid.sum(1)
        host_lengths = lengths.tolist()  # one device sync per pass, not one per layer
        rows = torch.arange(h.shape[0], device=h.device)
        last_attention = None
        for i in range(layer_k):
            h, q, k, v = self.layer_full(i, h, cos, sin, mask)
            if cache is not None:
                cache.write_prefill(i, k, v, host_lengths)
            if need_attention and i == layer_k - 1:
                q_last = q[rows, :, lengths - 1]  # [B, H, D]
                last_attention = ops.attention_from_query(q_last, k, valid, self.scale)
        keep = choose_keep(h, last_attention)
        if keep is None:
            keep = valid
        else:
            index, valid = ops.compact(keep)
            h = ops.gather_tokens(h, index)
            cos, sin = ops.gather_tokens(cos, index), ops.gather_tokens(sin, index)
            mask = ops.causal_padding_mask(valid)
            lengths = valid.sum(1)
            host_lengths = lengths.tolist()
        for i in range(layer_k, self.n_layers):
            h, _, k, v = self.layer_full(i, h, cos, sin, mask)
            if cache is not None:
                cache.write_prefill(i, k, v, host_lengths)
        return ContextResult(h[rows, lengths - 1], keep, lengths.tolist())

    def vision_keep_fn(self, image_mask: torch.Tensor, valid: torch.Tensor, keeps: list[float],
                       scorer_name: str, roundings: list[str],
                       layouts: Sequence[Sequence[ImageLayout]]) -> tuple[Callable, bool]:
        """choose_keep for prefill: all text + the top image_keep_counts of each image's tokens (a fixed count
        per image, so a small image is not starved by a large one; rounding per row). layouts[b]: row b's
        images (PreparedBatch.layouts_by_row)."""
        counts = image_keep_counts(layouts, keeps, roundings)
        if all(k == x.length for row, ks in zip(layouts, counts) for x, k in zip(row, ks)):
            return (lambda hidden, attention: None), False
        scorer = VISION_SCORERS[scorer_name]()
        width = max(len(row) for row in layouts)
        per_image = torch.tensor([ks + [0] * (width - len(ks)) for ks in counts], device=valid.device)
        groups = image_groups(image_mask, layouts)
        newline = newline_mask(groups, layouts)

        def choose(hidden: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
            inputs = VisionInputs(hidden, image_mask, per_image, attention, self.predictors, groups, newline)
            picked = ops.topk_keep_mask_grouped(scorer.score(inputs), groups, per_image)
            return (valid & ~image_mask) | picked

        return choose, scorer.needs_attention

    def check_scorers(self, sparsity: SparsityConfig) -> None:
        """Fail early (clear ValueError) if a requested scorer cannot run on this model."""
        if sparsity.layer >= self.n_layers:
            raise ValueError(f"layer K={sparsity.layer} must be below the model's {self.n_layers} layers")
        if sparsity.vision_scorer == "learned" and sparsity.vision_keep < 1.0:
            require_predictors(self.predictors, "vision")
        if sparsity.text_scorer == "learned" and (sparsity.text_keep is None or sparsity.text_keep < 1.0):
            require_predictors(self.predictors, "text")

    def generate(self, images: Sequence[Any], prompts: Sequence[str],
                 sparsity: SparsityConfig | Sequence[SparsityConfig] | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool = False, cuda_graphs: bool = True,
                 max_batch: int | None = None, join_running: bool = True, refill_at: int = 1):
        """Generate for a list of rows on the engine's loop (see batching.generate). Returns list[GenerationOutput]."""
        from dynllava.batching import generate

        return generate(self, images, prompts, sparsity=sparsity, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos,
                        cuda_graphs=cuda_graphs, max_batch=max_batch, join_running=join_running,
                        refill_at=refill_at)


__all__ = ["DynamicLlava", "ContextResult", "TEXT_SCORERS", "VISION_SCORERS"]
