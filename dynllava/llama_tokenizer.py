"""A LLaMA SentencePiece `tokenizer.model` as a `tokenizers` tokenizer, built without the sentencepiece package.

The original LLaVA loads `LlamaTokenizer` (slow, SentencePiece). Its two behaviours, chosen by `legacy` in
`tokenizer_config.json` (absent = True, as in the transformers releases LLaVA pinned), differ only after a special
token written in the text (e.g. `</s>` between turns):
- legacy=True: every piece of text between special tokens is encoded with SentencePiece's dummy prefix ("▁").
  Reproduced exactly by a Prepend("▁") + Replace(" ", "▁") normalizer, which `tokenizers` applies per piece.
- legacy=False: one "▁" before the whole text, none after special tokens. Reproduced by Metaspace with
  prepend_scheme "first" for text that does not start with a space (`inputs.tokenize_llava` handles that case).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import import_protobuf
from transformers.tokenization_utils_base import generate_merges

SPIECE_UNDERLINE = "▁"
_BPE, _UNKNOWN, _CONTROL = 2, 2, 3  # sentencepiece_model.proto: TrainerSpec.ModelType.BPE; piece types


def read_pieces(model_file: str | Path) -> tuple[list[str], list[int]]:
    """(pieces in id order, ids of control pieces such as <s> and </s>) of a SentencePiece BPE model.

    ValueError when the model is not the LLaMA kind (BPE with byte fallback and identity normalisation).
    """
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != _BPE:
        raise ValueError(f"{model_file}: SentencePiece model type {spec.model_type} is not BPE (LLaMA's)")
    if not spec.byte_fallback:
        raise ValueError(f"{model_file}: byte_fallback is off; only LLaMA-style tokenizers are converted")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise ValueError(f"{model_file}: normaliser {norm.name!r} is not LLaMA's identity normaliser")
    if not norm.add_dummy_prefix:
        raise ValueError(f"{model_file}: add_dummy_prefix is off; only LLaMA-style tokenizers are converted")
    pieces = [p.piece for p in proto.pieces]
    if pieces[:3] != ["<unk>", "<s>", "</s>"]:
        raise ValueError(f"{model_file}: ids 0-2 are {pieces[:3]}, not LLaMA's <unk>, <s>, </s>")
    control = [i for i, p in enumerate(proto.pieces) if p.type in (_CONTROL, _UNKNOWN)]
    return pieces, control


def llama_tokenizer(model_file: str | Path, legacy: bool, added: list[str]) -> PreTrainedTokenizerFast:
    """The fast tokenizer equal to LLaVA's slow LlamaTokenizer(legacy) on `model_file`, with `added` special tokens
    appended after the SentencePiece vocabulary (e.g. ["<image>", "<pad>"] as llava-hf numbers them)."""
    pieces, control = read_pieces(model_file)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=pieces[0], fuse_unk=True,
                        byte_fallback=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE),
                                               normalizers.Replace(" ", SPIECE_UNDERLINE)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="first",
                                                     split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = [pieces[i] for i in control]
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials + list(added)])
    unk, bos, eos = pieces[0], pieces[1], pieces[2]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   padding_side="right", legacy=legacy)
    return fast
