"""A tiny checkpoint in the original LLaVA / Dynamic-LLaVA layout, and a reference forward written directly over
its original keys (no transformers modeling code, nothing of dynllava), for testing `dynllava convert`.

The layout follows Osilly/dynamic_llava (model_type dynamic_llava_llama, `sparse_config`, `model.*` keys with the
projector under `model.mm_projector.{0,2}`, the CLIP tower under `model.vision_tower.vision_tower.vision_model.*`,
the predictors under `model.image_score_predictor.*` (timm blocks: attn.qkv without bias) and
`model.output_text_score_predictor.output_mlp.*`) and haotian-liu/LLaVA's `tokenizer_image_token` and
`expand2square`. The reference follows the paper's decision rules as the official code writes them: image tokens
kept = int(n * rate) by log_softmax(logits)[..., 0] (channel 0 = keep); a generated token is admitted iff keep logit > drop logit;
both on the hidden states entering layer `sparse_layer`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

IMAGE_TOKEN_INDEX = -200  # the original's sentinel for <image> in input ids
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red square on a blue background.",
    "Describe the image briefly. There are two circles and one triangle, 12 of 345.",
]
LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
      "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
SPARSE_CONFIG = {"sparse_layer": 2, "vision_keep_rate": 0.2, "output_text_keep_rate": 0.5, "instruct_keep_rate": 0.5,
                 "d_model": 512, "nhead": 8, "num_layers": 2, "dim_feedforward": 2048, "use_vision_predictor": True,
                 "use_text_predictor": True, "use_output_text_predictor": True, "use_instruct_predictor": False,
                 "mask_loss_weight": 0.0}
TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "image_size": 32, "patch_size": 8}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_sentencepiece(path: Path, vocab_size: int = 420) -> Path:
    """A LLaMA-style SentencePiece BPE model (byte fallback, identity normaliser, dummy prefix, ids 0-2 =
    <unk> <s> </s>) trained on a few sentences."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    return path


