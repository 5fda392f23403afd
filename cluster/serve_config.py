"""The online server's config: the `args` of the application in configs/serve.yaml (mirrors it 1:1).

Replicas, resources and autoscaling are Ray Serve's own deployment options (the YAML's `deployments:`
section); this object holds what the replica itself needs: the model, batching, limits, auth, and the
sparsity each request gets and may ask for.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dynllava.config import SparsityConfig, dataclass_from_dict


@dataclass(frozen=True)
class SparsityBounds:
    """What a request's `dynllava` field may ask for: keep ratios at or above the floors, listed scorers."""

    min_vision_keep: float = 0.05
    min_text_keep: float = 0.3
    vision_scorers: tuple[str, ...] = ("learned", "fastv", "stride", "random")
    text_scorers: tuple[str, ...] = ("learned", "recent", "h2o")

    def __post_init__(self) -> None:
        for name in ("min_vision_keep", "min_text_keep"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"sparsity_bounds.{name} must be in (0, 1], got {getattr(self, name)!r}")
        object.__setattr__(self, "vision_scorers", tuple(self.vision_scorers))
        object.__setattr__(self, "text_scorers", tuple(self.text_scorers))

    def check(self, s: SparsityConfig) -> None:
        """ValueError (-> HTTP 400) naming the bound a requested setting breaks."""
        if s.vision_keep < self.min_vision_keep:
            raise ValueError(f"dynllava.vision_keep {s.vision_keep} is below this server's floor "
                             f"{self.min_vision_keep}")
        if s.text_keep is not None and s.text_keep < self.min_text_keep:
            raise ValueError(f"dynllava.text_keep {s.text_keep} is below this server's floor {self.min_text_keep}")
        if s.vision_scorer not in self.vision_scorers:
            raise ValueError(f"dynllava.vision_scorer {s.vision_scorer!r} is not allowed here "
                             f"(allowed: {list(self.vision_scorers)})")
        if s.text_scorer not in self.text_scorers:
            raise ValueError(f"dynllava.text_scorer {s.text_scorer!r} is not allowed here "
                             f"(allowed: {list(self.text_scorers)})")


@dataclass(frozen=True)
class Limits:
    """Request limits. Bodies over max_body_bytes get 413; the rest 400."""

    max_body_bytes: int = 20 * 2**20
    max_images: int = 4  # images per request (all messages)
    max_image_bytes: int = 8 * 2**20  # one encoded image
    max_image_pixels: int = 16_000_000  # one decoded image (checked from its header)
    max_image_aspect_ratio: float = 20.0  # long side / short side (checked from the header: the resize to the
    #                                       vision tower's short side would otherwise blow up a 1 x 10000 image)
    max_prompt_chars: int = 65_536  # characters of message text, all messages (checked before tokenizing)
    max_stop_chars: int = 256  # characters of one stop string (at most 4 strings)
    max_logit_bias: int = 300  # entries in a request's logit_bias
    prepare_threads: int = 2  # requests decoding images and tokenizing at once (the rest wait their turn): bounds
    #                           that memory, as one 16 M-pixel image holds about 230 MB while it is resized
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 128  # when the request gives none
    remote_image_timeout_s: float = 10.0  # fetching an http(s) image_url (when allowed)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"limits.{f.name} must be a positive number, got {value!r}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")


