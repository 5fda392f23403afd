"""Claim: on the online endpoint, continuous batching and sparsity each raise goodput under a latency SLO.

Four arms, each a local deployment of one replica (model load excluded from the measurement): continuous or
static batching (`@serve.batch`) x dense or sparse (the configured vision/text keep). All four are deployed at
once, as apps of their own, and the loads run rate by rate, every arm at each rate, the arms' order reversed at
every other rate: this shared machine's speed drifts by 10-20% over minutes, and one arm's whole sweep after
another's put that drift between the arms compared. Each arm gets the same open-loop loads, one per rate of the
sweep (--rates): Poisson arrivals with a fixed seed for --duration s (at most --max-requests), loopback HTTP
only, streamed chat requests with a held-out synthetic scene and a caption, detailed-description or VQA prompt
(mixed output lengths), greedy. (With --num-gpus, one arm's replica at a time, each arm's whole sweep in turn.)
Per arm and rate: throughput, TTFT, time per output token after the first (TPOT) and end-to-end latency
percentiles, and goodput = requests that finished within --slo-s per second of offered load (the arrival
window, first to last arrival, as in DistServe: an arm that serves every request within the SLO has goodput =
the offered rate; dividing by the wall clock instead would charge the drain, i.e. the last request's own
latency, and make two arms that both serve everything differ by noise). The replicas shed what they cannot admit
in time (`max_queue_wait_s`, --max-queue-wait-s): above a replica's capacity, a queue that grows without bound
would make every request late, so goodput would measure the queue rather than the engine; `shed` counts the 503s. While each load runs, the replica's
/health is polled every 0.25 s for its K/V bytes: kv_allocated_over_in_use is the bytes the running rows'
blocks hold over the bytes of their valid slots, summed over the samples (target <= 1.15). Per rate:
continuous_over_static = continuous goodput / static goodput (dense and sparse; target >= 1 at every rate and
>= 1.5 at the highest) and sparse_over_dense = sparse goodput / dense goodput (continuous and static; target
>= 1). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.ordering import alternating  # noqa: E402
from benchmarks.provenance import commit, emit, hardware  # noqa: E402
from dynllava.data import shapes  # noqa: E402

TASKS = ("caption", "describe", "vqa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model source (default: the embedded tiny)")
    p.add_argument("--rates", default="4,8,12,16", help="comma-separated mean arrivals per second, one load each "
                   "(default 4,8,12,16: below to well above a 2-core CPU replica's capacity with tiny)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per load (default 30)")
    p.add_argument("--max-requests", type=int, default=400, help="most requests per arm (default 400)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    p.add_argument("--slo-s", type=float, default=3.0, help="end-to-end latency SLO for goodput (default 3 s)")
    p.add_argument("--max-queue-wait-s", type=float, default=1.0,
                   help="the replicas' max_queue_wait_s: a request not admitted this long after it arrived is shed "
                        "with 503 (counted in `shed`), as a server under an SLO is configured; 0: no limit, every "
                        "request waits its turn (default 1.0)")
    p.add_argument("--max-batch", type=int, default=16, help="rows per replica batch, both modes (default 16)")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="static: @serve.batch wait (default 0.05)")
    p.add_argument("--vision-keep", type=float, default=0.2)
    p.add_argument("--text-keep", type=float, default=0.5)
    p.add_argument("--replica-cpus", type=float, default=2, help="CPUs of the replica")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the replica (default: its CPUs - 1, "
                   "at least 1: on a small machine the HTTP proxy, request preprocessing and this load generator "
                   "need a core, and torch's threads stall when one of them is descheduled)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs of the replica")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when the replica has a GPU)")
    p.add_argument("--arms", default="continuous-dense,continuous-sparse,static-dense,static-sparse",
                   help="comma-separated subset of the four arms")
    p.add_argument("--engine-thread", action="store_true",
                   help="run the engine on a thread of the replica (engine_process: false) instead of its own process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def workload(args: argparse.Namespace, rate: float) -> list[tuple[float, dict]]:
    """(arrival offset s, request body) for one load: the same for every arm (fixed seed)."""
    rng = random.Random(args.seed)
    t, out = 0.0, []
    while len(out) < args.max_requests:
        t += rng.expovariate(rate)
        if t > args.duration:
            break
        out.append((t, request_body(rng, len(out), args.max_tokens)))
    return out


def request_body(rng: random.Random, index: int, max_tokens: int) -> dict:
    """A streamed, greedy chat request: held-out synthetic scene `index` with a caption, description or VQA
    prompt drawn from `rng`."""
    row = shapes.make_row(shapes.SPLIT_SEEDS["test"], index, rng.choice(TASKS))
    url = "data:image/png;base64," + base64.b64encode(row.image).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": row.prompt}]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def one_request(session, url: str, body: dict, start: float, offset: float) -> dict:
    """Send at start + offset; returns arrival-relative TTFT and latency (s), content chunks, generated tokens
    (the usage chunk), time per output token after the first, the status, and the sparsity the server applied
    (`dynllava.applied` on the last chunk)."""
    import aiohttp

    await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
    sent = time.perf_counter()
    ttft, chunks, tokens, status, applied = None, 0, 0, 0, None
    try:
        async with session.post(url, json=body) as response:
            status = response.status
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    status = 500
                    break
                applied = chunk.get("dynllava", {}).get("applied", applied)
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - sent
                        chunks += 1
    except aiohttp.ClientError:
        status = -1
    latency = time.perf_counter() - sent
    tpot = (latency - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    return {"ok": status == 200 and ttft is not None, "status": status, "ttft": ttft, "latency": latency,
            "chunks": chunks, "tokens": tokens, "tpot": tpot, "sent": sent - start, "applied": applied}


async def drive(url: str, load: list[tuple[float, dict]], health_url: str | None = None
                ) -> tuple[list[dict], float, list[tuple[int, int]]]:
    """Send the load; returns the results, the wall time, and (K/V bytes in use, allocated) from /health every
    0.25 s while rows ran (when health_url is given)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    samples: list[tuple[int, int]] = []

    async def sample(session) -> None:
        while True:
            await asyncio.sleep(0.25)
            async with session.get(health_url) as response:
                health = await response.json()
            if health.get("running"):
                samples.append((health["kv_bytes_in_use"], health["kv_bytes_allocated"]))

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        sampler = asyncio.create_task(sample(session)) if health_url else None
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(session, url, body, start, t) for t, body in load))
        wall = time.perf_counter() - start
        if sampler is not None:
            sampler.cancel()
        return results, wall, samples


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarise(results: list[dict], wall: float, slo_s: float, window: float) -> dict:
    """One arm at one rate; `wall` is first send to last answer, `window` the arrival window (s)."""
    ok = [r for r in results if r["ok"]]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r.get("tpot") is not None]
    good = sum(r["latency"] <= slo_s for r in ok)
    shed = sum(r["status"] == 503 for r in results)
    return {"requests": len(results), "ok": len(ok), "shed": shed, "errors": len(results) - len(ok) - shed,
            "wall_s": round(wall, 2),
            "throughput_rps": round(len(ok) / wall, 3),
            "output_tokens_per_s": round(sum(r.get("tokens", 0) for r in ok) / wall, 1),
            "output_chunks_per_s": round(sum(r["chunks"] for r in ok) / wall, 1),
            "tpot_p50": round(percentile(tpot, 50), 4), "tpot_p95": round(percentile(tpot, 95), 4),
            "ttft_p50": round(percentile(ttft, 50), 3), "ttft_p95": round(percentile(ttft, 95), 3),
            "ttft_p99": round(percentile(ttft, 99), 3), "latency_p50": round(percentile(lat, 50), 3),
            "latency_p95": round(percentile(lat, 95), 3), "latency_p99": round(percentile(lat, 99), 3),
            "mean_latency": round(statistics.fmean(lat), 3) if lat else None,
            "slo_attainment": round(good / len(results), 4) if results else 0.0,
            "window_s": round(window, 2), "goodput_rps": round(good / window, 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_threads(args: argparse.Namespace) -> int:
    """The replica's torch threads: --threads, else its CPUs - 1 (at least 1)."""
    return args.threads or max(1, int(args.replica_cpus) - 1)


def arm_config(name: str, args: argparse.Namespace, most: int):
    """(ServeConfig, deployment options) of one arm's replica, for loads of at most `most` requests."""
    from cluster.serve_config import ServeConfig
    from dynllava.config import SparsityConfig

    batching, density = name.split("-")
    sparsity = SparsityConfig(vision_keep=args.vision_keep, text_keep=args.text_keep) if density == "sparse" \
        else SparsityConfig(vision_keep=1.0, text_keep=1.0)
    config = ServeConfig(model=args.model, device=args.device, sparsity=sparsity, batching=batching,
                         max_batch=args.max_batch, batch_wait_s=args.batch_wait_s, max_waiting=most,
                         threads=replica_threads(args), engine_process=not args.engine_thread,
                         max_queue_wait_s=args.max_queue_wait_s or None)
    options = {"ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.num_gpus},
               "max_ongoing_requests": most + args.max_batch + 8}
    return config, options


def deploy(name: str, args: argparse.Namespace, base: str, loads: dict[float, list], app: str = "bench") -> str:
    """Deploy the arm's replica as Serve app `app` at route /<app> and warm it up (first-call costs, such as
    the allocator and lazy inits, off the clock). Returns the app's base URL."""
    from ray import serve

    from cluster.app import build

    serve.run(build(*arm_config(name, args, max(len(load) for load in loads.values()))), name=app,
              route_prefix=f"/{app}")
    url = f"{base}/{app}"
    asyncio.run(drive(f"{url}/v1/chat/completions", next(iter(loads.values()))[:4]))
    return url


def measure(name: str, args: argparse.Namespace, url: str, rate: float, load: list) -> dict:
    """Drive one load against a deployed arm (its base URL) and summarise it."""
    results, wall, kv = asyncio.run(drive(f"{url}/v1/chat/completions", load, f"{url}/health"))
    out = summarise(results, wall, args.slo_s, window=load[-1][0])
    in_use = sum(s[0] for s in kv)
    out["kv_allocated_over_in_use"] = round(sum(s[1] for s in kv) / in_use, 3) if in_use else None
    print(f"{name} @ {rate}/s: {out}", file=sys.stderr)
    return out


def run_arm(name: str, args: argparse.Namespace, base: str, loads: dict[float, list]) -> dict[float, dict]:
    """Deploy the arm's replica, drive each load in turn (rate -> summary), tear down."""
    from ray import serve

    url = deploy(name, args, base, loads)
    out = {rate: measure(name, args, url, rate, load) for rate, load in loads.items()}
    serve.delete("bench")
    return out


def sweep_order(names: list[str], rates: list[float]) -> list[tuple[float, str]]:
    """Rate by rate, every arm at that rate, in ABBA order across rates (A B C D, D C B A, ...): the arms
    compared at one rate run minutes apart at most, and steady drift favours none of them."""
    passes = alternating(names, len(rates))
    return [(rate, name) for rate, one_pass in zip(rates, passes) for name in one_pass]


def run_sweep(names: list[str], args: argparse.Namespace, base: str,
              loads: dict[float, list]) -> dict[str, dict[float, dict]]:
    """Deploy every arm at once (an idle replica's engine waits on its queue at no cost), then drive the loads
    in sweep_order. Returns arm -> rate -> summary, rates in the sweep's order."""
    from ray import serve

    urls = {name: deploy(name, args, base, loads, app=f"bench-{name}") for name in names}
    out: dict[str, dict[float, dict]] = {name: {} for name in names}
    try:
        for rate, name in sweep_order(names, list(loads)):
            out[name][rate] = measure(name, args, urls[name], rate, loads[rate])
    finally:
        for name in names:
            serve.delete(f"bench-{name}")
    return {name: {rate: out[name][rate] for rate in loads} for name in names}


def main(argv: list[str] | None = None) -> dict:
    import ray
    from ray import serve

    args = parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    loads = {rate: workload(args, rate) for rate in rates}
    names = args.arms.split(",")
    together = not args.num_gpus  # on a GPU, one arm's replica at a time: a 7B replica each would not fit
    order = sweep_order(names, rates) if together else [(rate, name) for name in names for rate in rates]
    # logical CPUs: every arm's replica is up at once, but only the one under load computes
    ray.init(address="local", num_cpus=max(4, (len(names) if together else 1) * int(args.replica_cpus) + 2),
             num_gpus=int(args.num_gpus) or None, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        arms = run_sweep(names, args, base, loads) if together else \
            {name: run_arm(name, args, base, loads) for name in names}
    finally:
        serve.shutdown()
        ray.shutdown()
    cols = ("ok", "shed", "goodput_rps", "slo_attainment", "ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "latency_p50",
            "latency_p95", "output_tokens_per_s", "output_chunks_per_s", "kv_allocated_over_in_use")
    print(f"Poisson loads over {args.duration}s each, SLO {args.slo_s}s, max_tokens {args.max_tokens}, "
          f"max_batch {args.max_batch}")
    print(f"{'arm':<20}{'rate':>6}" + "".join(f"{c:>14}" for c in cols))
    for name, by_rate in arms.items():
        for rate, row in by_rate.items():
            print(f"{name:<20}{rate:>6}" + "".join(f"{row[c]:>14}" for c in cols))

    def ratio(a: str, b: str, rate: float) -> float | None:
        if a in arms and b in arms and arms[b][rate]["goodput_rps"]:
            return round(arms[a][rate]["goodput_rps"] / arms[b][rate]["goodput_rps"], 3)
        return None

    ratios = {str(rate): {"continuous_over_static_dense": ratio("continuous-dense", "static-dense", rate),
                          "continuous_over_static_sparse": ratio("continuous-sparse", "static-sparse", rate),
                          "sparse_over_dense_continuous": ratio("continuous-sparse", "continuous-dense", rate),
                          "sparse_over_dense_static": ratio("static-sparse", "static-dense", rate)}
              for rate in rates}
    for rate, r in ratios.items():
        print(f"rate {rate}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    result = {"bench": "serve", "model": args.model, "hardware": hardware("cuda" if args.num_gpus else "cpu"),
              "commit": commit(), "replica_threads": replica_threads(args),
              "rates": rates, "duration_s": args.duration,
              "requests": {str(r): len(load) for r, load in loads.items()}, "max_tokens": args.max_tokens,
              "order": [f"{name}@{rate:g}" for rate, name in order],
              "max_batch": args.max_batch, "slo_s": args.slo_s, "max_queue_wait_s": args.max_queue_wait_s,
              "sparsity": {"vision_keep": args.vision_keep, "text_keep": args.text_keep},
              "arms": {name: {str(r): row for r, row in by_rate.items()} for name, by_rate in arms.items()},
              "ratios": ratios}
    emit(result, args.output)
    return result


if __name__ == "__main__":
    main()
