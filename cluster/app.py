"""The Serve application builder: `serve run configs/serve.yaml` and `dynllava serve` both build the app here.

In configs/serve.yaml, `args` is the ServeConfig and `deployments:` holds Ray Serve's own options (replicas,
autoscaling, actor resources), which Serve applies on top of the defaults set here.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.serve_config import ServeConfig


def default_deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Enough concurrent requests per replica for the engine to batch them (Serve's default is 5) and a little
    over its own queue, so the engine, not Serve, answers 429 with an OpenAI error body."""
    return {"max_ongoing_requests": config.max_batch + config.max_waiting + 8}


def build(config: ServeConfig, options: dict[str, Any] | None = None) -> Application:
    """The app for `config`, with Serve deployment `options` over the defaults."""
    from cluster.server import LlavaServer

    return LlavaServer.options(**{**default_deployment_options(config), **(options or {})}).bind(config.to_dict())


def build_app(args: dict[str, Any]) -> Application:
    """Application builder (`import_path: cluster.app:build_app`); args: the ServeConfig fields."""
    return build(ServeConfig.from_dict(args, where="serve args"))
