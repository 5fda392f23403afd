"""The two config objects of the method: the sparsity knob and a model shape. Validated when built."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Mode = Literal["kv_cache", "no_cache"]


def dataclass_from_dict(cls, data: dict[str, Any], where: str, what: str | None = None):
    """Build dataclass `cls` from a dict of its fields, nested dataclass fields from nested dicts; unknown keys
    are a ValueError naming `where` (a file) and `what` (the section; default the class name)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {what or cls.__name__} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown {what or cls.__name__} keys {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    data = dict(data)
    for name, value in list(data.items()):
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind) and value is None:
            del data[name]  # an empty YAML section: the defaults
        elif dataclasses.is_dataclass(kind) and isinstance(value, dict):
            data[name] = dataclass_from_dict(kind, value, where, name)
    return cls(**data)


def dataclass_from_yaml(cls, path: str | Path):
    """Build dataclass `cls` from a YAML file of its fields; unknown keys are a ValueError naming the file."""
    return dataclass_from_dict(cls, yaml.safe_load(Path(path).read_text()) or {}, str(path))


def _check_keep(name: str, value: float | None, allow_none: bool) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"{name} must be a number in (0, 1], got None")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class SparsityConfig:
    """The one sparsity knob, settable per request and per engine.

    vision_keep: fraction of image tokens kept at layer `layer` (count: see keep_rounding).
    text_keep: fraction of generated tokens whose K/V is admitted to layers >= `layer`; None lets the
        learned text predictor decide by itself (the paper's inference), only valid with text_scorer="learned".
    layer: K, the decoder layer whose input the scorers read; layers < K always see every token.
    vision_scorer / text_scorer: names in `dynllava.scorers` registries.
    mode: "kv_cache" (append-only sparse cache) or "no_cache" (recompute the kept context every step).
    keep_rounding: how vision_keep becomes a count of image tokens: "ceil" (at least one) or "floor" (the
        official code's int(n * vision_keep)).
    """

    vision_keep: float = 1.0
    text_keep: float | None = 1.0
    layer: int = 2
    vision_scorer: str = "learned"
    text_scorer: str = "learned"
    mode: Mode = "kv_cache"
    keep_rounding: str = "ceil"

    def __post_init__(self) -> None:
        _check_keep("vision_keep", self.vision_keep, allow_none=False)
        _check_keep("text_keep", self.text_keep, allow_none=self.text_scorer == "learned")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an integer >= 1, got {self.layer!r}")
        if self.mode not in ("kv_cache", "no_cache"):
            raise ValueError(f"mode must be 'kv_cache' or 'no_cache', got {self.mode!r}")
        if self.keep_rounding not in ("ceil", "floor"):
            raise ValueError(f"keep_rounding must be 'ceil' or 'floor', got {self.keep_rounding!r}")
        from dynllava.scorers import TEXT_SCORERS, VISION_SCORERS  # late: scorers import config

        if self.text_scorer == "keep_all" and self.text_keep != 1.0:
            raise ValueError(f"text_scorer 'keep_all' admits every token, so text_keep must be 1.0, got {self.text_keep}")
        if self.vision_scorer not in VISION_SCORERS:
            raise ValueError(f"vision_scorer must be one of {sorted(VISION_SCORERS)}, got {self.vision_scorer!r}")
        if self.text_scorer not in TEXT_SCORERS:
            raise ValueError(f"text_scorer must be one of {sorted(TEXT_SCORERS)}, got {self.text_scorer!r}")

    @property
    def is_dense(self) -> bool:
        """True when nothing is dropped: the model runs exactly as the unmodified LLaVA."""
        return self.vision_keep >= 1.0 and self.text_keep is not None and self.text_keep >= 1.0

    def replace(self, **changes: Any) -> "SparsityConfig":
        """A copy with some fields changed (None values are ignored), validated again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparsityConfig":
        return dataclass_from_dict(cls, data, "sparsity")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SparsityConfig":
        """Load a YAML file with SparsityConfig's keys (see configs/sparsity.yaml)."""
        return dataclass_from_yaml(cls, path)


@dataclass(frozen=True)
class VisionShape:
    """Vision tower shape (fields are CLIPVisionConfig's / SiglipVisionConfig's)."""

    model_type: str = "clip"  # clip (a CLS token first) | siglip (none)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14


