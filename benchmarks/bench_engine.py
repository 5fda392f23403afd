"""Claim: the one generation loop beats static batching in-process, dense and sparse.

The same mixed rows (held-out synthetic scenes: captions, descriptions and short VQA answers, so answer lengths
differ a lot) through `DynamicLlava.generate`, in one process, two scheduling policies of the same engine:
- static: batches of --static-batch rows, each runs until its longest row finishes (join_running=False);
- loop: at most --max-batch rows decode at once and a finished row's place goes to the next waiting row.
Each arm runs dense (keep 1.0) and sparse (--vision-keep / --text-keep). Images are decoded before timing;
one untimed warm-up call precedes the runs. loop_over_static = loop rows/s / static rows/s (target >= 1.25
against static batches of 16, dense and sparse). Prints a table, then one JSON line with the device and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, hardware  # noqa: E402
from dynllava.config import SparsityConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model source (default: the embedded tiny)")
    p.add_argument("--rows", type=int, default=500, help="mixed rows per run (default 500)")
    p.add_argument("--static-batch", type=int, default=16, help="rows per static batch (default 16)")
    p.add_argument("--max-batch", type=int, default=32, help="the loop's most rows decoding at once (default 32, "
                   "the engine's default)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per row (default 64)")
    p.add_argument("--vision-keep", type=float, default=0.2)
    p.add_argument("--text-keep", type=float, default=0.5)
    p.add_argument("--vision-scorer", default="learned")
    p.add_argument("--text-scorer", default="learned")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from dynllava.data.shapes import SPLIT_SEEDS, make_row
    from dynllava.inputs import load_image
    from dynllava.model import DynamicLlava

    args = parse_args(argv)
    model = DynamicLlava.from_pretrained(args.model, device=args.device)
    rows = [make_row(SPLIT_SEEDS["test"], i) for i in range(args.rows)]
    images = [load_image(r.image, "image") for r in rows]
    prompts = [model.format_prompt(r.prompt) for r in rows]
    settings = {"dense": SparsityConfig(),
                "sparse": SparsityConfig(vision_keep=args.vision_keep, text_keep=args.text_keep,
                                         vision_scorer=args.vision_scorer, text_scorer=args.text_scorer)}
    model.generate(images[:4], prompts[:4], sparsity=settings["sparse"], max_new_tokens=4)  # warm-up
    results, tokens = {}, {}
    for setting, sparsity in settings.items():
        for policy, join, width in (("static", False, args.static_batch), ("loop", True, args.max_batch)):
            started = time.perf_counter()
            outs = model.generate(images, prompts, sparsity=sparsity, max_new_tokens=args.max_new_tokens,
                                  max_batch=width, join_running=join)
            wall = time.perf_counter() - started
            results[f"{policy} {setting}"] = len(rows) / wall
            tokens[f"{policy} {setting}"] = sum(o.stats.n_text_generated for o in outs)
    assert tokens["static dense"] == tokens["loop dense"], "both policies must generate the same tokens"
    device = str(model.device)
    out = {"bench": "engine", "model": args.model, "rows": args.rows, "static_batch": args.static_batch,
           "max_batch": args.max_batch,
           "max_new_tokens": args.max_new_tokens, "sparsity": settings["sparse"].to_dict(),
           "rows_per_s": {k: round(v, 3) for k, v in results.items()},
           "tokens": tokens,
           "loop_over_static": {s: round(results[f"loop {s}"] / results[f"static {s}"], 3) for s in settings},
           "sparse_over_dense": {p: round(results[f"{p} sparse"] / results[f"{p} dense"], 3)
                                 for p in ("static", "loop")},
           "device": hardware(device), "commit": commit()}
    width = max(map(len, results))
    print("\n".join(f"{k:<{width}}  {v:8.2f} rows/s  ({tokens[k]} tokens)" for k, v in results.items()))
    print(f"loop_over_static {out['loop_over_static']} (target >= 1.25), sparse_over_dense {out['sparse_over_dense']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
