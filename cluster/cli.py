"""`dynllava serve`: deploy the OpenAI-compatible endpoint on Ray Serve (registered into the `dynllava` command)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "configs/serve.yaml"


def _deployment_options(app: dict) -> dict:
    """The YAML's options for the LlavaServer deployment (Serve's own keys), without its name."""
    for entry in app.get("deployments") or []:
        if entry.get("name") == "LlavaServer":
            return {k: v for k, v in entry.items() if k != "name"}
    return {}


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
    else:
        ray.init(include_dashboard=False)
    serve.start(http_options=http)
    name, prefix = app.get("name", "dynllava"), app.get("route_prefix", "/")
    serve.run(build(config, options), name=name, route_prefix=prefix, blocking=False)
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{prefix.rstrip('/')}"
    print(f"serving {config.model} as app {name!r} at {url}/v1/chat/completions ({config.batching} batching)")
    if args.detach:
        return 0
    print("Ctrl-C stops the app")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(name)
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
    s.add_argument("--detach", action="store_true",
                   help="return once deployed (with --address the app keeps running on the cluster)")
    s.set_defaults(func=cmd_serve)
