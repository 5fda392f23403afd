"""Resolve a model source (HF LLaVA directory, model YAML, or a registered name) into HF model + processor.

Nothing is fetched from a hub: a directory must exist on local disk, a YAML shape builds random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    LlavaProcessor,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
try:  # transformers >= 5.x ships a PIL backend that needs no torchvision
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as LlavaImageProcessor
except ImportError:  # pragma: no cover - older 5.x releases
    from transformers import LlavaImageProcessor

from dynllava.config import MODEL_FAMILIES, SUPPORTED_TEXT_MODELS, ModelSpec, SparsityConfig
from dynllava.inputs import PROMPT_RULE_ATTR, PromptRule

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "models"
ZOO_DIR = Path(__file__).resolve().parent / "zoo"  # embedded checkpoints, shipped inside the package
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
                 "llava_onevision": LlavaOnevisionForConditionalGeneration}
CONFIG_CLASSES = {"llava": LlavaConfig, "llava_next": LlavaNextConfig, "llava_onevision": LlavaOnevisionConfig}


class OnevisionImageProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without its video processor: transformers' own one requires torchvision
    (for videos, which dynllava does not take) even to be built. Images and prompts are processed by the
    parent's code unchanged."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]
MODEL_NOTES_FILE = "dynllava.json"  # written by `dynllava convert`: prompt rule and default sparsity


def resolve_source(source: str | Path) -> Path:
    """Map a model source to a local path: an existing directory/YAML, an embedded checkpoint in dynllava/zoo/
    (e.g. `tiny`), or a shape name in configs/models/ (random weights)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    embedded = ZOO_DIR / str(source)
    if (embedded / "config.json").is_file():
        return embedded
    named = MODEL_CONFIG_DIR / f"{source}.yaml"
    if named.exists():
        return named
    known = sorted({p.name for p in ZOO_DIR.glob("*") if (p / "config.json").is_file()} |
                   {p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml")})
    raise ValueError(
        f"model source {str(source)!r} is neither a local LLaVA directory, a model YAML, nor a known name "
        f"({', '.join(known)}); nothing is downloaded at run time"
    )


def byte_level_tokenizer(image_token_id: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built locally (no merges): 4 specials, 256 bytes, `<image>` at image_token_id.

    Used by random-weight shapes, where the text is meaningless but the token plumbing must be real.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    if image_token_id < len(vocab) or image_token_id >= vocab_size:
        raise ValueError(f"image_token_id {image_token_id} must lie in [{len(vocab)}, {vocab_size})")
    vocab["<image>"] = image_token_id
    used = set(vocab.values())  # fill the rest so every id a random model emits decodes to something visible
    vocab.update({f"<unused{i}>": i for i in range(vocab_size) if i not in used})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="right",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    """LLaVA-1.5's processor (CLIP resize/crop/normalise, `<image>` expansion, chat template), built locally."""
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )


def build_anyres_processor(tokenizer, spec: ModelSpec):
    """LLaVA-NeXT's or LLaVA-OneVision's processor (tiling at any resolution, normalise, `<image>` expansion,
    chat template), built locally for a random-weight shape."""
    side, pinpoints = spec.vision.image_size, [list(p) for p in spec.image_grid_pinpoints]
    if spec.family == "llava_next":
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
        return LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.vision.patch_size,
            vision_feature_select_strategy=spec.vision_feature_select_strategy,
            num_additional_image_tokens=1 if spec.vision.model_type == "clip" else 0,
            chat_template=LLAVA_15_CHAT_TEMPLATE)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                      image_grid_pinpoints=pinpoints)
    return OnevisionImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=spec.n_image_tokens,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        vision_aspect_ratio=spec.vision_aspect_ratio, chat_template=LLAVA_15_CHAT_TEMPLATE)


