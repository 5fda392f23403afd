"""--retry-errors without Ray: which error rows a pass takes out of the output and the checkpoint (transient ones
by default, all on request, kindless ones from older outputs as transient), which passes a run makes after a
crash, and how a row's failure is classified."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynllava.row_errors import INPUT, TRANSIENT, RowError, kind_of
from pipelines.output import open_output
from pipelines.retry import drop_error_rows, retry_passes

ROWS = [("a", None, None), ("b", "connection refused", TRANSIENT), ("c", "unreadable image", INPUT),
        ("d", None, None), ("e", "out of memory", TRANSIENT), ("f", None, None)]


def write_job(root, with_kinds: bool = True) -> None:
    """Three output files and their checkpoint files, the layout a caption run leaves."""
    (root / "_checkpoint").mkdir(parents=True)
    for part, rows in (("0", ROWS[:3]), ("1", ROWS[3:5]), ("2", ROWS[5:])):
        columns = {"id": [r[0] for r in rows], "caption": [None if r[1] else "ok" for r in rows],
                   "error": pa.array([r[1] for r in rows], pa.string())}
        if with_kinds:
            columns["error_kind"] = pa.array([r[2] for r in rows], pa.string()) if part == "0" else \
                pa.array([r[2] for r in rows])  # as a writer leaves them: typed from the values (null if none)
        pq.write_table(pa.table(columns), root / f"part-{part}.parquet")
        pq.write_table(pa.table({"id": [r[0] for r in rows]}), root / "_checkpoint" / f"ck-{part}.parquet")


def state(root) -> tuple[list[str], list[str]]:
    out = sorted(pq.read_table(root, columns=["id"]).column("id").to_pylist())
    done = sorted(pq.read_table(root / "_checkpoint").column("id").to_pylist())
    return out, done


@pytest.mark.parametrize("which,removed", [(TRANSIENT, {"b", "e"}), ("all", {"b", "c", "e"})])
def test_a_pass_takes_its_rows_out_of_the_output_and_the_checkpoint(tmp_path, which, removed):
    write_job(tmp_path)
    assert drop_error_rows(open_output(tmp_path), "_checkpoint", "id", which) == len(removed)
    left = sorted({"a", "b", "c", "d", "e", "f"} - removed)
    assert state(tmp_path) == (left, left)
    assert drop_error_rows(open_output(tmp_path), "_checkpoint", "id", which) == 0  # idempotent
    assert state(tmp_path) == (left, left)


def test_error_rows_without_a_kind_count_as_transient(tmp_path):
    write_job(tmp_path, with_kinds=False)
    assert drop_error_rows(open_output(tmp_path), "_checkpoint", "id", TRANSIENT) == 3
    assert state(tmp_path) == (["a", "d", "f"], ["a", "d", "f"])


def test_passes_after_a_crash():
    assert retry_passes(None, None) == []
    assert retry_passes(None, TRANSIENT) == [TRANSIENT]
    assert retry_passes(TRANSIENT, None) == [TRANSIENT]  # the pass a crash cut short is finished
    assert retry_passes(TRANSIENT, "all") == [TRANSIENT, "all"]
    assert retry_passes("all", "all") == ["all"]
    assert retry_passes(True, None) == ["all"]  # a record from before kinds: every error row was retried
    with pytest.raises(ValueError, match="retry_errors must be one of"):
        retry_passes(None, "some")


def test_which_failures_are_the_rows_own():
    assert kind_of(ValueError("prompt over the context")) == INPUT
    assert kind_of(FileNotFoundError("no such key")) == INPUT
    assert kind_of(OSError("AWS Error NETWORK_CONNECTION")) == TRANSIENT
    assert kind_of(RuntimeError("the engine's queue is full")) == TRANSIENT
    assert RowError.from_exception(ValueError("x")) == RowError("x", INPUT)
