"""`dynllava eval --data`: quality of dense and sparse settings on the user's own rows (Parquet or JSONL with an
image, a prompt and a reference answer; optional `task` and `id`), side by side with the keep ratios achieved
and the FLOPs / KV bytes saved.

The rows go through the caption job's own stages (one definition of an input): `pipelines.sources` reads and
resolves the columns, `decode_batch` reads and checks each image, `GenerateStage` runs the engine. Small inputs
run in this process (each chunk of rows is decoded once and answered under every setting); large ones run
the caption job on Ray Data once per setting and join its output to the references by id. Answers are graded
by `dynllava.row_grading`; the references of long answers are also scored by perplexity, teacher-forced through
the same sparse engine, in this process. A row that cannot be answered or graded (no reference, no image, an
empty prompt, a prompt over the context) gets its error in `rows.parquet` and is counted, never dropped.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dynllava.config import SparsityConfig, setting_label
from dynllava.data.grading import F1Counts
from dynllava.row_errors import INPUT, TRANSIENT
from dynllava.row_grading import Grade, Reference, grade, reference_of
from pipelines.config import CaptionJobConfig, Columns

log = logging.getLogger(__name__)
IN_PROCESS_MAX_ROWS = 5000  # runner "auto": inputs up to this many rows run in this process
PERPLEXITY_BATCH = 16  # references teacher-forced together
CHUNK_ROWS = 128  # rows decoded at once in this process (pixels of one chunk are held for every setting)
NO_REFERENCE = "no reference answer: the row cannot be graded (empty or missing reference column)"
NOT_ANSWERED = "no answer in the caption job's output (rerun eval: the job resumes where it stopped)"


@dataclass(frozen=True)
class EvalData:
    """What to evaluate on: the input, its column names and how many rows."""

    path: str  # Parquet or JSONL file or folder, local or a pyarrow URI
    columns: Columns = field(default_factory=Columns)  # id / image / image_path / prompt column names
    reference_column: str = "reference"  # a string or a list of strings (e.g. VQAv2's ten answers) per row
    task_column: str = "task"  # optional: vqa* = short answer; caption / describe / other = long answer
    limit: int | None = None  # the first N rows only


@dataclass
class SettingResult:
    """One setting's quality and cost over the input. Ratios are achieved (counted), not requested; savings are
    1 - sparse / dense. Metrics that apply to no row are None."""

    label: str  # "dense", "vision learned 0.2, text learned 0.5", ...
    sparsity: dict  # the SparsityConfig as a dict
    n_rows: int  # input rows
    n_graded: int  # rows answered and graded
    errors: dict  # error kind -> rows (input: the row's own fault; transient: retry may help)
    score: float  # mean per-row quality in [0, 1] (row_grading: VQA accuracy / attribute F1 / token F1)
    vqa_accuracy: float | None  # short answers: VQAv2 accuracy
    exact_match: float | None  # short answers
    token_f1: float | None  # every graded row
    shapes_caption_f1: float | None  # shape-scene captions: micro attribute F1
    perplexity: float | None  # long answers' references, teacher-forced through this setting
    image_keep: float
    text_keep: float
    flops_saved: float
    kv_bytes_saved: float


@dataclass
class Tally:
    """Running sums for one setting (grades, errors by kind, kept / total token counts, FLOPs, KV bytes)."""

    grades: list[Grade] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    image: list[int] = field(default_factory=lambda: [0, 0])  # kept, total
    text: list[int] = field(default_factory=lambda: [0, 0])  # admitted, decided
    flops: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sparse, dense
    kv: list[float] = field(default_factory=lambda: [0.0, 0.0])  # peak, dense equivalent
    nll: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sum, tokens


def _add_output(tally: Tally, out: dict[str, np.ndarray], refs: dict[str, Reference | None],
                rows: list[dict[str, Any]], label: str) -> None:
    """Grade one batch of the generate stage's output columns into the tally and the per-row records."""
    for i, row_id in enumerate(out["id"]):
        row_id = str(row_id)
        error, kind = out["error"][i], out["error_kind"][i]
        answer = out["caption"][i]
        if error is None and refs.get(row_id) is None:  # answered (on Ray Data every row is), but ungradable
            error, kind, answer = NO_REFERENCE, INPUT, None
        record = {"id": row_id, "setting": label, "answer": answer, "error": error, "error_kind": kind,
                  "score": None, "vqa": None, "exact": None, "f1": None}
        if error is not None:
            tally.errors[kind or "transient"] += 1
        else:
            g = grade(str(answer), refs[row_id])
            tally.grades.append(g)
            record.update(score=g.score, vqa=g.vqa, exact=g.exact, f1=g.f1)
            tally.image[0] += int(out["n_image_kept"][i])
            tally.image[1] += int(out["n_image_tokens"][i])
            tally.text[0] += int(out["n_text_admitted"][i])
            # every returned token was fed back except the last one of a length-stopped answer
            tally.text[1] += int(out["n_text_generated"][i]) - (out["finish_reason"][i] == "length")
            tally.flops[0] += float(out["flops_sparse"][i])
            tally.flops[1] += float(out["flops_dense"][i])
            tally.kv[0] += float(out["kv_bytes_peak"][i])
            tally.kv[1] += float(out["kv_bytes_dense"][i])
        rows.append(record)


