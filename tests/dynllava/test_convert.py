"""`dynllava convert` on checkpoints written in the original LLaVA / Dynamic-LLaVA layout: the converted model sees
the original's token ids and pixels, and matches a reference written over the original keys in the hidden states
entering layer K, the predictors' decisions and the greedy tokens (dense and sparse, and transformers' own
`generate` dense)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynllava.config import SparsityConfig
from dynllava.convert import VICUNA_V1_SYSTEM, ConversionError, convert
from dynllava.llama_tokenizer import llama_tokenizer
from dynllava.model import DynamicLlava
from tests.conftest import random_image
from tests.dynllava.original_format import (
    IMAGE_TOKEN_INDEX, OriginalReference, original_pixels, sentencepiece_pair, slow_llama_tokenize,
    tokenizer_image_token, train_sentencepiece, write_clip_directory, write_original,
)
from tests.dynllava.test_reference import engine_trace

NEW = 10
VARIANTS = {  # name: (weights format, CLIP tower saved in the checkpoint, tokenizer_config legacy, tower heads)
    "safetensors-with-tower": ("safetensors", True, False, 1),
    "bin-without-tower": ("bin", False, None, 2),
}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted(request, sp_model, tmp_path_factory):
    """(original state dict, converted DynamicLlava, tower heads, legacy) for each variant."""
    fmt, with_tower, legacy, heads = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    sd = write_original(root / "original", sp_model, with_tower, fmt, legacy)
    tower = None
    if not with_tower:
        tower = root / "clip"
        write_clip_directory(tower, heads=heads)
    convert(root / "original", root / "converted", vision_tower=tower, progress=lambda line: None)
    model = DynamicLlava.from_pretrained(root / "converted", device="cpu", dtype=torch.float32)
    return sd, model, heads, legacy is not False


def original_prompt(messages: list[tuple[str, str]], system: str = VICUNA_V1_SYSTEM) -> str:
    """LLaVA's conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO) with the last assistant message empty."""
    out = system + " "
    for i, (role, message) in enumerate(messages):
        out += f"{role}: {message}{' ' if i % 2 == 0 else '</s>'}" if message else f"{role}:"
    return out


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_equals_the_slow_llama_tokenizer(sp_model, legacy):
    """The tokenizer built from tokenizer.model without sentencepiece gives the slow LlamaTokenizer's ids (run
    here through sentencepiece itself) on 2,000 random strings with spaces, newlines, digits, "▁" and </s>,
    for both values of `legacy` (texts as inputs.tokenize_llava passes them)."""
    sp, sp_np = sentencepiece_pair(sp_model)
    tok = llama_tokenizer(sp_model, legacy, ["<image>", "<pad>"])
    rng = random.Random(0)
    alphabet = list("ab cdeUSER:ASIT\n?.ü1 ▁") + ["</s>", "  ", "hello", "image"]
    cases = ["", " leading", "x", "a  b   c", "▁weird", "hi</s>USER: x", "</s>x", "x</s> y"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(2000)]
    underline = tok.convert_tokens_to_ids("▁")
    for text in cases:
        ours = tok(text if legacy or not text else " " + text)["input_ids"]
        if not legacy and len(ours) > 2 and ours[1] == underline and ours[2] == 2:
            ours = ours[:1] + ours[2:]
        assert ours == slow_llama_tokenize(sp, sp_np, text, legacy), repr(text)


