"""Claim: a replica serves more when its engine loop runs in its own process than on a thread of the replica.

The same bench_serve arm (one replica, the same configuration and Poisson load) deployed alternately with
`engine_process: true` and `false`, --pairs times, in one Ray session: alternating pairs, because on a shared
machine the speed drifts between runs by more than the effect. Per run: output tokens/s, requests within the SLO,
TTFT p50 and TPOT p50; then each pair's tokens/s ratio (process over thread) and their geometric mean. Prints
one line per run, then one JSON line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serve import free_port, parse_args as serve_args, run_arm, workload  # noqa: E402
from benchmarks.provenance import commit, emit, hardware  # noqa: E402

KEYS = ("output_tokens_per_s", "slo_attainment", "ttft_p50", "tpot_p50")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", default="continuous-sparse", help="a bench_serve arm (default continuous-sparse)")
    p.add_argument("--rate", type=float, default=12.0, help="arrivals per second (default 12: one replica saturates)")
    p.add_argument("--pairs", type=int, default=3, help="process / thread pairs (default 3)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run (default 30)")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import ray
    from ray import serve

    args = parse_args(argv)
    sargs = serve_args(["--rates", str(args.rate), "--duration", str(args.duration), "--arms", args.arm])
    loads = {args.rate: workload(sargs, args.rate)}
    ray.init(address="local", num_cpus=max(4, int(sargs.replica_cpus) + 2), include_dashboard=False,
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, list[dict]] = {"process": [], "thread": []}
    try:
        for pair in range(args.pairs):
            for mode in ("process", "thread"):
                sargs.engine_thread = mode == "thread"
                row = run_arm(args.arm, sargs, f"http://127.0.0.1:{port}", loads)[args.rate]
                runs[mode].append({k: row[k] for k in KEYS})
                print(f"pair {pair + 1} {mode:>7}: " + ", ".join(f"{k} {row[k]}" for k in KEYS), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    ratios = [round(p["output_tokens_per_s"] / t["output_tokens_per_s"], 3)
              for p, t in zip(runs["process"], runs["thread"])]
    result = {"bench": "engine_process", "arm": args.arm, "rate": args.rate, "requests": len(loads[args.rate]),
              "runs": runs, "process_over_thread_tokens_per_s": ratios,
              "geomean_process_over_thread": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3),
              "hardware": hardware("cpu"), "commit": commit()}
    emit(result, args.output)
    return result


if __name__ == "__main__":
    main()
