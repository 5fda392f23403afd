"""The job record and the output location without Ray: valid JSON, killed runs, identity changes, redaction."""

from __future__ import annotations

import json
import math

import pytest

from pipelines import job_record
from pipelines.output import open_output, redact


def test_record_is_valid_json_marks_killed_runs_and_names_changes(tmp_path):
    out = open_output(tmp_path / "out")
    job = job_record.load(out)
    identity = {"input": "in", "model": "m", "prompt": "p", "sparsity": {"vision_keep": 0.2}, "max_new_tokens": 8}
    first = job_record.start_run(out, job, identity, {"input": "in"}, {"limit": None})
    job = job_record.load(out)  # a new process: the first run never finished (killed)
    second = job_record.start_run(out, job, identity, {"input": "in"}, {"limit": 5})
    job_record.finish_run(out, job, second, "finished", rows=0, image_keep=math.nan, total_rows=3)
    text = (tmp_path / "out" / job_record.JOB_FILE).read_text()
    job = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the record"))
    assert [r["status"] for r in job["runs"]] == ["killed", "finished"] and (first, second) == (0, 1)
    assert job["runs"][1]["image_keep"] is None and job["total_rows"] == 3
    assert job_record.identity_changes(job, identity) == []
    assert job_record.identity_changes(job, {**identity, "model": "other"}) == ["model: 'm' -> 'other'"]
    (tmp_path / "out" / job_record.JOB_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        job_record.load(out)


def test_redact_and_output_errors(tmp_path):
    assert redact("s3://AKID:SECRET@bucket/x?endpoint_override=h:1") == "s3://***@bucket/x?endpoint_override=h:1"
    assert redact("abfs://c/x?account_name=a&sas_token=abc&k=1") == "abfs://c/x?account_name=a&sas_token=***&k=1"
    assert redact("/local/path") == "/local/path"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        open_output(tmp_path / "file")
    with pytest.raises(ValueError, match="cannot write there"):  # a file where a parent folder should be
        open_output(tmp_path / "file" / "out")


def test_caption_cli_fails_fast_and_accepts_v_anywhere(tmp_path, capsys):
    """A missing input is one line and exit 2, before Ray starts (no Ray here); --limit 0 is refused by the
    parser; -v may follow the subcommand."""
    import ray

    from dynllava.cli import main

    assert main(["caption", "--input", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o"),
                 "-v"]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err and not ray.is_initialized()
    with pytest.raises(SystemExit):
        main(["caption", "--input", "x", "--output", "y", "--limit", "0"])


def test_progress_counts_rows_of_newly_committed_checkpoint_files(tmp_path):
    """Rows in checkpoint files committed after the start (pending ones not), and the line's rate and ETA."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.progress import CommittedRows, ProgressReporter, progress_line

    out = open_output(tmp_path / "out")
    (tmp_path / "out" / "_checkpoint").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "out" / "_checkpoint" / "old.parquet")
    rows = CommittedRows(out, "_checkpoint")
    assert rows.poll() == 0
    pq.write_table(pa.table({"id": ["c", "d", "e"]}), tmp_path / "out" / "_checkpoint" / "x.parquet")
    pq.write_table(pa.table({"id": ["f"]}), tmp_path / "out" / "_checkpoint" / "y.pending.parquet")
    assert rows.poll() == 3 and rows.poll() == 3
    assert progress_line(30, 120, 10.0) == "30 / 120 rows  3.0 rows/s  ETA 0m30s"
    assert progress_line(0, None, 4.0) == "0 rows  (starting, 4 s)"
    stream = io.StringIO()
    with ProgressReporter(rows.poll, 9, interval_s=0.01, stream=stream):
        pass
    assert stream.getvalue().startswith("3 / 9 rows")
