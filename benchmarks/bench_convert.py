"""Claim: `dynllava convert` streams shard by shard, so its peak memory is about one input shard, not the model.

Writes a random-weight checkpoint in the original LLaVA / Dynamic-LLaVA layout (fp16, --shards safetensors
shards, the CLIP tower and the predictors inside, a LLaMA --hidden x --layers language model), then runs
`dynllava convert` on it in a child process and reports the child's peak resident memory against the checkpoint's
size and its largest shard, and the conversion time. Prints one JSON line with the hardware and commit.
(Needs `sentencepiece`, the dev extra, to train the tiny tokenizer.model the checkpoint ships.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, emit, hardware  # noqa: E402
from tests.dynllava.original_format import (  # noqa: E402
    LM, original_config, original_state, tower_state, train_sentencepiece,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048, help="language-model width (default 2048)")
    p.add_argument("--layers", type=int, default=16, help="language-model layers (default 16: ~1.7 GB in fp16)")
    p.add_argument("--shards", type=int, default=4, help="safetensors shards of the checkpoint (default 4)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--output", default=None, help="also write the JSON line to this file")
    return p.parse_args(argv)


def write_checkpoint(directory: Path, hidden: int, layers: int, shards: int) -> tuple[int, int]:
    """(total bytes, largest shard's bytes) of a random fp16 original-format checkpoint, written layer by layer."""
    tokenizer = train_sentencepiece(directory.parent / "tokenizer.model")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    shape = dict(LM, hidden_size=hidden, intermediate_size=hidden * 11008 // 4096, num_hidden_layers=layers,
                 num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)
    LM.update(shape)  # original_state reads the shape from LM
    directory.mkdir(parents=True)
    state = {k: v.half() for k, v in original_state(vocab).items()}
    state.update({"model.vision_tower.vision_tower." + k: v.half() for k, v in tower_state(torch.Generator()).items()})
    cfg = original_config(vocab)
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    names = sorted(state, key=lambda n: (not n.startswith("model.layers."), n))
    per = -(-len(names) // shards)
    weight_map, sizes = {}, []
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, str(directory / file))
        sizes.append(sum(t.numel() * t.element_size() for t in part.values()))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(sizes), max(sizes)


CHILD = ("import sys\nfrom dynllava.cli import main\nrc = main(sys.argv[1:]) if sys.argv[1:] else 0\n"
         "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
         "print('VmHWM', hwm)\nsys.exit(rc)")


def peak_rss(cli_args: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Run `dynllava <cli_args>` in a child; (its peak resident bytes from its own VmHWM, which exec resets, so
    the parent's size does not count; the finished process)."""
    done = subprocess.run([sys.executable, "-c", CHILD, *cli_args], capture_output=True, text=True)
    line = [l for l in done.stdout.splitlines() if l.startswith("VmHWM")]
    return (int(line[-1].split()[1]) * 1024 if line else 0), done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        total, largest = write_checkpoint(root / "original", args.hidden, args.layers, args.shards)
        baseline, _ = peak_rss([])  # the interpreter with dynllava imported
        start = time.perf_counter()
        peak, done = peak_rss(["convert", str(root / "original"), str(root / "converted"), "--quiet"])
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(done.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    gib = 2 ** 30
    print(f"checkpoint {total / gib:.2f} GiB in {args.shards} shards (largest {largest / gib:.2f} GiB); convert: "
          f"peak RSS {peak / gib:.2f} GiB (the import alone {baseline / gib:.2f}), {seconds:.1f} s")
    emit({"bench": "convert", "hardware": hardware("cpu"), "commit": commit(), "hidden": args.hidden,
          "layers": args.layers, "shards": args.shards, "checkpoint_gib": round(total / gib, 3),
          "largest_shard_gib": round(largest / gib, 3), "peak_rss_gib": round(peak / gib, 3),
          "peak_over_checkpoint": round(peak / total, 3), "peak_over_largest_shard": round(peak / largest, 3),
          "seconds": round(seconds, 1), "import_rss_gib": round(baseline / gib, 3)},
         args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
