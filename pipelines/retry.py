"""`--retry-errors`: take a job's error rows (the transient ones, or all) out of its output and their ids out of
its checkpoint, so the run that follows does them again and each id still ends up in the output exactly once.

The checkpoint (Ray Data's: Parquet files of row ids under `_checkpoint/`, one per committed output file) is
rewritten first, then the output files. A crash in between leaves error rows whose ids are no longer marked
done; the job record says a retry is pending, and every later run finishes it first (it is idempotent: it
recomputes the error rows from the output), so no error row survives beside its redone row.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynllava.row_errors import INPUT, RETRY_CHOICES, TRANSIENT
from pipelines.output import OutputLocation

log = logging.getLogger(__name__)


def drop_error_rows(out: OutputLocation, checkpoint_dir: str, id_column: str, which: str = TRANSIENT) -> int:
    """Remove the error rows `which` names (RETRY_CHOICES) from the output and their ids from the checkpoint.
    Returns the rows removed. An error row without a kind (written before kinds were recorded) counts as
    transient."""
    files = [out.join(name) for name in sorted(out.parquet_files())]
    errored: dict[str, list] = {}
    for path in files:
        kind = ["error_kind"] if "error_kind" in pq.read_schema(path, filesystem=out.fs).names else []
        table = pq.read_table(path, columns=[id_column, "error", *kind], filesystem=out.fs)
        bad = _retried(table, which)
        if pc.any(bad).as_py():
            errored[path] = table.filter(bad).column(id_column).to_pylist()
    ids = {i for group in errored.values() for i in group}
    if not ids:
        return 0
    for path in out.committed_checkpoint_files(checkpoint_dir):
        table = pq.read_table(path, filesystem=out.fs)
        keep = pc.invert(pc.is_in(table.column(id_column), value_set=_array(ids, table.column(id_column).type)))
        if not pc.all(keep).as_py():
            out.write_table(path, table.filter(keep))
    for path in errored:
        table = pq.read_table(path, filesystem=out.fs)
        out.write_table(path, table.filter(pc.invert(_retried(table, which))))
    log.info("retrying %d error rows (%s) from %d output files", len(ids), which, len(errored))
    return len(ids)


def retry_passes(pending: str | bool | None, requested: str | None) -> list[str]:
    """The drop passes a run makes, each once: first one a crash cut short (the record's `retry_pending`; True,
    from records before error kinds, meant every error row), then the one asked for."""
    if pending is True:
        pending = "all"
    for which in (pending, requested):
        if which is not None and which not in RETRY_CHOICES:
            raise ValueError(f"retry_errors must be one of {RETRY_CHOICES}, got {which!r}")
    return list(dict.fromkeys(w for w in (pending, requested) if w))


def _retried(table, which: str):
    """Boolean mask of the table's error rows that `which` retries."""
    bad = pc.is_valid(table.column("error"))
    if which == "all" or "error_kind" not in table.column_names:
        return bad
    kind = table.column("error_kind").cast(pa.string())  # all null in a file without errors
    return pc.and_(bad, pc.invert(pc.fill_null(pc.equal(kind, INPUT), False)))


def _array(values, type_):
    return pa.array(sorted(values), type=type_)
