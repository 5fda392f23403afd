"""Train the embedded `tiny` LLaVA from scratch on shape scenes: a byte-level BPE tokenizer trained on the
corpus, a CLIP-style vision tower + Llama LM (transformers' own classes, saved in HF format), AdamW with
warm-up and cosine decay. Deterministic: the same config and seed give the same weights on the same machine."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dynllava.config import ModelSpec, TextShape, VisionShape, dataclass_from_yaml
from dynllava.data import shapes
from dynllava.loading import build_processor, hf_config_from_spec
from dynllava.train.conversations import collate, encode, shape_turns
from dynllava.train.precision import use_bf16_autocast

log = logging.getLogger(__name__)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass
class BaseTrainConfig:
    """Everything that determines the trained base model (configs/train/tiny.yaml mirrors it)."""

    seed: int = 0
    vocab_size: int = 512  # BPE vocabulary incl. specials
    tokenizer_rows: int = 4000  # scenes whose text trains the tokenizer
    vision: dict = field(default_factory=lambda: dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                                      num_attention_heads=4, image_size=192, patch_size=16))
    text: dict = field(default_factory=lambda: dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                                                    num_attention_heads=4, num_key_value_heads=4,
                                                    max_position_embeddings=1024))
    vision_feature_layer: int = -1
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 25
    vision_steps: int = 0  # stage 1: vision-tower pretraining steps on cell labels (0 = skip)
    vision_batch_size: int = 32  # images per stage-1 step
    vision_lr: float = 2e-3  # stage-1 peak learning rate
    vision_lr_scale: float = 1.0  # stage 2: the tower's learning rate as a fraction of `lr`
    vision_cell_index: bool = False  # stage 1 also predicts each patch's own grid cell (positions made explicit)
    questions_per_scene: int = 3  # VQA turns per training conversation
    variety: float = 0.0  # share of scenes on varied canvases (sizes, aspect ratios, plain backgrounds)
    question_weights: list[float] | None = None  # count, colour, position, exist (None: uniform)
    autocast_bf16: bool = True  # bf16 autocast for matmuls (fp32 master weights); 2x faster on AVX512-BF16 CPUs,
    #                             fp32 (with a warning) where bf16 would be emulated (train/precision.py)
    threads: int = 0  # torch CPU threads (0 = leave torch's default)
    init: str | None = None  # continue from this base model (its tokenizer, processor and weights), not from scratch
    first_row: int = 0  # the LLaVA stage's scenes start at this train-split row (a continued run sees new scenes)

    def __post_init__(self) -> None:
        if not 0.0 <= self.variety <= 1.0:
            raise ValueError(f"variety must be a share in [0, 1], got {self.variety!r}")
        if self.first_row < 0:
            raise ValueError(f"first_row must be >= 0, got {self.first_row!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BaseTrainConfig":
        return dataclass_from_yaml(cls, path)


def corpus(n_rows: int, split_seed: int) -> list[str]:
    """Conversation strings of n_rows training scenes (every task), for tokenizer training."""
    rng = random.Random(split_seed)
    texts = []
    for i in range(n_rows):
        _, turns = shape_turns(rng, split_seed, i)
        texts.append(" ".join(f"USER: {q} ASSISTANT: {a}" for q, a in turns))
    return texts


def train_tokenizer(config: BaseTrainConfig) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the training corpus (any text still encodes, as bytes), BOS added like Llama's."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(config.tokenizer_rows, shapes.SPLIT_SEEDS["train"]), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="right",
    )


def build_model(config: BaseTrainConfig, tokenizer):
    """Fresh LlavaForConditionalGeneration (fp32) and its processor for the config's shape."""
    from transformers import LlavaForConditionalGeneration

    vocab = len(tokenizer)
    spec = ModelSpec(name="tiny", seed=config.seed, vision=VisionShape(**config.vision),
                     text=TextShape(vocab_size=vocab, **config.text),
                     vision_feature_layer=config.vision_feature_layer,
                     image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    hf_config = hf_config_from_spec(spec)
    hf_config.text_config.pad_token_id = tokenizer.pad_token_id
    hf_config.text_config.bos_token_id = tokenizer.bos_token_id
    hf_config.text_config.eos_token_id = tokenizer.eos_token_id
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(hf_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = build_processor(tokenizer, spec.vision.image_size, spec.vision.patch_size)
    return model, processor


def load_base(path: str | Path):
    """A saved base model (fp32) and its processor, to continue training (`init:`). Its shape is the saved one:
    the config's vision / text shapes are ignored."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from dynllava.loading import resolve_source

    source = resolve_source(str(path))
    model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32, local_files_only=True)
    model.config._attn_implementation = "sdpa"
    return model, AutoProcessor.from_pretrained(source, local_files_only=True)


def _weights(config: BaseTrainConfig) -> tuple[float, ...] | None:
    return None if config.question_weights is None else tuple(config.question_weights)


def lr_at(step: int, config: BaseTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain_vision(model, processor, config: BaseTrainConfig, log_file, progress: bool) -> None:
    """Stage 1: the vision tower learns per-cell colour/shape/size (train/vision.py); the heads are dropped."""
    from tqdm import tqdm

    from dynllava.train.vision import CellHeads, cell_loss, scene_batch

    tower = model.model.vision_tower
    device = model.device
    heads = CellHeads(tower.config.hidden_size, config.vision_cell_index).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.vision_lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    started = time.time()
    for step in tqdm(range(config.vision_steps), desc="pretrain vision", disable=not progress):
        pixels, targets = scene_batch(rng, processor, shapes.SPLIT_SEEDS["train"], step * config.vision_batch_size,
                                      config.vision_batch_size, config.variety)
        warm = min(1.0, (step + 1) / config.warmup_steps)
        decay = 0.5 * (1 + math.cos(math.pi * step / config.vision_steps))
        for group in optimizer.param_groups:
            group["lr"] = config.vision_lr * warm * max(decay, 0.1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
            loss, right = cell_loss(tower, heads, pixels.to(device), [t.to(device) for t in targets])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if step % config.log_every == 0 or step == config.vision_steps - 1:
            log_file.write(json.dumps({"stage": "vision", "step": step, "loss": round(loss.item(), 5),
                                       "cells_right": round(right, 4),
                                       "elapsed_s": round(time.time() - started, 1)}) + "\n")
            log_file.flush()


def train_base(config: BaseTrainConfig, output: str | Path, progress: bool = True, device: str = "cpu") -> Path:
    """Train and save an HF-format LLaVA directory (weights in fp16) with its processor and a training log.
    The shipped `tiny` is trained on CPU; `device="cuda"` runs the same recipe on a GPU (same data, not bitwise
    the same weights)."""
    from tqdm import tqdm

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    if config.init:
        model, processor = load_base(config.init)
        tokenizer = processor.tokenizer
        log.info("continuing from %s", config.init)
    else:
        tokenizer = train_tokenizer(config)
        model, processor = build_model(config, tokenizer)
    model.to(device)
    config = dataclasses.replace(config, autocast_bf16=use_bf16_autocast(config.autocast_bf16, device))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tokenizer %d tokens; model %.2fM parameters", len(tokenizer), n_params / 1e6)
    log_file = open(out / "train_log.jsonl", "w")
    if config.vision_steps:
        model.train()
        pretrain_vision(model, processor, config, log_file, progress)
    groups = []
    for is_tower in (False, True):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("model.vision_tower.") == is_tower]
        scale = config.vision_lr_scale if is_tower else 1.0
        groups.append({"params": [p for _, p in named if p.dim() >= 2], "weight_decay": config.weight_decay,
                       "scale": scale})
        groups.append({"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "scale": scale})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    rng = random.Random(config.seed)
    split = shapes.SPLIT_SEEDS["train"]
    model.train()
    with log_file, tqdm(total=config.steps, desc="train base", disable=not progress) as bar:
        running = None
        for step in range(config.steps):
            examples = []
            for j in range(config.batch_size):
                row = config.first_row + step * config.batch_size + j
                image, turns = shape_turns(rng, split, row, config.questions_per_scene,
                                           _weights(config), config.variety)
                examples.append(encode(processor, image, turns))
            batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config) * group["scale"]
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
            if step % config.log_every == 0 or step == config.steps - 1:
                log_file.write(json.dumps({"stage": "llava", "step": step, "loss": round(loss.item(), 5), "lr": lr_at(step, config),
                                           "elapsed_s": round(time.time() - started, 1)}) + "\n")
                log_file.flush()
    model.eval()
    model.to("cpu", torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    log.info("trained %d steps in %.1f min -> %s", config.steps, (time.time() - started) / 60, out)
    return out