def test_prompt_ids_and_pixels_are_the_originals(converted, sp_model):
    """Single- and multi-turn prompts through the converted chat template and tokenizer give exactly the ids of
    the original's vicuna_v1 prompt through tokenizer_image_token (the image sentinel expanded to the image
    tokens), and the processor's pixels are expand2square + CLIP preprocessing."""
    sd, model, _, legacy = converted
    sp, sp_np = sentencepiece_pair(sp_model)
    tokenize = lambda text: slow_llama_tokenize(sp, sp_np, text, legacy)  # noqa: E731
    image = random_image(3, (20, 44))  # not square: padded
    conversations = [
        [("user", "<image>\nWhat is in the image?")],
        [("user", "<image>\nDescribe it."), ("assistant", "A red square."), ("user", "And the circles?")],
        [("system", "Answer briefly."), ("user", "<image>\n 12 of 345 ▁x")],
        [("user", "<image> two  spaces after the image")],  # a piece that starts with a space
    ]
    n_image = (32 // 8) ** 2
    for turns in conversations:
        system = turns[0][1] if turns[0][0] == "system" else VICUNA_V1_SYSTEM
        body = [(r.upper(), m) for r, m in turns if r != "system"] + [("ASSISTANT", "")]
        ours_text = model.processor.apply_chat_template([{"role": r, "content": m} for r, m in turns],
                                                        add_generation_prompt=True, tokenize=False)
        assert ours_text == original_prompt(body, system)
        prepared = model.prepare([image], [ours_text], NEW)
        expected = []
        for t in tokenizer_image_token(ours_text, tokenize):
            expected += [model.image_token_id] * n_image if t == IMAGE_TOKEN_INDEX else [t]
        assert prepared.input_ids[0].tolist() == expected
        torch.testing.assert_close(prepared.pixel_values[0], original_pixels(image), atol=1e-5, rtol=0)


def test_converted_model_equals_the_original(converted):
    """Hidden states entering layer 2, the image tokens kept and the generated tokens admitted, and the greedy
    tokens: the converted model through the engine (dense, and at its default sparsity from sparse_config:
    vision 0.2 floored, the text predictor's own decision) against the reference over the original keys; dense
    also against transformers' generate."""
    sd, model, heads, _ = converted
    assert model.default_sparsity == SparsityConfig(vision_keep=0.2, text_keep=None, layer=2, keep_rounding="floor")
    ref = OriginalReference(sd, heads)
    decisions: list[bool] = []
    for seed, question in [(1, "What is in the image?"), (2, "Describe the image briefly.")]:
        image = random_image(seed, (28, 36))
        prompt = model.format_prompt(question)
        prepared = model.prepare([image], [prompt], NEW)
        original_ids = tokenizer_image_token(prompt, lambda t: model.processor.tokenizer(t)["input_ids"])
        pixels = prepared.pixel_values[0]

        dense_tokens, hidden_k, _, _ = ref.generate(original_ids, pixels, NEW, vision_rate=None)
        with torch.no_grad():
            hf = model.hf_model(input_ids=prepared.input_ids, pixel_values=prepared.pixel_values,
                                output_hidden_states=True)
        torch.testing.assert_close(hf.hidden_states[2][0], hidden_k, atol=1e-4, rtol=1e-4)
        dense = engine_trace(model, prepared, SparsityConfig(), NEW)[0]
        assert dense.tokens == dense_tokens
        with torch.no_grad():
            generated = model.hf_model.generate(input_ids=prepared.input_ids, pixel_values=prepared.pixel_values,
                                                max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
        assert generated[0, prepared.lengths[0]:].tolist() == dense_tokens

        sparse_tokens, _, kept, admitted = ref.generate(original_ids, pixels, NEW, vision_rate=0.2)
        ours = engine_trace(model, prepared, model.default_sparsity, NEW)[0]
        assert len(kept) == prepared.lengths[0] - 16 + int(16 * 0.2)
        assert ours.kept == kept
        assert ours.admitted == admitted
        assert ours.tokens == sparse_tokens
        assert not torch.allclose(ours.logits[0], dense.logits[0]), "the sparse path must change the logits"
        decisions += ours.admitted
    assert any(decisions) and not all(decisions), "the text predictor should admit some tokens and drop others"


def test_converted_directory_loads_in_transformers_alone(converted, tmp_path):
    """transformers' own AutoModel / AutoProcessor load the converted directory by themselves."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, model, _, _ = converted
    directory = Path(model.hf_model.name_or_path)
    hf = LlavaForConditionalGeneration.from_pretrained(directory, local_files_only=True)
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
    assert processor.image_processor.do_pad
    for name, tensor in model.hf_model.state_dict().items():
        torch.testing.assert_close(hf.state_dict()[name], tensor, atol=0, rtol=0)


def test_convert_needs_no_sentencepiece_and_reports(sp_model, tmp_path, capsys):
    """The command runs with sentencepiece unimportable, prints what it wrote, and `generate` then uses the
    checkpoint's sparsity by default."""
    write_original(tmp_path / "orig", sp_model, True, "safetensors")
    code = ("import sys; sys.modules['sentencepiece'] = None; from dynllava.cli import main; "
            f"sys.exit(main(['convert', {str(tmp_path / 'orig')!r}, {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "predictors: yes" in done.stdout and "'keep_rounding': 'floor'" in done.stdout
    from dynllava.cli import main

    image = tmp_path / "img.png"
    random_image(0).save(image)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "out"), "--image", str(image), "--prompt", "What?",
                 "--max-new-tokens", "4", "--json", "--device", "cpu"]) == 0
    applied = json.loads(capsys.readouterr().out)["sparsity"]
    assert applied["vision_keep"] == 0.2 and applied["text_keep"] is None and applied["keep_rounding"] == "floor"
    assert main(["generate", "--model", str(tmp_path / "out"), "--image", str(image), "--prompt", "x",
                 "--vision-keep", "0.5", "--max-new-tokens", "2", "--device", "cpu"]) == 0


@pytest.mark.parametrize("change, message", [
    ({"image_aspect_ratio": "anyres"}, "any-resolution"),
    ({"mm_projector_type": "tokenpacker"}, "TokenPacker"),
    ({"mm_projector_type": "linear"}, "mlp2x_gelu"),
    ({"mm_use_im_start_end": True}, "start/end"),
    ({"sparse_config": {"use_instruct_predictor": True}}, "instruction-text predictor"),
    ({"sparse_config": {"d_model": 256}}, "sparse_config.d_model"),
    ({"model_type": "llava_mistral"}, "model_type"),
], ids=["anyres", "tokenpacker", "linear", "start-end", "instruct", "d_model", "mistral"])
def test_refuses_what_it_cannot_convert(sp_model, tmp_path, change, message):
    """A clear ConversionError naming the field, and nothing written (no destination, no partial directory)."""
    src = tmp_path / "orig"
    write_original(src, sp_model, True, "safetensors")
    cfg = json.loads((src / "config.json").read_text())
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out", progress=lambda line: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_refuses_a_missing_tower_and_a_used_destination(sp_model, tmp_path):
    src = tmp_path / "orig"
    write_original(src, sp_model, False, "bin")
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert(src, tmp_path / "out", progress=lambda line: None)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert(src, tmp_path / "used", progress=lambda line: None)
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