@dataclass(frozen=True)
class TextShape:
    """Llama/Mistral/Qwen2-style language model shape (fields are the HF text config's)."""

    model_type: str = "llama"
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_VISION_MODELS = ("clip", "siglip")
MODEL_FAMILIES = ("llava", "llava_next", "llava_onevision")  # LLaVA-1.5, LLaVA-NeXT (v1.6), LLaVA-OneVision


@dataclass(frozen=True)
class ModelSpec:
    """A LLaVA shape for building a model without a checkpoint (`random_weights: true` YAML files).

    A view of the image is (image_size / patch_size)^2 tokens, e.g. 576 for LLaVA-1.5 (336 px, patch 14). The
    any-resolution families add a grid of such tiles (image_grid_pinpoints: the canvas sizes, [height, width]
    in pixels) with a newline token per grid row.
    """

    name: str = "llava"
    random_weights: bool = True
    seed: int = 0
    family: str = "llava"  # one of MODEL_FAMILIES
    vision: VisionShape = field(default_factory=VisionShape)
    text: TextShape = field(default_factory=TextShape)
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # default: drop the tower's CLS token; full: keep all
    image_token_id: int = 32000
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # any-res families only
    vision_aspect_ratio: str | None = None  # LLaVA-OneVision: anyres_max_N, the grid's cap in tiles

    def __post_init__(self) -> None:
        if not self.random_weights:
            raise ValueError("a model YAML without a checkpoint must set random_weights: true")
        v, t = self.vision, self.text
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"family must be one of {MODEL_FAMILIES}, got {self.family!r}")
        if v.model_type not in SUPPORTED_VISION_MODELS:
            raise ValueError(f"vision.model_type must be one of {SUPPORTED_VISION_MODELS}, got {v.model_type!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be default or full")
        if (self.family == "llava") != (self.image_grid_pinpoints is None):
            raise ValueError("image_grid_pinpoints: required by the any-resolution families, not used by llava")
        for pin in self.image_grid_pinpoints or ():
            if len(pin) != 2 or any(x <= 0 or x % v.image_size for x in pin):
                raise ValueError(f"image_grid_pinpoints: {list(pin)} is not [height, width] in multiples of "
                                 f"vision.image_size {v.image_size}")
        if (self.family == "llava_onevision") != (self.vision_aspect_ratio is not None):
            raise ValueError("vision_aspect_ratio: required by llava_onevision (e.g. anyres_max_9), not used by "
                             "the other families")
        if v.image_size % v.patch_size and v.model_type != "siglip":  # SigLIP's 384 / 14 drops the remainder
            raise ValueError(f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if t.model_type not in SUPPORTED_TEXT_MODELS:
            raise ValueError(f"text.model_type must be one of {SUPPORTED_TEXT_MODELS}, got {t.model_type!r}")
        if t.num_attention_heads % t.num_key_value_heads or t.hidden_size % t.num_attention_heads:
            raise ValueError("text heads must divide hidden_size and be a multiple of num_key_value_heads")
        if not 0 <= self.image_token_id < t.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary ({t.vocab_size})")

    @property
    def n_image_tokens(self) -> int:
        """Tokens of one view (LLaVA-1.5: of an image)."""
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        vision = VisionShape(**data.pop("vision", {}))
        text = TextShape(**data.pop("text", {}))
        if data.get("image_grid_pinpoints") is not None:
            data["image_grid_pinpoints"] = tuple(tuple(p) for p in data["image_grid_pinpoints"])
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        return cls(vision=vision, text=text, **data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelSpec":
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        try:
            return cls.from_dict(data)
        except TypeError as e:  # unknown keys inside vision/text
            raise ValueError(f"{path}: {e}") from None


def setting_label(s: SparsityConfig) -> str:
    """A short name for a setting: dense, or what it prunes and how ("vision learned 0.2, text learned 0.5")."""
    if s.is_dense:
        return "dense"
    parts = []
    if s.vision_keep < 1:
        parts.append(f"vision {s.vision_scorer} {s.vision_keep:g}")
    if s.text_keep is None or s.text_keep < 1:
        parts.append(f"text {s.text_scorer} {'auto' if s.text_keep is None else f'{s.text_keep:g}'}")
    return ", ".join(parts)
