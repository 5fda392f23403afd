"""On a CUDA device: the CUDA-graph decoding step gives exactly what the eager step gives. Skipped without GPU."""

from __future__ import annotations

import pytest
import torch

from dynllava.config import SparsityConfig

from tests.conftest import sharpen

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_model(tiny_yaml, tiny_model):
    from dynllava.model import DynamicLlava

    model = DynamicLlava.from_pretrained(tiny_yaml, device="cuda", dtype=torch.float32)
    sharpen(model)
    model.predictors = tiny_model.predictors.to("cuda")
    return model


@pytest.mark.parametrize("vision,text,keep", [("stride", "keep_all", 1.0), ("fastv", "h2o", 0.5),
                                              ("learned", "learned", 0.5), ("random", "recent", 0.5)])
def test_graph_step_equals_eager_step(gpu_model, batch4, vision, text, keep):
    images, prompts = batch4
    cfg = SparsityConfig(vision_keep=0.25, text_keep=keep, vision_scorer=vision, text_scorer=text)
    kw = dict(sparsity=cfg, max_new_tokens=150, ignore_eos=True)  # > one 128-token block: a recapture
    graphed = gpu_model.generate(images, prompts, cuda_graphs=True, **kw)
    eager = gpu_model.generate(images, prompts, cuda_graphs=False, **kw)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert [o.stats.kv_bytes_peak for o in graphed] == [o.stats.kv_bytes_peak for o in eager]
    alone = gpu_model.generate(images[1:2], prompts[1:2], cuda_graphs=True, **kw)[0]
    assert alone.token_ids == graphed[1].token_ids


def test_gpu_dense_equals_hf_generate(gpu_model, batch4):
    images, prompts = batch4
    inputs = gpu_model.processor(images=images[:1], text=prompts[:1], return_tensors="pt").to("cuda")
    ref = gpu_model.hf_model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    ours = gpu_model.generate(images[:1], prompts[:1], max_new_tokens=20, ignore_eos=True)[0]
    assert ours.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_continuous_loop_with_graphs_equals_eager(gpu_model, batch4):
    """Rows of different lengths join and leave a running batch of 2 (the graph is recaptured as the rows
    change); every row's tokens and KV bytes equal the eager loop's and its own alone."""
    from dynllava.batching import ContinuousEngine, EngineRequest

    images, prompts = batch4
    cfg = SparsityConfig(vision_keep=0.25, text_keep=0.5, vision_scorer="stride", text_scorer="recent")

    def run(graphs: bool, rows: list[int]):
        engine = ContinuousEngine(gpu_model, max_batch=2, max_prefill_batch=1, cuda_graphs=graphs)
        outs = {}
        for i in rows:
            n = 20 + 30 * i
            request = EngineRequest(gpu_model.prepare([images[i]], [prompts[i]], n), cfg, n, ignore_eos=True,
                                    stream=False, on_event=lambda e, i=i: outs.__setitem__(i, e.output))
            engine.submit(request)
        engine.run_until_idle()
        return {i: (o.token_ids, o.stats.kv_bytes_peak) for i, o in outs.items()}

    graphed, eager = run(True, [0, 1, 2, 3]), run(False, [0, 1, 2, 3])
    assert graphed == eager
    assert run(True, [3])[3] == graphed[3]
