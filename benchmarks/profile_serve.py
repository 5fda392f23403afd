"""Where the CPU goes in a serving replica and Serve's HTTP proxy under the bench_serve load.

Deploys one arm of bench_serve (one replica), drives one Poisson load at --rate, and while it runs samples the
replica's and the proxy's Python stacks with py-spy (`pip install py-spy`; non-blocking sampling, idle threads
excluded). Prints, per process, the share of samples by thread and the functions with the most samples (self
and inclusive), then one JSON line. Use it to find what to fix before tuning; the README quotes a run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serve import drive, free_port, parse_args as serve_args, workload  # noqa: E402
from benchmarks.provenance import commit, emit, hardware  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", default="continuous-sparse", help="a bench_serve arm (default continuous-sparse)")
    p.add_argument("--rate", type=float, default=12.0, help="arrivals per second (default 12)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--sample-s", type=float, default=15.0, help="seconds of sampling, mid-load (default 15)")
    p.add_argument("--top", type=int, default=12, help="functions to list per process (default 12)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def actor_pid(title: str) -> int:
    """The pid of the local process whose title (Ray names worker processes `ray::<actor class>`) has `title`."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and title in (proc / "cmdline").read_bytes().decode(errors="replace"):
                return int(proc.name)
        except OSError:
            continue
    raise RuntimeError(f"no process titled *{title}*")


def sample(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


BOOTSTRAP = {"Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run", "<module>", "_run_module_as_main",
             "_run_code", "main"}


def frame_name(frame: str) -> str:
    """'func (path/file.py:12)' -> 'func (file.py)'."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else func


def summarise(raw: Path, top: int) -> dict:
    """Folded stacks -> sample shares by thread (named by its first frame below threading's bootstrap), and the
    top functions by self and inclusive samples."""
    threads, self_time, inclusive = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        names = [frame_name(f) for f in stack.split(";") if f]
        total += n
        threads[next((x for x in names if x.split(" (")[0] not in BOOTSTRAP), "other")] += n
        if names:
            self_time[names[-1]] += n
        for name in set(names):
            inclusive[name] += n

    def share(counter):
        return [(k, round(v / max(total, 1), 3)) for k, v in counter.most_common(top)]

    return {"samples": total, "threads": share(threads), "self": share(self_time), "inclusive": share(inclusive)}


def main(argv: list[str] | None = None) -> dict:
    import ray
    from ray import serve

    args = parse_args(argv)
    sargs = serve_args(["--rates", str(args.rate), "--duration", str(args.duration), "--arms", args.arm,
                        "--max-tokens", str(args.max_tokens)])
    load = workload(sargs, args.rate)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    work = Path(tempfile.mkdtemp(prefix="profile_serve_"))
    result: dict = {}
    try:
        from cluster.app import build
        from cluster.serve_config import ServeConfig
        from dynllava.config import SparsityConfig

        batching, density = args.arm.split("-")
        sparsity = SparsityConfig(vision_keep=sargs.vision_keep, text_keep=sargs.text_keep) \
            if density == "sparse" else SparsityConfig()
        config = ServeConfig(model=sargs.model, sparsity=sparsity, batching=batching, max_batch=sargs.max_batch,
                             max_waiting=len(load), threads=int(sargs.replica_cpus))
        serve.run(build(config, {"ray_actor_options": {"num_cpus": sargs.replica_cpus},
                                 "max_ongoing_requests": len(load) + sargs.max_batch + 8}),
                  name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(drive(url, load[:4]))
        pids = {"replica": actor_pid("ray::ServeReplica:bench"), "proxy": actor_pid("ray::ProxyActor")}
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(zip(("results", "wall"), asyncio.run(
            drive(url, load)))))
        runner.start()
        time.sleep(min(5.0, args.duration / 4))  # let the load build up
        spies = {name: sample(pid, args.sample_s, work / f"{name}.txt") for name, pid in pids.items()}
        for spy in spies.values():
            spy.wait()
        runner.join()
        for name in pids:
            result[name] = summarise(work / f"{name}.txt", args.top)
        ok = [r for r in outcome["results"] if r["ok"]]
        result["load"] = {"rate": args.rate, "requests": len(load), "ok": len(ok),
                          "tokens_per_s": round(sum(r["tokens"] for r in ok) / outcome["wall"], 1),
                          "chunks_per_s": round(sum(r["chunks"] for r in ok) / outcome["wall"], 1)}
    finally:
        serve.shutdown()
        ray.shutdown()
    for name in ("replica", "proxy"):
        print(f"== {name}: {result[name]['samples']} samples")
        print("threads:   " + "\n           ".join(f"{v:6.1%}  {k}" for k, v in result[name]["threads"]))
        print("self:      " + "\n           ".join(f"{v:6.1%}  {k}" for k, v in result[name]["self"]))
        print("inclusive: " + "\n           ".join(f"{v:6.1%}  {k}" for k, v in result[name]["inclusive"]))
    print(f"load: {result['load']}")
    out = {"bench": "profile_serve", "arm": args.arm, **result, "hardware": hardware("cpu"), "commit": commit()}
    emit(out, args.output)
    return out


if __name__ == "__main__":
    main()
