"""Bad input gets a clear ValueError naming the field; configs validate when built."""

from __future__ import annotations

import pytest

from dynllava.config import ModelSpec, SparsityConfig

from tests.conftest import TINY_SPEC, random_image


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_keep_ratios_outside_unit_interval(keep):
    with pytest.raises(ValueError, match="vision_keep"):
        SparsityConfig(vision_keep=keep)
    with pytest.raises(ValueError, match="text_keep"):
        SparsityConfig(text_keep=keep)


def test_text_keep_none_only_for_learned_and_unknown_names():
    SparsityConfig(text_keep=None, text_scorer="learned")
    with pytest.raises(ValueError, match="text_keep"):
        SparsityConfig(text_keep=None, text_scorer="recent")
    with pytest.raises(ValueError, match="vision_scorer"):
        SparsityConfig(vision_scorer="nope")
    with pytest.raises(ValueError, match="mode"):
        SparsityConfig(mode="paged")
    with pytest.raises(ValueError, match="keep_rounding"):
        SparsityConfig(keep_rounding="round")
    with pytest.raises(ValueError, match="keep_all"):
        SparsityConfig(text_keep=0.5, text_scorer="keep_all")


def test_model_spec_validation():
    with pytest.raises(ValueError, match="patch_size"):
        ModelSpec.from_dict({**TINY_SPEC, "vision": {**TINY_SPEC["vision"], "patch_size": 7}})
    with pytest.raises(ValueError, match="unknown"):
        ModelSpec.from_dict({**TINY_SPEC, "colour": "red"})
    assert ModelSpec.from_dict(TINY_SPEC).n_image_tokens == 16


def test_generate_rejects_bad_input(tiny_model):
    img = random_image(0)
    good = tiny_model.format_prompt("hi")
    with pytest.raises(ValueError, match=r"prompts\[0\].*no image placeholder"):
        tiny_model.generate([img], ["no placeholder"])
    with pytest.raises(ValueError, match=r"prompts\[0\].*placeholder"):
        tiny_model.generate([None], [good])
    with pytest.raises(ValueError, match=r"images\[0\]: unreadable image"):
        tiny_model.generate([b"\x89PNG\r\n\x1a\n truncated"], [good])
    with pytest.raises(ValueError, match=r"images\[0\]: unreadable image"):
        tiny_model.generate(["/no/such/file.png"], [good])
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_model.generate([img], [good], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_model.generate([img], [good], max_new_tokens=10_000)
    with pytest.raises(ValueError, match=r"prompts\[0\].*context"):
        tiny_model.generate([img], [good + " word" * 200], max_new_tokens=10)
    with pytest.raises(ValueError, match="same length"):
        tiny_model.generate([img, img], [good])
    with pytest.raises(ValueError, match="layer K"):
        tiny_model.generate([img], [good], sparsity=SparsityConfig(layer=9))
    with pytest.raises(ValueError, match="layer K"):  # one bad row: nothing runs
        tiny_model.generate([img, img], [good, good], sparsity=[SparsityConfig(), SparsityConfig(layer=9)])


def test_rows_of_one_call_may_differ_in_every_sparsity_field(tiny_model):
    """Keep ratios, scorers, layer and mode may differ per row (rows that cannot decode together run one
    after the other); each row gives what it gives alone."""
    img, good = random_image(0), tiny_model.format_prompt("hi")
    half = SparsityConfig(vision_keep=0.5, vision_scorer="stride", text_keep=0.5, text_scorer="recent")
    rows = [half, half.replace(vision_keep=0.25), half.replace(vision_scorer="fastv"), half.replace(layer=1),
            half.replace(mode="no_cache"), half.replace(text_scorer="h2o")]
    outs = tiny_model.generate([img] * len(rows), [good] * len(rows), sparsity=rows, max_new_tokens=6,
                               ignore_eos=True)
    assert [o.stats.n_image_kept for o in outs] == [8, 4, 8, 8, 8, 8]
    for out, sparsity in zip(outs, rows):
        alone = tiny_model.generate([img], [good], sparsity=sparsity, max_new_tokens=6, ignore_eos=True)[0]
        assert out.sparsity == sparsity and out.token_ids == alone.token_ids
        assert out.stats.n_text_admitted == alone.stats.n_text_admitted


def test_stop_strings_and_eos(tiny_model):
    img = random_image(0)
    prompt = tiny_model.format_prompt("hi")
    free = tiny_model.generate([img], [prompt], max_new_tokens=12, ignore_eos=True)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = free.text[3:5]
    stopped = tiny_model.generate([img], [prompt], max_new_tokens=12, stop=[stop], ignore_eos=True)[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert free.text.startswith(stopped.text)


def test_config_files_mirror_the_config_objects():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    assert SparsityConfig.from_yaml(root / "sparsity.yaml") == SparsityConfig()
    shapes = {p.stem: ModelSpec.from_yaml(p) for p in (root / "models").glob("*.yaml")}
    assert {"tiny", "llava-1.5-7b", "llava-1.5-13b", "tiny-next", "tiny-onevision", "llava-v1.6-vicuna-7b",
            "llava-v1.6-mistral-7b"} <= set(shapes)
    assert all(s.n_image_tokens == 576 for s in shapes.values() if s.family in ("llava", "llava_next"))  # 336 / 14
    assert shapes["tiny-onevision"].n_image_tokens == 729  # SigLIP's 384 / 14, the remainder dropped
    assert {s.family for s in shapes.values()} == {"llava", "llava_next", "llava_onevision"}
    assert (shapes["llava-1.5-7b"].text.hidden_size, shapes["llava-1.5-13b"].text.num_hidden_layers) == (4096, 40)


def test_preprocessed_pixels_give_the_same_batch_and_tokens(tiny_model, batch4):
    """Images preprocessed elsewhere (a pipeline's CPU stage) tokenize and generate exactly as raw images."""
    from dynllava.inputs import preprocess_images

    images, prompts = batch4
    pixels = preprocess_images(tiny_model.processor, images)
    raw = tiny_model.prepare(images, prompts, max_new_tokens=4)
    pre = tiny_model.prepare(pixels, prompts, max_new_tokens=4)
    assert raw.lengths == pre.lengths and raw.n_images == pre.n_images
    assert (raw.input_ids == pre.input_ids).all() and (raw.pixel_values == pre.pixel_values).all()
    sparsity = SparsityConfig(vision_keep=0.5, vision_scorer="stride", text_keep=0.5, text_scorer="recent")
    a = tiny_model.generate(images, prompts, sparsity=sparsity, max_new_tokens=6)
    b = tiny_model.generate(pixels, prompts, sparsity=sparsity, max_new_tokens=6)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
