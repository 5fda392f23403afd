"""Where the CPU goes in a serving replica and Serve's HTTP proxy under the bench_serve load.

Deploys one arm of bench_serve (one replica, the same configuration), drives one Poisson load at --rate, and
while it runs samples the replica's, its engine process's and the proxy's Python stacks with py-spy (`pip install py-spy`;
non-blocking sampling, idle threads excluded) and every process's CPU time from /proc (cores used by the
replica, the proxy, this load generator and the whole machine). Then, for a continuous arm, the same load
runs through the same engine in this process without Serve (requests parsed, images decoded and tokenized on
prepare_threads workers as they arrive, as the replica does): the gap between the two is what the HTTP path
costs. Prints, per process, the share of samples by thread and the functions with the most samples (self and
inclusive), both runs' latency figures, then one JSON line. The README quotes a run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serve import arm_config, drive, free_port, parse_args as serve_args, summarise as serve_summary, \
    workload  # noqa: E402
from benchmarks.provenance import commit, emit, hardware  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", default="continuous-sparse", help="a bench_serve arm (default continuous-sparse)")
    p.add_argument("--rate", type=float, default=12.0, help="arrivals per second (default 12)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument("--sample-s", type=float, default=15.0, help="seconds of sampling, mid-load (default 15)")
    p.add_argument("--top", type=int, default=12, help="functions to list per process (default 12)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--no-alone", action="store_true", help="skip the engine-alone run")
    p.add_argument("--engine-thread", action="store_true",
                   help="the engine on a thread of the replica (engine_process: false), not in its own process")
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


def engine_child(parent: int) -> int | None:
    """The pid of `parent`'s engine process (dynllava.engine_process), if it has one."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"engine_process" in (proc / "cmdline").read_bytes() and \
                    int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def sample(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> float:
    """CPU seconds every core of this machine has spent busy so far (/proc/stat, idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def engine_alone(sargs: argparse.Namespace, arm: str, load: list[tuple[float, dict]]) -> dict:
    """The load through the arm's engine in this process, without Serve: each request validated, its image
    decoded and tokenized on prepare_threads workers when it arrives (the replica's own functions), then
    submitted; TTFT and latency from arrival, as bench_serve measures them. Continuous arms only."""
    import torch

    from cluster import openai_protocol as proto
    from cluster.chat_inputs import to_prompt
    from dynllava.batching import ContinuousEngine, EngineRequest
    from dynllava.model import DynamicLlava

    config, _ = arm_config(arm, sargs, len(load))
    torch.set_num_threads(config.threads)
    model = DynamicLlava.from_pretrained(config.model, device=config.device, dtype=config.dtype)
    engine = ContinuousEngine(model, max_batch=config.max_batch, max_prefill_batch=config.max_prefill_batch,
                              max_prefill_tokens=config.max_prefill_tokens, max_waiting=len(load) + 8)
    engine.start()
    results: list[dict] = [{} for _ in load]
    done = threading.Semaphore(0)

    def run(i: int, body: dict, sent: float) -> None:
        r = results[i] = {"ok": False, "status": 200, "ttft": None, "tokens": 0, "chunks": 0, "sent": sent}
        try:
            chat = proto.ChatCompletionRequest.model_validate(body)
            prompt, images = to_prompt(model.processor, chat.messages, config.limits, False)
            prepared = model.prepare([images], [prompt], chat.max_tokens)
        except Exception:  # counted as an error, as the replica's 400 is
            r["status"], r["latency"] = 400, time.perf_counter() - sent
            done.release()
            raise

        def on_event(event) -> None:
            now = time.perf_counter()
            if event.token_ids:
                r["ttft"] = r["ttft"] if r["ttft"] is not None else now - sent
                r["tokens"] += len(event.token_ids)
                r["chunks"] += 1
            if event.final:
                r["ok"], r["latency"] = event.error is None, now - sent
                n, ttft = r["tokens"], r["ttft"]
                r["tpot"] = (r["latency"] - ttft) / (n - 1) if ttft is not None and n > 1 else None
                done.release()

        engine.submit(EngineRequest(prepared, config.sparsity, chat.max_tokens, on_event=on_event, arrived_at=sent))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(config.limits.prepare_threads) as pool:
        for i in range(min(4, len(load))):  # warm-up, off the clock
            pool.submit(run, i, load[i][1], time.perf_counter())
        for _ in range(min(4, len(load))):
            done.acquire()
        start = time.perf_counter()
        for i, (offset, body) in enumerate(load):
            time.sleep(max(0.0, start + offset - time.perf_counter()))
            pool.submit(run, i, body, time.perf_counter())
        for _ in load:
            done.acquire()
    wall = time.perf_counter() - start
    engine.stop()
    return serve_summary(results, wall, sargs.slo_s, window=load[-1][0])


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
                        "--max-tokens", str(args.max_tokens)] + ["--engine-thread"] * args.engine_thread)
    load = workload(sargs, args.rate)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    work = Path(tempfile.mkdtemp(prefix="profile_serve_"))
    result: dict = {}
    try:
        from cluster.app import build

        serve.run(build(*arm_config(args.arm, sargs, len(load))), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        asyncio.run(drive(url, load[:4]))
        pids = {"replica": actor_pid("ray::ServeReplica:bench"), "proxy": actor_pid("ray::ProxyActor")}
        engine = engine_child(pids["replica"])
        if engine is not None:
            pids["engine"] = engine
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(zip(("results", "wall"), asyncio.run(
            drive(url, load)))))
        runner.start()
        time.sleep(min(5.0, args.duration / 4))  # let the load build up
        pids["load generator"] = os.getpid()
        cpu_before, machine_before, t0 = {n: process_cpu_s(p) for n, p in pids.items()}, machine_cpu_s(), \
            time.monotonic()
        spies = {name: sample(pid, args.sample_s, work / f"{name}.txt") for name, pid in pids.items()
                 if name != "load generator"}
        for spy in spies.values():
            spy.wait()
        span = time.monotonic() - t0
        cores = {n: round((process_cpu_s(p) - cpu_before[n]) / span, 2) for n, p in pids.items()}
        cores["machine"] = round((machine_cpu_s() - machine_before) / span, 2)
        runner.join()
        for name in spies:
            result[name] = summarise(work / f"{name}.txt", args.top)
        result["cores"] = cores  # CPU used over the sampling window, per process and by the whole machine
        result["served"] = serve_summary(outcome["results"], outcome["wall"], sargs.slo_s, window=load[-1][0])
    finally:
        serve.shutdown()
        ray.shutdown()
    if not args.no_alone and args.arm.startswith("continuous"):
        result["alone"] = engine_alone(sargs, args.arm, load)
        result["served_over_alone_tokens_per_s"] = round(result["served"]["output_tokens_per_s"] /
                                                         result["alone"]["output_tokens_per_s"], 3)
    for name in [n for n in ("replica", "engine", "proxy") if n in result]:
        print(f"== {name}: {result[name]['samples']} samples")
        print("threads:   " + "\n           ".join(f"{v:6.1%}  {k}" for k, v in result[name]["threads"]))
        print("self:      " + "\n           ".join(f"{v:6.1%}  {k}" for k, v in result[name]["self"]))
        print("inclusive: " + "\n           ".join(f"{v:6.1%}  {k}" for k, v in result[name]["inclusive"]))
    print("cores used while sampling: " + ", ".join(f"{k} {v}" for k, v in result["cores"].items()))
    keys = ("slo_attainment", "ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "output_tokens_per_s")
    for run in ("served", "alone"):
        if run in result:
            print(f"{run:>7}: " + ", ".join(f"{k} {result[run][k]}" for k in keys))
    out = {"bench": "profile_serve", "arm": args.arm, "rate": args.rate, "requests": len(load),
           "replica_threads": arm_config(args.arm, sargs, len(load))[0].threads,
           "engine_process": not args.engine_thread, **result,
           "hardware": hardware("cpu"), "commit": commit()}
    emit(out, args.output)
    return out


if __name__ == "__main__":
    main()