def read_answers(output: str | Path) -> Iterator[dict[str, np.ndarray]]:
    """A caption job's output files, one column batch each. A file an interrupted run left half-written (never
    committed; a rerun of the job removes it) is skipped with a warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.output import existing_output

    out = existing_output(output)
    unreadable = []
    for name in sorted(out.parquet_files()):
        try:
            table = pq.read_table(out.join(name), filesystem=out.fs)
        except (OSError, pa.ArrowInvalid):
            unreadable.append(name)
            continue
        yield _numpy_batch(table)
    if unreadable:
        log.warning("skipped %d unreadable output file(s), left by an interrupted run and not committed (a rerun "
                    "of the job removes them): %s", len(unreadable), ", ".join(unreadable[:5]))


def grade_job_output(output: str | Path, refs: dict[str, Reference | None], label: str, tally: Tally,
                     rows: list[dict[str, Any]]) -> set[str]:
    """Grade every answer in a caption job's output folder against `refs` (joined by id) into the tally and the
    per-row records; returns the ids answered. Ids not in `refs` are ignored (another input's rows)."""
    answered: set[str] = set()
    for batch in read_answers(output):
        keep = np.array([str(i) in refs for i in batch["id"]], dtype=bool)
        batch = {k: v[keep] for k, v in batch.items()}
        before = len(rows)
        _add_output(tally, batch, refs, rows, label)
        answered.update(r["id"] for r in rows[before:])
    return answered


def say(line: str) -> None:
    """Progress to stdout, flushed (a log file or a pipe sees it when it happens)."""
    print(line, flush=True)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def setting_result(tally: Tally, setting: SparsityConfig, n_rows: int) -> SettingResult:
    """A setting's summary from its tally: mean grades, achieved keep ratios, savings (KV only with a cache)."""
    grades = tally.grades
    shapes = F1Counts()
    for g in grades:
        if g.shapes_f1:
            shapes.add(F1Counts(*g.shapes_f1))
    kv_cache = setting.mode == "kv_cache"
    return SettingResult(
        label=setting_label(setting), sparsity=setting.to_dict(), n_rows=n_rows, n_graded=len(grades),
        errors=dict(tally.errors), score=_mean([g.score for g in grades]) or 0.0,
        vqa_accuracy=_mean([g.vqa for g in grades if g.vqa is not None]),
        exact_match=_mean([g.exact for g in grades if g.exact is not None]),
        token_f1=_mean([g.f1 for g in grades]),
        shapes_caption_f1=shapes.f1 if shapes.reference else None,
        perplexity=math.exp(tally.nll[0] / tally.nll[1]) if tally.nll[1] else None,
        image_keep=tally.image[0] / tally.image[1] if tally.image[1] else 1.0,
        text_keep=tally.text[0] / tally.text[1] if tally.text[1] else 1.0,
        flops_saved=1 - tally.flops[0] / tally.flops[1] if tally.flops[1] else 0.0,
        kv_bytes_saved=1 - tally.kv[0] / tally.kv[1] if tally.kv[1] and kv_cache else 0.0)


def job_references(data: EvalData):
    """The input's ids, references and tasks (no images), keyed as the caption job keys its output rows: the id
    column, else the image path. Returns (table, InputSpec)."""
    from pipelines.sources import read_table

    fields = [data.columns.id, data.columns.image_path, data.reference_column, data.task_column]
    return read_table(data.path, data.columns, fields=fields, number_rows=False)


def references(table, data: EvalData, id_column: str) -> dict[str, Reference | None]:
    """id -> grading key (None: the row has no reference) for every row of an Arrow table. Duplicate ids are
    refused: rows are joined to answers by id."""
    if data.reference_column not in table.column_names:
        raise ValueError(f"input {data.path}: no {data.reference_column!r} column with the reference answers "
                         f"(columns are {table.column_names}; set --reference-column)")
    ids = [str(v) for v in table.column(id_column).to_pylist()]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"input {data.path}: the id column {id_column!r} repeats ({dup!r}); answers are joined "
                         f"to references by id, so ids must be unique (give each row a unique id; evaluated in "
                         f"this process, an input without an id column is numbered by row)")
    tasks = (table.column(data.task_column).to_pylist() if data.task_column in table.column_names
             else [None] * len(ids))
    return {i: reference_of(r, t) for i, r, t in zip(ids, table.column(data.reference_column).to_pylist(), tasks)}


