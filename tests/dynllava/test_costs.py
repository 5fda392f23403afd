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
