"""`dynllava caption`: an image(-text) dataset -> one Parquet row per input row, on Ray Data.

read -> decode/validate/preprocess (CPU tasks) -> generate (autoscaling pool of engine actors) -> write.
Exactly-once output and resume come from Ray Data's own job checkpointing (2-phase commit per output file,
keyed on the row id, checkpoint kept beside the output); engine actors that die are restarted by Ray Data
and their batches retried. What we add: bad rows become error rows, and `_job.json` records each run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dynllava.row_errors import INPUT
from pipelines import job_record
from pipelines.config import CaptionJobConfig
from pipelines.job_record import JOB_FILE
from pipelines.lease import OutputLease
from pipelines.output import OutputLocation, open_output, redact
from pipelines.progress import CommittedRows, ProgressReporter
from pipelines.retry import drop_error_rows, retry_passes
from pipelines.sources import InputSpec, detect_kind, open_input, with_v1_parquet_reader
from pipelines.stages import DECODED_COLUMNS, GenerateStage, ServeGenerateStage, Stage, decode_batch

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "_checkpoint"
# A write task's logical CPUs. Writing 1,000 rows is mostly waiting on the filesystem; at Ray's default of 1 CPU
# the write stage fits in no share of Ray Data's resource budget while the engine actors and the decode tasks
# hold theirs, so nothing was committed in a run's first tens of seconds (a kill then lost all its work).
WRITE_NUM_CPUS = 0.25


@dataclass
class RunSummary:
    """One run of a job over its output folder. Rates are over this run's wall time; kept ratios are means
    over this run's good rows; kv_bytes_saved = 1 - sum(peak KV) / sum(dense-equivalent KV)."""

    rows: int  # rows written by this run (good + error)
    errors: int
    transient_errors: int  # of those errors, the ones a later `--retry-errors` redoes (dynllava.row_errors)
    total_rows: int  # rows in the output folder after this run
    wall_s: float
    rows_per_s: float
    output_tokens_per_s: float
    image_keep: float
    text_keep: float
    kv_bytes_saved: float
    error_examples: list[str]
    sparsity_over_time: list[dict] = field(default_factory=list)  # see sparsity_timeline

    def table(self) -> str:
        errors = f"{self.errors}" + (f" ({self.transient_errors} transient: --retry-errors redoes them)"
                                     if self.transient_errors else "")
        rows = [("rows written", f"{self.rows}"), ("errors", errors),
                ("rows in output", f"{self.total_rows}"), ("wall time", f"{self.wall_s:.1f} s"),
                ("rows/s", f"{self.rows_per_s:.2f}"), ("output tokens/s", f"{self.output_tokens_per_s:.1f}"),
                ("mean image keep", f"{self.image_keep:.3f}"), ("mean text keep", f"{self.text_keep:.3f}"),
                ("KV bytes saved vs dense", f"{self.kv_bytes_saved:+.1%}")]
        if len({(b["vision_keep"], b["text_keep"]) for b in self.sparsity_over_time}) > 1:  # it changed
            rows.append(("sparsity over time", "  ".join(
                f"+{b['from_s']:.0f}s {b['vision_keep']:.2f}/{b['text_keep']:.2f}" for b in self.sparsity_over_time)))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def sparsity_timeline(generated_at: list[float], sparsity: list[str], buckets: int = 10) -> list[dict]:
    """The keep setting rows ran at over the run: the span from the first to the last row cut into `buckets`
    equal parts; per part with rows, its start (s from the first row), rows, and the mean configured
    vision_keep and text_keep (text_keep None = 1). Shows the controller's moves in the job summary."""
    if not generated_at:
        return []
    t0, span = min(generated_at), max(max(generated_at) - min(generated_at), 1e-9)
    parts: dict[int, list[dict]] = {}
    for t, config in zip(generated_at, sparsity):
        parts.setdefault(min(buckets - 1, int((t - t0) / span * buckets)), []).append(json.loads(config))
    return [{"from_s": round(i * span / buckets, 1), "rows": len(cs),
             "vision_keep": round(sum(c["vision_keep"] for c in cs) / len(cs), 3),
             "text_keep": round(sum(c.get("text_keep") or 1.0 for c in cs) / len(cs), 3)}
            for i, cs in sorted(parts.items())]


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
               "controller": config.controller, "engine": config.engine_limits(),
               "threads": config.actors.threads}),
    ]


