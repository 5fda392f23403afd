"""`_job.json` beside a caption job's output: what the output holds and one entry per run (attempt) over it.

A run's entry is written when it starts (status "running") and replaced when it ends ("finished" or "failed",
with its summary or its error). A run that was killed stays "running" until the next run marks it "killed".
The file is always valid JSON: NaN and infinities are written as null. URIs are recorded redacted.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from pipelines.output import OutputLocation

JOB_FILE = "_job.json"
IDENTITY_FIELDS = ("input", "model", "prompt", "sparsity", "max_new_tokens")  # what makes two runs one job


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _finite(value: Any) -> Any:
    """`value` with NaN / infinite floats (anywhere inside) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def load(out: OutputLocation) -> dict[str, Any]:
    """The output's record ({"runs": []} for a new output); ValueError when the file is not a job record."""
    text = out.read_text(JOB_FILE)
    if text is None:
        return {"runs": []}
    try:
        job = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{out.uri}/{JOB_FILE} is not valid JSON ({e}); move it away to start a new record") from None
    if not isinstance(job, dict) or not isinstance(job.get("runs"), list):
        raise ValueError(f"{out.uri}/{JOB_FILE} is not a caption job record")
    return job


def save(out: OutputLocation, job: dict[str, Any]) -> None:
    out.write_text(JOB_FILE, json.dumps(_finite(job), indent=2, allow_nan=False) + "\n")


def identity_changes(job: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The identity fields (input, model, prompt, sparsity, max_new_tokens) in which this run differs from the
    output's recorded job, as "field: recorded -> now" lines (empty for a new output or the same job)."""
    recorded = job.get("identity")
    if not recorded:
        return []
    return [f"{k}: {recorded.get(k)!r} -> {identity.get(k)!r}" for k in IDENTITY_FIELDS
            if recorded.get(k) != identity.get(k)]


def start_run(out: OutputLocation, job: dict[str, Any], identity: dict[str, Any], header: dict[str, Any],
              run: dict[str, Any]) -> int:
    """Mark earlier runs left "running" as killed, record this run as running (with its resolved config in
    `run`), and write the record. Returns the run's index."""
    for earlier in job["runs"]:
        if earlier.get("status") == "running":
            earlier["status"] = "killed"
    job.update(header)
    job["identity"] = identity
    job["runs"].append({"status": "running", "started_at": _now(), **run})
    save(out, job)
    return len(job["runs"]) - 1


def finish_run(out: OutputLocation, job: dict[str, Any], index: int, status: str, **fields: Any) -> None:
    """Record how run `index` ended ("finished" or "failed") with its summary fields or its error."""
    job["runs"][index].update({"status": status, "finished_at": _now(), **fields})
    if "total_rows" in fields:
        job["total_rows"] = fields["total_rows"]
    save(out, job)
