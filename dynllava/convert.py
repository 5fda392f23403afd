"""`dynllava convert`: an original-format LLaVA-1.5 checkpoint (haotian-liu/LLaVA, or Osilly/dynamic_llava with its
predictors) -> a llava-hf directory that transformers and this project load by themselves.

Written: config.json, generation_config.json, model-*.safetensors with their index (one output shard per input
shard, so the peak memory is about one shard, not the model), tokenizer.json and the processor (pad-to-square as
`image_aspect_ratio: pad`, the vicuna_v1 chat template), predictors.safetensors, and dynllava.json (the prompt
rule and the checkpoint's sparse_config as its default sparsity). Refused with a message: what llava-hf's
LlavaForConditionalGeneration cannot express (any-resolution, other projectors, image start/end tokens) and the
instruction predictor (not implemented here).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig

from dynllava.config import SparsityConfig
from dynllava.llama_tokenizer import llama_tokenizer
from dynllava.loading import MODEL_NOTES_FILE, build_processor
from dynllava.predictors import Predictors

log = logging.getLogger("dynllava.convert")

ORIGINAL_TYPES = ("llava_llama", "dynamic_llava_llama")  # config model_type of the two original repositories
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO): system + " ", then "USER: msg " and "ASSISTANT: msg</s>"; a system
# message replaces the default system text.
VICUNA_V1_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}"
    + VICUNA_V1_SYSTEM + "{% endif %} "
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
PREDICTOR_SHAPE = {"d_model": 512, "nhead": 8, "dim_feedforward": 2048, "num_layers": 2}  # what predictors.py builds
TOWER_PREFIX = "model.vision_tower.vision_tower."
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ConversionError(ValueError):
    """A checkpoint this converter cannot turn into an equivalent llava-hf model (the message says why)."""


@dataclass(frozen=True)
class ConversionReport:
    """What `convert` wrote."""

    dst: Path  # the new model directory
    tensors: int  # tensors written to the model shards
    bytes_written: int  # bytes of those tensors
    vision_tower: str  # "checkpoint" or the --vision-tower directory it came from
    predictors: bool  # predictors.safetensors written
    sparsity: SparsityConfig | None  # the default sparsity recorded in dynllava.json


def check_supported(cfg: dict, where: str) -> None:
    """ConversionError naming the field when an original config asks for what a llava-hf LLaVA-1.5 cannot do."""
    def refuse(why: str) -> None:
        raise ConversionError(f"{where}: {why}")

    if cfg.get("model_type") not in ORIGINAL_TYPES:
        refuse(f"model_type {cfg.get('model_type')!r} is not an original LLaVA-1.5 Llama checkpoint "
               f"({', '.join(ORIGINAL_TYPES)}); llava-hf directories load as they are")
    projector = cfg.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        refuse(f"mm_projector_type {projector!r}: only LLaVA-1.5's mlp2x_gelu maps onto llava-hf's projector "
               "(TokenPacker, linear and deeper MLPs are not converted)")
    aspect = str(cfg.get("image_aspect_ratio", "square"))
    if aspect.startswith("anyres") or cfg.get("mm_patch_merge_type", "flat") != "flat":
        refuse(f"image_aspect_ratio {aspect!r} / mm_patch_merge_type {cfg.get('mm_patch_merge_type')!r}: "
               "any-resolution (LLaVA-NeXT) checkpoints are not converted")
    if aspect not in ("pad", "square"):
        refuse(f"image_aspect_ratio {aspect!r}: only 'pad' (LLaVA-1.5) and 'square' are converted")
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_use_im_patch_token"):
        refuse("mm_use_im_start_end / mm_use_im_patch_token: image start/end tokens have no llava-hf equivalent")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        refuse(f"mm_vision_select_feature {cfg.get('mm_vision_select_feature')!r}: only 'patch' (CLS dropped)")
    if cfg.get("rope_scaling"):
        refuse(f"rope_scaling {cfg['rope_scaling']!r} is not converted")
    sparse = cfg.get("sparse_config") or {}
    if sparse.get("use_instruct_predictor"):
        refuse("sparse_config.use_instruct_predictor: the instruction-text predictor is not implemented here")
    if sparse.get("use_vision_predictor") or sparse.get("use_output_text_predictor"):
        for name, want in PREDICTOR_SHAPE.items():
            if sparse.get(name, want) != want:
                refuse(f"sparse_config.{name} {sparse.get(name)!r}: the predictors are built with {want}")
        if not (sparse.get("use_vision_predictor") and sparse.get("use_text_predictor", True)
                and sparse.get("use_output_text_predictor")):
            refuse("sparse_config: only checkpoints with both the vision and the output-text predictor are converted")


# ---------------------------------------------------------------------------------------------------- reading
def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files in order: a safetensors or .bin index's shards, or its single file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / name for name in dict.fromkeys(sorted(set(weight_map.values())))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise ConversionError(f"{directory}: no model.safetensors, pytorch_model.bin or their index")


def read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file; a .bin is memory-mapped and loaded without running pickled code."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        yield from torch.load(path, map_location="cpu", mmap=True, weights_only=True).items()


# ---------------------------------------------------------------------------------------------------- key maps
def lm_key(name: str) -> str | None:
    """An original key's llava-hf name (None: not part of the language model or projector)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    match = re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", name)
    if match:
        return f"multi_modal_projector.linear_{1 if match[1] == '0' else 2}.{match[2]}"
    if name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; recomputed from rope_theta
        return None
    if name.startswith(TOWER_PREFIX) or re.match(r"model\.(image_score_predictor|output_text_score_predictor|"
                                                  r"instruct_score_predictor)\.", name):
        return None
    if re.match(r"model\.(embed_tokens|layers|norm)\.", name):
        return "language_model." + name
    raise ConversionError(f"unexpected tensor {name!r} in an original LLaVA checkpoint")


