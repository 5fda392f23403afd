"""Profile one prefill and 32 cached decoding steps (dense and sparse) with torch.profiler; prints the top ops.
A diagnostic, not a claim: use it to see where a shape spends its time (python overhead vs kernels)."""

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
from dynllava.model import DynamicLlava  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    m = DynamicLlava.from_pretrained(a.shape, device=a.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(a.batch)]
    prompts = [m.format_prompt("Describe the image in detail.")] * a.batch
    configs = {"dense": SparsityConfig(vision_scorer="stride", text_scorer="recent"),
               "sparse": SparsityConfig(0.2, 0.5, vision_scorer="stride", text_scorer="recent")}
    for name, cfg in configs.items():
        m.generate(images, prompts, sparsity=cfg, max_new_tokens=4, ignore_eos=True)  # warm-up
        t0 = time.perf_counter()
        out = m.generate(images, prompts, sparsity=cfg, max_new_tokens=a.tokens, ignore_eos=True)
        wall = time.perf_counter() - t0
        s = out[0].stats
        print(f"{name}: wall {wall * 1e3:.1f} ms  prefill {s.prefill_s * 1e3:.1f} ms  "
              f"decode {s.decode_s / max(1, a.tokens - 1) * 1e3:.2f} ms/token")
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if a.device == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            m.generate(images, prompts, sparsity=cfg, max_new_tokens=a.tokens, ignore_eos=True)
        key = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