def _rand(g: torch.Generator, *shape: int, std: float = 0.15) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def tower_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """CLIP vision weights under `vision_model.*` (CLIPVisionModel's own names)."""
    w, f, p = TOWER["hidden_size"], TOWER["intermediate_size"], TOWER["patch_size"]
    n_pos = (TOWER["image_size"] // p) ** 2 + 1
    sd = {"embeddings.class_embedding": _rand(g, w), "embeddings.patch_embedding.weight": _rand(g, w, 3, p, p),
          "embeddings.position_embedding.weight": _rand(g, n_pos, w),
          "pre_layrnorm.weight": 1 + _rand(g, w, std=0.05), "pre_layrnorm.bias": _rand(g, w, std=0.05),
          "post_layernorm.weight": 1 + _rand(g, w, std=0.05), "post_layernorm.bias": _rand(g, w, std=0.05)}
    for i in range(TOWER["num_hidden_layers"]):
        pre = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[pre + f"self_attn.{proj}.weight"] = _rand(g, w, w)
            sd[pre + f"self_attn.{proj}.bias"] = _rand(g, w, std=0.05)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[pre + f"{ln}.weight"] = 1 + _rand(g, w, std=0.05)
            sd[pre + f"{ln}.bias"] = _rand(g, w, std=0.05)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"] = _rand(g, f, w), _rand(g, f, std=0.05)
        sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"] = _rand(g, w, f), _rand(g, w, std=0.05)
    return {"vision_model." + k: v for k, v in sd.items()}


def original_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Language model, projector and predictors under the original names (random, sharpened weights)."""
    g = torch.Generator().manual_seed(seed)
    d, f, L = LM["hidden_size"], LM["intermediate_size"], LM["num_hidden_layers"]
    sd = {"model.embed_tokens.weight": _rand(g, vocab, d), "model.norm.weight": 1 + _rand(g, d, std=0.05),
          "lm_head.weight": _rand(g, vocab, d),
          "model.mm_projector.0.weight": _rand(g, d, TOWER["hidden_size"]), "model.mm_projector.0.bias": _rand(g, d),
          "model.mm_projector.2.weight": _rand(g, d, d), "model.mm_projector.2.bias": _rand(g, d)}
    for i in range(L):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[pre + f"self_attn.{proj}.weight"] = _rand(g, d, d)
        sd[pre + "mlp.gate_proj.weight"], sd[pre + "mlp.up_proj.weight"] = _rand(g, f, d), _rand(g, f, d)
        sd[pre + "mlp.down_proj.weight"] = _rand(g, d, f)
        sd[pre + "input_layernorm.weight"] = 1 + _rand(g, d, std=0.05)
        sd[pre + "post_attention_layernorm.weight"] = 1 + _rand(g, d, std=0.05)
        sd[pre + "self_attn.rotary_emb.inv_freq"] = torch.zeros(d // LM["num_attention_heads"] // 2)  # old saves
    m, ff = SPARSE_CONFIG["d_model"], SPARSE_CONFIG["dim_feedforward"]
    vp = "model.image_score_predictor."
    sd.update({vp + "down_mlp.0.weight": 1 + _rand(g, d, std=0.05), vp + "down_mlp.0.bias": _rand(g, d, std=0.05),
               vp + "down_mlp.1.weight": _rand(g, m, d), vp + "down_mlp.1.bias": _rand(g, m, std=0.05)})
    for b in range(SPARSE_CONFIG["num_layers"]):
        pre = vp + f"transformer.{b}."
        sd.update({pre + "norm1.weight": 1 + _rand(g, m, std=0.05), pre + "norm1.bias": _rand(g, m, std=0.05),
                   pre + "attn.qkv.weight": _rand(g, 3 * m, m, std=0.05),
                   pre + "attn.proj.weight": _rand(g, m, m, std=0.05), pre + "attn.proj.bias": _rand(g, m, std=0.05),
                   pre + "norm2.weight": 1 + _rand(g, m, std=0.05), pre + "norm2.bias": _rand(g, m, std=0.05),
                   pre + "mlp.fc1.weight": _rand(g, ff, m, std=0.05), pre + "mlp.fc1.bias": _rand(g, ff, std=0.05),
                   pre + "mlp.fc2.weight": _rand(g, m, ff, std=0.05), pre + "mlp.fc2.bias": _rand(g, m, std=0.05)})
    for i, (a, b) in zip((0, 2, 4), ((m, m // 2), (m // 2, m // 4), (m // 4, 2))):
        sd[vp + f"output_mlp.{i}.weight"], sd[vp + f"output_mlp.{i}.bias"] = _rand(g, b, a), _rand(g, b, std=0.05)
    tp = "model.output_text_score_predictor.output_mlp."
    sd[tp + "0.weight"], sd[tp + "0.bias"] = 1 + _rand(g, d, std=0.05), _rand(g, d, std=0.05)
    for i, (a, b) in zip((1, 3, 5, 7), ((d, m), (m, m // 2), (m // 2, m // 4), (m // 4, 2))):
        sd[tp + f"{i}.weight"], sd[tp + f"{i}.bias"] = _rand(g, b, a), _rand(g, b, std=0.05)
    return sd


def original_config(vocab: int) -> dict:
    return {"model_type": "dynamic_llava_llama", "architectures": ["DynamicLlavaLlamaForCausalLM"], **LM,
            "vocab_size": vocab, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
            "mm_hidden_size": TOWER["hidden_size"], "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "tokenizer_padding_side": "right", "sparse_config": dict(SPARSE_CONFIG)}


def write_original(directory: Path, tokenizer_model: Path, with_tower: bool, fmt: str, legacy: bool | None = False,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the checkpoint (fmt "safetensors": two shards and an index; "bin": one pytorch_model.bin). Returns
    every tensor it holds under its original name, the CLIP tower included (for the reference)."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).vocab_size()
    directory.mkdir(parents=True)
    sd = original_state(vocab, seed)
    tower = {"model.vision_tower.vision_tower." + k: v for k, v in tower_state(torch.Generator().manual_seed(seed + 1)).items()}
    saved = {**sd, **(tower if with_tower else {})}
    (directory / "config.json").write_text(json.dumps(original_config(vocab), indent=2))
    (directory / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    tok_cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
               "model_max_length": 2048, "pad_token": "<unk>", "padding_side": "right"}
    if legacy is not None:
        tok_cfg["legacy"] = legacy
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if fmt == "safetensors":
        names = sorted(saved)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in shards.items():
            save_file({k: saved[k].contiguous() for k in keys}, str(directory / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(saved, directory / "pytorch_model.bin")
    return {**sd, **tower}


def write_clip_directory(directory: Path, seed: int = 0, heads: int = 1) -> None:
    """A local CLIP vision directory as transformers saves CLIPVisionModel (config.json + model.safetensors)."""
    directory.mkdir(parents=True)
    config = {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "hidden_act": "quick_gelu",
              "num_attention_heads": heads, "layer_norm_eps": 1e-5, "projection_dim": TOWER["hidden_size"], **TOWER}
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tower_state(torch.Generator().manual_seed(seed + 1)), str(directory / "model.safetensors"))


# ------------------------------------------------------------------------------------------- the original's input
def slow_llama_tokenize(sp, sp_no_prefix, text: str, legacy: bool) -> list[int]:
    """transformers 4.3x LlamaTokenizer (slow) on `text` with BOS, </s> written in the text as the special token.
    legacy: SentencePiece's dummy prefix on every piece between special tokens; else "▁" + text, encoded without
    the dummy prefix, a leading "▁" dropped before a special token."""
    if legacy:
        out = []
        for i, seg in enumerate(text.split("</s>")):
            out += ([2] if i else []) + (sp.encode(seg) if seg else [])
        return [1] + out
    if not text:
        return [1]
    out = []
    for i, seg in enumerate(("▁" + text.replace("▁", " ")).split("</s>")):
        out += ([2] if i else []) + (sp_no_prefix.encode(seg) if seg else [])
    if len(out) > 1 and out[0] == sp.piece_to_id("▁") and out[1] == 2:
        out = out[1:]
    return [1] + out


def sentencepiece_pair(tokenizer_model: Path):
    """(the model, the same model without the dummy prefix, as the slow tokenizer loads it with legacy=False)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_model.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return (spm.SentencePieceProcessor(model_file=str(tokenizer_model)),
            spm.SentencePieceProcessor(model_proto=proto.SerializeToString()))


def tokenizer_image_token(prompt: str, tokenize) -> list[int]:
    """LLaVA's mm_utils.tokenizer_image_token (`tokenize(text) -> ids with BOS`)."""
    chunks = [tokenize(chunk) for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == 1:
        offset = 1
        ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
    for x in separated:
        ids += x[offset:]
    return ids


def expand2square(img: Image.Image, background) -> Image.Image:
    """LLaVA's mm_utils.expand2square."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return out


def original_pixels(img: Image.Image) -> torch.Tensor:
    """[3, S, S]: expand2square with the CLIP mean, then CLIP's resize (shortest edge, bicubic), centre crop,
    rescale and normalise, written out with PIL and torch."""
    img = expand2square(img.convert("RGB"), tuple(int(x * 255) for x in CLIP_MEAN))
    s = TOWER["image_size"]
    img = img.resize((s, s), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


# ------------------------------------------------------------------------------------------- the reference forward
def _ln(x, sd, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _attention(q, k, v, heads, causal):
    n, d = q.shape
    q, k, v = (t.view(t.shape[0], heads, d // heads).transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(1, 2) / math.sqrt(d // heads)
    if causal is not None:
        scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, d)


def clip_patch_features(sd, pixels: torch.Tensor, heads: int, select_layer: int = -2) -> torch.Tensor:
    """[P, W] patch features (CLS dropped) of hidden_states[select_layer] of the CLIP tower, for one image."""
    p = "model.vision_tower.vision_tower.vision_model."
    patch = F.conv2d(pixels[None], sd[p + "embeddings.patch_embedding.weight"],
                     stride=TOWER["patch_size"])[0].flatten(1).T  # [P, W]
    x = torch.cat([sd[p + "embeddings.class_embedding"][None], patch]) + sd[p + "embeddings.position_embedding.weight"]
    x = _ln(x, sd, p + "pre_layrnorm")
    states = [x]
    for i in range(TOWER["num_hidden_layers"]):
        pre = p + f"encoder.layers.{i}."
        h = _ln(x, sd, pre + "layer_norm1")
        q, k, v = (h @ sd[pre + f"self_attn.{n}_proj.weight"].T + sd[pre + f"self_attn.{n}_proj.bias"] for n in "qkv")
        x = x + _attention(q, k, v, heads, None) @ sd[pre + "self_attn.out_proj.weight"].T + sd[pre + "self_attn.out_proj.bias"]
        h = _ln(x, sd, pre + "layer_norm2") @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        states.append(x)
    return states[select_layer][1:]


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, heads):
    n, d = x.shape
    hd = d // heads
    inv = 1.0 / (LM["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = positions[:, None].float() * inv[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    x = x.view(n, heads, hd)
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return (x * cos[:, None] + rot * sin[:, None]).reshape(n, d)


def _layers(sd, x, positions, first, last):
    heads = LM["num_attention_heads"]
    causal = positions[None, :] <= positions[:, None]
    for i in range(first, last):
        pre = f"model.layers.{i}."
        h = _rms(x, sd[pre + "input_layernorm.weight"])
        q, k, v = (h @ sd[pre + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        x = x + _attention(_rope(q, positions, heads), _rope(k, positions, heads), v, heads, causal) @ \
            sd[pre + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[pre + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ sd[pre + "mlp.gate_proj.weight"].T) * (h @ sd[pre + "mlp.up_proj.weight"].T)) @ \
            sd[pre + "mlp.down_proj.weight"].T
    return x


def vision_keep_logits(sd, hidden_image: torch.Tensor) -> torch.Tensor:
    """[N, 2] VisionPredictor (official HEAD) on the image tokens' hidden states entering layer K."""
    p = "model.image_score_predictor."
    x = F.gelu(_ln(hidden_image, sd, p + "down_mlp.0") @ sd[p + "down_mlp.1.weight"].T + sd[p + "down_mlp.1.bias"])
    for b in range(SPARSE_CONFIG["num_layers"]):
        pre = p + f"transformer.{b}."
        q, k, v = (_ln(x, sd, pre + "norm1") @ sd[pre + "attn.qkv.weight"].T).chunk(3, -1)
        x = x + _attention(q, k, v, SPARSE_CONFIG["nhead"], None) @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        h = F.gelu(_ln(x, sd, pre + "norm2") @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        x = x + h @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
    half = x.shape[-1] // 2
    x = torch.cat([x[:, :half], x[:, half:].mean(0, keepdim=True).expand(len(x), half)], -1)
    for i in (0, 2, 4):
        x = x @ sd[p + f"output_mlp.{i}.weight"].T + sd[p + f"output_mlp.{i}.bias"]
        x = F.gelu(x) if i < 4 else x
    return x


def text_keep_logits(sd, hidden: torch.Tensor) -> torch.Tensor:
    """[2] TextPredictor (official HEAD) on one generated token's hidden state entering layer K."""
    p = "model.output_text_score_predictor.output_mlp."
    x = _ln(hidden, sd, p + "0")
    for i in (1, 3, 5, 7):
        x = x @ sd[p + f"{i}.weight"].T + sd[p + f"{i}.bias"]
        x = F.gelu(x) if i < 7 else x
    return x


class OriginalReference:
    """Greedy decoding of the original checkpoint on one prompt, dense or Dynamic-LLaVA sparse, recomputing the
    whole sequence every step (layers < K over every token; layers >= K over the kept prompt tokens, the admitted
    generated tokens and the newest one, at their original positions): the KV-cache semantics of the method."""

    def __init__(self, sd: dict[str, torch.Tensor], tower_heads: int):
        self.sd, self.tower_heads = sd, tower_heads
        self.layer_k = SPARSE_CONFIG["sparse_layer"]

    def embed(self, ids: list[int], pixels: torch.Tensor | None) -> torch.Tensor:
        """[T, d] embeddings with projected image features spliced in at the sentinel (one image)."""
        sd = self.sd
        parts, i = [], 0
        for j, t in enumerate(ids + [None]):
            if t == IMAGE_TOKEN_INDEX or t is None:
                if ids[i:j]:
                    parts.append(sd["model.embed_tokens.weight"][torch.tensor(ids[i:j])])
                if t is not None:
                    feats = clip_patch_features(sd, pixels, self.tower_heads)
                    h = F.gelu(feats @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
                    parts.append(h @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"])
                i = j + 1
        return torch.cat(parts)

    def generate(self, ids: list[int], pixels, n_new: int, vision_rate: float | None):
        """(tokens, hidden entering layer K over the prompt [T', d], kept prompt positions, admitted flags per fed
        token). vision_rate None: dense."""
        sd = self.sd
        x0 = self.embed(ids, pixels)
        n_prompt = len(x0)
        n_img = clip_patch_features(sd, pixels, self.tower_heads).shape[0] if pixels is not None else 0
        start = ids.index(IMAGE_TOKEN_INDEX) if n_img else 0
        image = list(range(start, start + n_img))
        fed: list[int] = []
        admitted: list[bool] = []
        tokens: list[int] = []
        kept = list(range(n_prompt))
        hidden_k_prompt = None
        for step in range(n_new):
            x = torch.cat([x0, sd["model.embed_tokens.weight"][torch.tensor(fed, dtype=torch.long)]]) if fed else x0
            positions = torch.arange(len(x))
            hk = _layers(sd, x, positions, 0, self.layer_k)
            if step == 0:
                hidden_k_prompt = hk
                if vision_rate is not None and image:
                    score = F.log_softmax(vision_keep_logits(sd, hk[image]), -1)[:, 0]  # the official image_score
                    n_keep = int(len(image) * vision_rate)
                    top = sorted(image[i] for i in score.argsort(descending=True)[:n_keep].tolist())
                    kept = [p for p in range(n_prompt) if p not in image or p in top]
            if fed and vision_rate is not None:
                lg = text_keep_logits(sd, hk[-1])
                admitted.append(bool(lg[0] > lg[1]))
            elif fed:
                admitted.append(True)
            sparse = kept + [n_prompt + i for i, a in enumerate(admitted[:-1]) if a] + ([len(x) - 1] if fed else [])
            sel = torch.tensor(sparse)
            h = _layers(sd, hk[sel], positions[sel], self.layer_k, LM["num_hidden_layers"])
            logits = _rms(h[-1], sd["model.norm.weight"]) @ sd["lm_head.weight"].T
            tokens.append(int(logits.argmax()))
            fed.append(tokens[-1])
        return tokens, hidden_k_prompt, kept, admitted
