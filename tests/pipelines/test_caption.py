"""The caption job end to end on a local Ray: every input kind, bad rows, exactly-once output, resume after an
interrupted run, a killed engine actor, the saved job record, and fail-fast on unusable inputs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.caption import JOB_FILE, run_caption_job
from pipelines.config import CaptionJobConfig
from pipelines.lease import LEASE_FILE

from tests.conftest import REPO_ROOT
from tests.pipelines.conftest import png_bytes

pytestmark = pytest.mark.ray


def read_output(output: Path) -> pa.Table:
    return pq.read_table(str(output), columns=None) if any(output.glob("*.parquet")) else pa.table({})


def output_rows(output: Path) -> list[dict]:
    files = sorted(output.glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def write_parquet_input(path: Path, n: int, start: int = 0, **extra_rows) -> list[str]:
    ids = [f"r{i:04d}" for i in range(start, start + n)]
    table = pa.table({"id": ids, "image": [png_bytes(i) for i in range(start, start + n)],
                      "prompt": [f"What is in picture {i}?" for i in range(start, start + n)]})
    pq.write_table(table, path)
    return ids


def test_image_folder_and_jsonl_inputs(ray_local, tmp_path, job_config):
    """A folder of images (4 formats; rows keyed on the file's path) and JSONL rows without an id (keyed on their
    image_path, relative to the JSONL's folder): each caption is what the in-process engine gives that image and
    prompt (the job's prompt when the row has none)."""
    from dynllava.inputs import load_image
    from dynllava.model import DynamicLlava

    model = DynamicLlava.from_pretrained(job_config.model)

    def expected(image: bytes, prompt: str) -> str:
        return model.generate([load_image(image, "image")], [model.format_prompt(prompt)],
                              sparsity=job_config.sparsity, max_new_tokens=job_config.max_new_tokens)[0].text.strip()

    folder = tmp_path / "images"
    folder.mkdir()
    files = {}
    for i, fmt in enumerate(["PNG", "JPEG", "WEBP", "GIF"]):
        path = folder / f"img{i}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.write_bytes(png_bytes(i, fmt=fmt))
        files[path.name] = path.read_bytes()
    run_caption_job(str(folder), tmp_path / "out_folder", job_config)
    rows = {Path(r["id"]).name: r for r in output_rows(tmp_path / "out_folder")}
    assert sorted(rows) == sorted(files)
    for name, data in files.items():
        assert rows[name]["error"] is None and rows[name]["caption"] == expected(data, job_config.prompt), name

    (tmp_path / "pics").mkdir()
    for k in (7, 8):
        (tmp_path / "pics" / f"{k}.png").write_bytes(png_bytes(k))
    lines = [{"image_path": "pics/7.png", "prompt": "What colour?"}, {"image_path": "pics/8.png"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    run_caption_job(str(tmp_path / "in.jsonl"), tmp_path / "out_jsonl", job_config)
    rows = {r["id"]: r for r in output_rows(tmp_path / "out_jsonl")}
    assert sorted(rows) == ["pics/7.png", "pics/8.png"], "rows without an id are keyed on their image_path"
    assert rows["pics/7.png"]["caption"] == expected(png_bytes(7), "What colour?")
    assert rows["pics/8.png"]["caption"] == expected(png_bytes(8), job_config.prompt)
    job = json.loads((tmp_path / "out_jsonl" / JOB_FILE).read_text())
    assert (job["input_kind"], job["id_column"]) == ("jsonl", "image_path")


def test_parquet_rows_match_the_engine_and_bad_rows_become_error_rows(ray_local, tmp_path, job_config):
    """One output row per input row, in any order. Each good row's caption and counts are what
    DynamicLlava.generate gives it (its own prompt, or the job's); each bad row gets its error, and the job goes
    on: a truncated or non-image file, an image over max_image_pixels, no image, an empty prompt, a prompt over
    the context."""
    from dynllava.model import DynamicLlava

    good = png_bytes(1)
    rows = [(f"r{i:04d}", png_bytes(i), f"What is in picture {i}?") for i in range(10)] + [
        ("truncated", good[: len(good) // 2], "Describe."), ("not-an-image", b"hello world", "Describe."),
        ("bomb", png_bytes(2, size=(300, 300)), "Describe."), ("no-image", None, "Describe."),
        ("empty-prompt", good, "   "), ("too-long", good, "word " * 400), ("default-prompt", good, None)]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows],
                             "prompt": [r[2] for r in rows]}), tmp_path / "in.parquet")
    config = CaptionJobConfig.from_dict({**job_config.to_dict(), "max_image_pixels": 200 * 200})
    summary = run_caption_job(str(tmp_path / "in.parquet"), tmp_path / "out", config)
    out = {r["id"]: r for r in output_rows(tmp_path / "out")}
    assert sorted(out) == sorted(r[0] for r in rows) and (summary.rows, summary.errors) == (17, 6)
    errors = {k: v["error"] for k, v in out.items()}
    assert "unreadable image" in errors["truncated"] and "unreadable image" in errors["not-an-image"]
    assert "max_image_pixels" in errors["bomb"] and "no image" in errors["no-image"]
    assert "empty prompt" in errors["empty-prompt"] and "context" in errors["too-long"]
    model = DynamicLlava.from_pretrained(job_config.model)
    for row_id, image, prompt in [rows[0], rows[5], rows[9], ("default-prompt", good, job_config.prompt)]:
        ref = model.generate([image], [model.format_prompt(prompt)], sparsity=config.sparsity,
                             max_new_tokens=config.max_new_tokens)[0]
        row = out[row_id]
        assert row["caption"] == ref.text.strip() and row["error"] is None
        assert row["n_image_kept"] == ref.stats.n_image_kept and row["kv_bytes_peak"] == ref.stats.kv_bytes_peak
        assert json.loads(row["sparsity"]) == config.sparsity.to_dict()


def test_resume_in_slices_then_retry_errors_and_the_record(ray_local, tmp_path, job_config):
    """--limit N means N more rows on a resumed output (here a file:// URI); a resume with another
    max_new_tokens is refused unless allowed; rows whose image was missing fail (the row's own fault: error_kind
    input), and once the files exist --retry-errors all redoes exactly those with the rest: every id once, none
    an error; each run is recorded with its resolved config."""
    images = tmp_path / "imgs"
    images.mkdir()
    missing = {3, 11, 17}
    inputs = [{"id": f"r{i:02d}", "image_path": f"imgs/{i}.png"} for i in range(20)]
    for i in set(range(20)) - missing:
        (images / f"{i}.png").write_bytes(png_bytes(i))
    pq.write_table(pa.Table.from_pylist(inputs), tmp_path / "in.parquet")
    source, out = str(tmp_path / "in.parquet"), f"file://{tmp_path}/out"
    first = run_caption_job(source, out, job_config, limit=7)
    second = run_caption_job(source, out, job_config, limit=5)
    done = output_rows(tmp_path / "out")
    assert (first.rows, second.rows, second.total_rows, len(done)) == (7, 5, 12, 12)
    failed = sorted(r["id"] for r in done if r["error"])
    assert failed == sorted(r["id"] for r in done if int(r["id"][1:]) in missing)  # exactly the missing images
    assert first.errors + second.errors == len(failed) and first.transient_errors + second.transient_errors == 0
    assert {r["error_kind"] for r in done if r["error"]} == {"input"}

    for i in missing:
        (images / f"{i}.png").write_bytes(png_bytes(i))
    changed = job_config.with_overrides(max_new_tokens=3)
    with pytest.raises(ValueError, match="another configuration.*max_new_tokens"):
        run_caption_job(source, out, changed)
    third = run_caption_job(source, out, changed, allow_config_change=True, retry_errors="all")
    rows = output_rows(tmp_path / "out")
    assert (third.rows, third.errors, third.total_rows) == (8 + len(failed), 0, 20)
    assert sorted(r["id"] for r in rows) == [r["id"] for r in inputs] and all(r["error"] is None for r in rows)

    text = (tmp_path / "out" / JOB_FILE).read_text()
    job = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the job record"))
    assert set(job) == {"input", "input_kind", "id_column", "identity", "total_rows", "runs"}
    assert (job["input"], job["input_kind"], job["id_column"], job["total_rows"]) == (source, "parquet", "id", 20)
    assert [CaptionJobConfig.from_dict(r["config"]) for r in job["runs"]] == [job_config] * 2 + [changed]
    assert [(r["status"], r["rows"], r["limit"], r["retry_errors"]) for r in job["runs"]] == \
        [("finished", 7, 7, None), ("finished", 5, 5, None), ("finished", 8 + len(failed), None, "all")]
    assert set(job["runs"][0]) == {"status", "started_at", "finished_at", "limit", "retry_errors", "config", "rows",
                                   "errors", "transient_errors", "total_rows", "wall_s", "rows_per_s", "output_tokens_per_s",
                                   "image_keep", "text_keep", "kv_bytes_saved", "error_examples",
                                   "sparsity_over_time"}
    assert job["runs"][0]["image_keep"] == 0.5  # stride at 0.5 keeps 8 of 16 image tokens in every row
    good = [r for r in rows if r["error"] is None]
    saved = 1 - sum(r["kv_bytes_peak"] for r in good) / sum(r["kv_bytes_dense"] for r in good)
    runs_saved = [r["kv_bytes_saved"] for r in job["runs"]]
    assert min(runs_saved) <= saved <= max(runs_saved) and 0 < saved < 1
    assert job["runs"][2]["rows_per_s"] == pytest.approx(job["runs"][2]["rows"] / job["runs"][2]["wall_s"])
    assert job["identity"]["max_new_tokens"] == 3  # the refused run recorded nothing; the allowed one did


def test_resume_after_the_job_process_is_killed(ray_local, tmp_path, job_config):
    """Kill a job's whole process tree mid-run (some files committed, others not), then rerun: every id
    exactly once."""
    (tmp_path / "in").mkdir()  # 8 files: Ray Data streams them as separate blocks, so outputs land one by one
    ids = [i for k in range(8) for i in write_parquet_input(tmp_path / "in" / f"part-{k:02d}.parquet", 6, 6 * k)]
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({**job_config.to_dict(), "batch_size": 2, "rows_per_file": 2}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dynllava.cli", "caption", "--input", str(tmp_path / "in"),
                             "--output", str(out), "--config", str(cfg)], env=env, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
    os.killpg(proc.pid, 9)
    proc.wait()
    # (its output files are not read here: one it was writing can be torn; the rerun's recovery deletes it)
    assert json.loads((out / JOB_FILE).read_text())["runs"][-1]["status"] == "running", \
        "the job finished before it could be interrupted; make it slower"
    # Its workers can still commit files for a moment (they did, 0.8 s after the kill, and the rerun wrote
    # those rows twice): the lease it left makes the rerun wait them out.
    assert (out / LEASE_FILE).exists()
    started = time.monotonic()
    run_caption_job(str(tmp_path / "in"), out, job_config)
    assert time.monotonic() - started >= job_config.lease_s
    assert sorted(r["id"] for r in output_rows(out)) == ids
    assert not (out / LEASE_FILE).exists()
    runs = json.loads((out / JOB_FILE).read_text())["runs"]
    assert [r["status"] for r in runs] == ["killed", "finished"]  # the killed attempt is visible as such


def crash_once_loader(model, device=None, dtype=None, marker: str = ""):
    """Loads the model, but the first row the engine takes anywhere kills its actor process (marker file)."""
    from dynllava.model import DynamicLlava

    real = DynamicLlava.from_pretrained(model, device=device, dtype=dtype)
    marker = Path(marker)
    prepare = real.prepare

    def prepare_or_die(*args, **kwargs):
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the process dies as on an OOM kill: no exception, no cleanup
        return prepare(*args, **kwargs)

    real.prepare = prepare_or_die
    return real


def test_a_killed_engine_actor_is_replaced_and_no_row_is_lost(ray_local, tmp_path, job_config):
    from functools import partial

    ids = write_parquet_input(tmp_path / "in.parquet", 16)
    marker = tmp_path / "crashed"
    loader = partial(crash_once_loader, marker=str(marker))
    run_caption_job(str(tmp_path / "in.parquet"), tmp_path / "out", job_config, loader=loader)
    assert marker.exists(), "the actor never crashed: the test proved nothing"
    got = [r["id"] for r in output_rows(tmp_path / "out")]
    assert sorted(got) == ids and all(r["error"] is None for r in output_rows(tmp_path / "out"))


def test_unusable_inputs_fail_fast_with_one_message(ray_local, tmp_path, job_config):
    with pytest.raises(ValueError, match="no such file"):
        run_caption_job(str(tmp_path / "missing.parquet"), tmp_path / "out1", job_config)
    pq.write_table(pa.table({"id": ["a"], "picture": [png_bytes(0)]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="no image column"):
        run_caption_job(str(tmp_path / "wrong.parquet"), tmp_path / "out2", job_config)
    pq.write_table(pa.table({"image": [png_bytes(0)]}), tmp_path / "noid.parquet")
    with pytest.raises(ValueError, match="row id"):
        run_caption_job(str(tmp_path / "noid.parquet"), tmp_path / "out3", job_config)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_caption_job(str(tmp_path / "wrong.parquet"), tmp_path / "a_file", job_config)
    assert not (tmp_path / "out1").exists()


def test_the_sparsity_timeline_buckets_rows_by_time_and_the_summary_shows_a_move():
    from pipelines.caption import RunSummary, sparsity_timeline

    dense, floor = json.dumps({"vision_keep": 1.0, "text_keep": None}), json.dumps({"vision_keep": 0.25,
                                                                                   "text_keep": 0.5})
    timeline = sparsity_timeline([100.0, 100.5, 101.0, 109.0, 110.0], [dense, dense, floor, floor, floor], buckets=2)
    assert timeline == [{"from_s": 0.0, "rows": 3, "vision_keep": 0.75, "text_keep": 0.833},
                        {"from_s": 5.0, "rows": 2, "vision_keep": 0.25, "text_keep": 0.5}]
    summary = RunSummary(rows=5, errors=0, transient_errors=0, total_rows=5, wall_s=10.0, rows_per_s=0.5, output_tokens_per_s=1.0,
                         image_keep=0.55, text_keep=0.7, kv_bytes_saved=0.1, error_examples=[],
                         sparsity_over_time=timeline)
    assert summary.table().endswith("sparsity over time       +0s 0.75/0.83  +5s 0.25/0.50")


def hold_until_the_actor_runs_at(vision_keep: float):
    """A loader: loads the model; every row after the first waits before it joins the engine until the actor
    has applied the controller's order and reported `vision_keep` back (or 120 s). The first row waits with its
    batch, so no row is admitted before the order: however fast the machine or the controller, every row runs
    at that keep."""

    def load(model, device=None, dtype=None):
        import ray

        from cluster.controller import find_controller
        from dynllava.model import DynamicLlava

        real = DynamicLlava.from_pretrained(model, device=device, dtype=dtype)
        prepare, state = real.prepare, {"calls": 0, "applied": False}

        def applied() -> bool:
            controller = find_controller()
            actors = ray.get(controller.status.remote())["actors"] if controller is not None else {}
            return any(a["snapshot"]["sparsity"]["vision_keep"] == vision_keep for a in actors.values())

        def prepare_after_the_order(*args, **kwargs):
            state["calls"] += 1
            deadline = time.monotonic() + 120.0
            while state["calls"] > 1 and not state["applied"] and time.monotonic() < deadline:
                state["applied"] = applied()
                time.sleep(0 if state["applied"] else 0.2)
            return prepare(*args, **kwargs)

        real.prepare = prepare_after_the_order
        return real

    return load


def test_a_job_under_a_memory_ceiling_starts_the_controller_and_runs_sparser(ray_local, tmp_path, job_config):
    """controller: true with no controller running: the job starts one with its SLA. The actor's memory is
    over that SLA's ceiling, so the controller orders the floor; the job asked for dense rows, and once the
    actor has applied the order (the engine holds the rows until then) every row runs at the floor. The
    rows/s target holds and the summary's sparsity over time shows the floor."""
    import dataclasses

    import ray
    import yaml

    from cluster.controller import find_controller
    from dynllava.config import SparsityConfig

    sla = tmp_path / "sla.yaml"
    # rows/s: an easy target (the first report rates 4 rows over the actor's start-up), so memory decides
    sla.write_text(yaml.safe_dump({"offline": {"rows_per_s": 0.05}, "memory_ceiling": 0.001,
                                   "floor": {"vision_keep": 0.25, "text_keep": 0.5},
                                   "pacing": {"levels": 2, "cooldown_s": 0}}))
    write_parquet_input(tmp_path / "in.parquet", 48)
    config = dataclasses.replace(job_config, controller=True, sla=str(sla), max_new_tokens=24,
                                 sparsity=SparsityConfig(vision_keep=1.0, text_keep=1.0, vision_scorer="stride",
                                                         text_scorer="recent"))
    assert find_controller() is None
    summary = run_caption_job(str(tmp_path / "in.parquet"), tmp_path / "out", config,
                              loader=hold_until_the_actor_runs_at(0.25))
    controller = find_controller()
    try:
        assert controller is not None, "the job did not start the controller"
        status = ray.get(controller.status.remote())
        rows = output_rows(tmp_path / "out")
        assert len(rows) == 48 and summary.errors == 0
        keeps = {(json.loads(r["sparsity"])["vision_keep"], json.loads(r["sparsity"])["text_keep"]) for r in rows}
        assert keeps == {(0.25, 0.5)}, keeps
        timeline = summary.sparsity_over_time
        assert {b["vision_keep"] for b in timeline} == {0.25}
        assert sum(b["rows"] for b in timeline) == 48 and "sparsity over time" not in summary.table()  # constant
        assert summary.rows_per_s >= 0.05
        assert any("memory" in d["reason"] for d in status["decisions"]), status["decisions"]
        assert status["offline"] is None  # the job ended: nothing left to judge
    finally:
        if controller is not None:
            ray.kill(controller)


def test_an_any_resolution_model_through_the_job(ray_local, tmp_path, job_config):
    """A LLaVA-NeXT model (tiny, random weights) through the whole job, no special case: rows of different
    aspect ratios become different numbers of tiles through Ray Data, and each caption is what the model
    generates in-process from the original image."""
    import io

    import yaml
    from PIL import Image

    from dynllava.model import DynamicLlava
    from tests.dynllava.test_anyres import SPECS

    path = tmp_path / "next.yaml"
    path.write_text(yaml.safe_dump(dict(SPECS["llava_next"], name="next", image_token_id=260)))
    sizes = [(90, 40), (50, 100), (33, 33), (70, 64), (64, 30), (40, 90)]
    rows = [{"id": f"r{i}", "image": png_bytes(i, size)} for i, size in enumerate(sizes)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    config = job_config.with_overrides(model=str(path))
    summary = run_caption_job(str(tmp_path / "in.parquet"), tmp_path / "out", config)
    assert (summary.rows, summary.errors) == (6, 0)
    got = {r["id"]: r for r in output_rows(tmp_path / "out")}
    model = DynamicLlava.from_pretrained(path, device="cpu")
    expected = model.generate([Image.open(io.BytesIO(r["image"])) for r in rows],
                              [model.format_prompt(config.prompt)] * len(rows), sparsity=config.sparsity,
                              max_new_tokens=config.max_new_tokens)
    assert [got[r["id"]]["caption"] for r in rows] == [e.text.strip() for e in expected]
    assert [got[r["id"]]["n_image_tokens"] for r in rows] == [e.stats.n_image_tokens for e in expected]
    assert len({got[r["id"]]["n_image_tokens"] for r in rows}) > 2  # the rows' images differ in token count


def test_the_job_reads_parquet_with_the_v1_datasource_and_leaves_the_callers_context_alone():
    """Ray Data's V2 Parquet datasource starts 32 footer-reader actors per read (11 s of a 16 s small job here);
    the job reads with V1 inside a copy of the caller's DataContext, which it restores."""
    from ray.data import DataContext

    from pipelines.sources import with_v1_parquet_reader

    caller = DataContext.get_current()
    before = caller.use_datasource_v2
    seen = with_v1_parquet_reader(lambda: (DataContext.get_current().use_datasource_v2,
                                           DataContext.get_current() is caller))()
    assert seen == (False, False)
    assert DataContext.get_current() is caller and caller.use_datasource_v2 == before
    assert run_caption_job.__wrapped__ is not None  # the job (and its CLI) runs inside it
