"""The stage UDFs without Ray: decode checks and preprocesses rows, generate isolates bad rows."""

from __future__ import annotations

import json

import base64

import numpy as np
import pytest

from pipelines.sources import InputSpec
from dynllava.inputs import normalise_pixels
from pipelines.stages import GenerateStage, decode_batch, require_columns

from tests.pipelines.conftest import png_bytes


def spec(**kw) -> InputSpec:
    base = dict(path="x", kind="parquet", id_column="id", image_column="image", image_path_column="image_path",
                prompt_column="prompt", base_dir="/")
    return InputSpec(**{**base, **kw})


def test_decode_checks_every_row_and_preprocesses_like_the_processor(tiny_yaml, tiny_model, tmp_path):
    from dynllava.inputs import preprocess_images

    (tmp_path / "p.png").write_bytes(png_bytes(3))
    good = png_bytes(1)
    batch = {"id": np.array(["a", "b", "c", "d", "e", "f"], dtype=object),
             "image": np.array([good, good[:40], base64.b64encode(good).decode(), None, png_bytes(2, (90, 90)),
                                good], dtype=object),
             "image_path": np.array([None, None, None, str(tmp_path / "p.png"), None, None], dtype=object),
             "prompt": np.array(["Q?", "Q?", None, "Q?", "Q?", ""], dtype=object)}
    out = decode_batch(batch, spec=spec(), model=tiny_yaml, default_prompt="Default?", max_pixels=80 * 80)
    errors = list(out["error"])
    assert errors[0] is None and errors[2] is None and errors[3] is None
    assert "unreadable" in errors[1] and "max_image_pixels" in errors[4] and "empty prompt" in errors[5]
    assert list(out["error_kind"]) == [None, "input", None, None, "input", "input"]
    assert list(out["prompt"][:3]) == ["Q?", "Q?", "Default?"]
    expected = preprocess_images(tiny_model.processor, [good, png_bytes(3)])
    got = normalise_pixels(tiny_model.processor, out["pixels"][[0, 3]])
    assert out["pixels"].dtype == np.uint8 and not out["pixels"][1].any()
    assert all(np.array_equal(g.values.numpy(), e.values.numpy()) for g, e in zip(got, expected))


def test_generate_passes_errors_through_and_isolates_a_rejected_row(tiny_yaml):
    stage = GenerateStage(tiny_yaml, {"vision_keep": 0.5, "vision_scorer": "stride", "text_keep": 0.5,
                                      "text_scorer": "recent"}, max_new_tokens=4)
    decoded = decode_batch({"id": np.array(["ok", "bad", "long"], dtype=object),
                            "image": np.array([png_bytes(i) for i in range(3)], dtype=object)},
                           spec=spec(prompt_column=None, image_path_column=None), model=tiny_yaml,
                           default_prompt="Q?", max_pixels=10**6)
    batch = {**decoded, "prompt": np.array(["Q?", "Q?", "w " * 400], dtype=object),
             "error": np.array([None, "unreadable image (x)", None], dtype=object),
             "error_kind": np.array([None, "input", None], dtype=object)}
    out = stage(batch)
    assert list(out["id"]) == ["ok", "bad", "long"]
    assert out["error"][0] is None and out["caption"][0] is not None and out["n_image_kept"][0] > 0
    assert out["error"][1] == "unreadable image (x)" and out["caption"][1] is None
    assert "context" in out["error"][2] and list(out["error_kind"]) == [None, "input", "input"]
    with pytest.raises(KeyError, match="generate"):
        require_columns({"id": 1}, ("id", "prompt"), "generate")


