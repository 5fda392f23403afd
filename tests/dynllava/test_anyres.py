"""Any-resolution LLaVA (LLaVA-NeXT, LLaVA-OneVision) on tiny random configs, with images of several sizes and
aspect ratios in one batch and rows of one and two images: the layouts are transformers' own, keep 1.0 equals
transformers' generate token for token, each image keeps exactly its own budget under every scorer, text is
never dropped, the cache slots the scheduler reserves are the ones filled, and a batch equals each row alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynllava.batching import prompt_slots
from dynllava.batching import EngineRequest
from dynllava.config import ModelSpec, SparsityConfig
from dynllava.engine import DecodingRow, StaticBatch
from dynllava.image_layout import image_groups, newline_mask
from dynllava.loading import build_random
from dynllava.model import DynamicLlava
from dynllava.ops import keep_count
from dynllava.predictors import Predictors

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=272, max_position_embeddings=2048)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
SPECS = {
    "llava_next": dict(family="llava_next", vision=VISION, text=dict(TEXT, model_type="llama"),
                       image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]),
    "llava_onevision": dict(family="llava_onevision", vision=dict(VISION, model_type="siglip"),
                            text=dict(TEXT, model_type="qwen2"), vision_feature_layer=-1,
                            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64],
                                                  [96, 96]]),
    # a cap of one tile's worth of grid: OneVision shrinks every larger grid (its interpolation branch)
    "llava_onevision_max1": dict(family="llava_onevision", vision=dict(VISION, model_type="siglip"),
                                 text=dict(TEXT, model_type="qwen2"), vision_feature_layer=-1,
                                 vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
                                 image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64], [96, 96]]),
}
SCORERS = ("learned", "fastv", "stride", "random")
NEW = 8


def images() -> list[Image.Image]:
    """Wide, tall, small and square images (width x height)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for w, h in ((90, 40), (50, 100), (33, 33), (70, 64))]


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request) -> DynamicLlava:
    spec = ModelSpec.from_dict(dict(SPECS[request.param], name=request.param, image_token_id=260))
    hf, processor = build_random(spec, torch.device("cpu"), torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():  # wider than the default init, so greedy tokens vary (a stronger equality test)
        for w in hf.model.language_model.parameters():
            if w.dim() == 2:
                w.normal_(0, 2.0 / w.shape[1] ** 0.5)
    m = DynamicLlava(hf, processor, name=request.param)
    torch.manual_seed(2)
    m.predictors = Predictors(TEXT["hidden_size"], image_width=64).eval()
    return m


def rows(model: DynamicLlava) -> tuple[list, list[str]]:
    """A row of two images of different sizes, then rows of one."""
    a, b, c, d = images()
    return [[a, b], [c], [d]], [model.format_prompt("Two?", 2), model.format_prompt("One?"), model.format_prompt("Q")]


def hf_generate(model: DynamicLlava, row_images: list, prompt: str) -> list[int]:
    prepared = model.prepare([row_images], [prompt], NEW)
    extra = {"batch_num_images": torch.tensor(prepared.n_images)} if model.family == "llava_onevision" else {}
    out = model.hf_model.generate(input_ids=prepared.input_ids, pixel_values=prepared.pixel_values,
                                  image_sizes=prepared.image_sizes, max_new_tokens=NEW, min_new_tokens=NEW,
                                  do_sample=False, **extra)
    return out[0, prepared.input_ids.shape[1]:].tolist()


@torch.inference_mode()
def test_layouts_are_the_processors_counts_and_the_features_newlines(model):
    """Each image's run: as long as the processor's placeholders and transformers' features, with the newline
    tokens exactly where the features hold `image_newline`."""
    for row_images in ([im] for im in images()), [images()[:2]], [images()[1:]]:
        for group in row_images:
            prompt = model.format_prompt("x", len(group))
            prepared = model.prepare([group], [prompt], 1)
            slots = int((prepared.input_ids == model.image_token_id).sum())
            assert sum(x.length for x in prepared.image_layouts) == slots
            extra = {"batch_num_images": prepared.n_images} if model.family == "llava_onevision" else {}
            feats = model.hf_model.model.get_image_features(
                pixel_values=prepared.pixel_values, image_sizes=prepared.image_sizes, **extra).pooler_output
            assert [f.shape[0] for f in feats] == [x.length for x in prepared.image_layouts]
            assert prepared.pixel_values.shape[0] == sum(x.n_tiles for x in prepared.image_layouts)
            groups = image_groups(prepared.input_ids == model.image_token_id, [prepared.image_layouts])
            newline = newline_mask(groups, [prepared.image_layouts])[0][groups[0] >= 0]
            is_newline = (torch.cat(feats) == model.hf_model.model.image_newline).all(-1)
            assert torch.equal(newline, is_newline) and int(newline.sum()) == sum(
                x.n_newlines for x in prepared.image_layouts)
            if len(group) > 1 and model.family == "llava_onevision":  # multi-image mode: one view each
                assert [x.n_tiles for x in prepared.image_layouts] == [1] * len(group)


def test_keep_1_equals_transformers_generate_in_a_ragged_batch(model):
    batch_images, prompts = rows(model)
    ours = model.generate(batch_images, prompts, sparsity=SparsityConfig(vision_keep=1.0, text_keep=1.0),
                          max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in ours] == [hf_generate(model, r, p) for r, p in zip(batch_images, prompts)]


@torch.inference_mode()
@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_every_scorer_keeps_each_images_own_budget_and_all_text(model, rounding):
    batch_images, prompts = rows(model)
    prepared = model.prepare(batch_images, prompts, NEW)
    layouts = prepared.layouts_by_row()
    image_mask = prepared.input_ids == model.image_token_id
    groups = image_groups(image_mask, layouts)
    for scorer in SCORERS:
        sparsity = SparsityConfig(vision_keep=0.3, vision_scorer=scorer, text_keep=1.0, keep_rounding=rounding)
        batch = StaticBatch(model, prepared, [sparsity] * len(prompts), NEW, cuda_graphs=False)
        batch.prefill()
        keep = batch.prompt_keep
        for b, row in enumerate(layouts):
            kept = [int((keep[b] & (groups[b] == m)).sum()) for m in range(len(row))]
            assert kept == [keep_count(x.length, 0.3, rounding) for x in row], (scorer, b)
            text = prepared.valid[b] & ~image_mask[b]
            assert keep[b][text].all(), f"{scorer}: text dropped"
            request = EngineRequest(model.prepare([batch_images[b]], [prompts[b]], NEW), sparsity, NEW)
            assert prompt_slots(model, request) == (prepared.lengths[b], batch.n_kept_prompt[b])


@pytest.mark.parametrize("vision", SCORERS)
def test_a_batch_equals_each_row_alone(model, vision):
    batch_images, prompts = rows(model)
    text = {"learned": "learned", "fastv": "h2o", "stride": "recent", "random": "keep_all"}[vision]
    sparsity = SparsityConfig(vision_keep=0.25, text_keep=1.0 if text == "keep_all" else 0.5,
                              vision_scorer=vision, text_scorer=text)
    together = model.generate(batch_images, prompts, sparsity=sparsity, max_new_tokens=NEW, ignore_eos=True)
    for i, (row_images, prompt) in enumerate(zip(batch_images, prompts)):
        alone = model.generate([row_images], [prompt], sparsity=sparsity, max_new_tokens=NEW, ignore_eos=True)[0]
        assert alone.token_ids == together[i].token_ids, (vision, i)
        assert alone.stats.n_image_kept == together[i].stats.n_image_kept


def test_a_saved_llava_hf_directory_loads_and_runs_the_same(model, tmp_path):
    """A local directory in llava-hf's layout (the OneVision processor loaded without torchvision)."""
    model.hf_model.save_pretrained(tmp_path)
    model.processor.save_pretrained(tmp_path)
    loaded = DynamicLlava.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert loaded.family == model.family and type(loaded.processor) is type(model.processor)
    batch_images, prompts = rows(model)
    sparsity = SparsityConfig(vision_keep=0.5, vision_scorer="stride", text_keep=1.0)
    ours = [o.token_ids for o in model.generate(batch_images, prompts, sparsity=sparsity, max_new_tokens=4)]
    assert [o.token_ids for o in loaded.generate(batch_images, prompts, sparsity=sparsity, max_new_tokens=4)] == ours


def test_a_chat_template_that_places_the_images_itself():
    """llava-hf's LLaVA-NeXT templates take a message's content as parts and write the image placeholders
    themselves; format_prompt gives them parts (and LLaVA-1.5's string templates a string)."""
    spec = ModelSpec.from_dict(dict(SPECS["llava_next"], name="t", image_token_id=260))
    hf, processor = build_random(spec, torch.device("cpu"), torch.float32)
    model = DynamicLlava(hf, processor)
    assert model.format_prompt("Describe.", 1) == "USER: <image>\nDescribe. ASSISTANT:"
    processor.chat_template = (  # llava-v1.6-mistral-7b-hf's, abridged
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
        "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}{% endif %}{% endfor %}")
    assert model.format_prompt("Describe.", 2) == "[INST] <image>\n<image>\nDescribe. [/INST]"


def test_prefill_formula_counts_every_view_and_equals_the_executed_flops(model):
    """The cost model over an any-res row: the tower runs each image's base view and tiles (vision_tokens per
    view: no CLS for SigLIP), the LM layers count the newline tokens as image tokens. Counted op by op, the
    prefill equals costs.prefill_flops with n_views = the views run, plus the patch convolutions."""
    from dynllava import costs
    from dynllava.engine import model_dims
    from tests.dynllava.test_costs import counted_flops

    d = model_dims(model)
    vision = model.config.vision_config
    clip = "siglip" not in vision.model_type
    per_view = (vision.image_size // vision.patch_size) ** 2
    assert d.vision_tokens == per_view + clip and d.projector_tokens == per_view
    conv = 2 * per_view * 3 * vision.patch_size**2 * vision.hidden_size
    batch_images, prompts = rows(model)
    for keep in (1.0, 0.25):
        prepared = model.prepare(batch_images[2:], prompts[2:], 4)  # one 70x64 image: a base view and tiles
        n_views = prepared.pixel_values.shape[0]
        assert n_views == sum(x.n_tiles for x in prepared.image_layouts) > 1
        batch = StaticBatch(model, prepared, [SparsityConfig(vision_keep=keep, vision_scorer="stride")], 4,
                            cuda_graphs=False)
        with torch.inference_mode():
            executed = counted_flops(batch.prefill)
        n, kept = prepared.lengths[0], int(batch.prompt_keep.sum())
        assert executed == pytest.approx(costs.prefill_flops(d, n, kept, 2, n_views) + n_views * conv, rel=1e-3)
        row = DecodingRow(n, batch.sparsities[0], None)
        batch.record_prefill([row])  # what the request's stats report
        assert row.n_views == n_views and row.prefill_flops == (costs.prefill_flops(d, n, n, 2, n_views),
                                                                costs.prefill_flops(d, n, kept, 2, n_views))
