"""The operator's SLA (configs/sla.yaml mirrors it 1:1): latency targets online, a rate or deadline offline, a
device-memory ceiling, the quality floor and the preferred setting, replica and node bounds, and the
controller's pacing (how fast it moves, how long it waits before relaxing or releasing).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynllava.config import dataclass_from_dict


def _positive_or_none(where: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"{where} must be a positive number or null, got {value!r}")


@dataclass(frozen=True)
class OnlineTargets:
    """p95 targets in seconds over the telemetry window; null = not a target."""

    ttft_p95_s: float | None = 1.0
    token_latency_p95_s: float | None = None
    latency_p95_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_p95_s", "token_latency_p95_s", "latency_p95_s"):
            _positive_or_none(f"online.{name}", getattr(self, name))


@dataclass(frozen=True)
class OfflineTargets:
    """A batch job's target: rows per second, or a deadline in seconds from the job's start (null = none)."""

    rows_per_s: float | None = None
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        _positive_or_none("offline.rows_per_s", self.rows_per_s)
        _positive_or_none("offline.deadline_s", self.deadline_s)


@dataclass(frozen=True)
class KeepSetting:
    """A point on the quality axis: fractions of image tokens and generated tokens kept."""

    vision_keep: float = 1.0
    text_keep: float = 1.0

    def __post_init__(self) -> None:
        for name in ("vision_keep", "text_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True)
class Bounds:
    """Inclusive bounds on a count."""

    min: int = 1
    max: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.min, int) and isinstance(self.max, int) and 0 <= self.min <= self.max):
            raise ValueError(f"bounds need integers 0 <= min <= max, got {self.min!r}, {self.max!r}")


@dataclass(frozen=True)
class Pacing:
    """How the controller moves. Sparsity walks a ladder of `levels` steps from `preferred` (level 0) to the
    floor (level `levels`), at most `max_step` levels per decision and one decision per actor per
    `cooldown_s`. It tightens when a target is at risk (a measured p95 above `risk` x target, or memory above
    the ceiling) and relaxes one level after `relax_after_s` with every figure below `slack` x target, but never
    back to a level that missed until the actor's request rate is under `relax_load` x the rate it missed at.
    Replicas
    are added when actors have sat at the floor for `floor_settle_s` and still miss, at most one per
    `scale_cooldown_s` (a replica joining under load starts at its peers' level); removed when
    every actor is at level 0 and uses under `idle_fraction` of one replica's recent peak rate for
    `release_after_s`."""

    levels: int = 6
    max_step: int = 2
    cooldown_s: float = 1.0
    risk: float = 0.9
    slack: float = 0.6
    relax_after_s: float = 10.0
    scale_cooldown_s: float = 15.0
    floor_settle_s: float = 5.0
    release_after_s: float = 30.0
    idle_fraction: float = 0.3
    relax_load: float = 0.8

    def __post_init__(self) -> None:
        if not (isinstance(self.levels, int) and self.levels >= 1 and isinstance(self.max_step, int)
                and self.max_step >= 1):
            raise ValueError("pacing.levels and pacing.max_step must be integers >= 1")
        if not 0 < self.slack < self.risk <= 1.5:
            raise ValueError(f"pacing needs 0 < slack < risk <= 1.5, got {self.slack}, {self.risk}")
        for name in ("cooldown_s", "relax_after_s", "scale_cooldown_s", "floor_settle_s", "release_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"pacing.{name} must be >= 0")
        if not 0 <= self.idle_fraction < 1 or not 0 < self.relax_load <= 1:
            raise ValueError("pacing.idle_fraction must be in [0, 1) and pacing.relax_load in (0, 1]")


@dataclass(frozen=True)
class SLA:
    """Everything the controller steers toward (see configs/sla.yaml)."""

    online: OnlineTargets = field(default_factory=OnlineTargets)
    offline: OfflineTargets = field(default_factory=OfflineTargets)
    memory_ceiling: float = 0.9  # fraction of device memory an actor may use
    floor: KeepSetting = field(default_factory=lambda: KeepSetting(vision_keep=0.1, text_keep=0.3))
    preferred: KeepSetting = field(default_factory=KeepSetting)
    replicas: Bounds = field(default_factory=lambda: Bounds(1, 4))
    nodes: Bounds = field(default_factory=lambda: Bounds(0, 2))
    pacing: Pacing = field(default_factory=Pacing)
    # a measured ladder, preferred first, floor last (written by `dynllava calibrate`); when set it replaces
    # the geometric one: preferred, floor and pacing.levels are taken from it
    ladder: tuple[KeepSetting, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.memory_ceiling <= 1:
            raise ValueError(f"memory_ceiling must be in (0, 1], got {self.memory_ceiling!r}")
        if self.ladder is not None:
            ladder = _ladder(self.ladder)
            object.__setattr__(self, "ladder", ladder)
            object.__setattr__(self, "preferred", ladder[0])
            object.__setattr__(self, "floor", ladder[-1])
            object.__setattr__(self, "pacing", dataclasses.replace(self.pacing, levels=len(ladder) - 1))
        if self.floor.vision_keep > self.preferred.vision_keep or self.floor.text_keep > self.preferred.text_keep:
            raise ValueError("floor must not keep more than preferred")

    def keep_at(self, level: int) -> KeepSetting:
        """The ladder: level 0 = preferred, level `pacing.levels` = floor; the measured `ladder`'s steps when
        set, else geometric in between (equal ratios, so each step cuts the same share of the remaining
        tokens)."""
        level = min(max(level, 0), self.pacing.levels)
        if self.ladder is not None:
            return self.ladder[level]
        t = level / self.pacing.levels

        def between(hi: float, lo: float) -> float:
            return round(hi * math.exp(t * math.log(lo / hi)), 4)

        return KeepSetting(between(self.preferred.vision_keep, self.floor.vision_keep),
                           between(self.preferred.text_keep, self.floor.text_keep))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "sla") -> "SLA":
        return dataclass_from_dict(cls, data or {}, where, "sla")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SLA":
        if not Path(path).is_file():
            raise ValueError(f"sla {path}: no such file")
        return cls.from_dict(yaml.safe_load(Path(path).read_text()), where=str(path))


def _ladder(steps) -> tuple[KeepSetting, ...]:
    """A ladder from YAML (a list of {vision_keep, text_keep}) or KeepSettings: at least two steps, each keeping
    no more of either kind of token than the step before it."""
    if isinstance(steps, (str, bytes, dict)) or not hasattr(steps, "__iter__"):
        raise ValueError(f"ladder must be a list of {{vision_keep, text_keep}} steps, got {steps!r}")
    out = []
    for i, step in enumerate(steps):
        if isinstance(step, dict):
            unknown = set(step) - {"vision_keep", "text_keep"}
            if unknown:
                raise ValueError(f"ladder[{i}]: unknown keys {sorted(unknown)}")
            step = KeepSetting(**step)
        if not isinstance(step, KeepSetting):
            raise ValueError(f"ladder[{i}] must be a mapping with vision_keep and text_keep, got {step!r}")
        if out and (step.vision_keep > out[-1].vision_keep or step.text_keep > out[-1].text_keep):
            raise ValueError(f"ladder[{i}] keeps more than ladder[{i - 1}]: each step must be at least as sparse")
        out.append(step)
    if len(out) < 2:
        raise ValueError("ladder needs at least two steps (preferred, floor)")
    return tuple(out)


DEFAULT_SLA = "configs/sla.yaml"


def load_sla(path: str | Path | None) -> SLA:
    """The SLA in `path`; with no path, configs/sla.yaml when it exists (relative to the working directory),
    else the defaults."""
    path = path or (DEFAULT_SLA if Path(DEFAULT_SLA).is_file() else None)
    return SLA.from_yaml(path) if path else SLA()
