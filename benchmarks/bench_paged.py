"""Claim: the block-paged cache decodes as fast as the padded one (step time <= 1.1x at batch 16).

The same --batch rows (random 336 px images, one prompt) are prefilled twice per setting, once into a padded
SparseKVCache and once into a PagedKVPool's blocks, and then both decode side by side: the two batches take
turns step by step (so machine noise hits both alike) for --steps greedy steps. Reports the median step time
of each and paged_over_padded per setting (dense; sparse at --vision-keep / --text-keep with the stride and
recent scorers, which need no trained predictors). Prints one JSON line with the hardware and commit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, emit, hardware  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "configs" / "models" / "tiny.yaml"),
                   help="model source (default: the 576-image-token tiny shape)")
    p.add_argument("--batch", type=int, default=16, help="rows decoding together (default 16)")
    p.add_argument("--steps", type=int, default=48, help="decoding steps timed per layout (default 48)")
    p.add_argument("--vision-keep", type=float, default=0.2)
    p.add_argument("--text-keep", type=float, default=0.5)
    p.add_argument("--block-tokens", type=int, default=None, help="slots per block (default: the engine's)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--output", default=None, help="also write the JSON line to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from dynllava.config import SparsityConfig
    from dynllava.engine import StaticBatch, new_row
    from dynllava.model import DynamicLlava
    from dynllava.paged_cache import PAGED_BLOCK_TOKENS, PagedKVPool

    args = parse_args(argv)
    torch.manual_seed(0)
    model = DynamicLlava.from_pretrained(args.model, device=args.device)
    size = model.config.vision_config.image_size
    images = [[Image.fromarray(np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8))]
              for i in range(args.batch)]
    prompts = [model.format_prompt("Describe the image in detail.") for _ in range(args.batch)]
    prepared = model.prepare(images, prompts, args.steps + 1)
    settings = {"dense": SparsityConfig(),
                "sparse": SparsityConfig(vision_keep=args.vision_keep, text_keep=args.text_keep,
                                         vision_scorer="stride", text_scorer="recent")}
    results = {}
    for name, sparsity in settings.items():
        arms = {}
        for layout in ("padded", "paged"):
            pool = PagedKVPool(model.n_layers, sparsity.layer, model.n_kv_heads, model.head_dim, model.dtype,
                               model.device, args.block_tokens or PAGED_BLOCK_TOKENS) if layout == "paged" else None
            batch = StaticBatch(model, prepared, [sparsity] * args.batch, args.steps + 1, cuda_graphs=False,
                                kv_pool=pool)
            rows = [new_row(n, sparsity, model.device, args.steps + 1, 0.0, 1.0, None, None, True)
                    for n in prepared.lengths]
            with torch.inference_mode():
                logits = batch.prefill()
            batch.record_prefill(rows)
            arms[layout] = {"batch": batch, "rows": rows, "logits": logits, "times": []}
        with torch.inference_mode():
            for _ in range(args.steps):
                for arm in arms.values():
                    tokens = arm["logits"].argmax(-1).tolist()
                    for row, token in zip(arm["rows"], tokens):
                        row.tokens.append(token)
                    if model.device.type == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    arm["logits"] = arm["batch"].step(tokens, arm["rows"], [True] * args.batch)
                    if model.device.type == "cuda":
                        torch.cuda.synchronize()
                    arm["times"].append(time.perf_counter() - started)
                    for row in arm["rows"]:
                        row.n_fed += 1
        same = [r.tokens for r in arms["padded"]["rows"]] == [r.tokens for r in arms["paged"]["rows"]]
        ms = {layout: round(statistics.median(arm["times"][2:]) * 1e3, 2) for layout, arm in arms.items()}
        results[name] = {"padded_ms": ms["padded"], "paged_ms": ms["paged"],
                         "paged_over_padded": round(ms["paged"] / ms["padded"], 3), "same_tokens": same}
        print(f"{name:7s} padded {ms['padded']:8.2f} ms  paged {ms['paged']:8.2f} ms  "
              f"x{ms['paged'] / ms['padded']:.3f}  same tokens: {same}")
    device = model.device.type
    emit({"benchmark": "paged_decode_step", "model": Path(args.model).stem, "hardware": hardware(device),
          "commit": commit(), "batch": args.batch, "steps": args.steps,
          "block_tokens": args.block_tokens or PAGED_BLOCK_TOKENS, "prompt_tokens": prepared.lengths[0],
          "results": results}, args.output)


if __name__ == "__main__":
    main()