@dataclass(frozen=True)
class ServeConfig:
    """Everything one replica needs (see configs/serve.yaml)."""

    model: str = "tiny"  # embedded name, local HF LLaVA directory, or model YAML
    served_model_name: str | None = None  # the `model` clients send and /v1/models lists (default: model's name)
    device: str | None = None  # cuda | cpu (default: cuda when the replica has a GPU)
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    sparsity: SparsityConfig = field(default_factory=lambda: SparsityConfig(vision_keep=0.2, text_keep=0.5))
    sparsity_bounds: SparsityBounds = field(default_factory=SparsityBounds)
    batching: Literal["continuous", "static"] = "continuous"
    max_batch: int = 32  # rows decoding together (static: the @serve.batch size)
    max_prefill_batch: int = 8  # requests prefilled in one pass (continuous)
    max_prefill_tokens: int | None = 4096  # prompt tokens prefilled in one engine step (continuous; None: no cap)
    batch_wait_s: float = 0.05  # static: how long @serve.batch waits to fill a batch
    kv_budget_mib: float | None = None  # cap on the K/V the rows hold; full, the youngest row is preempted (None: none)
    max_waiting: int = 64  # queued requests per replica beyond which new ones get 429
    max_queue_wait_s: float | None = None  # a request not admitted this long after it arrived gets 503 (an
    #                                        overloaded replica sheds load instead of serving everyone late;
    #                                        set it below your latency SLO). None: it waits as long as it takes
    engine_process: bool = True  # run the engine loop in a child process of the replica (False: on a thread of it,
    #                              where it shares the GIL with the event loop and preprocessing; see README)
    threads: int = 0  # torch CPU threads per replica (0: torch's default; on a CPU replica, one less than its CPUs
    #                   leaves a core to the event loop and preprocessing: see README, where a replica's CPU goes)
    limits: Limits = field(default_factory=Limits)
    allow_remote_images: bool = False  # fetch http(s) image_url parts (off: only data: URLs)
    api_key_env: str | None = None  # name of an env var holding the API key; requests then need `Bearer <key>`
    controller: bool = False  # report telemetry to the cluster controller and follow its sparsity orders
    report_period_s: float = 1.0  # how often a replica reports to the controller
    stream_interval_s: float = 0.05  # a stream sends at most one chunk per interval after the first (tokens that
    #                                  arrive meanwhile go in one chunk; 0: a chunk per engine step)
    telemetry_window_s: float = 30.0  # the sliding window of finished requests behind the reported p95s

    def __post_init__(self) -> None:
        if self.batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', got {self.batching!r}")
        for name in ("max_batch", "max_prefill_batch", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.sparsity.mode != "kv_cache":
            raise ValueError("sparsity.mode must be kv_cache for serving (continuous batching decodes with the cache)")
        if not 0 <= self.stream_interval_s <= 5:
            raise ValueError(f"stream_interval_s must be in [0, 5], got {self.stream_interval_s!r}")
        if not self.report_period_s > 0 or not self.telemetry_window_s > 0:
            raise ValueError("report_period_s and telemetry_window_s must be positive")
        if self.max_prefill_tokens is not None and (isinstance(self.max_prefill_tokens, bool) or
                                                    not isinstance(self.max_prefill_tokens, int) or
                                                    self.max_prefill_tokens < 1):
            raise ValueError(f"max_prefill_tokens must be null or an integer >= 1, got {self.max_prefill_tokens!r}")
        if self.kv_budget_mib is not None and self.kv_budget_mib <= 0:
            raise ValueError(f"kv_budget_mib must be positive or null, got {self.kv_budget_mib!r}")
        if self.max_queue_wait_s is not None and not 0 < self.max_queue_wait_s <= 3600:
            raise ValueError(f"max_queue_wait_s must be in (0, 3600] or null, got {self.max_queue_wait_s!r}")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError(f"batch_wait_s must be in [0, 10], got {self.batch_wait_s!r}")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set (or empty)")

    @property
    def api_key(self) -> str | None:
        return os.environ[self.api_key_env] if self.api_key_env else None

    @property
    def kv_budget_bytes(self) -> int | None:
        return None if self.kv_budget_mib is None else int(self.kv_budget_mib * 2**20)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = self.sparsity.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "serve config") -> "ServeConfig":
        return dataclass_from_dict(cls, data or {}, where, "args")


def read_serve_yaml(path: str | Path) -> dict[str, Any]:
    """A Ray Serve config file (the format `serve run` reads) with exactly one application."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    apps = data.get("applications")
    if not isinstance(apps, list) or len(apps) != 1:
        raise ValueError(f"{path}: expected `applications:` with exactly one application")
    return data
