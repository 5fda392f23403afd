"""Training on tiny configs: base training saves a model transformers can load; a few predictor steps lower the
loss and move the keep rates toward the budget; the recipe's pieces (temperature schedule, the x100 budget and its
50-token rule, answer-only labels, LLaVA-665k input). Masked attention: test_reference."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dynllava.model import DynamicLlava
from dynllava.train.base import BaseTrainConfig, train_base
from dynllava.train.predictors import PredictorTrainConfig, budget_loss, tau_at, train_predictors
from tests.conftest import random_image

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


def test_base_training_continues_from_a_saved_model(base_dir, tmp_path):
    """`init:` starts from the saved tokenizer and weights (its first loss is the trained model's, not a fresh
    one's); `first_row` moves the scenes on."""
    out = train_base(BaseTrainConfig(steps=2, lr=1e-3, init=str(base_dir), first_row=48, **SMALL), tmp_path,
                     progress=False)
    first = lambda d: next(json.loads(x)["loss"] for x in (d / "train_log.jsonl").read_text().splitlines()  # noqa: E731
                           if json.loads(x)["stage"] == "llava")
    assert first(out) < 0.8 * first(base_dir)
    assert (out / "tokenizer.json").read_text() == (base_dir / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="first_row"):
        BaseTrainConfig(first_row=-1)


FAST = dict(batch_size=4, predictor_lr=1e-3, warmup_steps=2, text_budget_min_tokens=20, log_every=1,
            image_width=64, autocast_bf16=False)  # the recipe at a test's size (fp32: bf16 matmuls are slow on CPU)


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "predictor_log.jsonl").read_text().splitlines()]


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def test_predictor_steps_with_the_lm_lower_the_loss_and_move_keep_rates_to_budget(base_dir, tmp_path):
    """25 steps of the paper's recipe, LM fine-tuned too: the cross-entropy and the budget term both fall, the
    image keep rate moves to the 0.2 budget, the temperature anneals 1.0 -> 0.1, and the saved model loads."""
    config = PredictorTrainConfig(steps=25, lm_lr=3e-3, **FAST)
    out = train_predictors(base_dir, tmp_path, config, device="cpu", progress=False)
    log = _log(out)
    first, last = log[:4], log[-4:]
    assert _mean(last, "ce") < _mean(first, "ce") - 0.5
    assert _mean(last, "budget") < _mean(first, "budget")
    assert abs(_mean(last, "image_keep") - 0.2) < abs(_mean(first, "image_keep") - 0.2)
    assert (log[0]["tau"], log[-1]["tau"]) == (1.0, 0.1)
    model = DynamicLlava.from_pretrained(out, device="cpu")
    assert model.predictors is not None and model.predictors.layer == 2 and model.predictors.image.width == 64
    assert next(model.predictors.parameters()).dtype == torch.float32
    base = DynamicLlava.from_pretrained(base_dir, device="cpu")
    assert not torch.equal(base.lm.layers[0].mlp.up_proj.weight, model.lm.layers[0].mlp.up_proj.weight)


def test_predictor_steps_with_a_frozen_lm_keep_its_weights(base_dir, tmp_path):
    config = PredictorTrainConfig(steps=6, lm_lr=0.0, **FAST)
    out = train_predictors(base_dir, tmp_path, config, device="cpu", progress=False)
    assert _mean(_log(out)[-2:], "budget") < _mean(_log(out)[:2], "budget")
    base, tuned = (DynamicLlava.from_pretrained(d, device="cpu") for d in (base_dir, out))
    for (name, a), (_, b) in zip(base.hf_model.named_parameters(), tuned.hf_model.named_parameters()):
        assert torch.equal(a, b), name


def test_temperature_anneals_exponentially_from_1_to_0_1():
    config = PredictorTrainConfig(steps=101)
    assert tau_at(0, config) == 1.0 and tau_at(100, config) == pytest.approx(0.1)
    assert tau_at(50, config) == pytest.approx(0.1**0.5)  # geometric: halfway in steps is halfway in log(tau)


def test_budget_loss_is_100x_the_squared_misses_and_counts_only_long_answers():
    """loss = 100 * mean over terms of (0.2 - image keep)^2 per row with an image and (0.5 - text keep)^2 per
    answer of >= text_budget_min_tokens (50) tokens; a 49-token answer adds no term."""
    from dynllava.train.masked import MaskedOutput

    image_mask = torch.zeros(2, 120, dtype=torch.bool)
    image_mask[:, :10] = True
    image_keep = torch.zeros(2, 120)
    image_keep[0, :5] = 1.0  # row 0 keeps 5 of 10 image tokens, row 1 keeps 1
    image_keep[1, :1] = 1.0
    text_keep = torch.zeros(2, 120)
    text_keep[0, 20:60] = 1.0  # row 0: a 50-token answer [20, 70) keeping 40 (0.8)
    text_keep[1, 20:69] = 1.0  # row 1: a 49-token answer, all kept, but too short to count
    out = MaskedOutput(torch.zeros(2, 120, 8), image_keep, text_keep)
    loss, image_rate, text_rate = budget_loss(out, [[(20, 70)], [(20, 69)]], image_mask, PredictorTrainConfig())
    expected = 100 * ((0.2 - 0.5) ** 2 + (0.2 - 0.1) ** 2 + (0.5 - 0.8) ** 2) / 3
    assert float(loss) == pytest.approx(expected)
    assert (image_rate, text_rate) == (pytest.approx(0.3), pytest.approx(0.8))