def predictor_key(name: str) -> str | None:
    """An original predictor key's name in dynllava.predictors.Predictors (None: not a predictor tensor)."""
    m = re.fullmatch(r"model\.image_score_predictor\.(.+)", name)
    if m:
        rest = m[1]
        rules = [(r"down_mlp\.([01])\.(.+)", lambda g: f"image.stem.{g[1]}.{g[2]}"),
                 (r"transformer\.(\d+)\.norm([12])\.(.+)", lambda g: f"image.blocks.{g[1]}.norm{g[2]}.{g[3]}"),
                 (r"transformer\.(\d+)\.attn\.qkv\.weight", lambda g: f"image.blocks.{g[1]}.self_attn.in_proj_weight"),
                 (r"transformer\.(\d+)\.attn\.proj\.(.+)", lambda g: f"image.blocks.{g[1]}.self_attn.out_proj.{g[2]}"),
                 (r"transformer\.(\d+)\.mlp\.fc([12])\.(.+)", lambda g: f"image.blocks.{g[1]}.linear{g[2]}.{g[3]}"),
                 (r"output_mlp\.([024])\.(.+)", lambda g: f"image.head.{g[1]}.{g[2]}")]
    else:
        m = re.fullmatch(r"model\.output_text_score_predictor\.(.+)", name)
        if not m:
            return None
        rest = m[1]
        rules = [(r"output_mlp\.0\.(.+)", lambda g: f"text.net.0.{g[1]}"),
                 (r"output_mlp\.([1357])\.(.+)", lambda g: f"text.net.1.{int(g[1]) - 1}.{g[2]}")]
    for pattern, target in rules:
        g = re.fullmatch(pattern, rest)
        if g:
            return target(g)
    raise ConversionError(f"unexpected predictor tensor {name!r}")


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, C] -> [rows, C]: new rows (the added <image>, <pad> and alignment rows) are the mean of the old ones,
    the expectation of transformers' own conversion (which samples around it); as output rows their logit is the
    mean logit, below the best real token's, so greedy decoding never picks them."""
    if rows == weight.shape[0]:
        return weight
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