def summarize(out: OutputLocation, new_files: set[str], wall_s: float, total_rows: int) -> RunSummary:
    """Figures for this run from the files it wrote (a few columns of those files only; earlier runs' files are
    not read: `total_rows` comes from the job record)."""
    import pyarrow.parquet as pq

    cols = ["error", "error_kind", "n_image_kept", "n_image_tokens", "n_text_admitted", "n_text_generated",
            "kv_bytes_peak", "kv_bytes_dense", "generated_at", "sparsity"]
    tables = [pq.read_table(out.join(f), columns=cols, filesystem=out.fs) for f in sorted(new_files)]
    data = {c: [v for t in tables for v in t.column(c).to_pylist()] for c in cols}
    n = len(data["error"])
    good = [i for i in range(n) if data["error"][i] is None]
    errors = [e for e in data["error"] if e is not None]

    def ratio(a: str, b: str) -> float:
        den = sum(data[b][i] for i in good)
        return sum(data[a][i] for i in good) / den if den else float("nan")

    tokens = sum(data["n_text_generated"][i] for i in good)
    transient = sum(data["error"][i] is not None and data["error_kind"][i] != INPUT for i in range(n))
    return RunSummary(rows=n, errors=len(errors), transient_errors=transient, total_rows=total_rows + n,
                      wall_s=wall_s,
                      rows_per_s=n / wall_s if wall_s else 0.0, output_tokens_per_s=tokens / wall_s if wall_s else 0.0,
                      image_keep=ratio("n_image_kept", "n_image_tokens"),
                      text_keep=ratio("n_text_admitted", "n_text_generated"),
                      kv_bytes_saved=1.0 - ratio("kv_bytes_peak", "kv_bytes_dense"),
                      error_examples=sorted(set(errors))[:5],
                      sparsity_over_time=sparsity_timeline([data["generated_at"][i] for i in good],
                                                           [data["sparsity"][i] for i in good]))


def _pass_through(batch):
    return batch


def rows_in_output(out: OutputLocation) -> int:
    """Rows in the output's files, from their Parquet footers (used once, for outputs written before the job
    record kept the count)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(out.join(f), filesystem=out.fs).metadata.num_rows for f in out.parquet_files())


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

    from cluster.serve_handle import serves_dynllava

    if not serves_dynllava(name):
        apps = serve.status().applications
        raise ValueError(f"serve app {name!r}: no such `dynllava serve` app on this cluster "
                         f"(running apps: {sorted(apps) or 'none'})")


def _job_controller(config: CaptionJobConfig):
    """The cluster controller this job's engine actors report to: the running one, else one started with the
    job's SLA (it then asks the autoscaler for engine-actor bundles of the job's size). None without
    `controller: true`, and with serve_app (the app's replicas report for themselves)."""
    if not config.controller or config.serve_app:
        return None
    from cluster.controller import find_controller, start_controller
    from cluster.sla import load_sla

    controller = find_controller()
    if controller is None:
        pool = config.actors
        bundle = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {})}
        controller = start_controller(load_sla(config.sla), engine_bundle=bundle)
        log.info("started the cluster controller (SLA: %s)", config.sla or "configs/sla.yaml or defaults")
    return controller


def _rows_to_do(ds, done: int, limit: int | None) -> int:
    """Rows this run will process: the input's rows less those already in the output, capped at `limit`."""
    todo = max(0, ds.count() - done)
    return todo if limit is None else min(todo, limit)


@with_v1_parquet_reader
def run_caption_job(input_path: str, output: str | Path, config: CaptionJobConfig, address: str | None = None,
                    limit: int | None = None, loader: Callable | None = None, retry_errors: str | None = None,
                    allow_config_change: bool = False, progress_s: float | None = None) -> RunSummary:
    """Run (or resume) a caption job; returns this run's summary, recorded in `output/_job.json`.

    output: a local folder or any pyarrow filesystem URI (s3://, gs://, abfs://, file://); the checkpoint goes
    beside the rows. limit: at most this many more rows in this run (rows already in the output do not count).
    retry_errors: "transient" or "all": first take those error rows out of the output (and their ids out of the
    checkpoint), so this run does them again (dynllava.row_errors says which errors are transient). A resume
    whose input, model, prompt, sparsity or max_new_tokens differs from the output's record is refused unless
    allow_config_change. progress_s: print rows done, rows/s and (Parquet inputs) the time left every so many
    seconds, from the committed checkpoint files. `loader` replaces
    DynamicLlava.from_pretrained in the engine actors (tests inject failures with it). A second run on the same
    output while this one runs is refused (OutputBusy); one started after this one was killed first waits
    config.lease_s for its workers to stop (pipelines.lease)."""
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive number of rows, got {limit}")
    detect_kind(input_path)  # a missing or unusable input fails here, before Ray starts
    out = open_output(output)  # and so do a bad bucket, endpoint or credentials
    with OutputLease(out, config.lease_s) as lease:  # one run at a time; a killed run's writers gone first
        return _run_caption_job(input_path, out, config, lease, address, limit, loader, retry_errors,
                                allow_config_change, progress_s)