def test_labels_cover_only_the_answers(base_dir):
    """Answer-only supervision: every labelled token is inside an answer (with its end-of-sequence), every
    answer token is labelled, and the answer spans are those tokens."""
    from dynllava.loading import load_processor
    from dynllava.train.conversations import IGNORE, encode

    processor = load_processor(str(base_dir))
    tok = processor.tokenizer
    turns = [("How many shapes are there?", "three"), ("What colour is the shape at the top?", "red")]
    example = encode(processor, random_image(0), turns)
    labelled = (example.labels != IGNORE).nonzero().flatten().tolist()
    spans = [list(range(a, b)) for a, b in example.answer_spans]
    assert labelled == spans[0] + spans[1]
    assert torch.equal(example.labels[labelled], example.input_ids[labelled])
    for span, (_, answer) in zip(spans, turns):
        assert tok.decode(example.input_ids[span]).strip() == answer + tok.eos_token
    n_image = int((example.input_ids == processor.image_token_id).sum())
    assert n_image == 16 and labelled[0] > int((example.input_ids == processor.image_token_id).nonzero().max())


def test_llava_665k_json_input(base_dir, tmp_path, caplog):
    """LLaVA-665k-style records: human/gpt turns become (question, answer) pairs without the <image> marker;
    records without an image, or whose image is missing, are skipped with a warning; training runs on them."""
    from dynllava.train.predictors import llava_json_turns

    (tmp_path / "img").mkdir()
    random_image(3).save(tmp_path / "img" / "a.png")
    records = [
        {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A test pattern."},
            {"from": "human", "value": "Colours?"}, {"from": "gpt", "value": "Many."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "3", "image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    found = list(llava_json_turns(path, tmp_path / "img"))
    assert [turns for _, turns in found] == [[("What is it?", "A test pattern."), ("Colours?", "Many.")]]
    assert "missing.png" in caplog.text
    # one usable record, batches of 2: batches span epochs (this once looped forever)
    config = PredictorTrainConfig(steps=2, lm_lr=0.0, **{**FAST, "batch_size": 2})
    out = train_predictors(base_dir, tmp_path / "out", config, data=str(path), image_root=str(tmp_path / "img"),
                           device="cpu", progress=False)
    assert len(_log(out)) == 2
    (tmp_path / "none.json").write_text(json.dumps(records[1:]))
    with pytest.raises(ValueError, match="no usable record"):
        train_predictors(base_dir, tmp_path / "out2", config, data=str(tmp_path / "none.json"),
                         image_root=str(tmp_path / "img"), device="cpu", progress=False)


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


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_predictor_training_takes_any_resolution_models(family, tmp_path):
    """A few steps on a tiny any-res model (masked steps and dense steps through transformers' own forward):
    each scene is tiled as inference tiles it, the image predictor sees every view's tokens, and the model it
    writes loads and runs with the learned scorers."""
    from dynllava.config import ModelSpec, SparsityConfig
    from dynllava.loading import build_random
    from tests.dynllava.test_anyres import SPECS

    spec = ModelSpec.from_dict(dict(SPECS[family], name=family, image_token_id=260))
    hf, processor = build_random(spec, torch.device("cpu"), torch.float32)
    hf.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    config = PredictorTrainConfig(steps=4, lm_lr=1e-4, dense_every=2, **FAST)
    out = train_predictors(tmp_path / "base", tmp_path / "out", config, device="cpu", progress=False)
    log = _log(out)
    assert len(log) == 4 and all(0.0 <= r["image_keep"] <= 1.0 and r["ce"] > 0 for r in log)
    model = DynamicLlava.from_pretrained(out, device="cpu", dtype=torch.float32)
    assert model.family == family and model.predictors is not None
    result = model.generate([random_image(0)], [model.format_prompt("What is here?")], max_new_tokens=3,
                            sparsity=SparsityConfig(vision_keep=0.3, text_keep=0.5))[0]
    assert result.stats.n_image_kept == sum(-(-x.length * 3 // 10) for x in model.prepare(
        [random_image(0)], [model.format_prompt("What is here?")], 3).image_layouts)


def test_bf16_autocast_falls_back_to_fp32_where_the_cpu_would_emulate_it(monkeypatch, caplog):
    """An AVX2-only CPU runs bf16 matmuls about 200x slower than fp32: the trainers train in fp32 and say so."""
    from dynllava.train import precision

    assert precision.native_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with caplog.at_level("WARNING"):
        assert precision.use_bf16_autocast(True, "cpu") is False
    assert "training in fp32" in caplog.text
    assert precision.use_bf16_autocast(False, "cpu") is False
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.use_bf16_autocast(True, "cpu") is True


@pytest.mark.parametrize("name", ["tiny", "tiny_variety", "predictors"])
def test_the_shipped_training_configs_load(name):
    """The recipe's YAMLs mirror their dataclasses (an unknown or mistyped key is refused)."""
    from pathlib import Path

    path = Path(__file__).parents[2] / "configs" / "train" / f"{name}.yaml"
    cls = PredictorTrainConfig if name == "predictors" else BaseTrainConfig
    config = cls.from_yaml(path)
    assert config.steps > 0 and config.variety == (0.0 if name == "tiny" else 0.3)