# ---------------------------------------------------------------------------------------------------- the tower
def tower_config(cfg: dict, tensors: dict[str, tuple]) -> CLIPVisionConfig:
    """CLIPVisionConfig from a CLIP directory's config (dict) or, for a tower saved inside the checkpoint, from
    its tensor shapes ({name: shape}; heads = width / 64, as every OpenAI CLIP ViT)."""
    if cfg:
        vision = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
        return CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in ("model_type", "architectures")})
    width, _, patch, _ = tensors["embeddings.patch_embedding.weight"]
    positions = tensors["embeddings.position_embedding.weight"][0] - 1
    side = int(round(positions ** 0.5))
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("encoder.layers."))
    return CLIPVisionConfig(hidden_size=width, intermediate_size=tensors["encoder.layers.0.mlp.fc1.weight"][0],
                            num_hidden_layers=layers, num_attention_heads=width // 64, image_size=side * patch,
                            patch_size=patch, projection_dim=width, hidden_act="quick_gelu")


def tower_from_directory(directory: Path) -> tuple[CLIPVisionConfig, list[Path]]:
    """A local CLIP directory (CLIPModel or CLIPVisionModel, as openai/clip-vit-large-patch14-336 is laid out)."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"--vision-tower {directory}: no config.json")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type") not in ("clip", "clip_vision_model"):
        raise ConversionError(f"--vision-tower {directory}: model_type {cfg.get('model_type')!r} is not CLIP")
    return tower_config(cfg, {}), weight_files(directory)


# ---------------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes converted tensors as model-NNNNN.safetensors files and their index."""

    def __init__(self, directory: Path, dtype: torch.dtype | None):
        self.directory, self.dtype = directory, dtype
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.n_shards = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        self.n_shards += 1
        name = f"model-{self.n_shards:05d}.safetensors"
        out = {k: (v.to(self.dtype) if self.dtype and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
        save_file(out, str(self.directory / name), metadata={"format": "pt"})
        for k, v in out.items():
            self.weight_map[k] = name
            self.total += v.numel() * v.element_size()

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _tokenizer_legacy(src: Path) -> bool:
    config = src / "tokenizer_config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    return bool(data.get("legacy", True))  # transformers 4.31-4.37 (LLaVA's pins) default to legacy when unset


def convert(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None, dtype: str | None = None,
            progress: Callable[[str], None] = log.info) -> ConversionReport:
    """Convert the original-format checkpoint in `src` into a new directory `dst` (written beside it as
    dst.partial and renamed at the end, so a failed conversion leaves nothing that looks like a model)."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: no config.json (expected an original LLaVA checkpoint directory)")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; choose a new directory")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    cfg = json.loads((src / "config.json").read_text())
    check_supported(cfg, str(src / "config.json"))
    if not (src / "tokenizer.model").is_file():
        raise ConversionError(f"{src}: no tokenizer.model (the original's SentencePiece tokenizer)")
    files = weight_files(src)
    tower_shapes = {}
    for path in files:  # names and shapes only: is the CLIP tower inside the checkpoint?
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                tower_shapes.update({k[len(TOWER_PREFIX) + len("vision_model."):]: tuple(f.get_slice(k).get_shape())
                                     for k in f.keys() if k.startswith(TOWER_PREFIX + "vision_model.")})
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            tower_shapes.update({k[len(TOWER_PREFIX) + len("vision_model."):]: tuple(v.shape)
                                 for k, v in state.items() if k.startswith(TOWER_PREFIX + "vision_model.")})
            del state
    if vision_tower is not None:
        vision_config, tower_files = tower_from_directory(Path(vision_tower))
        tower_source = str(vision_tower)
    elif tower_shapes:
        vision_config, tower_files, tower_source = tower_config({}, tower_shapes), [], "checkpoint"
    else:
        raise ConversionError(f"{src}: the CLIP tower is not in the checkpoint (the original loads "
                              f"{cfg.get('mm_vision_tower')!r} from the hub); pass --vision-tower DIR with a local "
                              "copy of it")
    select_layer = cfg.get("mm_vision_select_layer", -2)
    if vision_config.hidden_size != cfg.get("mm_hidden_size", vision_config.hidden_size):
        raise ConversionError(f"vision tower width {vision_config.hidden_size} != mm_hidden_size {cfg['mm_hidden_size']}")

    legacy = _tokenizer_legacy(src)
    tokenizer = llama_tokenizer(src / "tokenizer.model", legacy, ["<image>", "<pad>"])
    n_vocab = cfg.get("vocab_size", 32000)
    if len(tokenizer) != n_vocab + 2:
        raise ConversionError(f"tokenizer.model has {len(tokenizer) - 2} pieces but vocab_size is {n_vocab}")
    image_id, pad_id = n_vocab, n_vocab + 1
    padded_vocab = -(-(n_vocab + 2) // 64) * 64  # llava-hf pads to a multiple of 64

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp, DTYPES.get(dtype) if dtype else None)
        predictor_state: dict[str, torch.Tensor] = {}
        n_lm = 0
        for i, path in enumerate(files, 1):
            out: dict[str, torch.Tensor] = {}
            for name, tensor in read_shard(path):
                if name.startswith(TOWER_PREFIX):
                    if vision_tower is None and name.startswith(TOWER_PREFIX + "vision_model."):
                        out["vision_tower." + name[len(TOWER_PREFIX):]] = tensor
                    continue
                target = predictor_key(name)
                if target is not None:
                    predictor_state[target] = tensor.float()
                    continue
                target = lm_key(name)
                if target is None:
                    continue
                if target.endswith(("embed_tokens.weight", "lm_head.weight")):
                    if tensor.shape[0] != n_vocab:
                        raise ConversionError(f"{name} has {tensor.shape[0]} rows, vocab_size is {n_vocab}")
                    tensor = pad_rows(tensor, padded_vocab)
                out[target] = tensor
                n_lm += 1
            writer.write(out)
            progress(f"shard {i}/{len(files)}: {path.name} -> {len(out)} tensors")
            del out
        for path in tower_files:
            writer.write({"vision_tower." + k: v for k, v in read_shard(path) if k.startswith("vision_model.")})
            progress(f"vision tower: {path.name}")
        expected = 3 + 9 * cfg["num_hidden_layers"] + 4  # embed, norm, lm_head, 9 per layer, projector
        if n_lm != expected:
            raise ConversionError(f"{src}: found {n_lm} language-model and projector tensors, expected {expected}")
        writer.finish()

        text_config = LlamaConfig(
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096), rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_parameters={"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)},
            vocab_size=padded_vocab, bos_token_id=1, eos_token_id=2, pad_token_id=pad_id, tie_word_embeddings=False,
        )
        n_image = (vision_config.image_size // vision_config.patch_size) ** 2
        config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_id,
                             image_seq_length=n_image, vision_feature_layer=select_layer,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             multimodal_projector_bias=True, tie_word_embeddings=False)
        config.architectures = ["LlavaForConditionalGeneration"]
        if dtype:
            config.dtype = dtype
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=pad_id).save_pretrained(tmp)

        processor = build_processor(tokenizer, vision_config.image_size, vision_config.patch_size)
        processor.image_processor.do_pad = cfg.get("image_aspect_ratio", "square") == "pad"
        processor.chat_template = VICUNA_V1_TEMPLATE
        processor.save_pretrained(tmp)

        sparsity = None
        sparse = cfg.get("sparse_config") or {}
        if predictor_state:
            predictors = Predictors(cfg["hidden_size"], layer=sparse["sparse_layer"], image_width=PREDICTOR_SHAPE["d_model"])
            for b in range(len(predictors.image.blocks)):
                predictor_state[f"image.blocks.{b}.self_attn.in_proj_bias"] = torch.zeros(3 * PREDICTOR_SHAPE["d_model"])
            missing, unexpected = predictors.load_state_dict(predictor_state, strict=False)
            if missing or unexpected:
                raise ConversionError(f"predictor tensors do not match: missing {missing}, unexpected {unexpected}")
            predictors.save(tmp)
            sparsity = SparsityConfig(vision_keep=float(sparse["vision_keep_rate"]), text_keep=None,
                                      layer=int(sparse["sparse_layer"]), keep_rounding="floor")
        elif sparse.get("use_vision_predictor"):
            raise ConversionError(f"{src}: sparse_config enables the predictors but no predictor tensors were found")
        notes = {"format": 1, "converted_from": str(src.resolve()), "vision_tower": tower_source,
                 "prompt": {"legacy": legacy}, "sparsity": sparsity.to_dict() if sparsity else None,
                 "sparse_config": sparse or None}
        (tmp / MODEL_NOTES_FILE).write_text(json.dumps(notes, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionReport(dst, len(writer.weight_map), writer.total, tower_source, sparsity is not None, sparsity)
