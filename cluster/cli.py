"""`dynllava serve`: deploy the OpenAI-compatible endpoint on Ray Serve (registered into the `dynllava` command)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cluster.sla import DEFAULT_SLA, load_sla

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "configs/serve.yaml"


def _deployment_options(app: dict) -> dict:
    """The YAML's options for the dynllava deployment (Serve's own keys), without its name."""
    from cluster.serve_handle import DEPLOYMENT_NAME

    for entry in app.get("deployments") or []:
        if entry.get("name") == DEPLOYMENT_NAME:
            return {k: v for k, v in entry.items() if k != "name"}
    return {}


def metrics_urls() -> list[str]:
    """Every alive node's Ray metrics endpoint, where the replicas' dynllava_* series are exported."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")]


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import build
    from cluster.serve_config import ServeConfig, read_serve_yaml

    path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    data = read_serve_yaml(path) if path else {"applications": [{"name": "dynllava", "args": {}}]}
    app = data["applications"][0]
    overrides = {k: v for k, v in (("model", args.model), ("batching", args.batching)) if v is not None}
    config = ServeConfig.from_dict({**(app.get("args") or {}), **overrides}, where=path or "defaults")
    options = _deployment_options(app)
    if args.replicas is not None:
        options.pop("autoscaling_config", None)
        options["num_replicas"] = args.replicas
    http = {**(data.get("http_options") or {})}
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    if args.address:
        ray.init(address=args.address)
    else:  # a new local cluster, as --help says, with Prometheus metrics on a known port
        ray.init(address="local", include_dashboard=False, _metrics_export_port=args.metrics_port)
    print("Prometheus metrics (ray_dynllava_* series, per node): " + ", ".join(metrics_urls()), flush=True)
    if config.controller:
        from cluster.controller import start_controller

        start_controller(load_sla(args.sla))
    serve.start(http_options=http)
    name, prefix = app.get("name", "dynllava"), app.get("route_prefix", "/")
    serve.run(build(config, options), name=name, route_prefix=prefix, blocking=False)
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{prefix.rstrip('/')}"
    print(f"serving {config.model} as app {name!r} at {url}/v1/chat/completions ({config.batching} batching)",
          flush=True)
    if args.detach:
        return 0
    print("Ctrl-C stops the app")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(name)
    return 0


def status_table(status: dict) -> str:
    """The controller's view as text: one row per engine actor, then the desired counts and recent decisions."""
    head = ("actor", "kind", "level", "vision", "text", "req/s", "tok/s", "ttft p95", "queue", "running",
            "KV MiB", "memory")
    rows = []
    for actor, entry in sorted(status["actors"].items()):
        s = entry["snapshot"]
        ttft = f"{s['ttft_p95_s']:.3f}" if s["ttft_p95_s"] is not None else "-"
        memory = f"{s['device_memory_used'] / s['device_memory_total']:.0%}" if s["device_memory_total"] else "-"
        rows.append((actor, s["kind"], "-" if entry["level"] is None else str(entry["level"]),
                     f"{s['sparsity'].get('vision_keep', 1.0):g}", f"{s['sparsity'].get('text_keep') or 1.0:g}",
                     f"{s['requests_per_s']:.2f}", f"{s['output_tokens_per_s']:.1f}", ttft, str(s["queue_depth"]),
                     str(s["running"]), f"{s['kv_bytes_in_use'] / 2**20:.1f}", memory))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    if not rows:
        lines.append("(no engine actor has reported yet)")
    lines.append(f"desired counts: {status['desired'] or 'none yet'}")
    if status.get("offline"):
        o = status["offline"]
        lines.append(f"offline job: {o['rows_done']} of {o['rows_total']} rows")
    for d in status["decisions"][-10:]:
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(d['at']))} {d['action']} {d['target']} -> "
                     f"{d['value']} ({d['reason']})")
    return "\n".join(lines)


def cmd_controller(args: argparse.Namespace) -> int:
    import ray

    from cluster.controller import find_controller, start_controller

    ray.init(address=args.address, namespace="dynllava")
    if args.action == "start":
        start_controller(load_sla(args.sla))
        print(f"controller running (SLA: {args.sla or DEFAULT_SLA}); `dynllava controller status` shows it")
        return 0
    controller = find_controller()
    if controller is None:
        print("no controller on this cluster (start one with `dynllava controller start`)")
        return 1
    print(status_table(ray.get(controller.status.remote())))
    return 0


def register(sub) -> None:
    """Add the `serve` subcommand to the `dynllava` parser's subparsers."""
    s = sub.add_parser(
        "serve", help="serve the model as an OpenAI-compatible endpoint on Ray Serve",
        description="Deploy POST /v1/chat/completions (text + image_url parts, streaming, per-request sparsity in "
                    "the `dynllava` field), GET /v1/models and GET /health with continuous batching. The same "
                    "YAML works with `serve run configs/serve.yaml`.")
    s.add_argument("--config", default=None, help=f"Serve config YAML (default: {DEFAULT_CONFIG} when present)")
    s.add_argument("--address", default=None, help="an existing Ray cluster: auto or ray://HOST:PORT "
                                                   "(default: start Ray locally)")
    s.add_argument("--model", default=None, help="override the config's model (tiny, a directory or a YAML)")
    s.add_argument("--batching", choices=("continuous", "static"), default=None, help="override the batching")
    s.add_argument("--replicas", type=int, default=None, help="fixed replica count (drops autoscaling_config)")
    s.add_argument("--host", default=None, help="HTTP host (default from the config: 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default from the config: 8000)")
    s.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port of the local Ray "
                   "started here (default 8080; with --address the cluster's own ports apply: both are printed)")
    s.add_argument("--detach", action="store_true",
                   help="return once deployed (with --address the app keeps running on the cluster)")
    s.add_argument("--sla", default=None, help=f"SLA YAML for the controller when the config has `controller: "
                                               f"true` (default: {DEFAULT_SLA} when present)")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("controller", help="start the cluster controller or show its view",
                       description="The controller reads every engine actor's telemetry and tunes its sparsity "
                                   "within the SLA, and asks for more replicas when sparsity alone cannot meet "
                                   "it. It is a detached actor: start it on a running cluster.")
    c.add_argument("action", choices=("start", "status"), help="start (idempotent) or status (a table)")
    c.add_argument("--sla", default=None, help=f"SLA YAML (default: {DEFAULT_SLA} when present)")
    c.add_argument("--address", default="auto", help="the Ray cluster (default: auto)")
    c.set_defaults(func=cmd_controller)
