"""Claim: under a step in load, the cluster controller holds the TTFT SLO by trading sparsity first and
replicas second, with fewer replica-seconds than Ray Serve's default autoscaling, which misses during the step.

Three arms, each a fresh local deployment of the default model starting at --sla's minimum replica count:
  dense-default   dense (the SLA's preferred setting) with Serve's default autoscaling policy
  fixed-default   a fixed sparsity (--fixed-vision-keep/--fixed-text-keep) with Serve's default autoscaling
  controller      starts at the preferred setting; the cluster controller (cluster/controller.py) sets each
                  replica's sparsity and the replica count (cluster.autoscaling:controller_policy)
Serve's default autoscaling is used as shipped (target_ongoing_requests 2, upscale_delay_s 30,
downscale_delay_s 600) with the SLA's replica bounds; every arm gets the same requests: open-loop Poisson
arrivals at --base-rate, then --step-factor x that rate, then --base-rate again (--phases seconds each), fixed
seed, loopback HTTP only, streamed greedy chat requests over held-out synthetic scenes (caption, description
and VQA prompts).

Per arm: SLO attainment (share of all requests answered with TTFT <= the SLA's ttft_p95_s; errors and 429s
count as misses) overall and during the step, goodput (such requests per second), TTFT p50/p95/p99,
replica-seconds (integral of replicas holding resources over the run, sampled from serve.status()), peak
replicas, mean keep ratios the server applied (the quality cost), recover_s (seconds after the step up until
the p95 TTFT of each 2.5 s of arrivals stays within target; 0 if it never left, null if it never came back
during the step) and settle_s (seconds after the step down until replicas and sparsity are back where the arm
started, for good; null if not by the end). Writes a PNG of TTFT, keep ratio and replicas over time, prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serve import drive, free_port, percentile, request_body  # noqa: E402
from dynllava.plots import Panel, save_panels  # noqa: E402
from benchmarks.provenance import commit, emit, hardware  # noqa: E402
from cluster.serve_config import ServeConfig  # noqa: E402
from cluster.sla import SLA, Bounds, KeepSetting, OnlineTargets  # noqa: E402

ARMS = ("dense-default", "fixed-default", "controller")
APP = "autoscale"
BIN_S = 2.5  # seconds of arrivals per point in the recovery measure and the plot
HOLDING = ("STARTING", "RUNNING", "UPDATING", "RECOVERING", "STOPPING")  # replica states that hold resources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model source (default: the embedded tiny)")
    p.add_argument("--sla", default="configs/sla.yaml", help="SLA file: TTFT target, floor, preferred setting, "
                   "replica bounds, pacing (default configs/sla.yaml)")
    p.add_argument("--ttft-s", type=float, default=None, help="override the SLA's online.ttft_p95_s")
    p.add_argument("--risk", type=float, default=None, help="override the SLA's pacing.risk: the share of a "
                   "target at which the controller tightens (lower: earlier, sparser, fewer misses)")
    p.add_argument("--max-replicas", type=int, default=None, help="override the SLA's replicas.max (every arm's "
                   "bound; e.g. the machine's cores on a CPU box, where more replicas only share them)")
    p.add_argument("--base-rate", type=float, default=3.5, help="arrivals per second outside the step (default 3.5: "
                   "4x that is over one dense 1-CPU replica of tiny and under one at the floor)")
    p.add_argument("--step-factor", type=float, default=4.0, help="the step's rate as a multiple (default 4)")
    p.add_argument("--phases", default="30,40,90", help="seconds at base, step, base rate (default 30,40,90)")
    p.add_argument("--max-tokens", type=int, default=24, help="max_tokens per request (default 24: short answers "
                   "and captions, so TTFT is mostly prefill and queueing)")
    p.add_argument("--max-batch", type=int, default=16, help="rows per replica batch (default 16)")
    p.add_argument("--max-prefill-tokens", type=int, default=ServeConfig.max_prefill_tokens,
                   help=f"prompt tokens prefilled per engine step (default {ServeConfig.max_prefill_tokens}, "
                   "ServeConfig's); with long prompts on a CPU, about one prompt keeps the queue visible "
                   "to the controller and lets its orders reach the requests still waiting")
    p.add_argument("--replica-cpus", type=float, default=1, help="CPUs (torch threads) per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (default 0)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when the replica has a GPU)")
    p.add_argument("--fixed-vision-keep", type=float, default=0.2, help="fixed-default arm's vision keep")
    p.add_argument("--fixed-text-keep", type=float, default=0.5, help="fixed-default arm's text keep")
    p.add_argument("--vision-scorer", default="learned", help="every arm's vision scorer (default learned; a "
                   "random-weight shape such as configs/models/tiny.yaml has no predictors: use stride)")
    p.add_argument("--text-scorer", default="learned", help="every arm's text scorer (default learned; recent for "
                   "a random-weight shape)")
    p.add_argument("--window-s", type=float, default=10.0, help="controller arm: replicas' telemetry window")
    p.add_argument("--report-period-s", type=float, default=1.0, help="controller arm: report and step period")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --output, else none)")
    args = p.parse_args(argv)
    args.phases = [float(x) for x in args.phases.split(",")]
    if len(args.phases) != 3 or min(args.phases) <= 0:
        p.error("--phases needs three positive numbers: base, step, base")
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    return args


def step_workload(args: argparse.Namespace) -> list[tuple[float, dict]]:
    """(arrival offset s, request body): Poisson at base, base x factor, base rate over the three phases."""
    rng = random.Random(args.seed)
    out, start = [], 0.0
    for length, rate in zip(args.phases, (args.base_rate, args.base_rate * args.step_factor, args.base_rate)):
        t = start + rng.expovariate(rate)
        while t < start + length:
            out.append((t, request_body(rng, len(out), args.max_tokens)))
            t += rng.expovariate(rate)
        start += length
    return out


class ReplicaSampler:
    """Samples the app's replicas holding resources every `period_s` on a thread: [(seconds since t0, n)]; with a
    controller, also what it last heard from each replica (`telemetry`: queue, head wait, busy fraction, p95,
    level), to see what it saw when it acted."""

    def __init__(self, t0: float, period_s: float = 0.5, controller=None):
        self.t0, self.period_s, self.points, self.telemetry = t0, period_s, [], []
        self.controller = controller
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray import serve

        while not self.stop.is_set():
            try:
                app = serve.status().applications[APP]
                states = next(iter(app.deployments.values())).replica_states
                self.points.append((time.perf_counter() - self.t0, sum(states.get(s, 0) for s in HOLDING)))
            except (KeyError, StopIteration):
                pass
            if self.controller is not None:
                self._sample_controller()
            self.stop.wait(self.period_s)

    def _sample_controller(self) -> None:
        import ray

        now = time.perf_counter() - self.t0
        for actor, seen in ray.get(self.controller.status.remote())["actors"].items():
            snap = seen["snapshot"]
            self.telemetry.append({"t": round(now, 2), "actor": actor, "level": seen.get("level"),
                                   "age_s": round(time.time() - snap["timestamp"], 2),
                                   **{k: snap[k] if not isinstance(snap[k], float) else round(snap[k], 3)
                                      for k in ("queue_depth", "oldest_wait_s", "busy_fraction", "requests_per_s",
                                                "ttft_p95_s", "running")}})

    def finish(self) -> list[tuple[float, int]]:
        self.stop.set()
        self.thread.join()
        return self.points


def arm_deployment(name: str, args: argparse.Namespace, sla: SLA, n_requests: int):
    """(ServeConfig, Serve deployment options) for an arm."""
    from dynllava.config import SparsityConfig

    keep = {"dense-default": sla.preferred, "controller": sla.preferred,
            "fixed-default": KeepSetting(args.fixed_vision_keep, args.fixed_text_keep)}[name]
    config = ServeConfig(model=args.model, device=args.device, max_batch=args.max_batch,
                         max_prefill_tokens=args.max_prefill_tokens,
                         sparsity=SparsityConfig(vision_keep=keep.vision_keep, text_keep=keep.text_keep,
                                                 vision_scorer=args.vision_scorer, text_scorer=args.text_scorer),
                         max_waiting=n_requests, threads=max(1, int(args.replica_cpus)),
                         controller=name == "controller", report_period_s=args.report_period_s,
                         telemetry_window_s=args.window_s)
    autoscaling = {"min_replicas": sla.replicas.min, "max_replicas": sla.replicas.max,
                   "initial_replicas": sla.replicas.min}
    if name == "controller":  # Serve carries out the controller's count at once; the controller paces it
        autoscaling.update(upscale_delay_s=0, downscale_delay_s=0, metrics_interval_s=args.report_period_s,
                           look_back_period_s=2 * args.report_period_s,
                           policy={"policy_function": "cluster.autoscaling:controller_policy"})
    options = {"ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.num_gpus},
               "max_ongoing_requests": n_requests + args.max_batch + 8, "autoscaling_config": autoscaling}
    return config, options


def run_arm(name: str, args: argparse.Namespace, sla: SLA, base: str, load) -> dict:
    """Deploy, warm up, drive the load while sampling replicas, tear down; returns the raw results."""
    import ray
    from ray import serve

    from cluster.app import build
    from cluster.controller import start_controller

    config, options = arm_deployment(name, args, sla, len(load))
    controller = start_controller(sla, period_s=args.report_period_s) if name == "controller" else None
    try:
        serve.run(build(config, options), name=APP, route_prefix="/")
        url = f"{base}/v1/chat/completions"
        for _, body in load[:4]:  # first-call costs off the clock, one at a time: no queue the controller sees
            asyncio.run(drive(url, [(0.0, body)]))
        time.sleep(args.window_s + 2 * args.report_period_s)  # the replicas' telemetry window forgets the warm-up
        t0, wall0 = time.perf_counter(), time.time()
        sampler = ReplicaSampler(t0, controller=controller)
        results, wall, _ = asyncio.run(drive(url, load))
        replicas = sampler.finish()
        decisions = ray.get(controller.status.remote())["decisions"] if controller is not None else []
        decisions = [{"t": round(d["at"] - wall0, 2), **{k: v for k, v in d.items() if k != "at"}}
                     for d in decisions]  # seconds since the load started (negative: during the warm-up)
    finally:
        serve.delete(APP)
        if controller is not None:
            ray.kill(controller)
    return {"results": results, "wall": wall, "replicas": replicas, "decisions": decisions,
            "telemetry": sampler.telemetry,
            "autoscaling": options["autoscaling_config"]}


def _bins(results: list[dict], start: float, end: float) -> list[tuple[float, list[dict]]]:
    """Requests grouped by arrival into BIN_S bins over [start, end): [(bin end, requests)]."""
    out, t = [], start
    while t < end - 1e-9:
        out.append((min(t + BIN_S, end), [r for r in results if t <= r["sent"] < t + BIN_S]))
        t += BIN_S
    return out


def _ttft(r: dict) -> float:
    return r["ttft"] if r["ok"] else float("inf")


def _keep_of(r: dict) -> tuple[float, float] | None:
    a = r.get("applied")
    return (a["vision_keep"], a.get("text_keep") or 1.0) if a else None


def summarise(raw: dict, args: argparse.Namespace, target: float) -> dict:
    results, wall, replicas = raw["results"], raw["wall"], raw["replicas"]
    up, down = args.phases[0], args.phases[0] + args.phases[1]
    ok = [r for r in results if r["ok"]]
    within = [r for r in ok if r["ttft"] <= target]
    step = [r for r in results if up <= r["sent"] < down]
    ttft = [r["ttft"] for r in ok]
    held = replicas + [(wall, replicas[-1][1])] if replicas else []
    replica_seconds = sum(n * (t2 - t1) for (t1, n), (t2, _) in zip(held, held[1:]))
    keeps = [k for k in map(_keep_of, ok) if k]
    violating = [end for end, rs in _bins(results, up, down) if rs and percentile([_ttft(r) for r in rs], 95) > target]
    if not violating:
        recover = 0.0
    else:
        recover = None if violating[-1] >= down - 1e-9 else round(violating[-1] - up, 1)
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok), "wall_s": round(wall, 1),
            "slo_attainment": round(len(within) / len(results), 4) if results else 0.0,
            "step_slo_attainment": round(sum(r in within for r in step) / len(step), 4) if step else None,
            "goodput_rps": round(len(within) / wall, 3),
            "ttft_p50": round(percentile(ttft, 50), 3), "ttft_p95": round(percentile(ttft, 95), 3),
            "ttft_p99": round(percentile(ttft, 99), 3),
            "replica_seconds": round(replica_seconds, 1), "peak_replicas": max((n for _, n in replicas), default=0),
            "mean_vision_keep": round(statistics.fmean(k[0] for k in keeps), 4) if keeps else None,
            "mean_text_keep": round(statistics.fmean(k[1] for k in keeps), 4) if keeps else None,
            "recover_s": recover, "settle_s": _settle(results, replicas, down),
            "controller_decisions": _count_decisions(raw["decisions"]), "decisions": raw["decisions"],
            "controller_saw": raw["telemetry"],
            "ttft_by_arrival": [(round(r["sent"], 2), round(_ttft(r), 3) if r["ok"] else None) for r in results]}


def _settle(results: list[dict], replicas: list[tuple[float, int]], down: float) -> float | None:
    """Seconds after the step down until the replica count and the applied sparsity are back at the arm's
    starting values for the rest of the run (None: not by the end)."""
    answered = sorted((r for r in results if r["ok"]), key=lambda r: r["sent"])
    late_replicas = [(t, n) for t, n in replicas if t >= down]
    late_requests = [r for r in answered if r["sent"] >= down]
    if not answered or not late_replicas or not late_requests:
        return None
    first_n, first_keep = replicas[0][1], _keep_of(answered[0])
    if late_replicas[-1][1] != first_n or _keep_of(late_requests[-1]) != first_keep:
        return None
    off = [t for t, n in late_replicas if n != first_n] + [r["sent"] for r in late_requests
                                                           if _keep_of(r) != first_keep]
    return round(max(off) - down, 1) if off else 0.0


def _count_decisions(decisions: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in decisions:
        out[d["action"]] = out.get(d["action"], 0) + 1
    return out


def plot(path: str, arms: dict[str, dict], args: argparse.Namespace, target: float) -> None:
    end = sum(args.phases)
    ttft, keep, replicas, orders, scales = {}, {}, {}, [], []
    for name, raw in arms.items():
        for d in raw["decisions"]:  # the controller's orders, where the load ran (the warm-up's are in the JSON)
            if 0 <= d["t"] <= end:
                if d["action"] == "set_sparsity":
                    orders.append((d["t"], d["value"]["vision_keep"]))
                else:
                    scales.append((d["t"], float(d["value"])))
        bins = _bins(raw["results"], 0.0, end)
        ttft[name] = [(t, percentile([_ttft(r) for r in rs], 95)) for t, rs in bins if rs]
        keep[name] = [(t, statistics.fmean(k[0] for k in ks)) for t, rs in bins
                      if (ks := [k for k in map(_keep_of, rs) if k])]
        replicas[name] = [(t, float(n)) for t, n in raw["replicas"]]
    save_panels(path, f"{args.model}: load step {args.base_rate:g} -> {args.base_rate * args.step_factor:g} -> "
                      f"{args.base_rate:g} req/s ({hardware('cuda' if args.num_gpus else 'cpu')}, {commit()})",
                [Panel(f"TTFT p95 per {BIN_S:g} s of arrivals (s)", ttft, {"target": target}, y_max=4 * target),
                 Panel("vision keep applied (mean)", keep, y_max=1.05,
                       events={"controller: vision keep ordered": orders}),
                 Panel("replicas", replicas, y_max=float(max(n for r in replicas.values() for _, n in r) + 1),
                       steps=True, events={"controller: replicas ordered": scales})],
                marks={"step up": args.phases[0], "step down": args.phases[0] + args.phases[1]})


def main(argv: list[str] | None = None) -> dict:
    import ray
    from ray import serve

    args = parse_args(argv)
    sla = SLA.from_yaml(args.sla)
    if args.ttft_s is not None:
        sla = replace(sla, online=OnlineTargets(ttft_p95_s=args.ttft_s))
    if args.risk is not None:
        sla = replace(sla, pacing=replace(sla.pacing, risk=args.risk))
    if args.max_replicas is not None:
        sla = replace(sla, replicas=Bounds(sla.replicas.min, args.max_replicas))
    target = sla.online.ttft_p95_s
    if target is None:
        raise SystemExit(f"{args.sla}: online.ttft_p95_s is null; this benchmark measures against a TTFT target")
    load = step_workload(args)
    ray.init(address="local", num_cpus=int(sla.replicas.max * args.replica_cpus) + 4,
             num_gpus=int(sla.replicas.max * args.num_gpus) or None, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    raw = {}
    try:
        for name in args.arms.split(","):
            raw[name] = run_arm(name, args, sla, f"http://127.0.0.1:{port}", load)
            print(f"{name}: {summarise(raw[name], args, target)}", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    arms = {name: summarise(r, args, target) for name, r in raw.items()}
    cols = ("ok", "slo_attainment", "step_slo_attainment", "goodput_rps", "ttft_p95", "replica_seconds",
            "peak_replicas", "mean_vision_keep", "mean_text_keep", "recover_s", "settle_s")
    print(f"{len(load)} requests per arm; {args.base_rate:g} -> {args.base_rate * args.step_factor:g} -> "
          f"{args.base_rate:g} req/s over {args.phases} s; TTFT target {target} s")
    print(f"{'arm':<15}" + "".join(f"{c:>20}" for c in cols))
    for name, row in arms.items():
        print(f"{name:<15}" + "".join(f"{str(row[c]):>20}" for c in cols))
    plot_path = args.plot or (str(Path(args.output).with_suffix(".png")) if args.output else None)
    if plot_path:
        plot(plot_path, raw, args, target)
    result = {"bench": "autoscale", "model": args.model, "hardware": hardware("cuda" if args.num_gpus else "cpu"),
              "commit": commit(), "base_rate": args.base_rate, "step_factor": args.step_factor,
              "phases_s": args.phases, "requests": len(load), "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "max_prefill_tokens": args.max_prefill_tokens,
              "replica_cpus": args.replica_cpus, "ttft_target_s": target,
              "sla": asdict(sla), "autoscaling": {n: r["autoscaling"] for n, r in raw.items()}, "arms": arms,
              "slo_attainment": {n: a["slo_attainment"] for n, a in arms.items()},
              "replica_seconds": {n: a["replica_seconds"] for n, a in arms.items()}, "plot": plot_path}
    emit(result, args.output)
    return result


if __name__ == "__main__":
    main()
