"""Claim: the Ray Data caption job costs little over a plain loop, and sparsity makes it faster.

The same rows (held-out synthetic scenes, caption prompts) three ways in one process, each from a cold start
(model load included, so the pipeline's actor start-up is not hidden):
- loop: an in-process loop over the engine at the sparse setting (decode PNG -> generate, batches of B);
- pipeline dense / pipeline sparse: `run_caption_job` with one engine actor.
pipeline_over_loop = pipeline sparse rows/s / loop rows/s (target >= 0.9 with one actor);
sparse_over_dense = pipeline sparse rows/s / pipeline dense rows/s (target >= 1.8 at 0.2 / 0.5 on `tiny`).
Prints a table, then one JSON line with the device and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, hardware  # noqa: E402
from dynllava.config import SparsityConfig  # noqa: E402
from pipelines.caption import run_caption_job  # noqa: E402
from pipelines.config import ActorPool, CaptionJobConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model source (default: the embedded tiny)")
    p.add_argument("--rows", type=int, default=1000, help="rows per run (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per engine call (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="per row (default 48)")
    p.add_argument("--vision-keep", type=float, default=0.2)
    p.add_argument("--text-keep", type=float, default=0.5)
    p.add_argument("--vision-scorer", default="learned")
    p.add_argument("--text-scorer", default="learned")
    p.add_argument("--actor-cpus", type=float, default=2, help="CPUs (torch threads) of the engine actor")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs of the engine actor")
    p.add_argument("--decode-tasks", type=int, default=1, help="most decode tasks at once (default 1: 2 cores)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    return p.parse_args(argv)


def make_rows(path: Path, n: int) -> None:
    from dynllava.data.shapes import SPLIT_SEEDS, write_parquet

    write_parquet(str(path), n, SPLIT_SEEDS["test"], task="caption", progress=False)


def loop_rows_per_s(data: Path, args, sparsity: SparsityConfig) -> float:
    """Cold start: load the model, then read, decode and caption every row in batches."""
    import pyarrow.parquet as pq

    from dynllava.model import DynamicLlava

    started = time.perf_counter()
    model = DynamicLlava.from_pretrained(args.model, device=args.device)
    table = pq.read_table(data, columns=["image", "prompt"])
    images, prompts = table.column("image").to_pylist(), table.column("prompt").to_pylist()
    for start in range(0, len(images), args.batch_size):
        model.generate(images[start : start + args.batch_size],
                       [model.format_prompt(p) for p in prompts[start : start + args.batch_size]],
                       sparsity=sparsity, max_new_tokens=args.max_new_tokens)
    return len(images) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    import ray

    args = parse_args(argv)
    sparse = SparsityConfig(vision_keep=args.vision_keep, text_keep=args.text_keep,
                            vision_scorer=args.vision_scorer, text_scorer=args.text_scorer)
    dense = SparsityConfig()
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    data = work / "rows.parquet"
    make_rows(data, args.rows)
    ray.init(address="local", num_cpus=int(args.actor_cpus) + 2, include_dashboard=False, log_to_driver=False)
    results = {"loop sparse": loop_rows_per_s(data, args, sparse)}
    for name, sparsity in (("pipeline dense", dense), ("pipeline sparse", sparse)):
        config = CaptionJobConfig(model=args.model, sparsity=sparsity, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, device=args.device, decode_tasks=args.decode_tasks,
                                  actors=ActorPool(1, 1, num_cpus=args.actor_cpus, num_gpus=args.num_gpus))
        summary = run_caption_job(str(data), work / name.replace(" ", "_"), config)
        assert summary.rows == args.rows and summary.errors == 0, summary
        results[name] = summary.rows_per_s
    ray.shutdown()
    device = args.device or ("cuda" if args.num_gpus else "cpu")
    out = {"bench": "pipeline", "model": args.model, "rows": args.rows, "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "sparsity": sparse.to_dict(),
           "rows_per_s": {k: round(v, 3) for k, v in results.items()},
           "pipeline_over_loop": round(results["pipeline sparse"] / results["loop sparse"], 3),
           "sparse_over_dense": round(results["pipeline sparse"] / results["pipeline dense"], 3),
           "device": hardware(device), "commit": commit()}
    width = max(map(len, results))
    print("\n".join(f"{k:<{width}}  {v:8.2f} rows/s" for k, v in results.items()))
    print(f"pipeline_over_loop {out['pipeline_over_loop']} (target >= 0.9), "
          f"sparse_over_dense {out['sparse_over_dense']} (target >= 1.8)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