def test_generate_reports_to_the_controller_and_follows_its_orders(tiny_yaml):
    """An engine actor's telemetry reaches the controller after each batch; a keep setting in the reply
    applies from the next batch (here: a rows/s target it cannot meet)."""
    from cluster.controller import ControllerCore
    from cluster.sla import SLA, OfflineTargets, Pacing

    core = ControllerCore(SLA(offline=OfflineTargets(rows_per_s=1e6), pacing=Pacing(cooldown_s=0)))
    stage = GenerateStage(tiny_yaml, {"vision_keep": 1.0, "vision_scorer": "stride", "text_keep": 1.0,
                                      "text_scorer": "recent"}, max_new_tokens=3, reporter=core.report)
    decoded = decode_batch({"id": np.array(["a", "b"], dtype=object),
                            "image": np.array([png_bytes(i) for i in range(2)], dtype=object)},
                           spec=spec(prompt_column=None, image_path_column=None), model=tiny_yaml,
                           default_prompt="Q?", max_pixels=10**6)
    first = stage(decoded)
    (snapshot,) = core.status()["actors"].values()
    assert snapshot["snapshot"]["kind"] == "data" and snapshot["snapshot"]["requests_per_s"] > 0
    decisions = core.step()
    assert decisions and decisions[0].target == stage.actor_id
    stage(decoded)  # this batch's report carries the order back
    second = stage(decoded)
    assert json.loads(first["sparsity"][0])["vision_keep"] == 1.0
    assert json.loads(second["sparsity"][0])["vision_keep"] == decisions[0].value.vision_keep < 1.0
    assert second["n_image_kept"][0] < first["n_image_kept"][0]


def test_out_of_memory_on_a_batch_retries_row_by_row(tiny_yaml):
    """A device out-of-memory error in a batched prefill splits it: each row is retried alone, so the rows that
    fit get their captions (the same as a batch would give) and only a row that does not fit alone fails. CPU
    memory cannot be exhausted on purpose here, so the loaded model's embedding (the prefill's first step)
    raises torch's own OutOfMemoryError for batches of more than one row and for one oversized row."""
    import torch

    from dynllava.model import DynamicLlava

    calls = []

    def loader(model, device=None, dtype=None):
        real = DynamicLlava.from_pretrained(model, device=device, dtype=dtype)
        embed = real.embed

        def embed_within_memory(input_ids, pixel_values, *images):
            calls.append(input_ids.shape[0])
            if input_ids.shape[0] > 1 or "huge" in real.processor.tokenizer.decode(input_ids[0]):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return embed(input_ids, pixel_values, *images)

        real.embed = embed_within_memory
        return real

    sparsity = {"vision_keep": 0.5, "vision_scorer": "stride", "text_keep": 0.5, "text_scorer": "recent"}
    stage = GenerateStage(tiny_yaml, sparsity, max_new_tokens=4, loader=loader)
    reference = GenerateStage(tiny_yaml, sparsity, max_new_tokens=4)
    decoded = decode_batch({"id": np.array(["a", "b", "c"], dtype=object),
                            "image": np.array([png_bytes(i) for i in range(3)], dtype=object),
                            "prompt": np.array(["Q?", "huge Q?", "Q?"], dtype=object)},
                           spec=spec(image_path_column=None), model=tiny_yaml, default_prompt="Q?", max_pixels=10**6)
    out = stage(decoded)
    assert calls == [3, 1, 1, 1]
    assert out["error"][1].startswith("OutOfMemoryError: CUDA out of memory") and out["caption"][1] is None
    assert out["error_kind"][1] == "transient"  # memory may be free on a later attempt
    expected = reference(decoded)
    assert [out["caption"][i] for i in (0, 2)] == [expected["caption"][i] for i in (0, 2)]
    assert out["error"][0] is None and out["error"][2] is None