def hf_config_from_spec(spec: ModelSpec):
    """The transformers config of the spec's family (CLIP or SigLIP vision + a Llama-family text model)."""
    v, t = spec.vision, spec.text
    shape = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                 num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                 image_size=v.image_size, patch_size=v.patch_size)
    vision_config = (SiglipVisionConfig(**shape, vision_use_head=False) if v.model_type == "siglip"
                     else CLIPVisionConfig(**shape, projection_dim=v.hidden_size))
    text_config = AutoConfig.for_model(
        t.model_type, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        pad_token_id=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        **({"sliding_window": None} if t.model_type == "mistral" else {}),  # Mistral-7B v0.2 and later: none
    )
    common = dict(vision_config=vision_config, text_config=text_config, image_token_index=spec.image_token_id,
                  vision_feature_layer=spec.vision_feature_layer,
                  vision_feature_select_strategy=spec.vision_feature_select_strategy)
    if spec.family == "llava":
        return LlavaConfig(**common, image_seq_length=spec.n_image_tokens)
    pinpoints = [list(p) for p in spec.image_grid_pinpoints]
    if spec.family == "llava_next":
        return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints, image_seq_length=spec.n_image_tokens)
    return LlavaOnevisionConfig(**common, image_grid_pinpoints=pinpoints, vision_aspect_ratio=spec.vision_aspect_ratio,
                                video_token_index=spec.image_token_id + 1, tie_word_embeddings=False)


def build_random(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """A random-weight LLaVA of the spec's shape, initialised directly on `device` (a 7B fits in seconds)."""
    config = hf_config_from_spec(spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = MODEL_CLASSES[spec.family](config).to(dtype)
    return model.eval(), processor_for_spec(spec)


def processor_for_spec(spec: ModelSpec):
    """The processor of a random-weight shape: a byte-level tokenizer and the shape's image geometry."""
    tokenizer = byte_level_tokenizer(spec.image_token_id, spec.text.vocab_size)
    if spec.family == "llava":
        return build_processor(tokenizer, spec.vision.image_size, spec.vision.patch_size)
    return build_anyres_processor(tokenizer, spec)


def load_processor(source: str | Path):
    """Only the processor of a model source (no weights): for CPU workers that decode and preprocess."""
    path = resolve_source(source)
    if path.suffix in (".yaml", ".yml"):
        return processor_for_spec(ModelSpec.from_yaml(path))
    if AutoConfig.from_pretrained(path, local_files_only=True).model_type == "llava_onevision":
        processor = OnevisionImageProcessor.from_pretrained(path, local_files_only=True)  # no torchvision needed
    else:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = LLAVA_15_CHAT_TEMPLATE
    prompt = read_model_notes(path).get("prompt")
    if prompt is not None:
        setattr(processor, PROMPT_RULE_ATTR, PromptRule(legacy=bool(prompt["legacy"])))
    return processor


def read_model_notes(path: Path) -> dict:
    """What `dynllava convert` recorded beside the weights (dynllava.json): the prompt rule of an original-format
    model and its default sparsity. Empty for other directories."""
    notes = path / MODEL_NOTES_FILE
    if not notes.is_file():
        return {}
    data = json.loads(notes.read_text())
    if not isinstance(data, dict) or data.get("format") != 1:
        raise ValueError(f"{notes}: not a dynllava.json this version reads (format 1)")
    return data


def default_sparsity(path: Path) -> SparsityConfig | None:
    """The model's own sparsity setting (a converted Dynamic-LLaVA checkpoint's sparse_config), or None."""
    data = read_model_notes(path).get("sparsity") if path.is_dir() else None
    return SparsityConfig.from_dict(data) if data is not None else None


def load_directory(path: Path, device: torch.device, dtype: torch.dtype):
    """An HF-format LLaVA directory (as llava-hf/llava-1.5-7b-hf, llava-v1.6-*-hf or llava-onevision-*-hf are laid
    out), local files only. On the meta device: the model's shapes without its weights."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in MODEL_FAMILIES:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not one of {MODEL_FAMILIES}")
    if config.text_config.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"{path}: language model {config.text_config.model_type!r} is not one of "
                         f"{SUPPORTED_TEXT_MODELS}")
    if device.type == "meta":  # the shapes only (a serving front end's tokenizer and checks): no weights read
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = MODEL_CLASSES[config.model_type](config).to(dtype)
        return model.eval(), load_processor(path)
    # no device_map: that needs `accelerate`, a dependency we do not otherwise use; load, then move
    model = MODEL_CLASSES[config.model_type].from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    ).to(device)
    return model.eval(), load_processor(path)