def _numpy_batch(table) -> dict[str, np.ndarray]:
    """An Arrow table as Ray Data's numpy batch format (object arrays for strings, bytes and lists)."""
    out = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        array = np.empty(len(values), dtype=object)
        array[:] = values
        out[name] = array
    return out


def _mark_ungradable(decoded: dict[str, np.ndarray], refs: dict[str, Reference | None]) -> None:
    """Rows without a reference are not answered: they get an input error (decode's own errors stay)."""
    for i, row_id in enumerate(decoded["id"]):
        if refs[str(row_id)] is None and decoded["error"][i] is None:
            decoded["error"][i], decoded["error_kind"][i] = NO_REFERENCE, INPUT


def _perplexity(model, decoded: dict[str, np.ndarray], refs: dict[str, Reference | None], budget: int,
                settings: list[SparsityConfig], tallies: list[Tally]) -> int:
    """Teacher-forced NLL of up to `budget` long references of this chunk under every setting. Returns how
    many rows it scored. Rows the engine refuses (e.g. reference too long for the context) are skipped."""
    from dynllava.engine import teacher_forced_nll
    from dynllava.inputs import normalise_pixels

    long = [i for i, row_id in enumerate(decoded["id"])
            if decoded["error"][i] is None and refs[str(row_id)].long][:budget]
    if not long:
        return 0
    tok = model.processor.tokenizer
    images = normalise_pixels(model.processor, decoded["pixels"][long], decoded["image_size"][long])
    prompts = [model.format_prompt(str(decoded["prompt"][i])) for i in long]
    targets = [tok.encode(" " + refs[str(decoded["id"][i])].references[0], add_special_tokens=False)
               + [tok.eos_token_id] for i in long]
    ok = []
    for j in range(len(long)):  # what the engine would refuse (e.g. a reference too long for the context)
        try:
            model.prepare([images[j]], [prompts[j]], len(targets[j]))
            ok.append(j)
        except ValueError as e:
            log.info("perplexity skips row %s: %s", decoded["id"][long[j]], e)
    for start in range(0, len(ok), PERPLEXITY_BATCH):
        batch = ok[start : start + PERPLEXITY_BATCH]
        for setting, tally in zip(settings, tallies):
            for total, n in teacher_forced_nll(model, [images[j] for j in batch], [prompts[j] for j in batch],
                                               [targets[j] for j in batch], setting):
                tally.nll[0] += total
                tally.nll[1] += n
    return len(ok)


def evaluate_in_process(data: EvalData, settings: list[SparsityConfig], config: CaptionJobConfig, model, *,
                        perplexity_rows: int = 64, progress: Callable[[str], None] = say,
                        ) -> tuple[list[SettingResult], list[dict[str, Any]]]:
    """Every setting on every row, in this process, with `model` (a DynamicLlava loaded from config.model).
    Returns (one result per setting, per-row records)."""
    from pipelines.sources import read_table
    from pipelines.stages import GenerateStage, decode_batch

    table, spec = read_table(data.path, data.columns, data.limit)
    if table.num_rows == 0:
        raise ValueError(f"input {data.path}: no rows")
    refs = references(table, data, spec.id_column)
    for s in settings:
        model.check_scorers(s)  # a learned scorer without predictors fails here, before any work
    stage = GenerateStage(config.model, settings[0].to_dict(), config.max_new_tokens, loader=lambda *a, **k: model,
                          engine=config.engine_limits())
    tallies = [Tally() for _ in settings]
    rows: list[dict[str, Any]] = []
    ppl_left = perplexity_rows
    try:
        for start in range(0, table.num_rows, CHUNK_ROWS):
            chunk = _numpy_batch(table.slice(start, CHUNK_ROWS))
            decoded = decode_batch(chunk, spec=spec, model=config.model, default_prompt=config.prompt,
                                   max_pixels=config.max_image_pixels)
            decoded["id"] = np.array([str(v) for v in decoded["id"]], dtype=object)
            _mark_ungradable(decoded, refs)
            for setting, tally in zip(settings, tallies):
                stage.set_sparsity(setting.to_dict())
                _add_output(tally, stage(decoded), refs, rows, setting_label(setting))
            if ppl_left > 0:
                ppl_left -= _perplexity(model, decoded, refs, ppl_left, settings, tallies)
            progress(f"{min(start + CHUNK_ROWS, table.num_rows)}/{table.num_rows} rows x {len(settings)} settings")
    finally:
        stage.engine.stop()
    return [setting_result(t, s, table.num_rows) for t, s in zip(tallies, settings)], rows


