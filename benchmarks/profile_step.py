"""Diagnostic (not a claim): where one shape spends its time. Times our prefill against transformers' own
forward, our decoding (eager and CUDA-graph) against transformers' generate, and prints torch.profiler's top
ops of one prefill. Use it before optimising."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dynllava.config import SparsityConfig  # noqa: E402
from dynllava.engine import StaticBatch  # noqa: E402
from dynllava.model import DynamicLlava  # noqa: E402


def timed(fn, device: str, repeats: int = 5) -> float:
    """Median seconds of fn() after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    m = DynamicLlava.from_pretrained(a.shape, device=a.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(a.batch)]
    prompts = [m.format_prompt("Describe the image in detail.")] * a.batch
    dense = SparsityConfig(vision_scorer="stride", text_scorer="recent")
    sparse = SparsityConfig(0.2, 0.5, vision_scorer="stride", text_scorer="recent")
    prepared = m.prepare(images, prompts, a.tokens)
    inputs = m.processor(images=images, text=prompts, return_tensors="pt").to(a.device)
    print(f"shape={a.shape} device={a.device} batch={a.batch} prompt={prepared.lengths[0]} tokens={a.tokens}")
    hf_prefill = timed(lambda: m.hf_model(**inputs, logits_to_keep=1), a.device)
    print(f"prefill ms: hf forward {hf_prefill * 1e3:.1f}", end="")
    for name, cfg in (("dense", dense), ("sparse", sparse)):
        t = timed(lambda: StaticBatch(m, prepared, [cfg] * a.batch, a.tokens).prefill(), a.device)
        print(f"  ours {name} {t * 1e3:.1f}", end="")
    print()
    n = a.tokens
    hf = timed(lambda: m.hf_model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False),
               a.device, 2)
    print(f"generate {n} tokens, ms/token incl. prefill: hf {hf / n * 1e3:.2f}", end="")
    for name, cfg in (("dense", dense), ("sparse", sparse)):
        for graphs in (False, True):
            t = timed(lambda: m.generate(images, prompts, sparsity=cfg, max_new_tokens=n, ignore_eos=True,
                                         cuda_graphs=graphs), a.device, 2)
            print(f"  {name}{'+graph' if graphs else ''} {t / n * 1e3:.2f}", end="")
    print()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if a.device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        StaticBatch(m, prepared, [dense] * a.batch, a.tokens).prefill()
        if a.device == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if a.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
