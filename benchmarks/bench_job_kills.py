"""Claim: a killed caption job loses little work (target: at most 2 x rows_per_file rows per kill) and a rerun
completes it exactly once; and the pipeline's own ceiling (the engine replaced by an instant stand-in).

With `benchmarks/stand_in.py` (every row answered at once, the rows each batch answered appended to a count
file) on --rows synthetic rows: one clean run into a fresh output gives the ceiling rows/s; then --kills times a
job on another output is started and its whole process group SIGKILLed at a random moment (uniform in
--kill-after seconds), and the work lost by that kill is the rows the stand-in answered in that attempt minus the
rows the attempt left committed in the output. A last run completes the output; every id must be there once.
The clean run and --s3-kills killed attempts are repeated with the output on an S3-compatible server on loopback
(moto): s3_over_local and the work lost there. Also reported: the driver's peak memory and the checkpoint's size
after the clean run. Prints one JSON line with the hardware and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, emit, hardware  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAND_IN = REPO / "benchmarks" / "stand_in.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="input rows (default 20000)")
    p.add_argument("--rows-per-file", type=int, default=1000, help="the job's rows_per_file (default 1000)")
    p.add_argument("--kills", type=int, default=4, help="killed attempts on the local output (default 4)")
    p.add_argument("--s3-kills", type=int, default=2, help="killed attempts on the S3 output (default 2)")
    p.add_argument("--kill-after", type=float, nargs=2, default=(20.0, 45.0),
                   help="a kill comes uniformly between these seconds after the attempt starts (default 20 45)")
    p.add_argument("--actor-cpus", type=float, default=2.0, help="the stand-in actor's CPUs (the job default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-s3", action="store_true", help="skip the runs with the output on a local S3 server")
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


@dataclass
class Output:
    """Where a run writes: the job's output argument, and the filesystem + path to inspect it with."""

    arg: str  # what the job is given (a folder or an s3:// URI)
    fs: pafs.FileSystem
    path: str

    def files(self, under: str = "") -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(f"{self.path}/{under}".rstrip("/"), allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def committed(self) -> int:
        """Rows whose output file is committed: the ids in the checkpoint's committed files, from their footers
        (a data file whose checkpoint is still pending is deleted by the next run, and may be torn)."""
        return sum(pq.ParquetFile(i.path, filesystem=self.fs).metadata.num_rows for i in self.files("_checkpoint")
                   if i.path.endswith(".parquet") and not i.path.endswith(".pending.parquet"))

    def record(self) -> dict:
        with self.fs.open_input_stream(f"{self.path}/_job.json") as f:
            return json.loads(f.read())

    def checkpoint_bytes(self) -> int:
        return sum(i.size for i in self.files("_checkpoint"))

    def ids(self) -> list[str]:
        return pq.read_table(self.path, columns=["id"], filesystem=self.fs).column("id").to_pylist()


def answered(count_file: Path) -> int:
    return sum(int(line) for line in count_file.read_text().split()) if count_file.exists() else 0


def attempt(input_path: Path, output: Output, count_file: Path, args: argparse.Namespace, kill_at: float | None,
            log: Path, env_extra: dict, stats_file: Path | None = None) -> float:
    """Run the stand-in job once (killed at kill_at seconds, or to the end); returns its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", **env_extra}
    command = [sys.executable, str(STAND_IN), str(input_path), output.arg, str(count_file),
               "--rows-per-file", str(args.rows_per_file), "--actor-cpus", str(args.actor_cpus)]
    started = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(command + (["--stats-file", str(stats_file)] if stats_file else []), env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(2)  # the process group's Ray processes go with it
    if kill_at is None and proc.returncode:
        raise SystemExit(f"the stand-in job failed; see {log}")
    return time.monotonic() - started


def clean_run(root: Path, name: str, output: Output, args: argparse.Namespace, log: Path, env: dict) -> dict:
    """One run into a fresh output: its rows/s over the write phase (from the job record: Ray's start
    excluded), wall seconds, the driver's peak memory and the checkpoint's size."""
    stats = root / f"{name}.stats.json"
    wall = attempt(root / "in.parquet", output, root / f"{name}.count", args, None, log, env, stats)
    return {"rows_per_s": output.record()["runs"][-1]["rows_per_s"], "wall_s": wall,
            "driver_peak_rss_mb": json.loads(stats.read_text())["driver_peak_rss_mb"],
            "checkpoint_bytes": output.checkpoint_bytes()}


def killed_runs(root: Path, name: str, output: Output, n_kills: int, args: argparse.Namespace, rng: random.Random,
                log: Path, env: dict) -> tuple[list[dict], bool]:
    """n_kills attempts on one output, each SIGKILLed at a random moment, then one to the end. Returns each
    kill's work lost and whether every input id is in the output exactly once."""
    count, kills = root / f"{name}.count", []
    for k in range(n_kills):
        before_rows, before_answered = output.committed(), answered(count)
        at = rng.uniform(*args.kill_after)
        attempt(root / "in.parquet", output, count, args, at, log, env)
        done, did = output.committed() - before_rows, answered(count) - before_answered
        kills.append({"kill_at_s": round(at, 1), "answered": did, "committed": done, "lost": max(0, did - done)})
        print(f"{name} kill {k + 1}: at {at:.1f} s, answered {did}, committed {done}, lost {max(0, did - done)}",
              flush=True)
        if output.committed() >= args.rows:
            break
    attempt(root / "in.parquet", output, count, args, None, log, env)
    return kills, sorted(output.ids()) == [f"r{i:07d}" for i in range(args.rows)]


@contextlib.contextmanager
def s3_server():
    """An S3-compatible server on loopback (moto's, in this process): (bucket URI maker, filesystem, env)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="bench",
                               secret_key="bench", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir("bench")
        yield (lambda name: Output(f"s3://bench/{name}?endpoint_override=127.0.0.1:{port}&scheme=http", fs,
                                   f"bench/{name}")), env
    finally:
        server.stop()


def summary(kills: list[dict], rows_per_file: int) -> dict:
    lost = [k["lost"] for k in kills]
    return {"kills": kills, "lost_median": statistics.median(lost) if lost else None,
            "lost_max": max(lost) if lost else None,
            "lost_max_over_rows_per_file": round(max(lost) / rows_per_file, 2) if lost else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    local_fs = pafs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="bench_kills_") as tmp:
        root = Path(tmp)
        make_input(root / "in.parquet", args.rows)
        log = root / "jobs.log"
        local = clean_run(root, "clean", Output(str(root / "clean"), local_fs, str(root / "clean")), args, log, {})
        kills, once = killed_runs(root, "killed", Output(str(root / "killed"), local_fs, str(root / "killed")),
                                  args.kills, args, rng, log, {})
        s3, s3_kills, s3_once = None, [], True
        if not args.no_s3:
            with s3_server() as (s3_output, env):
                s3 = clean_run(root, "s3_clean", s3_output("clean"), args, log, env)
                s3_kills, s3_once = killed_runs(root, "s3_killed", s3_output("killed"), args.s3_kills, args, rng,
                                                log, env)
    result = {"bench": "job_kills", "hardware": hardware("cpu"), "commit": commit(), "rows": args.rows,
              "rows_per_file": args.rows_per_file, "actor_cpus": args.actor_cpus,
              "ceiling_rows_per_s": round(local["rows_per_s"], 1), "clean_wall_s": round(local["wall_s"], 1),
              "driver_peak_rss_mb": local["driver_peak_rss_mb"], "checkpoint_bytes": local["checkpoint_bytes"],
              **summary(kills, args.rows_per_file), "exactly_once": once}
    if s3 is not None:
        result.update({"s3_ceiling_rows_per_s": round(s3["rows_per_s"], 1),
                       "s3_over_local": round(s3["rows_per_s"] / local["rows_per_s"], 3),
                       "s3_driver_peak_rss_mb": s3["driver_peak_rss_mb"],
                       "s3": summary(s3_kills, args.rows_per_file), "s3_exactly_once": s3_once})
    emit(result, args.output)
    return 0 if once and s3_once else 1


if __name__ == "__main__":
    raise SystemExit(main())
