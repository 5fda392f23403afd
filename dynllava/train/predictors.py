"""Train the Dynamic-LLaVA predictors the paper's way, jointly with a light fine-tune of the LM:
Gumbel-softmax straight-through, temperature annealed 1.0 -> 0.1, masked attention (train/masked.py),
loss = CE + budget_weight * [(vision_target - image keep)^2 + (text_target - text keep)^2], the text term only
over answers of at least `text_budget_min_tokens` tokens; the predictors learn faster than the LM.

Data: the shape scenes (default) or LLaVA-665k-style JSON (conversations with an image path each)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from dynllava.config import dataclass_from_yaml
from dynllava.data import shapes
from dynllava.inputs import load_image
from dynllava.predictors import Predictors
from dynllava.train.conversations import IGNORE, Example, collate, encode, shape_turns
from dynllava.train.masked import masked_forward
from dynllava.train.precision import use_bf16_autocast

log = logging.getLogger(__name__)
# Copied from the base model when the LM is frozen: its config, generation defaults and training record.
BASE_FILES = ("config.json", "generation_config.json", "train_config.json", "train_log.jsonl")


@dataclass
class PredictorTrainConfig:
    """Everything that determines the trained predictors (configs/train/predictors.yaml mirrors it)."""

    seed: int = 0
    layer: int = 2  # K
    image_width: int = 512  # the image predictor's width W (the paper's 512; smaller for narrow models)
    steps: int = 800
    batch_size: int = 8
    predictor_lr: float = 1e-3  # the predictors' AdamW learning rate
    lm_lr: float = 5e-5  # the language model's (and projector's); 0 freezes them. The vision tower is frozen.
    dense_every: int = 0  # with lm_lr > 0: every n-th step is a plain dense CE step (0 = never), so the LM
    #                      learns the pruned context without forgetting the full one (one model, any keep ratio)
    vision_keep_target: float = 0.2
    text_keep_target: float = 0.5
    budget_weight: float = 100.0
    text_budget_min_tokens: int = 50  # the text budget applies only to answers at least this long
    tau_start: float = 1.0
    tau_end: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    log_every: int = 25
    autocast_bf16: bool = True
    variety: float = 0.0  # share of shape scenes on varied canvases (sizes, aspect ratios, plain backgrounds)

    def __post_init__(self) -> None:
        if not 0.0 <= self.variety <= 1.0:
            raise ValueError(f"variety must be a share in [0, 1], got {self.variety!r}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PredictorTrainConfig":
        return dataclass_from_yaml(cls, path)


def tau_at(step: int, config: PredictorTrainConfig) -> float:
    """Exponential annealing from tau_start to tau_end over the run."""
    return config.tau_start * (config.tau_end / config.tau_start) ** (step / max(1, config.steps - 1))


def llava_json_turns(path: str | Path, image_root: str | Path) -> Iterator[tuple[object, list[tuple[str, str]]]]:
    """LLaVA-665k-style records: {"image": relative path, "conversations": [{"from": "human"|"gpt", "value"}]}.
    Records without an image, or whose image cannot be read, are skipped with a warning."""
    records = json.loads(Path(path).read_text())
    for n, rec in enumerate(records):
        if "image" not in rec:
            continue
        try:
            image = load_image(Path(image_root) / rec["image"], f"record {n} image")
        except ValueError as e:
            log.warning("skipping: %s", e)
            continue
        conv = rec.get("conversations", [])
        turns = [(q["value"].replace("<image>", "").strip(), a["value"].strip())
                 for q, a in zip(conv[0::2], conv[1::2]) if q.get("from") == "human" and a.get("from") == "gpt"]
        if turns:
            yield image, turns


def _batches(processor, config: PredictorTrainConfig, data: str | None, image_root: str | None,
             layout_fn=None) -> Iterator[list[Example]]:
    rng = random.Random(config.seed)
    if data is None:  # shape scenes, continuing past the rows the base model saw
        index = 10_000_000
        while True:
            batch = []
            for _ in range(config.batch_size):
                batch.append(encode(processor, *shape_turns(rng, shapes.SPLIT_SEEDS["train"], index,
                                                            variety=config.variety), layout_fn=layout_fn))
                index += 1
            yield batch
    else:  # epochs over the records; a batch may span two epochs, so no record is skipped and a small file works
        batch: list[Example] = []
        while True:
            usable = 0
            for image, turns in llava_json_turns(data, image_root or "."):
                usable += 1
                batch.append(encode(processor, image, turns, layout_fn=layout_fn))
                if len(batch) == config.batch_size:
                    yield batch
                    batch = []
            if not usable:
                raise ValueError(f"{data}: no usable record (each needs a readable image and a human/gpt turn pair)")


def budget_loss(out, answer_spans: list[list[tuple[int, int]]], image_mask: torch.Tensor,
                config: PredictorTrainConfig) -> tuple[torch.Tensor, float, float]:
    """The paper's keep-rate penalty; returns (loss, mean image keep, mean text keep on long answers)."""
    image_rate = out.image_keep.sum(1) / image_mask.sum(1).clamp_min(1)  # [B]
    has_image = image_mask.any(1)
    loss = ((config.vision_keep_target - image_rate[has_image]) ** 2).sum()
    text_rates = []
    for b, spans in enumerate(answer_spans):
        for start, end in spans:
            if end - start >= config.text_budget_min_tokens:
                text_rates.append(out.text_keep[b, start:end].mean())
    text_rate = torch.stack(text_rates) if text_rates else None
    if text_rate is not None:
        loss = loss + ((config.text_keep_target - text_rate) ** 2).sum()
    n_terms = int(has_image.sum()) + (len(text_rates) if text_rates else 0)
    image_mean = float(image_rate[has_image].mean().detach()) if has_image.any() else 1.0
    text_mean = float(text_rate.mean().detach()) if text_rate is not None else 1.0
    return config.budget_weight * loss / max(1, n_terms), image_mean, text_mean


