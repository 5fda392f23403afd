"""Analytic costs: the paper's per-layer form, and KV bytes."""

from __future__ import annotations

from dynllava import costs

D = costs.ModelDims(n_layers=32, hidden=4096, intermediate=4 * 4096, n_heads=32, n_kv_heads=32, head_dim=128,
                    vocab=32000, vision_layers=24, vision_hidden=1024, vision_intermediate=4096, vision_tokens=577)


def test_decoder_layer_is_the_papers_32NC2_plus_4N2C_with_4C_gated_mlp():
    n, c = 600, 4096
    assert costs.decoder_layer_flops(D, n, n) == 32 * n * c * c + 4 * n * n * c


def test_prefill_sparse_counts_layers_after_k_on_kept_tokens():
    dense = costs.prefill_flops(D, 600, 600, 2, 1)
    sparse = costs.prefill_flops(D, 600, 140, 2, 1)
    delta = 30 * (costs.decoder_layer_flops(D, 600, 600) - costs.decoder_layer_flops(D, 140, 140))
    assert dense - sparse == delta


def test_kv_bytes_per_group():
    per = 2 * 32 * 128 * 2  # K and V, bf16
    assert costs.kv_bytes(D, 100, 40, 2, 2) == per * (2 * 100 + 30 * 40)


def counted_flops(fn) -> int:
    """FLOPs torch's own FlopCounterMode counts while fn() runs. Its table lacks the CPU flash-attention kernel
    SDPA dispatches to here, so that op is counted the way torch counts the other SDPA kernels: the full
    QK^T and AV products (2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
        b, h, s_q, d = q
        return 2 * b * h * s_q * k[2] * d + 2 * b * h * s_q * k[2] * v[3]

    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}) as counter:
        fn()
    return counter.get_total_flops()


def test_prefill_formula_equals_the_flops_the_engine_executes(tiny_model, batch4):
    """The whole prefill of one row, as the engine runs it (vision tower, projector, layers < K over every token,
    layers >= K over the kept ones, last-token logits), counted op by op, equals costs.prefill_flops, dense and
    pruned. The one term the formula leaves out is the patch-embedding convolution (2 * patches * 3p^2 * c)."""
    import torch

    from dynllava.config import SparsityConfig
    from dynllava.engine import StaticBatch, model_dims

    images, prompts = batch4
    d = model_dims(tiny_model)
    vision = tiny_model.config.vision_config
    n_patches = (vision.image_size // vision.patch_size) ** 2
    conv = 2 * n_patches * 3 * vision.patch_size**2 * vision.hidden_size
    for keep in (1.0, 0.25):
        prepared = tiny_model.prepare(images[1:2], prompts[1:2], 4)
        batch = StaticBatch(tiny_model, prepared, [SparsityConfig(vision_keep=keep, vision_scorer="stride")], 4)
        with torch.inference_mode():
            executed = counted_flops(batch.prefill)
        n, kept = prepared.lengths[0], int(batch.prompt_keep.sum())
        assert kept == n - 16 + (16 if keep == 1.0 else 4)
        assert executed == costs.prefill_flops(d, n, kept, 2, 1) + conv


def test_predictor_formulas_equal_counted_flops(tiny_model):
    """The image predictor (two transformer blocks at width W over n tokens) and the text predictor (one token)
    cost what costs says. Counted with autograd on: in inference the encoder blocks take PyTorch's fused fast
    path, which the counter cannot see into."""
    import torch

    from dynllava.engine import model_dims

    d = model_dims(tiny_model)
    hidden = torch.randn(1, 16, d.hidden)
    image = counted_flops(lambda: tiny_model.predictors.image(hidden, torch.ones(1, 16, dtype=torch.bool)))
    assert image == costs.image_predictor_flops(d, 16)
    with torch.inference_mode():
        assert counted_flops(lambda: tiny_model.predictors.text(hidden[:, 0])) == costs.text_predictor_flops(d)
        assert counted_flops(lambda: tiny_model.hf_model.lm_head(hidden[:, 0])) == costs.lm_head_flops(d)