def test_output_rows_have_the_documented_columns(tiny_yaml):
    """The schema the README documents, and what each column holds for a good row and an error row."""
    from pipelines.stages import OUTPUT_COLUMNS

    stage = GenerateStage(tiny_yaml, {"vision_keep": 0.5, "vision_scorer": "stride", "text_keep": 0.5,
                                      "text_scorer": "recent"}, max_new_tokens=5)
    decoded = decode_batch({"id": np.array(["a", "b"], dtype=object),
                            "image": np.array([png_bytes(0), b"not an image"], dtype=object)},
                           spec=spec(prompt_column=None, image_path_column=None), model=tiny_yaml,
                           default_prompt="Q?", max_pixels=10**6)
    out = stage(decoded)
    assert tuple(out) == OUTPUT_COLUMNS == (
        "id", "caption", "error", "error_kind", "finish_reason", "n_image_kept", "n_text_admitted", "kv_bytes_peak",
        "latency_s", "model", "sparsity", "n_image_tokens", "n_text_generated", "kv_bytes_dense", "flops_dense",
        "flops_sparse", "generated_at")
    alone = stage.model.generate([png_bytes(0)], [stage.model.format_prompt("Q?")], sparsity=stage.sparsity,
                                 max_new_tokens=5)[0]
    good = {c: out[c][0] for c in OUTPUT_COLUMNS}
    assert good["caption"] == alone.text.strip() and good["error"] is None and good["error_kind"] is None
    assert good["finish_reason"] == alone.finish_reason and good["model"] == "test-tiny"
    assert (good["n_image_tokens"], good["n_image_kept"]) == (16, 8)
    assert (good["n_text_generated"], good["n_text_admitted"]) == (alone.stats.n_text_generated,
                                                                  alone.stats.n_text_admitted)
    assert (good["kv_bytes_peak"], good["kv_bytes_dense"]) == (alone.stats.kv_bytes_peak,
                                                               alone.stats.kv_bytes_dense_equivalent)
    assert (good["flops_dense"], good["flops_sparse"]) == (alone.stats.flops_dense, alone.stats.flops_sparse)
    assert good["flops_sparse"] < good["flops_dense"]
    assert json.loads(good["sparsity"]) == stage.sparsity.to_dict() and good["latency_s"] > 0
    bad = {c: out[c][1] for c in OUTPUT_COLUMNS}
    assert "unreadable image" in bad["error"] and bad["caption"] is None and bad["n_image_kept"] == 0
    assert bad["error_kind"] == "input"
    assert out["generated_at"][0] == out["generated_at"][1] > 1.7e9  # unix seconds of the batch


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_any_resolution_rows_decode_to_tiles_and_generate_as_the_model_does(tmp_path, family):
    """An any-res model: decode ships each row's own number of uint8 tiles and its image size; the actor's
    normalisation is bit-identical to the processor's, and each caption is what the model generates from the
    original image."""
    import io

    import torch
    import yaml
    from PIL import Image

    from dynllava.config import SparsityConfig
    from dynllava.model import DynamicLlava
    from tests.dynllava.test_anyres import SPECS

    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(dict(SPECS[family], name=family, image_token_id=260)))
    sizes = [(90, 40), (50, 100), (33, 33)]
    encoded = [png_bytes(i, size) for i, size in enumerate(sizes)]
    decoded = decode_batch({"id": np.array(["a", "b", "bad", "c"], dtype=object),
                            "image": np.array(encoded[:2] + [b"junk", encoded[2]], dtype=object)},
                           spec=spec(prompt_column=None, image_path_column=None), model=str(path),
                           default_prompt="Q?", max_pixels=10**6)
    assert [tuple(s) for s in decoded["image_size"][[0, 1, 3]]] == [(h, w) for w, h in sizes]
    assert len({decoded["pixels"][i].shape[0] for i in (0, 1, 3)}) > 1  # a different tile count per row
    model = DynamicLlava.from_pretrained(path, device="cpu", dtype=torch.float32)
    originals = [Image.open(io.BytesIO(b)).convert("RGB") for b in encoded]
    for i, image in zip((0, 1, 3), originals):
        ours = normalise_pixels(model.processor, decoded["pixels"][[i]], decoded["image_size"][[i]])[0]
        theirs = model.prepare([image], [model.format_prompt("Q?")], 1)
        assert torch.equal(ours.values, theirs.pixel_values)
    sparsity = {"vision_keep": 0.5, "vision_scorer": "stride", "text_keep": 1.0}
    out = GenerateStage(str(path), sparsity, max_new_tokens=4)(decoded)
    expected = model.generate(originals, [model.format_prompt("Q?")] * 3, sparsity=SparsityConfig(**sparsity),
                              max_new_tokens=4)
    assert [out["caption"][i] for i in (0, 1, 3)] == [e.text.strip() for e in expected]
    assert out["error_kind"][2] == "input" and out["caption"][2] is None
