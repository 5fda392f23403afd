"""Quality of a model on the held-out test split of the shape scenes, dense vs sparse: caption attribute F1,
VQA accuracy, reference perplexity (teacher-forced through the same sparse engine), keep ratios achieved and
analytic FLOPs / KV bytes saved. The sweep crosses keep ratios with scorers and writes Markdown, JSON and PNG."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dynllava.config import SparsityConfig, setting_label
from dynllava.data.grading import Scores
from dynllava.data.shapes import SPLIT_SEEDS, Row, make_row
from dynllava.engine import teacher_forced_nll

MAX_NEW_TOKENS = {"caption": 48, "describe": 200, "vqa": 8}
VISION_SWEEP = (1.0, 0.5, 0.35, 0.2, 0.1, 0.05)
VISION_SCORERS = ("learned", "fastv", "stride", "random")
TEXT_SWEEP = (1.0, 0.5, 0.3)
TEXT_SCORERS = ("learned", "recent", "h2o")


@dataclass
class EvalResult:
    """One evaluation point. Ratios are achieved (counted), not requested; savings are 1 - sparse / dense."""

    label: str
    sparsity: dict
    n_rows: int
    caption_attribute_f1: float
    vqa_accuracy: float
    perplexity: float
    image_keep: float
    text_keep: float
    flops_saved: float
    kv_bytes_saved: float
    per_task: dict


def split_rows(n: int, split: str = "test") -> list[Row]:
    """The first n rows of a split (the test split by default; never tune on it)."""
    return [make_row(SPLIT_SEEDS[split], i) for i in range(n)]


def _kind(task: str) -> str:
    return "vqa" if task.startswith("vqa") else task


def evaluate(model, rows: list[Row], sparsity: SparsityConfig, label: str = "", batch_size: int = 16,
             perplexity_rows: int = 32) -> EvalResult:
    """Greedy answers for every row (batched by task), graded; perplexity of the first `perplexity_rows`
    detailed descriptions' references (long answers: where text sparsity acts)."""
    scores = Scores()
    image_total = image_kept = decided = admitted = 0
    flops_dense = flops_sparse = kv_dense = kv_sparse = 0.0
    for kind in ("caption", "describe", "vqa"):
        subset = [r for r in rows if _kind(r.task) == kind]
        for start in range(0, len(subset), batch_size):
            chunk = subset[start : start + batch_size]
            outs = model.generate([r.image for r in chunk], [model.format_prompt(r.prompt) for r in chunk],
                                  sparsity=sparsity, max_new_tokens=MAX_NEW_TOKENS[kind])
            for row, out in zip(chunk, outs):
                scores.add(row.task, out.text, row.reference)
                s = out.stats
                image_total += s.n_image_tokens
                image_kept += s.n_image_kept
                # every returned token was fed back except the last one of a length-stopped answer
                decided += s.n_text_generated - (out.finish_reason == "length")
                admitted += s.n_text_admitted
                flops_dense += s.flops_dense
                flops_sparse += s.flops_sparse
                kv_dense += s.kv_bytes_dense_equivalent
                kv_sparse += s.kv_bytes_peak
    describe = [r for r in rows if r.task == "describe"][:perplexity_rows]
    ppl = float("nan")
    if describe:
        tok = model.processor.tokenizer
        targets = [tok.encode(" " + r.reference, add_special_tokens=False) + [tok.eos_token_id] for r in describe]
        nll, count = 0.0, 0
        for start in range(0, len(describe), batch_size):
            chunk = describe[start : start + batch_size]
            for total, n in teacher_forced_nll(model, [r.image for r in chunk],
                                               [model.format_prompt(r.prompt) for r in chunk],
                                               targets[start : start + batch_size], sparsity):
                nll, count = nll + total, count + n
        ppl = math.exp(nll / count)
    summary = scores.summary()
    return EvalResult(
        label=label or setting_label(sparsity), sparsity=sparsity.to_dict(), n_rows=len(rows),
        caption_attribute_f1=summary["caption_attribute_f1"], vqa_accuracy=summary["vqa_accuracy"], perplexity=ppl,
        image_keep=image_kept / image_total if image_total else 1.0,
        text_keep=admitted / decided if decided else 1.0,
        flops_saved=1 - flops_sparse / flops_dense if flops_dense else 0.0,
        kv_bytes_saved=1 - kv_sparse / kv_dense if kv_dense and sparsity.mode == "kv_cache" else 0.0,
        per_task={k: v for k, v in summary.items() if k.endswith("_score")},
    )