def evaluate_on_ray(data: EvalData, settings: list[SparsityConfig], config: CaptionJobConfig, model,
                    output: str | Path, *, address: str | None = None, perplexity_rows: int = 64,
                    progress: Callable[[str], None] = say) -> tuple[list[SettingResult], list[dict[str, Any]]]:
    """Every setting as a caption job on Ray Data (`output/answers/NN`, resumable: a rerun finishes what a killed
    one left), each joined to the references by id; perplexity of the first long references in this process."""
    import dataclasses

    from pipelines.caption import run_caption_job
    from pipelines.sources import read_table
    from pipelines.stages import decode_batch

    if data.limit:
        raise ValueError("--limit selects rows in process only; on Ray Data evaluate a file of the rows you want")
    table, spec = job_references(data)
    refs = references(table, data, spec.id_column)
    tallies = [Tally() for _ in settings]
    rows: list[dict[str, Any]] = []
    for n, (setting, tally) in enumerate(zip(settings, tallies)):
        answers = Path(output) / "answers" / f"{n:02d}"
        progress(f"[{n + 1}/{len(settings)}] {setting_label(setting)}: caption job -> {answers}")
        run_caption_job(data.path, answers, dataclasses.replace(config, sparsity=setting), address=address)
        answered = grade_job_output(answers, refs, setting_label(setting), tally, rows)
        for row_id in refs.keys() - answered:  # never silently short: a row the job did not write is an error
            tally.errors[TRANSIENT] += 1
            rows.append({"id": row_id, "setting": setting_label(setting), "answer": None, "error": NOT_ANSWERED,
                         "error_kind": TRANSIENT, "score": None, "vqa": None, "exact": None, "f1": None})
    if perplexity_rows > 0:
        head, head_spec = read_table(data.path, data.columns, limit=max(CHUNK_ROWS, 4 * perplexity_rows),
                                     number_rows=False)  # keyed as the references: the job's ids
        decoded = decode_batch(_numpy_batch(head), spec=head_spec, model=config.model, default_prompt=config.prompt,
                               max_pixels=config.max_image_pixels)
        decoded["id"] = np.array([str(v) for v in decoded["id"]], dtype=object)
        _mark_ungradable(decoded, refs)
        _perplexity(model, decoded, refs, perplexity_rows, settings, tallies)
    return [setting_result(t, s, len(refs)) for t, s in zip(tallies, settings)], rows


def markdown_table(results: list[SettingResult]) -> str:
    """One line per setting: quality (dash where a metric does not apply), keep ratios and savings."""
    def cell(v: float | None, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    head = ("| setting | score | VQA acc | exact | token F1 | shapes F1 | perplexity | image keep | text keep | "
            "FLOPs saved | KV saved | graded | errors |\n" + "| --- " * 13 + "|\n")
    lines = [f"| {r.label} | {r.score:.3f} | {cell(r.vqa_accuracy)} | {cell(r.exact_match)} | {cell(r.token_f1)} | "
             f"{cell(r.shapes_caption_f1)} | {cell(r.perplexity)} | {r.image_keep:.3f} | {r.text_keep:.3f} | "
             f"{r.flops_saved:+.1%} | {r.kv_bytes_saved:+.1%} | {r.n_graded}/{r.n_rows} | "
             f"{', '.join(f'{n} {k}' for k, n in sorted(r.errors.items())) or 0} |" for r in results]
    return head + "\n".join(lines) + "\n"


def write_report(results: list[SettingResult], rows: list[dict[str, Any]], output: str | Path, title: str,
                 ) -> dict[str, Path]:
    """eval.md (the table), eval.json (the results), rows.parquet (every row's answer, grades or error per
    setting) and eval.png (quality vs keep ratio; needs the `plot` extra) in `output`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dynllava.plots import plot_eval_sweep

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "eval.md", "json": out / "eval.json", "rows": out / "rows.parquet"}
    paths["markdown"].write_text(f"# {title}\n\n" + markdown_table(results))
    paths["json"].write_text(json.dumps({"title": title, "results": [asdict(r) for r in results]}, indent=1))
    pq.write_table(pa.Table.from_pylist(rows), paths["rows"])
    png = plot_eval_sweep([asdict(r) for r in results], out / "eval.png", {"score": "score (mean per row, 0-1)"},
                          title)
    if png:
        paths["png"] = png
    return paths