def train_predictors(model_dir: str | Path, output: str | Path, config: PredictorTrainConfig,
                     data: str | None = None, image_root: str | None = None, device: str | None = None,
                     progress: bool = True) -> Path:
    """Fine-tune `model_dir` with fresh predictors; writes a full model directory (LM weights fp16 on CPU, the
    model's dtype on GPU) with predictors.safetensors and predictor_log.jsonl."""
    from tqdm import tqdm

    from dynllava.model import DynamicLlava

    started = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = DynamicLlava.from_pretrained(model_dir, device=device)  # fp32 on CPU, bf16 on GPU
    config = dataclasses.replace(config, autocast_bf16=use_bf16_autocast(config.autocast_bf16, model.device))
    d_model = model.config.text_config.hidden_size
    model.predictors = Predictors(d_model, layer=config.layer, image_width=config.image_width).to(model.device, torch.float32)
    hf = model.hf_model
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    lm_params = [p for n, p in hf.named_parameters() if p.requires_grad]
    groups = [{"params": list(model.predictors.parameters()), "lr": config.predictor_lr}]
    if config.lm_lr > 0:
        groups.append({"params": lm_params, "lr": config.lm_lr})
    else:
        for p in lm_params:
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    peak = [g["lr"] for g in optimizer.param_groups]
    hf.train()
    model.predictors.train()
    pad = model.processor.tokenizer.pad_token_id
    batches = _batches(model.processor, config, data, image_root, model.image_layouts if model.anyres else None)
    image_rate = text_rate = 1.0
    with open(out / "predictor_log.jsonl", "w") as log_file, \
            tqdm(total=config.steps, desc="train predictors", disable=not progress) as bar:
        for step in range(config.steps):
            examples = next(batches)
            batch = collate(examples, pad)
            ids = batch["input_ids"].to(model.device)
            labels = batch["labels"].to(model.device)
            valid = batch["attention_mask"].bool().to(model.device)
            answer_mask = torch.zeros_like(valid)
            for b, e in enumerate(examples):
                for start, end in e.answer_spans:
                    answer_mask[b, start:end] = True
            scale = min(1.0, (step + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            for group, lr in zip(optimizer.param_groups, peak):
                group["lr"] = lr * max(scale, 0.05)
            tau = tau_at(step, config)
            pixels = batch["pixel_values"].to(model.device)
            sizes = batch.get("image_sizes")
            images = {} if sizes is None else {"image_sizes": sizes.to(model.device)}
            if model.family == "llava_onevision":
                images["batch_num_images"] = torch.ones(len(examples), dtype=torch.long)
            dense_step = config.lm_lr > 0 and config.dense_every > 0 and step % config.dense_every == 0
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
                if dense_step:
                    logits = hf(input_ids=ids, pixel_values=pixels, attention_mask=valid.long(), **images).logits
                else:
                    out_ = masked_forward(model, ids, pixels, valid, answer_mask, config.layer, tau, sizes)
                    logits = out_.logits
                ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                     ignore_index=IGNORE)
            if dense_step:
                loss, budget = ce, torch.zeros(())
            else:
                image_mask = (ids == model.image_token_id) & valid
                budget, image_rate, text_rate = budget_loss(out_, [e.answer_spans for e in examples], image_mask,
                                                            config)
                loss = ce + budget
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(ce=f"{ce.item():.3f}", img=f"{image_rate:.2f}", txt=f"{text_rate:.2f}", tau=f"{tau:.2f}")
            if step % config.log_every == 0 or step == config.steps - 1:
                log_file.write(json.dumps({"step": step, "ce": round(ce.item(), 5), "budget": round(budget.item(), 5),
                                           "image_keep": round(image_rate, 4), "text_keep": round(text_rate, 4),
                                           "tau": round(tau, 4), "elapsed_s": round(time.time() - started, 1)})
                               + "\n")
                log_file.flush()
    hf.eval()
    model.predictors.eval()
    save_dtype = torch.float16 if model.device.type == "cpu" else model.dtype
    src = Path(model_dir)
    if config.lm_lr > 0:
        hf.to(save_dtype).save_pretrained(out)
    else:
        for f in [*src.glob("model*.safetensors"), *(src / n for n in BASE_FILES)]:
            if f.is_file():
                shutil.copy(f, out / f.name)
    model.processor.save_pretrained(out)
    model.predictors.to(save_dtype).save(out)
    (out / "predictor_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    log.info("trained predictors %d steps in %.1f min -> %s", config.steps, (time.time() - started) / 60, out)
    return out
