"""`dynllava caption`: an image(-text) dataset -> one Parquet row per input row, on Ray Data.

read -> decode/validate/preprocess (CPU tasks) -> generate (autoscaling pool of engine actors) -> write.
Exactly-once output and resume come from Ray Data's own job checkpointing (2-phase commit per output file,
keyed on the row id, checkpoint kept beside the output); engine actors that die are restarted by Ray Data
and their batches retried. What we add: bad rows become error rows, and `_job.json` records each run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pipelines.config import CaptionJobConfig
from pipelines.sources import InputSpec, open_input
from pipelines.stages import DECODED_COLUMNS, GenerateStage, ServeGenerateStage, Stage, decode_batch

log = logging.getLogger(__name__)
JOB_FILE = "_job.json"
CHECKPOINT_DIR = "_checkpoint"


@dataclass
class RunSummary:
    """One run of a job over its output folder. Rates are over this run's wall time; kept ratios are means
    over this run's good rows; kv_bytes_saved = 1 - sum(peak KV) / sum(dense-equivalent KV)."""

    rows: int  # rows written by this run (good + error)
    errors: int
    total_rows: int  # rows in the output folder after this run
    wall_s: float
    rows_per_s: float
    output_tokens_per_s: float
    image_keep: float
    text_keep: float
    kv_bytes_saved: float
    error_examples: list[str]

    def table(self) -> str:
        rows = [("rows written", f"{self.rows}"), ("errors", f"{self.errors}"),
                ("rows in output", f"{self.total_rows}"), ("wall time", f"{self.wall_s:.1f} s"),
                ("rows/s", f"{self.rows_per_s:.2f}"), ("output tokens/s", f"{self.output_tokens_per_s:.1f}"),
                ("mean image keep", f"{self.image_keep:.3f}"), ("mean text keep", f"{self.text_keep:.3f}"),
                ("KV bytes saved vs dense", f"{self.kv_bytes_saved:+.1%}")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_stages(config: CaptionJobConfig, spec: InputSpec, loader: Callable | None = None) -> list[Stage]:
    """The pipeline between read and write, as data (the job below turns it into Ray Data calls)."""
    id_extra = () if spec.id_column == "id" else (spec.id_column,)
    return [
        Stage("decode", decode_batch, (spec.id_column,),
              {"spec": spec, "model": config.model, "default_prompt": config.prompt,
               "max_pixels": config.max_image_pixels}),
        Stage("generate", ServeGenerateStage, DECODED_COLUMNS,
              {"app_name": config.serve_app, "sparsity": config.sparsity.to_dict(),
               "max_new_tokens": config.max_new_tokens, "extra_columns": id_extra})
        if config.serve_app else
        Stage("generate", GenerateStage, DECODED_COLUMNS,
              {"model": config.model, "sparsity": config.sparsity.to_dict(), "max_new_tokens": config.max_new_tokens,
               "device": config.device, "dtype": config.dtype, "loader": loader, "extra_columns": id_extra,
               "controller": config.controller}),
    ]


def _output_files(output: Path) -> set[str]:
    return {p.name for p in output.glob("*.parquet")}


def summarize(output: Path, new_files: set[str], wall_s: float) -> RunSummary:
    """Figures for this run from the files it wrote (earlier runs' files are only counted in total_rows)."""
    import pyarrow.parquet as pq

    cols = ["error", "n_image_kept", "n_image_tokens", "n_text_admitted", "n_text_generated", "kv_bytes_peak",
            "kv_bytes_dense"]
    tables = [pq.read_table(output / f, columns=cols) for f in sorted(new_files)]
    data = {c: [v for t in tables for v in t.column(c).to_pylist()] for c in cols}
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in output.glob("*.parquet"))
    n = len(data["error"])
    good = [i for i in range(n) if data["error"][i] is None]
    errors = [e for e in data["error"] if e is not None]

    def ratio(a: str, b: str) -> float:
        den = sum(data[b][i] for i in good)
        return sum(data[a][i] for i in good) / den if den else float("nan")

    tokens = sum(data["n_text_generated"][i] for i in good)
    return RunSummary(rows=n, errors=len(errors), total_rows=total, wall_s=wall_s,
                      rows_per_s=n / wall_s if wall_s else 0.0, output_tokens_per_s=tokens / wall_s if wall_s else 0.0,
                      image_keep=ratio("n_image_kept", "n_image_tokens"),
                      text_keep=ratio("n_text_admitted", "n_text_generated"),
                      kv_bytes_saved=1.0 - ratio("kv_bytes_peak", "kv_bytes_dense"),
                      error_examples=sorted(set(errors))[:5])


