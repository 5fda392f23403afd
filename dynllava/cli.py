"""The `dynllava` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dynllava.config import SparsityConfig
from dynllava.scorers import TEXT_SCORERS, VISION_SCORERS

log = logging.getLogger("dynllava")


def _text_keep(value: str) -> float | str:
    """A fraction, or "none" (the learned predictor decides), kept apart from None (the flag not given)."""
    if value.lower() in ("none", "auto", "predictor"):
        return "none"
    return float(value)


def _add_sparsity_args(p: argparse.ArgumentParser) -> None:
    """Sparsity flags; each one not given keeps the model's own setting (a converted Dynamic-LLaVA checkpoint's
    sparse_config, see `dynllava convert`), else the dense default."""
    g = p.add_argument_group("sparsity (default: the model's own setting when it has one, else dense)")
    g.add_argument("--vision-keep", type=float, default=None,
                   help="fraction of image tokens kept at layer K, in (0, 1] (paper: 0.2)")
    g.add_argument("--text-keep", type=_text_keep, default=None,
                   help="fraction of generated tokens admitted to the cache of layers >= K, in (0, 1] "
                        "(paper: ~0.5); 'none' lets the learned predictor decide by itself")
    g.add_argument("--vision-scorer", choices=sorted(VISION_SCORERS), default=None,
                   help="how image tokens are ranked (learned needs predictor weights)")
    g.add_argument("--text-scorer", choices=sorted(TEXT_SCORERS), default=None,
                   help="how generated tokens are admitted (learned needs predictor weights)")
    g.add_argument("--layer", type=int, default=None, help="K: the layer whose input the scorers read")
    g.add_argument("--mode", choices=["kv_cache", "no_cache"], default=None,
                   help="decode with the sparse KV cache, or recompute the kept context every step")
    g.add_argument("--keep-rounding", choices=["ceil", "floor"], default=None,
                   help="image tokens kept: ceil(n * keep) or the official int(n * keep)")


SPARSITY_FLAGS = ("vision_keep", "text_keep", "vision_scorer", "text_scorer", "layer", "mode", "keep_rounding")


def _sparsity_from(args: argparse.Namespace, base: SparsityConfig | None = None) -> SparsityConfig:
    """`base` (default dense) with the sparsity flags that were given. --text-keep none is a given value."""
    given = {k: getattr(args, k) for k in SPARSITY_FLAGS if getattr(args, k) is not None}
    if given.get("text_keep") == "none":
        given["text_keep"] = None
    return (base or SparsityConfig()).replace(**given)


def cmd_generate(args: argparse.Namespace) -> int:
    from dynllava.model import DynamicLlava

    log.info("loading %s", args.model)
    model = DynamicLlava.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    sparsity = _sparsity_from(args, model.default_sparsity)
    prompt = args.prompt if args.raw_prompt else model.format_prompt(args.prompt, n_images=1 if args.image else 0)
    out = model.generate([args.image], [prompt], sparsity=sparsity, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed)[0]
    if args.json:
        print(json.dumps({"model": model.name, "text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason, "sparsity": sparsity.to_dict(),
                          "stats": out.stats.to_dict()}))
        return 0
    s = out.stats
    print(out.text)
    print(f"\n[{model.name}] finish={out.finish_reason}  image tokens kept {s.n_image_kept}/{s.n_image_tokens}  "
          f"text admitted {s.n_text_admitted}/{s.n_text_generated}")
    kv_ratio = s.kv_bytes_peak / s.kv_bytes_dense_equivalent if s.kv_bytes_dense_equivalent else 0.0
    print(f"KV cache {s.kv_bytes_peak / 2**20:.2f} MiB ({kv_ratio:.0%} of dense)  "
          f"FLOPs {s.flops_sparse / 1e9:.2f} G ({s.flops_sparse / s.flops_dense:.0%} of dense)  "
          f"ttft {s.ttft_s * 1e3:.0f} ms  decode {s.decode_s * 1e3:.0f} ms")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dynllava.data.shapes import SPLIT_SEEDS, write_parquet

    seed = args.seed if args.seed is not None else SPLIT_SEEDS[args.split]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = write_parquet(str(out), args.n, seed, args.task, progress=not args.quiet, variety=args.variety)
    print(f"wrote {n} rows (split seed {seed}) to {out}")
    return 0


def _train_config(cls, args: argparse.Namespace):
    """Defaults <- --config YAML <- --steps."""
    config = cls.from_yaml(args.config) if args.config else cls()
    if args.steps is not None:
        config.steps = args.steps
    return config


def cmd_train_base(args: argparse.Namespace) -> int:
    from dynllava.train.base import BaseTrainConfig, train_base

    config = _train_config(BaseTrainConfig, args)
    if args.init:
        config.init = args.init
    path = train_base(config, args.output, progress=not args.quiet, device=args.device)
    print(f"saved the base model to {path}")
    return 0


def cmd_train_predictors(args: argparse.Namespace) -> int:
    from dynllava.train.predictors import PredictorTrainConfig, train_predictors

    config = _train_config(PredictorTrainConfig, args)
    path = train_predictors(args.model, args.output, config, data=args.data, image_root=args.image_root,
                            device=args.device, progress=not args.quiet)
    print(f"saved the model with its predictors to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dynllava.eval import evaluate, markdown_table, sweep_configs, target_checks, split_rows, write_results
    from dynllava.model import DynamicLlava

    model = DynamicLlava.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    rows = split_rows(args.n)
    if args.sweep:
        configs = sweep_configs(learned=model.predictors is not None)
    else:
        configs = [_sparsity_from(args, model.default_sparsity)]
    results = []
    for i, cfg in enumerate(configs, 1):
        log.info("[%d/%d] %s", i, len(configs), cfg)
        results.append(evaluate(model, rows, cfg, batch_size=args.batch_size))
        r = results[-1]
        print(f"[{i}/{len(configs)}] {r.label}: caption F1 {r.caption_attribute_f1:.3f}  VQA {r.vqa_accuracy:.3f}  "
              f"ppl {r.perplexity:.3f}  image keep {r.image_keep:.3f}  text keep {r.text_keep:.3f}  "
              f"FLOPs saved {r.flops_saved:+.1%}", flush=True)
    print()
    print(markdown_table(results))
    for name, ok, got in target_checks(results):
        print(f"{'met' if ok else 'NOT met'}: {name} ({got})")
    if args.output:
        paths = write_results(results, args.output, model.name)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dynllava.convert import convert

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    report = convert(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype, progress=progress)
    print(f"wrote {report.dst}: {report.tensors} tensors, {report.bytes_written / 2**30:.2f} GiB, vision tower from "
          f"{report.vision_tower}, predictors: {'yes' if report.predictors else 'no'}")
    if report.sparsity is not None:
        print(f"default sparsity (from sparse_config): {report.sparsity.to_dict()}")
    return 0


def _add_train_args(p: argparse.ArgumentParser, config_yaml: str, output_help: str, device_help: str,
                    device_default: str | None = None) -> None:
    """The options both training commands share."""
    p.add_argument("--config", default=None, help=f"training YAML ({config_yaml}); default: built-in")
    p.add_argument("--output", required=True, help=output_help)
    p.add_argument("--steps", type=int, default=None, help="override the config's optimizer steps")
    p.add_argument("--device", default=device_default, help=device_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynllava",
        description="LLaVA inference with Dynamic-LLaVA vision-text sparsification.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress to stderr, and show tracebacks (anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt about one image and print the answer and its stats",
                       description="Answer one prompt about one image; prints the answer, then what was kept, "
                                   "the KV-cache bytes and the analytic FLOPs against dense.")
    g.add_argument("--model", default="tiny",
                   help="a local HF LLaVA directory, a model YAML, or a name in configs/models/ (default: tiny)")
    g.add_argument("--image", help="path of the image (omit for a text-only prompt)")
    g.add_argument("--prompt", required=True, help="the question or instruction")
    g.add_argument("--raw-prompt", action="store_true",
                   help="use --prompt as is (it must hold the <image> placeholder) instead of the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_sparsity_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert an original-format LLaVA-1.5 / Dynamic-LLaVA checkpoint",
                       description="Convert a checkpoint in the original haotian-liu/LLaVA layout (the paper's "
                                   "released Dynamic-LLaVA-7B/13B, or plain LLaVA-1.5) into a llava-hf directory "
                                   "that this project and transformers load: weights (shard by shard), config, "
                                   "tokenizer.json (from tokenizer.model, no sentencepiece needed), processor "
                                   "(pad to square), the vicuna_v1 chat template, predictors.safetensors, and "
                                   "dynllava.json (the prompt rule and the checkpoint's sparse_config as the "
                                   "model's default sparsity). Any-resolution, TokenPacker and other projector "
                                   "types are refused.")
    c.add_argument("src", help="the original checkpoint directory (config.json, weights, tokenizer.model)")
    c.add_argument("dst", help="the new directory (must not exist or be empty)")
    c.add_argument("--vision-tower", default=None,
                   help="local CLIP directory (e.g. a copy of openai/clip-vit-large-patch14-336) when the tower is "
                        "not saved in the checkpoint")
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="cast the weights (default: keep each tensor's dtype)")
    c.add_argument("--quiet", action="store_true", help="no per-shard progress")
    c.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="make synthetic datasets").add_subparsers(dest="dataset", required=True)
    d = data.add_parser("shapes", help="procedural shape scenes with captions, descriptions and VQA",
                        description="Write deterministic shape scenes (1-6 objects) as Parquet with columns id, "
                                    "image (PNG), prompt, reference, task. Row i depends only on the split seed "
                                    "and i.")
    d.add_argument("--n", type=int, required=True, help="number of rows")
    d.add_argument("--split", choices=["train", "validation", "test"], default="train",
                   help="which split: train, validation and test use seeds 0, 1, 2 (default train)")
    d.add_argument("--seed", type=int, default=None, help="explicit split seed (overrides --split)")
    d.add_argument("--task", choices=["caption", "describe", "vqa"], default=None,
                   help="only this task (default: caption/describe/vqa mixed 1:1:2)")
    d.add_argument("--variety", action="store_true",
                   help="the same rows on canvases of other sizes (160-800 px), aspect ratios (3:4 to 4:3) and "
                        "plain backgrounds (white, black, ...), the scene centred where a centre crop keeps it: "
                        "a robustness check for models trained on the square tinted scenes")
    d.add_argument("--output", required=True, help="Parquet file to write")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_data_shapes)

    train = sub.add_parser("train", help="train the base model or the predictors").add_subparsers(
        dest="stage", required=True)
    tb = train.add_parser("base", help="train the tiny LLaVA from scratch on shape scenes (CPU, ~40 min)",
                          description="Train a byte-level BPE tokenizer and a CLIP-style + Llama LLaVA from scratch "
                                      "on generated shape scenes; saves an HF-format directory (fp16 weights), "
                                      "its processor and train_log.jsonl.")
    _add_train_args(tb, "configs/train/tiny.yaml", "directory to write the model to",
                    "cpu (how the shipped tiny is trained) or cuda", device_default="cpu")
    tb.add_argument("--init", default=None, help="continue from this base model directory (its tokenizer and "
                                                 "weights) instead of from scratch; overrides the config's init")
    tb.set_defaults(func=cmd_train_base)
    tp = train.add_parser("predictors", help="train the image/text predictors the paper's way",
                          description="Gumbel-softmax straight-through predictors at layer K with masked attention "
                                      "and the keep-budget loss, optionally fine-tuning the LM (lm_lr); writes a full "
                                      "model directory with predictors.safetensors. Works on any local HF LLaVA "
                                      "directory, with shape scenes or LLaVA-665k-style JSON data.")
    tp.add_argument("--model", required=True, help="local HF LLaVA directory to start from")
    tp.add_argument("--data", default=None, help="LLaVA-665k-style JSON (default: generated shape scenes)")
    tp.add_argument("--image-root", default=None, help="folder the JSON's image paths are relative to")
    _add_train_args(tp, "configs/train/predictors.yaml", "directory to write the fine-tuned model to",
                    "cuda or cpu (default: cuda when present)")
    tp.set_defaults(func=cmd_train_predictors)

    e = sub.add_parser("eval", help="quality on the shape scenes' test split, dense vs sparse",
                       description="Grade greedy answers on the held-out test split: caption attribute F1, VQA "
                                   "accuracy, reference perplexity (teacher-forced through the sparse engine), keep "
                                   "ratios achieved and analytic FLOPs saved. --sweep crosses keep ratios with "
                                   "scorers and writes eval.md, eval.json and eval.png to --output.")
    e.add_argument("--model", default="tiny", help="model source (default: tiny)")
    e.add_argument("--n", type=int, default=600, help="test-split rows (default 600)")
    e.add_argument("--sweep", action="store_true", help="run the whole sweep instead of one setting")
    e.add_argument("--output", default=None, help="folder for eval.md / eval.json / eval.png")
    e.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    e.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    _add_sparsity_args(e)
    e.set_defaults(func=cmd_eval)
    _register_extensions(sub)
    return parser


# The offline jobs and the serving/control plane add their subcommands here. They are imported when the
# parser is built, not when `dynllava` is imported, so the method package stays free of Ray (invariant 4).
EXTENSIONS = ("pipelines.cli", "cluster.cli")


def _register_extensions(sub) -> None:
    import importlib

    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # the method works without the Ray layers installed
            log.debug("no %s: %s", name, e)
            continue
        module.register(sub)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)  # -v anywhere: before or after the subcommand
    args = build_parser().parse_args([a for a in argv if a not in ("-v", "--verbose")])
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dynllava: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # bad input, config or flags: the message says what and where
        print(f"dynllava: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else (a filesystem, Ray, a device): its cause in one line; -v: traceback
        if verbose:
            raise
        print(f"dynllava: error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
