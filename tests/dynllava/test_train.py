"""Training plumbing on tiny configs: base training saves a model transformers can load; a few predictor steps
lower the loss and move the keep rates toward the budget."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dynllava.model import DynamicLlava
from dynllava.train.base import BaseTrainConfig, train_base
from dynllava.train.predictors import PredictorTrainConfig, train_predictors

SMALL = dict(vocab_size=320, tokenizer_rows=200,
             vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=64, patch_size=16),
             text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024),
             batch_size=4, warmup_steps=2, log_every=1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_base(BaseTrainConfig(steps=12, lr=3e-3, vision_steps=2, vision_batch_size=4, vision_lr_scale=0.5, **SMALL),
               out, progress=False)
    return out


def test_base_training_lowers_loss_and_saves_an_hf_model(base_dir):
    log = [json.loads(line) for line in (base_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log[:2]] == ["vision", "vision"]
    losses = [r["loss"] for r in log if r["stage"] == "llava"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    hf = LlavaForConditionalGeneration.from_pretrained(base_dir)  # transformers loads it by itself
    assert hf.config.image_seq_length == 16
    model = DynamicLlava.from_pretrained(base_dir, device="cpu")
    assert model.predictors is None and model.processor.tokenizer.decode([model.processor.tokenizer.bos_token_id])


def test_predictor_steps_lower_loss_and_move_keep_rates_to_budget(base_dir, tmp_path):
    config = PredictorTrainConfig(steps=25, batch_size=4, predictor_lr=1e-3, lm_lr=0.0, warmup_steps=2,
                                  text_budget_min_tokens=20, log_every=1)
    out = train_predictors(base_dir, tmp_path, config, device="cpu", progress=False)
    log = [json.loads(line) for line in (out / "predictor_log.jsonl").read_text().splitlines()]
    first, last = log[:4], log[-4:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "budget") < mean(first, "budget")
    assert abs(mean(last, "image_keep") - 0.2) < abs(mean(first, "image_keep") - 0.2)
    model = DynamicLlava.from_pretrained(out, device="cpu")
    assert model.predictors is not None and model.predictors.layer == 2
    assert next(model.predictors.parameters()).dtype == torch.float32


def test_cell_index_head_adds_a_position_target():
    """With cell_index, every patch also predicts its own 3x3 cell: the loss is the mean of four terms, the
    fourth being cross-entropy against each patch's cell."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from dynllava.train.vision import CellHeads, cell_loss

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=48, patch_size=16))
    pixels, targets = torch.randn(2, 3, 48, 48), [torch.zeros(2, 9, dtype=torch.long)] * 3
    heads = CellHeads(32, cell_index=True)
    with_cells, _ = cell_loss(tower, heads, pixels, targets)
    cell_head, heads.cell = heads.cell, None
    plain, _ = cell_loss(tower, heads, pixels, targets)
    patches = tower(pixels).last_hidden_state[:, 1:]
    cells = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])  # a 3x3 patch grid: one patch per cell
    own_cell = torch.nn.functional.cross_entropy(cell_head(patches).flatten(0, 1), cells.repeat(2))
    assert cell_head.out_features == 9
    assert torch.allclose(with_cells * 4, plain * 3 + own_cell, atol=1e-5)
