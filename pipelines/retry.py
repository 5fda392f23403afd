"""`--retry-errors`: take a job's error rows out of its output and their ids out of its checkpoint, so the run
that follows does them again and each id still ends up in the output exactly once.

The checkpoint (Ray Data's: Parquet files of row ids under `_checkpoint/`, one per committed output file) is
rewritten first, then the output files. A crash in between leaves error rows whose ids are no longer marked
done; the job record says a retry is pending, and every later run finishes it first (it is idempotent: it
recomputes the error rows from the output), so no error row survives beside its redone row.
"""

from __future__ import annotations

import logging

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.output import OutputLocation

log = logging.getLogger(__name__)


def drop_error_rows(out: OutputLocation, checkpoint_dir: str, id_column: str) -> int:
    """Remove every error row from the output and its id from the checkpoint. Returns the rows removed."""
    files = [out.join(name) for name in sorted(out.parquet_files())]
    errored: dict[str, list] = {}
    for path in files:
        table = pq.read_table(path, columns=[id_column, "error"], filesystem=out.fs)
        bad = pc.is_valid(table.column("error"))
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
        out.write_table(path, table.filter(pc.is_null(table.column("error"))))
    log.info("retrying %d error rows from %d output files", len(ids), len(errored))
    return len(ids)


def _array(values, type_):
    import pyarrow as pa

    return pa.array(sorted(values), type=type_)
