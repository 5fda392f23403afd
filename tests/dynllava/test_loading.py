"""Loading a local HF-format LLaVA directory (as llava-hf/llava-1.5-7b-hf is laid out), predictors beside it."""

from __future__ import annotations

import pytest
import torch

from dynllava.config import SparsityConfig
from dynllava.model import DynamicLlava


@pytest.fixture(scope="module")
def saved_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("llava-dir")
    tiny_model.hf_model.save_pretrained(path)
    tiny_model.processor.save_pretrained(path)
    tiny_model.predictors.save(path)
    return path


def test_directory_loads_with_processor_and_predictors(saved_dir, tiny_model, batch4):
    loaded = DynamicLlava.from_pretrained(saved_dir, device="cpu", dtype=torch.float32)
    assert loaded.predictors is not None and loaded.processor.image_token == tiny_model.processor.image_token
    images, prompts = batch4
    cfg = SparsityConfig(vision_keep=0.25, text_keep=0.5, vision_scorer="learned", text_scorer="learned")
    a = loaded.generate(images, prompts, sparsity=cfg, max_new_tokens=8, ignore_eos=True)
    b = tiny_model.generate(images, prompts, sparsity=cfg, max_new_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.stats.n_text_admitted for o in a] == [o.stats.n_text_admitted for o in b]


def test_directory_without_predictors_names_training_free_scorers(saved_dir, tmp_path, batch4):
    for f in saved_dir.iterdir():
        if f.name != "predictors.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    loaded = DynamicLlava.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert loaded.predictors is None
    images, prompts = batch4
    with pytest.raises(ValueError, match="training-free vision_scorer: fastv, random, stride"):
        loaded.generate(images[:1], prompts[:1], sparsity=SparsityConfig(vision_keep=0.2))


def test_directory_that_is_not_llava_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not one of"):
        DynamicLlava.from_pretrained(tmp_path, device="cpu")


def test_a_sliding_window_caps_the_context():
    """The explicit forward attends over the whole context, so a model with an active sliding window is run only
    within it (prompts beyond are refused); the Mistral shapes have none, as Mistral-7B v0.2."""
    from dynllava.config import ModelSpec, TextShape, VisionShape
    from dynllava.loading import build_random

    spec = ModelSpec(name="m", text=TextShape(model_type="mistral", hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              vocab_size=32064, max_position_embeddings=512),
                     vision=VisionShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14))
    hf, processor = build_random(spec, torch.device("cpu"), torch.float32)
    assert hf.config.text_config.sliding_window is None and DynamicLlava(hf, processor).max_context == 512
    hf.config.text_config.sliding_window = 100
    model = DynamicLlava(hf, processor)
    assert model.max_context == 100
    with pytest.raises(ValueError, match="context of 100 tokens"):
        model.prepare([None], ["x" * 95], max_new_tokens=10)
