"""The caption job with its engine replaced by an instant stand-in, to measure the pipeline's own ceiling (read,
decode, Ray Data, write, checkpoint) and how much work a killed job loses.

`python benchmarks/stand_in.py INPUT OUTPUT COUNT_FILE [--rows-per-file N]` runs `run_caption_job` with the
generate stage replaced by `InstantGenerateStage`: every row is answered at once, and the number of rows each
batch answered is appended to COUNT_FILE (rows processed, committed or not). Used by bench_job_kills.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipelines.caption  # noqa: E402
from pipelines.stages import GenerateStage  # noqa: E402

COUNT_ENV = "DYNLLAVA_STAND_IN_COUNT_FILE"
ZERO_STATS = SimpleNamespace(n_image_kept=0, n_text_admitted=0, kv_bytes_peak=0, ttft_s=0.0, decode_s=0.0,
                             n_image_tokens=0, n_text_generated=1, kv_bytes_dense_equivalent=1,
                             flops_dense=1.0, flops_sparse=1.0)


class InstantGenerateStage(GenerateStage):
    """The generate stage without a model: each row's answer is "stand-in", at once."""

    def __init__(self, model: str, sparsity: dict, max_new_tokens: int, extra_columns: tuple[str, ...] = (),
                 **_ignored):
        self.set_sparsity(sparsity)
        self.max_new_tokens = max_new_tokens
        self.extra_columns = extra_columns
        self.model_name = "stand-in"
        self.controller = None
        self.count_file = os.environ.get(COUNT_ENV, "")  # the job's workers inherit the driver's environment

    def generate_rows(self, pixels, prompts: list[str], image_sizes) -> list:
        if self.count_file:
            with open(self.count_file, "a") as f:
                f.write(f"{len(prompts)}\n")
        return [SimpleNamespace(text="stand-in", finish_reason="length", sparsity=self.sparsity, stats=ZERO_STATS)
                for _ in prompts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("count_file")
    p.add_argument("--rows-per-file", type=int, default=1000)
    p.add_argument("--actor-cpus", type=float, default=2.0, help="the engine actor's CPUs (the job default: 2)")
    p.add_argument("--stats-file", default=None, help="write this process's peak RSS (MB) here as JSON at the end")
    args = p.parse_args(argv)
    from pipelines.config import ActorPool, CaptionJobConfig

    os.environ[COUNT_ENV] = str(Path(args.count_file).resolve())
    pipelines.caption.GenerateStage = InstantGenerateStage
    config = CaptionJobConfig(model="tiny", batch_size=256, decode_batch_size=256, rows_per_file=args.rows_per_file,
                              actors=ActorPool(min_size=1, max_size=1, num_cpus=args.actor_cpus))
    summary = pipelines.caption.run_caption_job(args.input, args.output, config)
    print(summary.table())
    if args.stats_file:
        import json
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        Path(args.stats_file).write_text(json.dumps({"driver_peak_rss_mb": round(peak_mb, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
