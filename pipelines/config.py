"""The caption job's config (configs/caption.yaml mirrors it 1:1). Precedence: defaults <- YAML <- CLI flags.
Validated when built, so a bad value fails before Ray starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynllava.config import SparsityConfig, dataclass_from_dict


@dataclass(frozen=True)
class Columns:
    """Input column names. id: the row's stable id (resume keys on it); image: encoded bytes (Parquet) or
    base64 (JSONL); image_path: a path or URI of the image; prompt: the per-row prompt (optional column)."""

    id: str = "id"
    image: str = "image"
    image_path: str = "image_path"
    prompt: str = "prompt"


@dataclass(frozen=True)
class ActorPool:
    """The engine actors: Ray Data autoscales the pool between min_size and max_size; each actor reserves
    num_cpus / num_gpus and runs torch on `threads` CPU threads."""

    min_size: int = 1
    max_size: int = 1
    num_cpus: float = 2.0
    num_gpus: float = 0.0
    threads: int | None = None  # torch CPU threads per actor (None: Ray's default, its num_cpus; on a CPU-only
    #                             machine shared with the decode tasks, one less than num_cpus runs faster)

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"actors: need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("actors: num_cpus and num_gpus must be >= 0")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or
                                         self.threads < 1):
            raise ValueError(f"actors: threads must be null or an integer >= 1, got {self.threads!r}")


@dataclass(frozen=True)
class CaptionJobConfig:
    """Everything that determines a caption job's output, saved as `_job.json` beside it."""

    model: str = "tiny"  # embedded name, local HF LLaVA directory, or model YAML
    prompt: str = "Describe the image briefly."  # used when a row has no prompt of its own
    columns: Columns = field(default_factory=Columns)
    sparsity: SparsityConfig = field(default_factory=lambda: SparsityConfig(vision_keep=0.2, text_keep=0.5))
    max_new_tokens: int = 64  # per row
    batch_size: int = 16  # rows per Ray Data batch handed to an engine actor
    batches_in_flight: int = 4  # Ray Data batches an actor works on at once: their rows share its engine's loop
    max_batch: int = 32  # rows decoding together per actor (a finished row's place goes to the next waiting row)
    max_prefill_batch: int = 8  # rows prefilled in one engine step
    max_prefill_tokens: int | None = 4096  # prompt tokens prefilled in one engine step (null: no cap)
    refill_at: int = 1  # while rows decode, refill the batch once this many places are free (fuller
    #                     prefills; at most max_batch)
    decode_batch_size: int = 64  # rows per CPU decode task
    decode_tasks: int | None = None  # most decode tasks at once (None: Ray Data decides; 1 on a 2-core box)
    decode_num_cpus: float = 0.5  # CPUs reserved per decode task (Ray fuses the decode stage into the engine
    #                               actors when their resources are equal: keep them different)
    actors: ActorPool = field(default_factory=ActorPool)
    max_image_pixels: int = 40_000_000  # larger images are rejected as decompression bombs
    device: str | None = None  # cuda or cpu (default: cuda when the actor has a GPU)
    dtype: str | None = None  # default: bf16 on GPU, fp32 on CPU
    rows_per_file: int = 1000  # at least this many rows per output Parquet file (fewer only at the end)
    serve_app: str | None = None  # send rows through this running Serve app's replicas instead of own actors
    serve_callers: int = 2  # with serve_app: batches in flight to the app at once (light caller actors)
    controller: bool = False  # engine actors report to the cluster controller and follow its sparsity orders
    sla: str | None = None  # SLA YAML for the controller the job starts when none runs (default configs/sla.yaml)
    lease_s: float = 10.0  # a run renews a lease on its output every lease_s / 5; a rerun after a kill waits
    #                        lease_s for the killed run's workers to stop (they can commit files ~1 s later)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "batches_in_flight", "max_batch", "max_prefill_batch",
                     "decode_batch_size", "max_image_pixels", "rows_per_file", "serve_callers", "refill_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_prefill_tokens is not None and (isinstance(self.max_prefill_tokens, bool) or
                                                    not isinstance(self.max_prefill_tokens, int) or
                                                    self.max_prefill_tokens < 1):
            raise ValueError(f"max_prefill_tokens must be null or an integer >= 1, got {self.max_prefill_tokens!r}")
        if self.decode_tasks is not None and (isinstance(self.decode_tasks, bool) or
                                              not isinstance(self.decode_tasks, int) or self.decode_tasks < 1):
            raise ValueError(f"decode_tasks must be null or an integer >= 1, got {self.decode_tasks!r}")
        if isinstance(self.lease_s, bool) or not isinstance(self.lease_s, (int, float)) or not 1 <= self.lease_s <= 600:
            raise ValueError(f"lease_s must be a number of seconds in [1, 600], got {self.lease_s!r}")
        if not 0 < self.decode_num_cpus <= 64:
            raise ValueError(f"decode_num_cpus must be in (0, 64], got {self.decode_num_cpus!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt must be a non-empty string")

    def engine_limits(self) -> dict[str, Any]:
        """The engine actors' scheduling knobs (ContinuousEngine keyword arguments)."""
        return {"max_batch": self.max_batch, "max_prefill_batch": self.max_prefill_batch,
                "max_prefill_tokens": self.max_prefill_tokens, "refill_at": min(self.refill_at, self.max_batch)}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sparsity"] = self.sparsity.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "CaptionJobConfig":
        """Build from plain data (YAML), with nested sections; unknown keys are a ValueError."""
        return dataclass_from_dict(cls, data, where, "top-level")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CaptionJobConfig":
        if not Path(path).is_file():
            raise ValueError(f"config {path}: no such file")
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {}, where=str(path))

    def with_overrides(self, **changes: Any) -> "CaptionJobConfig":
        """A copy with the given top-level fields and sparsity fields (vision_keep, text_keep, vision_scorer,
        text_scorer) changed; None values are ignored."""
        sparsity_keys = {f.name for f in dataclasses.fields(SparsityConfig)}
        sparsity = self.sparsity.replace(**{k: v for k, v in changes.items() if k in sparsity_keys})
        top = {k: v for k, v in changes.items() if k not in sparsity_keys and v is not None}
        return dataclasses.replace(self, sparsity=sparsity, **top)
