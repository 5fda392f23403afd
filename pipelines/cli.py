"""`dynllava caption`: the offline job's command line (registered into the `dynllava` command)."""

from __future__ import annotations

import argparse

from dynllava.row_errors import RETRY_CHOICES, TRANSIENT
from pipelines.calibrate import TEXT_GRID, VISION_GRID

DEFAULT_CONFIG = "configs/caption.yaml"


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of rows, got {value}")
    return n


def _base_config(path: str | None):
    """The caption job's config: `path`, else configs/caption.yaml when present, else the defaults."""
    from pathlib import Path

    from pipelines.config import CaptionJobConfig

    path = path or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    return CaptionJobConfig.from_yaml(path) if path else CaptionJobConfig()


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more rows, got {value}")
    return n


def cmd_caption(args: argparse.Namespace) -> int:
    from pipelines.caption import run_caption_job

    config = _base_config(args.config).with_overrides(model=args.model, prompt=args.prompt, vision_keep=args.vision_keep,
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


def _keeps(value: str) -> tuple[float, ...]:
    """"1,0.5,0.2" -> (1.0, 0.5, 0.2); each in (0, 1]."""
    try:
        keeps = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated keep ratios, got {value!r}") from None
    if not keeps or not all(0 < k <= 1 for k in keeps):
        raise argparse.ArgumentTypeError(f"keep ratios must be in (0, 1], got {value!r}")
    return keeps


def _job_config(args: argparse.Namespace):
    """The caption job's config (_base_config) with the flags that eval and calibrate share applied."""
    from pipelines.config import Columns

    config = _base_config(args.config)
    columns = Columns(**{k: getattr(args, f"{k}_column") or getattr(config.columns, k)
                         for k in ("id", "image", "image_path", "prompt")})
    return config.with_overrides(model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                 device=args.device, dtype=args.dtype, columns=columns)


def _evaluator(args: argparse.Namespace, config, model, output):
    """settings -> (results, rows) on --data, in this process or on Ray Data (--runner); `model` is the loaded
    model (answers in process, perplexity either way)."""
    from pipelines.evaluate import IN_PROCESS_MAX_ROWS, EvalData, evaluate_in_process, evaluate_on_ray
    from pipelines.sources import count_rows

    data = EvalData(args.data, config.columns, args.reference_column, args.task_column, args.limit)
    runner = args.runner
    if runner == "auto":
        limit = IN_PROCESS_MAX_ROWS
        small = data.limit is not None or count_rows(data.path, stop_after=limit) <= limit
        runner = "local" if small else "ray"  # --limit selects rows in process only
    if runner == "ray" and output is None:
        raise ValueError("--runner ray needs --output (the answers of each setting are kept there)")

    def evaluate(settings):
        if runner == "local":
            return evaluate_in_process(data, settings, config, model, perplexity_rows=args.perplexity_rows)
        return evaluate_on_ray(data, settings, config, model, output, address=args.address,
                               perplexity_rows=args.perplexity_rows)
    return evaluate


def _load_model(config):
    from dynllava.model import DynamicLlava

    return DynamicLlava.from_pretrained(config.model, device=config.device, dtype=config.dtype)


def cmd_eval_data(args: argparse.Namespace) -> int:
    """`dynllava eval --data`: dense and the chosen setting(s) side by side on the user's rows."""
    from dynllava.cli import _sparsity_from
    from dynllava.config import SparsityConfig
    from dynllava.eval import sweep_configs
    from pipelines.evaluate import markdown_table, write_report

    if not args.data:
        return args.split_func(args)
    config = _job_config(args)
    model = _load_model(config)
    if args.sweep:
        settings = sweep_configs(learned=model.predictors is not None)
    else:
        chosen = _sparsity_from(args, model.default_sparsity)  # as `eval` on the split: the model's own setting
        settings = [SparsityConfig()] + ([] if chosen.is_dense else [chosen])
    results, rows = _evaluator(args, config, model, args.output)(settings)
    print(markdown_table(results))
    if args.output:
        paths = write_report(results, rows, args.output, f"{config.model} on {args.data}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import yaml
    from pathlib import Path

    from cluster.sla import DEFAULT_SLA
    from pipelines.calibrate import calibrate

    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0 points, got {args.tolerance}")
    sla_path = args.sla or (DEFAULT_SLA if Path(DEFAULT_SLA).is_file() else None)
    base = (yaml.safe_load(Path(sla_path).read_text()) or {}) if sla_path else {}
    config = _job_config(args)
    model = _load_model(config)
    paths = calibrate(_evaluator(args, config, model, Path(args.output) / "eval"), model.predictors is not None,
                      args.tolerance, args.confidence, base, args.output, f"{config.model} on {args.data}",
                      vision=args.vision_grid, text=args.text_grid)
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(f"use it: dynllava serve --sla {paths['sla']}  (or dynllava caption --controller --sla {paths['sla']})")
    return 0


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    """The flags of eval --data and calibrate: the rows, their columns, the job config, where to run."""
    p.add_argument("--data", required=required, default=None,
                   help="Parquet or JSONL file/folder, one row per question: an image (bytes, base64 in JSONL, or "
                        "image_path), a prompt, a reference answer (a string, or a list such as VQAv2's ten human "
                        "answers); optional task (vqa* = short answer; caption / describe / anything else = long) "
                        "and id")
    p.add_argument("--limit", type=_positive, default=None, help="only the first N rows of --data")
    p.add_argument("--reference-column", default="reference", help="column of reference answers (default reference)")
    p.add_argument("--task-column", default="task", help="optional task column (default task)")
    for name in ("id", "image", "image_path", "prompt"):
        p.add_argument(f"--{name.replace('_', '-')}-column", dest=f"{name}_column", default=None,
                       help=f"the {name} column (default from the job config: {name})")
    p.add_argument("--config", default=None, help=f"caption job YAML for the prompt, max_new_tokens, engine limits "
                                                  f"and columns (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="per answer (default from the config)")
    p.add_argument("--prompt", default=None, help="prompt for rows without their own (default from the config)")
    p.add_argument("--runner", choices=("auto", "local", "ray"), default="auto",
                   help="local: in this process (each chunk of rows decoded once for every setting); ray: one "
                        "caption job per setting on Ray Data, resumable; auto (default): local up to 5000 rows")
    p.add_argument("--address", default=None, help="with --runner ray: an existing Ray cluster (default: local)")
    p.add_argument("--perplexity-rows", type=_non_negative, default=64,
                   help="long-answer rows whose reference perplexity is measured (teacher-forced, in this "
                        "process; default 64, 0: none)")


def cmd_grade(args: argparse.Namespace) -> int:
    from pipelines.config import Columns
    from pipelines.evaluate import EvalData
    from pipelines.grade import grade_lines, grade_output

    data = EvalData(args.input, Columns(id=args.id_column), reference_column=args.reference_column,
                    task_column=args.task_column)
    print(f"{args.output} against {args.input}:")
    print("\n".join(grade_lines(grade_output(args.input, args.output, data))))
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
    e = sub.choices["eval"]  # dynllava's own `eval` (the shape scenes' test split) learns --data here
    e.description += (" With --data, the same on your own rows (Parquet or JSONL): VQAv2 accuracy, exact match "
                      "and token F1 for short answers, token F1 and reference perplexity for long ones, the shapes "
                      "grader for shape scenes; dense beside the flags' setting (or the whole --sweep); "
                      "--output gets eval.md, eval.json, rows.parquet (every row's answer, grades or error) and "
                      "eval.png.")
    _add_data_args(e, required=False)
    e.set_defaults(func=cmd_eval_data, split_func=e.get_default("func"))
    k = sub.add_parser(
        "calibrate",
        help="measure quality vs sparsity on your rows and write the SLA's ladder down to a measured floor",
        description="Sweep vision_keep x text_keep (learned scorers; without predictors, the best training-free "
                    "scorer per axis) on a sample of your rows, measure each setting's quality loss against dense "
                    "with a confidence interval (paired per-row differences), and write OUTPUT/sla.yaml whose "
                    "ladder runs from dense to the cheapest setting within --tolerance; the controller never goes "
                    "below it. Also calibration.md (each setting, its interval, the rows it needs), "
                    "calibration.json and calibration.png.")
    _add_data_args(k, required=True)
    k.add_argument("--tolerance", type=float, default=1.0,
                   help="most quality loss allowed, in points of the row score x 100 (default 1.0)")
    k.add_argument("--confidence", type=float, default=0.95, help="of the loss interval (default 0.95)")
    k.add_argument("--vision-grid", type=_keeps, default=VISION_GRID,
                   help=f"vision_keep values to try, comma-separated (default {','.join(map(str, VISION_GRID))})")
    k.add_argument("--text-grid", type=_keeps, default=TEXT_GRID,
                   help=f"text_keep values to try, comma-separated (default {','.join(map(str, TEXT_GRID))})")
    k.add_argument("--sla", default=None, help="the SLA to start from (default: configs/sla.yaml when present)")
    k.add_argument("--output", required=True, help="folder for sla.yaml and the report")
    k.add_argument("--model", default=None, help="tiny (default from the config), an HF LLaVA directory or YAML")
    k.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    k.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    k.set_defaults(func=cmd_calibrate)
    g = sub.add_parser("grade", help="grade a caption job's output against the references in its input",
                       description="Join a caption job's output to its input's reference answers by id and grade "
                                   "them as `dynllava eval --data` does: VQAv2 accuracy, exact match and token F1 "
                                   "for short answers, token F1 for long ones, attribute F1 for shape-scene "
                                   "captions; with the keep ratios and FLOPs / KV bytes saved the rows recorded. "
                                   "Works on a job still running: rows not answered yet are counted, not graded.")
    g.add_argument("--input", required=True, help="the job's input (Parquet or JSONL) with a reference column")
    g.add_argument("--output", required=True, help="the job's output folder")
    g.add_argument("--id-column", default="id", help="the id column joining input and output (default id)")
    g.add_argument("--reference-column", default="reference", help="reference answers (default reference)")
    g.add_argument("--task-column", default="task", help="optional task column (default task)")
    g.set_defaults(func=cmd_grade)