def _init_ray(address: str | None, config: CaptionJobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    # Local: logical CPUs for the engine actors plus room for the decode tasks, so neither starves the other.
    need = config.actors.max_size * max(1.0, config.actors.num_cpus) + 2
    ray.init(address="local", num_cpus=int(max(need, os.cpu_count() or 1)), include_dashboard=False)


def _check_serve_app(name: str) -> None:
    from ray import serve

    apps = serve.status().applications
    if name not in apps or "LlavaServer" not in apps[name].deployments:
        raise ValueError(f"serve app {name!r}: no such `dynllava serve` app on this cluster "
                         f"(running apps: {sorted(apps) or 'none'})")


def run_caption_job(input_path: str, output: str | Path, config: CaptionJobConfig, address: str | None = None,
                    limit: int | None = None, loader: Callable | None = None) -> RunSummary:
    """Run (or resume) a caption job; returns this run's summary and appends it to `output/_job.json`.
    `loader` replaces DynamicLlava.from_pretrained in the engine actors (tests inject failures with it)."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    if "://" in str(output):
        raise ValueError(f"output {output}: give a local or network-mounted folder (every node must see it); "
                         f"remote URIs are read as inputs but not yet written as outputs")
    output = Path(output).expanduser().resolve()
    _init_ray(address or ("auto" if config.serve_app else None), config)
    if config.serve_app:
        _check_serve_app(config.serve_app)
    ds, spec = open_input(input_path, config.columns)  # fails fast on a bad input, before any work
    output.mkdir(parents=True, exist_ok=True)
    # The plan reads the context its dataset was created with (a copy), so the checkpoint goes there; every
    # dataset derived below inherits it. Kept after success: a rerun must still see which ids are done.
    ds.context.checkpoint_config = CheckpointConfig(
        id_column=spec.id_column, checkpoint_path=str(output / CHECKPOINT_DIR), delete_checkpoint_on_success=False)
    decode, generate = build_stages(config, spec, loader)
    if limit is not None:
        ds = ds.limit(limit)
    # Readers may return a whole file (or several) as one block; a block is the unit that flows through the
    # stages and is committed to the output, so cut them to decode-batch size (streaming, no shuffle).
    ds = ds.repartition(target_num_rows_per_block=config.decode_batch_size)
    ds = ds.map_batches(decode.udf, fn_kwargs=decode.kwargs, batch_size=config.decode_batch_size,
                        batch_format="numpy", num_cpus=config.decode_num_cpus,
                        compute=ray.data.TaskPoolStrategy(size=config.decode_tasks))
    pool = config.actors
    if config.serve_app:  # light callers; the engines are the app's replicas
        compute, num_cpus, num_gpus = ray.data.ActorPoolStrategy(size=config.serve_callers), 0.1, 0
    else:
        compute = ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size)
        num_cpus, num_gpus = pool.num_cpus, pool.num_gpus
    ds = ds.map_batches(generate.udf, fn_constructor_kwargs=generate.kwargs, batch_size=config.batch_size,
                        batch_format="numpy", compute=compute, num_cpus=num_cpus, num_gpus=num_gpus)
    # Ray Data's actor pools restart a dead actor and retry its batch by default (max_restarts=-1,
    # max_task_retries=-1); the job relies on that and tests it.
    before = _output_files(output)
    started = time.perf_counter()
    ds.write_parquet(str(output), min_rows_per_file=config.rows_per_file)
    wall = time.perf_counter() - started
    summary = summarize(output, _output_files(output) - before, wall)
    _record_run(output, config, spec, input_path, limit, summary)
    return summary


def _record_run(output: Path, config: CaptionJobConfig, spec: InputSpec, input_path: str, limit: int | None,
                summary: RunSummary) -> None:
    path = output / JOB_FILE
    job = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    job.update({"input": input_path, "input_kind": spec.kind, "id_column": spec.id_column,
                "config": config.to_dict(), "total_rows": summary.total_rows})
    job["runs"].append({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "limit": limit, **asdict(summary)})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job, indent=2))
    tmp.replace(path)
