"""Mutation check: do the tests catch the bugs they are there to catch?

Each mutation below is a deliberate bug (one exact source edit). For each, this script makes the edit, runs the
tests that should catch it (`pytest -x`), reports CAUGHT or MISSED, and restores the file, whatever happens.
Not collected by pytest (its name does not start with test_); run it by hand after changing a test or the code
it guards:

    .venv/bin/python tests/mutations.py                 # every mutation against its tests
    .venv/bin/python tests/mutations.py --only slack    # mutations whose name contains "slack"
    .venv/bin/python tests/mutations.py --tests tests/dynllava/test_exactness.py   # another set of tests

Exit status 1 if any mutation was missed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ("tests/dynllava/test_reference.py", "tests/dynllava/test_scorers.py", "tests/dynllava/test_ops.py")


@dataclass(frozen=True)
class Mutation:
    """A deliberate bug: replace `old` (which must occur exactly once in `path`) with `new`."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...] = REFERENCE


MUTATIONS = (
    Mutation("fastv reads layer K-2", "dynllava/model.py",
             "if need_attention and i == layer_k - 1:", "if need_attention and i == layer_k - 2:"),
    Mutation("fastv reads the second-to-last query", "dynllava/model.py",
             "q_last = q[rows, :, lengths - 1]", "q_last = q[rows, :, lengths - 2]"),
    Mutation("h2o and fastv read head 0 only", "dynllava/ops.py",
             "return logits.softmax(-1).mean(dim=(1, 2))", "return logits.softmax(-1)[:, 0, 0]"),
    Mutation("positions renumbered after the cut", "dynllava/model.py",
             "cos, sin = ops.gather_tokens(cos, index), ops.gather_tokens(sin, index)",
             "cos, sin = self.rotary(h, torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1))"),
    Mutation("decode position off by one", "dynllava/engine.py",
             "positions = [r.prompt_len + r.n_fed for r in rows]",
             "positions = [r.prompt_len + r.n_fed - 1 for r in rows]"),
    Mutation("an unadmitted token does not see itself", "dynllava/decode_step.py",
             "mask = torch.arange(cache.capacity(group), device=h.device)[None, :] <= lengths[:, None]",
             "mask = torch.arange(cache.capacity(group), device=h.device)[None, :] < lengths[:, None] + (group == 0)"),
    Mutation("every token admitted to layers >= K", "dynllava/engine.py",
             "cache.commit_step(1, admit_tokens(self.text_scorer, scores, rows, active, self.text_dense))",
             "admit_tokens(self.text_scorer, scores, rows, active, self.text_dense); cache.commit_step(1, active)"),
    Mutation("stride slot centres at m", "dynllava/scorers.py",
             "slot_of_next = torch.ceil((order + 1) * k / n_img - 0.5)\n        "
             "slot_of_this = torch.ceil(order * k / n_img - 0.5)",
             "slot_of_next = torch.ceil((order + 1) * k / n_img)\n        "
             "slot_of_this = torch.ceil(order * k / n_img)"),
    Mutation("learned vision margin flipped", "dynllava/scorers.py",
             "margin = logits[..., KEEP] - logits[..., 1 - KEEP]",
             "margin = logits[..., 1 - KEEP] - logits[..., KEEP]"),
    Mutation("admission slack 2 -> 4", "dynllava/scorers.py", "RATE_SLACK_TOKENS = 2.0", "RATE_SLACK_TOKENS = 4.0"),
    Mutation("training: dropped tokens visible to others", "dynllava/train/masked.py",
             "gate = torch.where(eye, torch.ones((), device=q.device), keep[:, None, None, :].float())",
             "gate = torch.ones_like(keep[:, None, None, :].float()).expand(-1, 1, t, t)"),
    Mutation("scenes drawn mirrored", "dynllava/data/shapes.py",
             "cx = (col + 0.5) * cell", "cx = (2 - col + 0.5) * cell", ("tests/dynllava/test_data.py",)),
    Mutation("position names mirrored", "dynllava/data/shapes.py",
             'POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", '
             '"bottom right")',
             'POSITIONS = ("top right", "top", "top left", "right", "center", "left", "bottom right", "bottom", '
             '"bottom left")', ("tests/dynllava/test_data.py",)),
    Mutation("KV bytes counted without the admitted text", "dynllava/cache.py",
             "return sum(g.lengths[row] * g.bytes_per_slot for g in self.groups)",
             "return sum((g.lengths[row] - (g is self.groups[1])) * g.bytes_per_slot for g in self.groups)",
             ("tests/dynllava/test_accounting.py",)),
    Mutation("a restarted controller forgets the levels", "cluster/policy.py",
             "reported = level_of(ctx.sla, snap.sparsity)", "reported = 0",
             ("tests/cluster/test_controller.py::test_floor_then_a_second_replica_and_a_controller_restart",)),
    Mutation("sparse prefill FLOPs charged as dense", "dynllava/engine.py",
             "costs.prefill_flops(self.dims, row.prompt_len, row.n_kept_prompt, self.k, row.n_views,",
             "costs.prefill_flops(self.dims, row.prompt_len, row.prompt_len, self.k, row.n_views,",
             ("tests/dynllava/test_accounting.py",)),
    Mutation("the server imports the pipelines", "cluster/server.py",
             "from dynllava.inputs import normalise_pixels\n",
             "from dynllava.inputs import normalise_pixels\nfrom pipelines.stages import decode_batch  # noqa\n",
             ("tests/test_layering.py",)),
    Mutation("decode FLOPs without the token itself", "dynllava/engine.py",
             "ctx_sparse = row.n_kept_prompt + row.n_admitted + 1",
             "ctx_sparse = row.n_kept_prompt + row.n_admitted", ("tests/dynllava/test_accounting.py",)),
    Mutation("the scheduler ignores the KV budget", "dynllava/scheduler.py",
             "layout.allocation_bytes(reserves + [head.reserve], head.signature[0]) > limits.admission_bytes",
             "False", ("tests/dynllava/test_scheduler.py",)),
    Mutation("a later request overtakes a waiting head", "dynllava/scheduler.py",
             "        if reason is not None:\n            break",
             "        if reason is not None:\n            reason = None\n            continue",
             ("tests/dynllava/test_scheduler.py",)),
    Mutation("a partial character is streamed", "dynllava/streaming.py",
             'if len(full) > len(prefix) and not full.endswith("\\ufffd"):', "if len(full) > len(prefix):",
             ("tests/dynllava/test_streaming.py",)),
    Mutation("streaming decodes the whole answer each step", "dynllava/streaming.py",
             "self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)",
             "self.read_offset = len(self.tokens)", ("tests/dynllava/test_streaming.py",)),
    Mutation("no_cache rows keep the prompt's pruning off", "dynllava/engine.py",
             "            keep[:, :t] = res.keep\n", "            keep[:, :t] = self.valid\n",
             ("tests/dynllava/test_exactness.py",)),
    Mutation("a failed prefill pass fails every request in it", "dynllava/batching.py",
             "                if len(members) > 1:\n                    log.warning(",
             "                if False:\n                    log.warning(", ("tests/dynllava/test_batching.py",)),
    Mutation("a row whose sampling fails takes the step down", "dynllava/engine.py",
             "            if failed is None:\n                raise", "            raise",
             ("tests/dynllava/test_batching.py",)),
    Mutation("the frequency penalty rewards repeats", "dynllava/engine.py",
             "out[ids] -= (self.frequency_penalty * counts", "out[ids] += (self.frequency_penalty * counts",
             ("tests/dynllava/test_batching.py",)),
    Mutation("the EOS's logprob stays when the EOS is dropped", "dynllava/engine.py",
             "        del row.token_logprobs[len(row.tokens):]", "        pass",
             ("tests/dynllava/test_batching.py",)),
    Mutation("paged attention's combine ignores the blocks' scales", "dynllava/ops.py",
             "    weight = torch.exp(peak - top[owner])", "    weight = torch.ones_like(peak)"),
    Mutation("a leaving row keeps its blocks", "dynllava/paged_cache.py",
             "                    table.release(self.pool.groups[group].blocks)", "                    pass",
             ("tests/dynllava/test_batching.py",)),
    Mutation("the paged step attends to one slot too few", "dynllava/paged_cache.py",
             "upto = torch.tensor([t.length + 1 for t in tables]", "upto = torch.tensor([t.length for t in tables]"),
    Mutation("leaving rows' holes stay in the pool", "dynllava/engine.py",
             "                self.cache.compact(group)", "                pass", ("tests/dynllava/test_batching.py",
                                                                           "tests/dynllava/test_kv_blocks.py")),
    Mutation("paged KV bytes counted without the admitted text", "dynllava/paged_cache.py",
             "return sum(self.tables[g][row].length * per_slot[g] for g in (0, 1))",
             "return sum((self.tables[g][row].length - g) * per_slot[g] for g in (0, 1))",
             ("tests/dynllava/test_accounting.py",)),
    Mutation("a block's id is reused while held", "dynllava/kv_blocks.py",
             "        return [self._free.pop() for _ in range(n)]", "        return [self._free[-1] for _ in range(n)]",
             ("tests/dynllava/test_kv_blocks.py",)),
    Mutation("a preempted row keeps its admission history", "dynllava/engine.py",
             "self.n_fed, self.admission = 0, AdmissionState()", "self.n_fed = 0",
             ("tests/dynllava/test_preemption.py",)),
    Mutation("a replayed token is sampled again", "dynllava/batching.py",
             "sampling = [i for i, row in enumerate(rows) if not row.replaying]", "sampling = list(range(len(rows)))",
             ("tests/dynllava/test_preemption.py",)),
    Mutation("a preempted row takes the engine's new setting", "dynllava/batching.py",
             "                or live.resume is not None:", "                or False:",
             ("tests/dynllava/test_preemption.py",)),
    Mutation("floor rounding rounds up", "dynllava/ops.py",
             "return min(n_tokens, int(n_tokens * keep))", "return min(n_tokens, math.ceil(n_tokens * keep))",
             ("tests/dynllava/test_ops.py", "tests/dynllava/test_reference.py")),
    Mutation("a tie between the text logits admits the token", "dynllava/scorers.py",
             "            admit = score > 0.0", "            admit = score >= 0.0",
             ("tests/dynllava/test_scorers.py",)),
    Mutation("paged admission counts the worst case", "dynllava/batching.py",
             "self.on_demand = self.paged and join_running", "self.on_demand = False",
             ("tests/dynllava/test_batching.py",)),
    Mutation("converted prompts tokenized as one string", "dynllava/inputs.py",
             "        rule = getattr(processor, PROMPT_RULE_ATTR, None)\n",
             "        rule = None\n", ("tests/dynllava/test_convert.py",)),
    Mutation("legacy=False text not given its leading space", "dynllava/inputs.py",
             'piece_ids = tokenizer(" " + piece)["input_ids"]', 'piece_ids = tokenizer(piece)["input_ids"]',
             ("tests/dynllava/test_convert.py",)),
    Mutation("the tokenizer's dummy prefix only once (legacy)", "dynllava/llama_tokenizer.py",
             "    if legacy:\n        tok.normalizer", "    if False:\n        tok.normalizer",
             ("tests/dynllava/test_convert.py",)),
    Mutation("the text predictor's layers shifted by one", "dynllava/convert.py",
             'lambda g: f"text.net.1.{int(g[1]) - 1}.{g[2]}"', 'lambda g: f"text.net.1.{int(g[1]) % 7}.{g[2]}"',
             ("tests/dynllava/test_convert.py",)),
    Mutation("qkv mapped without the image predictor's transpose order", "dynllava/convert.py",
             "                    predictor_state[target] = tensor.float()",
             "                    predictor_state[target] = (tensor.view(3, -1, tensor.shape[-1]).flip(0).reshape("
             "tensor.shape) if 'in_proj_weight' in target else tensor).float()",
             ("tests/dynllava/test_convert.py",)),
    Mutation("no pad to square", "dynllava/convert.py",
             'processor.image_processor.do_pad = cfg.get("image_aspect_ratio", "square") == "pad"',
             "processor.image_processor.do_pad = False", ("tests/dynllava/test_convert.py",)),
    Mutation("default sparsity ceil-rounded", "dynllava/convert.py",
             'layer=int(sparse["sparse_layer"]), keep_rounding="floor")', 'layer=int(sparse["sparse_layer"]))',
             ("tests/dynllava/test_convert.py",)),
    Mutation("--limit applied to the read (the same first rows again)", "pipelines/caption.py",
             'ds = ds.map_batches(_pass_through, batch_format="pyarrow", zero_copy_batch=True).limit(limit)',
             "ds = ds.limit(limit)", ("tests/pipelines/test_caption.py::test_resume_in_slices_then_retry_errors_and_the_record",)),
    Mutation("retry leaves the ids in the checkpoint", "pipelines/retry.py",
             "        if not pc.all(keep).as_py():", "        if False:",
             ("tests/pipelines/test_caption.py::test_resume_in_slices_then_retry_errors_and_the_record",)),
    Mutation("a killed run stays 'running'", "pipelines/job_record.py",
             '            earlier["status"] = "killed"', "            pass", ("tests/pipelines/test_job_record.py",)),
    Mutation("credentials recorded", "pipelines/output.py",
             'return _SECRET_PARAMS.sub(r"\\1***", _CREDENTIALS.sub(r"\\1***@", str(uri)))', "return str(uri)",
             ("tests/pipelines/test_job_record.py",)),
    Mutation("one budget per row, not per image", "dynllava/image_layout.py",
             "    return [[keep_count(x.length, keep, rounding) for x in row]\n",
             "    return [[keep_count(sum(y.length for y in row), keep, rounding) if i == 0 else 0 for i, x in "
             "enumerate(row)]\n", ("tests/dynllava/test_anyres.py",)),
    Mutation("stride keeps newlines like other tokens", "dynllava/scorers.py",
             "candidates = x.image_mask & ~x.newline if x.newline is not None else x.image_mask",
             "candidates = x.image_mask", ("tests/dynllava/test_scorers.py",)),
    Mutation("newline mask off by one", "dynllava/image_layout.py",
             "(grid_pos % width_t == width_t - 1)", "(grid_pos % width_t == 0)", ("tests/dynllava/test_anyres.py",)),
    Mutation("any-res views counted as images", "dynllava/engine.py",
             "row.n_views = sum(x.n_tiles for x in layouts)", "row.n_views = len(layouts)",
             ("tests/dynllava/test_anyres.py",)),
    Mutation("a missing image is transient", "dynllava/row_errors.py",
             "isinstance(e, (ValueError, FileNotFoundError))", "isinstance(e, ValueError)",
             ("tests/pipelines/test_retry.py",)),
    Mutation("--retry-errors retries input errors too", "pipelines/retry.py",
             '    if which == "all" or "error_kind" not in table.column_names:',
             '    if True:', ("tests/pipelines/test_retry.py",)),
    Mutation("NaN written into the record", "pipelines/job_record.py",
             "    if isinstance(value, float) and not math.isfinite(value):\n        return None",
             "    if False:\n        return None", ("tests/pipelines/test_job_record.py",)),
    Mutation("VQA normalisation keeps articles", "dynllava/answer_metrics.py",
             "if word and word not in ARTICLES:", "if word:", ("tests/dynllava/test_answer_metrics.py",)),
    Mutation("VQA accuracy counts the left-out answer too", "dynllava/answer_metrics.py",
             "min(1.0, (matches - (r == answer)) / 3)", "min(1.0, matches / 3)",
             ("tests/dynllava/test_answer_metrics.py",)),
    Mutation("a setting passes on its mean loss, not its interval", "pipelines/calibrate.py",
             "r is dense or (n > 0 and high <= tolerance)", "r is dense or (n > 0 and loss <= tolerance)",
             ("tests/pipelines/test_calibrate.py",)),
    Mutation("the floor is the cheapest setting, passing or not", "pipelines/calibrate.py",
             "floor = min(passing, key=", "floor = min(points, key=", ("tests/pipelines/test_calibrate.py",)),
    Mutation("the SLA ignores its measured ladder", "cluster/sla.py",
             "        if self.ladder is not None:\n            return self.ladder[level]\n", "",
             ("tests/pipelines/test_calibrate.py",)),
    Mutation("eval grades a row against another row's reference", "pipelines/evaluate.py",
             "g = grade(str(answer), refs[row_id])", "g = grade(str(answer), refs[str(out['id'][0])])",
             ("tests/pipelines/test_evaluate.py",)),
    Mutation("eval drops rows without a reference", "pipelines/evaluate.py",
             "        rows.append(record)\n",
             "        if record['error'] != NO_REFERENCE:\n            rows.append(record)\n",
             ("tests/pipelines/test_evaluate.py",)),
)


def run(mutation: Mutation, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(caught, the first failing test or the tail of pytest's output)."""
    path = ROOT / mutation.path
    source = path.read_text()
    if source.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the text to replace occurs {source.count(mutation.old)} times in "
                         f"{mutation.path}; update tests/mutations.py")
    path.write_text(source.replace(mutation.old, mutation.new))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(source)
    failed = [line.split(" - ")[0] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return done.returncode != 0, failed[0] if failed else done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only mutations whose name contains this text")
    parser.add_argument("--tests", nargs="+", help="run these tests instead of each mutation's own")
    args = parser.parse_args(argv)
    missed = 0
    for mutation in MUTATIONS:
        if args.only and args.only not in mutation.name:
            continue
        caught, detail = run(mutation, tuple(args.tests) if args.tests else mutation.tests)
        missed += not caught
        print(f"{'CAUGHT' if caught else 'MISSED'}  {mutation.name}: {detail}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
