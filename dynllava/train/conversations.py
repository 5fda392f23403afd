"""Turn image + question/answer turns into training tensors: one conversation string in the model's chat
template, tokenized as a whole (so a prefix tokenizes exactly as the inference prompt does), the `<image>`
token expanded to the image's tokens, and labels only on the answers (and their end-of-turn token)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dynllava.data import shapes
from dynllava.inputs import LayoutFn, image_token_count, is_anyres

IGNORE = -100


@dataclass
class Example:
    """One training sequence. input_ids, labels: [T] long; pixel_values: [3, H, W] (any-res: [n_tiles, 3, S, S],
    the image's base view and tiles); answer_spans: (start, end) token ranges of each answer, for the
    text-budget rule (answers >= 50 tokens); image_size: the image's (height, width), any-res only."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    answer_spans: list[tuple[int, int]]
    image_size: tuple[int, int] | None = None


def conversation_text(turns: list[tuple[str, str]], image_token: str, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA-1.5 template: "USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"; returns the text and
    the character span of each answer (answer text plus its </s>)."""
    text, spans = "", []
    for i, (question, answer) in enumerate(turns):
        text += "USER: " + (f"{image_token}\n" if i == 0 else "") + question + " ASSISTANT:"
        start = len(text)
        text += " " + answer + eos
        spans.append((start, len(text)))
    return text, spans


def encode(processor, image, turns: list[tuple[str, str]], bos: bool = True,
           layout_fn: LayoutFn | None = None) -> Example:
    """Tokenize one conversation about one image into an Example. layout_fn: the model's image layouts
    (DynamicLlava.image_layouts), required by the any-resolution families."""
    tok = processor.tokenizer
    text, spans = conversation_text(turns, processor.image_token, tok.eos_token)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=bos)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels, answer_spans, span_i = [], [], 0
    token_spans: list[list[int]] = [[] for _ in spans]
    for t, (start, end) in enumerate(offsets):
        inside = next((j for j, (a, b) in enumerate(spans) if start >= a and end <= b and end > start), None)
        labels.append(ids[t] if inside is not None else IGNORE)
        if inside is not None:
            token_spans[inside].append(t)
    image_size = None
    if is_anyres(processor):  # the image as a group of one, as inference prepares it
        if layout_fn is None:
            raise ValueError("an any-resolution model's training examples need its image layouts")
        out = processor.image_processor([[image]], return_tensors="pt")
        layout = layout_fn(out["image_sizes"], [1])[0]
        pixel_values, n_image = out["pixel_values"][0, : layout.n_tiles], layout.length
        image_size = tuple(int(x) for x in out["image_sizes"][0])
    else:
        pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
        n_image = image_token_count(processor, *pixel_values.shape[-2:])
    image_id = processor.image_token_id
    at = ids.index(image_id)
    ids = ids[:at] + [image_id] * n_image + ids[at + 1 :]
    labels = labels[:at] + [IGNORE] * n_image + labels[at + 1 :]
    shift = n_image - 1
    answer_spans = [(ts[0] + shift, ts[-1] + 1 + shift) for ts in token_spans if ts]
    del span_i
    return Example(torch.tensor(ids), torch.tensor(labels), pixel_values, answer_spans, image_size)


def shape_turns(rng: random.Random, split_seed: int, index: int, n_questions: int = 3,
                question_weights: tuple[float, ...] | None = None, variety: float = 0.0,
                ) -> tuple[object, list[tuple[str, str]]]:
    """A multi-turn conversation about one scene: its caption, its description (3+ objects) and n_questions
    questions (kinds weighted by question_weights, see shapes.vqa). Half the conversations ask the questions
    first, so that they must be answered from the image rather than copied from an earlier description; the
    other half are in random order. `variety`: the share of scenes drawn on varied canvases (shapes.scene_image)."""
    row_rng = random.Random(f"shapes/{split_seed}/{index}")
    scene = shapes.sample_scene(row_rng, min_objects=1)
    image = shapes.scene_image(scene, row_rng, f"shapes-canvas/{split_seed}/{index}", variety)
    texts = [(shapes.PROMPTS["caption"], shapes.caption(scene))]
    if len(scene) >= 3:
        texts.append((shapes.PROMPTS["describe"], shapes.describe(scene)))
    questions = []
    for _ in range(n_questions):
        _, question, answer = shapes.vqa(scene, row_rng, question_weights)
        questions.append((question + " Answer briefly.", answer))
    rng.shuffle(questions)
    rng.shuffle(texts)
    if rng.random() < 0.5:
        return image, questions + texts
    turns = questions + texts
    rng.shuffle(turns)
    return image, turns


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of Examples into a batch for the HF model's forward (any-res: every example's tiles
    concatenated, [N_views, 3, S, S], with image_sizes [B, 2])."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = e.input_ids, e.labels, 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if examples[0].image_size is not None:
        batch["pixel_values"] = torch.cat([e.pixel_values for e in examples])
        batch["image_sizes"] = torch.tensor([e.image_size for e in examples])
    else:
        batch["pixel_values"] = torch.stack([e.pixel_values for e in examples])
    return batch