def sweep_configs(learned: bool) -> list[SparsityConfig]:
    """Dense, the paper's setting (learned 0.2 / 0.5), vision_keep x vision scorers (text dense), text_keep x
    text scorers (vision dense). Learned scorers are skipped when the model has no predictors."""
    configs = [SparsityConfig(vision_scorer="stride", text_scorer="recent")]
    if learned:
        configs.append(SparsityConfig(0.2, 0.5, vision_scorer="learned", text_scorer="learned"))
    for scorer in VISION_SCORERS:
        if scorer == "learned" and not learned:
            continue
        configs += [SparsityConfig(v, 1.0, vision_scorer=scorer, text_scorer="recent") for v in VISION_SWEEP if v < 1]
    for scorer in TEXT_SCORERS:
        if scorer == "learned" and not learned:
            continue
        configs += [SparsityConfig(1.0, t, vision_scorer="stride", text_scorer=scorer) for t in TEXT_SWEEP if t < 1]
    return configs


def markdown_table(results: list[EvalResult]) -> str:
    head = ("| setting | caption F1 | VQA acc | perplexity | image keep | text keep | FLOPs saved | KV saved |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    rows = [f"| {r.label} | {r.caption_attribute_f1:.3f} | {r.vqa_accuracy:.3f} | {r.perplexity:.3f} | "
            f"{r.image_keep:.3f} | {r.text_keep:.3f} | {r.flops_saved:+.1%} | {r.kv_bytes_saved:+.1%} |"
            for r in results]
    return head + "\n".join(rows) + "\n"


def target_checks(results: list[EvalResult]) -> list[tuple[str, bool, str]]:
    """The issue's quality targets, each (name, met, what was measured)."""
    by = {r.label: r for r in results}
    dense = by.get("dense")
    checks = []
    if dense:
        checks.append(("dense VQA accuracy >= 0.90", dense.vqa_accuracy >= 0.90, f"{dense.vqa_accuracy:.3f}"))
        checks.append(("dense caption F1 >= 0.90", dense.caption_attribute_f1 >= 0.90,
                       f"{dense.caption_attribute_f1:.3f}"))
    paper = by.get("vision learned 0.2, text learned 0.5")
    if dense and paper:
        dv, df = dense.vqa_accuracy - paper.vqa_accuracy, dense.caption_attribute_f1 - paper.caption_attribute_f1
        checks.append(("learned 0.2/0.5 within 1 point of dense (VQA, F1)", dv <= 0.01 and df <= 0.01,
                       f"VQA -{dv * 100:.1f} pt, F1 -{df * 100:.1f} pt"))
    at = {s: by.get(f"vision {s} 0.1") for s in VISION_SCORERS}
    if all(at.values()):
        mean = {s: (r.vqa_accuracy + r.caption_attribute_f1) / 2 for s, r in at.items()}
        best_other = max(v for s, v in mean.items() if s != "learned")
        checks.append(("learned above fastv, stride, random at vision_keep 0.1", mean["learned"] > best_other,
                       ", ".join(f"{s} {v:.3f}" for s, v in mean.items())))
    text = by.get("text learned 0.5")
    if dense and text:
        rise = text.perplexity / dense.perplexity - 1
        checks.append(("perplexity rise at text_keep 0.5 <= 10%", rise <= 0.10, f"{rise:+.1%}"))
    return checks


def plot(results: list[EvalResult], path: str | Path) -> Path | None:
    """PNG (with the `plot` extra): VQA accuracy and caption F1 vs vision_keep (a line per vision scorer) and vs
    text_keep (a line per text scorer); None without matplotlib."""
    from dynllava.plots import plot_eval_sweep

    return plot_eval_sweep([asdict(r) for r in results], path,
                           {"vqa_accuracy": "VQA accuracy (0-1)", "caption_attribute_f1": "caption attribute F1 (0-1)"},
                           "quality vs sparsity (shape scenes, test split)")


def write_results(results: list[EvalResult], output: str | Path, model_name: str) -> dict[str, Path]:
    """eval.md (table + target checks), eval.json and (with the `plot` extra) eval.png in `output`."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    checks = target_checks(results)
    md = f"# {model_name}: quality vs sparsity (test split, {results[0].n_rows} rows)\n\n" + markdown_table(results)
    if checks:
        md += "\n" + "\n".join(f"- {'met' if ok else 'NOT met'}: {name} ({got})" for name, ok, got in checks) + "\n"
    paths = {"markdown": out / "eval.md", "json": out / "eval.json", "png": out / "eval.png"}
    paths["markdown"].write_text(md)
    paths["json"].write_text(json.dumps({"model": model_name, "results": [asdict(r) for r in results],
                                         "targets": [{"target": n, "met": ok, "measured": g} for n, ok, g in checks]},
                                        indent=1))
    if plot(results, paths["png"]) is None:
        del paths["png"]
    return paths