def _run_caption_job(input_path: str, out: OutputLocation, config: CaptionJobConfig, lease: OutputLease,
                     address: str | None, limit: int | None, loader: Callable | None, retry_errors: str | None,
                     allow_config_change: bool, progress_s: float | None) -> RunSummary:
    import ray
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    job = job_record.load(out)
    identity = {"input": redact(input_path), "model": config.model, "prompt": config.prompt,
                "sparsity": config.sparsity.to_dict(), "max_new_tokens": config.max_new_tokens}
    passes = retry_passes(job.get("retry_pending"), retry_errors)
    changes = job_record.identity_changes(job, identity)
    if changes and not allow_config_change:
        raise ValueError(f"output {out.uri} holds a job with another configuration ({'; '.join(changes)}); "
                         "resume with the same one, choose a new output, or pass --allow-config-change")
    _init_ray(address or ("auto" if config.serve_app else None), config)
    if config.serve_app:
        _check_serve_app(config.serve_app)
    ds, spec = open_input(input_path, config.columns)
    for which in passes:
        job["retry_pending"] = which  # from here until it is done, every later run finishes this pass first
        job_record.save(out, job)
        drop_error_rows(out, CHECKPOINT_DIR, spec.id_column, which)
        job.pop("retry_pending")
    if passes:
        job["total_rows"] = rows_in_output(out)  # from the footers: exact even after a retry that was cut short
        job_record.save(out, job)
    done = job["total_rows"] if job.get("total_rows") is not None else rows_in_output(out)
    controller = _job_controller(config)
    rows_total = None
    if controller is not None and ray.get(controller.status.remote())["sla"]["offline"]["deadline_s"]:
        rows_total = _rows_to_do(ds, done, limit)  # the deadline target needs it (counts the input once)
        log.info("deadline target: %d rows to do", rows_total)
    elif progress_s and spec.kind == "parquet":  # from the files' footers; other inputs would have to be read
        rows_total = _rows_to_do(ds, done, limit)
    # The plan reads the context its dataset was created with (a copy), so the checkpoint goes there; every
    # dataset derived below inherits it. Kept after success: a rerun must still see which ids are done.
    ds.context.checkpoint_config = CheckpointConfig(
        id_column=spec.id_column, checkpoint_path=out.join(CHECKPOINT_DIR), override_filesystem=out.fs,
        delete_checkpoint_on_success=False)
    decode, generate = build_stages(config, spec, loader)
    # Readers may return a whole file (or several) as one block; a block is the unit that flows through the
    # stages and is committed to the output, so cut them to decode-batch size (streaming, no shuffle).
    ds = ds.repartition(target_num_rows_per_block=config.decode_batch_size)
    if limit is not None:  # N more rows: after the read's checkpoint filter, behind a map the limit cannot move
        # past. A cheap pass-through map, not the decode: tasks the limit cancels must not be importing torch
        # (a cancelled import leaves the worker, which the next run reuses, with a half-initialised module).
        ds = ds.map_batches(_pass_through, batch_format="pyarrow", zero_copy_batch=True).limit(limit)
    ds = ds.map_batches(decode.udf, fn_kwargs=decode.kwargs, batch_size=config.decode_batch_size,
                        batch_format="numpy", num_cpus=config.decode_num_cpus,
                        compute=ray.data.TaskPoolStrategy(size=config.decode_tasks))
    pool = config.actors
    if config.serve_app:  # light callers; the engines are the app's replicas
        compute, num_cpus, num_gpus = ray.data.ActorPoolStrategy(size=config.serve_callers), 0.1, 0
    else:  # several batches per actor at once, each on its own thread, all feeding the actor's one engine loop
        compute = ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                             max_concurrent_calls_per_actor=config.batches_in_flight,
                                             enable_true_multi_threading=True)
        num_cpus, num_gpus = pool.num_cpus, pool.num_gpus
    ds = ds.map_batches(generate.udf, fn_constructor_kwargs=generate.kwargs, batch_size=config.batch_size,
                        batch_format="numpy", compute=compute, num_cpus=num_cpus, num_gpus=num_gpus)
    # Ray Data's actor pools restart a dead actor and retry its batch by default (max_restarts=-1,
    # max_task_retries=-1); the job relies on that and tests it.
    before = set(out.parquet_files())
    header = {"input": redact(input_path), "input_kind": spec.kind, "id_column": spec.id_column, "total_rows": done}
    run = job_record.start_run(out, job, identity, header, {"limit": limit, "retry_errors": retry_errors,
                                                            "config": config.to_dict()})
    started = time.perf_counter()
    if controller is not None:
        ray.get(controller.start_offline_job.remote(rows_total, time.time()))
    reporter = (ProgressReporter(CommittedRows(out, CHECKPOINT_DIR).poll, rows_total, progress_s)
                if progress_s else contextlib.nullcontext())
    lease.writing()
    try:
        with reporter:
            ds.write_parquet(out.path, filesystem=out.fs, min_rows_per_file=config.rows_per_file,
                             ray_remote_args={"num_cpus": WRITE_NUM_CPUS})
    except BaseException as e:
        job_record.finish_run(out, job, run, "failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    finally:
        if controller is not None:
            ray.get(controller.end_offline_job.remote())
    wall = time.perf_counter() - started
    summary = summarize(out, set(out.parquet_files()) - before, wall, done)
    job_record.finish_run(out, job, run, "finished", **asdict(summary))
    return summary
