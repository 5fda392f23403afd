"""Claim: a killed caption job loses little work (target: at most 2 x rows_per_file rows per kill) and a rerun
completes it exactly once; and the pipeline's own ceiling (the engine replaced by an instant stand-in).

With `benchmarks/stand_in.py` (every row answered at once, the rows each batch answered appended to a count
file) on --rows synthetic rows: one clean run into a fresh output gives the ceiling rows/s; then --kills times a
job on another output is started and its whole process group SIGKILLed at a random moment (uniform in
--kill-after seconds), and the work lost by that kill is the rows the stand-in answered in that attempt minus the
rows the attempt left committed in the output. A last run completes the output; every id must be there once.
The clean run is repeated with the output on an S3-compatible server on loopback (moto) for s3_over_local.
Prints one JSON line with the hardware and commit.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, emit, hardware  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAND_IN = REPO / "benchmarks" / "stand_in.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="input rows (default 20000)")
    p.add_argument("--rows-per-file", type=int, default=1000, help="the job's rows_per_file (default 1000)")
    p.add_argument("--kills", type=int, default=4, help="killed attempts (default 4)")
    p.add_argument("--kill-after", type=float, nargs=2, default=(20.0, 45.0),
                   help="a kill comes uniformly between these seconds after the attempt starts (default 20 45)")
    p.add_argument("--actor-cpus", type=float, default=2.0, help="the stand-in actor's CPUs (the job default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-s3", action="store_true", help="skip the clean run with the output on a local S3 server")
    p.add_argument("--output", default=None, help="also write the JSON line to this file")
    return p.parse_args(argv)


def make_input(path: Path, n: int) -> None:
    from PIL import Image

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), (i % 256, (i * 7) % 256, 9)).save(buf, "PNG")
        return buf.getvalue()

    images = [png(i) for i in range(256)]
    pq.write_table(pa.table({"id": [f"r{i:07d}" for i in range(n)], "image": [images[i % 256] for i in range(n)]}),
                   path, row_group_size=2000)


def committed(output: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in output.glob("*.parquet"))


def answered(count_file: Path) -> int:
    return sum(int(line) for line in count_file.read_text().split()) if count_file.exists() else 0


def attempt(input_path: Path, output: Path | str, count_file: Path, rows_per_file: int, kill_at: float | None,
            log: Path, actor_cpus: float, env_extra: dict | None = None) -> float:
    """Run the stand-in job once (killed at kill_at seconds, or to the end); returns its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    started = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, str(STAND_IN), str(input_path), str(output), str(count_file),
                                 "--rows-per-file", str(rows_per_file), "--actor-cpus", str(actor_cpus)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(2)  # the process group's Ray processes go with it
    if kill_at is None and proc.returncode:
        raise SystemExit(f"the stand-in job failed; see {log}")
    return time.monotonic() - started


def s3_clean_run(root: Path, args: argparse.Namespace, log: Path) -> float:
    """The clean run again with the output on an S3-compatible server on loopback (moto's, in this process);
    returns its rows/s from the job record it wrote there."""
    import json
    import socket

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="bench",
                               secret_key="bench", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("bench")
        uri = f"s3://bench/out?endpoint_override=127.0.0.1:{port}&scheme=http"
        attempt(root / "in.parquet", uri, root / "s3.count", args.rows_per_file, None, log, args.actor_cpus, creds)
        with fs.open_input_stream("bench/out/_job.json") as f:
            return json.loads(f.read())["runs"][-1]["rows_per_s"]
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_kills_") as tmp:
        root = Path(tmp)
        make_input(root / "in.parquet", args.rows)
        log = root / "jobs.log"
        clean_s = attempt(root / "in.parquet", root / "clean", root / "clean.count", args.rows_per_file, None, log,
                          args.actor_cpus)
        import json

        job = json.loads((root / "clean" / "_job.json").read_text())
        ceiling = job["runs"][-1]["rows_per_s"]  # rows over the job's write phase (Ray's start excluded)
        s3_ceiling = None if args.no_s3 else s3_clean_run(root, args, log)
        kills = []
        out, count = root / "killed", root / "killed.count"
        for k in range(args.kills):
            before_rows, before_answered = (committed(out) if out.exists() else 0), answered(count)
            at = rng.uniform(*args.kill_after)
            attempt(root / "in.parquet", out, count, args.rows_per_file, at, log, args.actor_cpus)
            done, did = committed(out) - before_rows, answered(count) - before_answered
            kills.append({"kill_at_s": round(at, 1), "answered": did, "committed": done, "lost": max(0, did - done)})
            print(f"kill {k + 1}: at {at:.1f} s, answered {did}, committed {done}, lost {max(0, did - done)}",
                  flush=True)
            if committed(out) >= args.rows:
                break
        attempt(root / "in.parquet", out, count, args.rows_per_file, None, log, args.actor_cpus)
        ids = pq.read_table(str(out), columns=["id"]).column("id").to_pylist()
        exactly_once = sorted(ids) == [f"r{i:07d}" for i in range(args.rows)]
    lost = [k["lost"] for k in kills]
    result = {"bench": "job_kills", "hardware": hardware("cpu"), "commit": commit(), "rows": args.rows,
              "rows_per_file": args.rows_per_file, "actor_cpus": args.actor_cpus,
              "ceiling_rows_per_s": round(ceiling, 1),
              "s3_ceiling_rows_per_s": round(s3_ceiling, 1) if s3_ceiling else None,
              "s3_over_local": round(s3_ceiling / ceiling, 3) if s3_ceiling else None,
              "clean_wall_s": round(clean_s, 1), "kills": kills,
              "lost_median": statistics.median(lost) if lost else None, "lost_max": max(lost) if lost else None,
              "lost_max_over_rows_per_file": round(max(lost) / args.rows_per_file, 2) if lost else None,
              "exactly_once": exactly_once}
    emit(result, args.output)
    return 0 if exactly_once else 1


if __name__ == "__main__":
    raise SystemExit(main())
