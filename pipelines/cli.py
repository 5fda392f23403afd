"""`dynllava caption`: the offline job's command line (registered into the `dynllava` command)."""

from __future__ import annotations

import argparse

from dynllava.row_errors import RETRY_CHOICES, TRANSIENT

DEFAULT_CONFIG = "configs/caption.yaml"


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of rows, got {value}")
    return n


def cmd_caption(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.caption import run_caption_job
    from pipelines.config import CaptionJobConfig

    if args.config:
        config = CaptionJobConfig.from_yaml(args.config)
    elif Path(DEFAULT_CONFIG).is_file():
        config = CaptionJobConfig.from_yaml(DEFAULT_CONFIG)
    else:
        config = CaptionJobConfig()
    config = config.with_overrides(model=args.model, prompt=args.prompt, vision_keep=args.vision_keep,
                                   text_keep=args.text_keep, vision_scorer=args.vision_scorer,
                                   text_scorer=args.text_scorer, batch_size=args.batch_size,
                                   serve_app=args.serve_app, sla=args.sla,
                                   controller=True if args.controller else None)
    summary = run_caption_job(args.input, args.output, config, address=args.address, limit=args.limit,
                              retry_errors=args.retry_errors, allow_config_change=args.allow_config_change,
                              progress_s=args.progress_s or None)
    print(summary.table())
    if summary.error_examples:
        print("errors, for example:\n  " + "\n  ".join(summary.error_examples))
    print(f"output: {args.output} (job record: {args.output}/_job.json)")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    from pipelines.grade import grade_output

    summary, n = grade_output(args.input, args.output)
    print(f"graded {n} rows of {args.output} against {args.input}:")
    for key, value in summary.items():
        print(f"  {key:<24} {value:.3f}")
    return 0


def register(sub) -> None:
    """Add the `caption` subcommand to the `dynllava` parser's subparsers."""
    c = sub.add_parser(
        "caption", help="caption or answer a large image dataset on Ray Data (resumable)",
        description="Stream an image(-text) dataset through a pool of engine actors and write one Parquet row "
                    "per input row (id, caption, error, finish_reason, kept counts, KV bytes, latency, model, "
                    "sparsity) plus DIR/_job.json. Rerunning on the same output folder processes only the ids "
                    "that have no row yet. Bad rows get an `error` and the job goes on.")
    c.add_argument("--input", required=True,
                   help="Parquet file/folder (columns image bytes or image_path, optional id, prompt), a folder of "
                        "images (jpg/png/webp/gif), or JSONL (image_path or base64 image, prompt); local or any "
                        "filesystem pyarrow handles (s3://, gs://, ...)")
    c.add_argument("--output", required=True,
                   help="output folder, local or any filesystem pyarrow handles (s3://, gs://, abfs://, file://); "
                        "resumes when it holds an earlier run. Credentials come from the environment")
    c.add_argument("--model", default=None, help="tiny (default), a local HF LLaVA directory, or a model YAML")
    c.add_argument("--config", default=None, help=f"job YAML (default: {DEFAULT_CONFIG} when present)")
    c.add_argument("--address", default=None, help="an existing Ray cluster: auto or ray://HOST:PORT "
                                                   "(default: start Ray locally)")
    c.add_argument("--vision-keep", type=float, default=None, help="override the config's vision_keep")
    c.add_argument("--text-keep", type=float, default=None, help="override the config's text_keep")
    c.add_argument("--vision-scorer", default=None, help="override the config's vision_scorer")
    c.add_argument("--text-scorer", default=None, help="override the config's text_scorer")
    c.add_argument("--prompt", default=None, help="prompt for rows without their own (default from config)")
    c.add_argument("--batch-size", type=int, default=None, help="rows per Ray Data batch handed to an engine actor (default from config)")
    c.add_argument("--limit", type=_positive, default=None,
                   help="process at most N more rows in this run (rows already in the output do not count), "
                        "e.g. to work through a big input in slices")
    c.add_argument("--retry-errors", nargs="?", const=TRANSIENT, default=None, choices=RETRY_CHOICES,
                   help="first take the output's error rows out (and their ids out of the checkpoint) so this run "
                        "does them again; every id still ends up exactly once. Plain --retry-errors redoes the "
                        "transient ones (an image URI that could not be read, out of memory, an engine failure: "
                        "error_kind 'transient'); --retry-errors all also redoes the rows' own faults (an "
                        "unreadable or missing image, an empty prompt, a prompt over the context: 'input'), "
                        "e.g. after uploading the missing images or raising a limit")
    c.add_argument("--progress-s", type=float, default=10.0,
                   help="print rows done, rows/s and the time left (Parquet inputs) every so many seconds, from the "
                        "committed checkpoint (default 10; 0: off). Ray Data's own progress bars show on a terminal")
    c.add_argument("--allow-config-change", action="store_true",
                   help="resume an output whose record has another input, model, prompt, sparsity or "
                        "max_new_tokens (refused by default: its rows would mix two jobs)")
    c.add_argument("--serve-app", default=None,
                   help="send rows through the replicas of this running `dynllava serve` app (shared with online "
                        "traffic) instead of starting engine actors; connects to the running cluster (--address "
                        "auto unless given). --model must name the model the app serves (its image geometry)")
    c.add_argument("--controller", action="store_true",
                   help="engine actors report to the cluster controller and follow its sparsity orders (starts "
                        "one with --sla when none runs); the summary then shows the sparsity over time")
    c.add_argument("--sla", default=None, help="SLA YAML for that controller: rows/s or deadline target, memory "
                                               "ceiling, quality floor (default: configs/sla.yaml when present)")
    c.set_defaults(func=cmd_caption)
    g = sub.add_parser("grade", help="grade a caption job's output against the references in its input",
                       description="For inputs made by `dynllava data shapes` (columns reference, task): caption "
                                   "attribute F1 and VQA accuracy of the captions in a job's output folder.")
    g.add_argument("--input", required=True, help="the job's input Parquet (with reference and task columns)")
    g.add_argument("--output", required=True, help="the job's output folder")
    g.set_defaults(func=cmd_grade)
