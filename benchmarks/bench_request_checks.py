"""Claim: the per-request limits cost nothing measurable on good traffic.

A replica turns each chat request into engine input in four steps, all timed here on the same good request (a
held-out scene as a base64 PNG data URL, its prompt, max_tokens 64, a stop string, logit_bias and a penalty, so
every check runs):
- parse: the strict OpenAI schema (pydantic) and the unsupported-field refusals;
- checks: the scalar limits (max_tokens, stop length, logit_bias size and ranges, penalties, min_tokens);
- inputs: the data URL and image decoded, the image limits read from its header, the chat template applied;
- prepare: tokenizing and the image processor.
Median microseconds of --repeats runs each, and `checks_share`: the scalar checks' share of the four steps (the
image limits inside `inputs` are comparisons on the header PIL has already read). One request's end-to-end time
on an idle replica is tens of milliseconds (bench_serve), so a share of a few thousandths is below that
benchmark's noise. Prints one JSON line with the hardware and commit.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, emit, hardware  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model source (default: the embedded tiny)")
    p.add_argument("--repeats", type=int, default=300, help="timed runs of each step (default 300)")
    p.add_argument("--output", default=None, help="also write the JSON line to this file")
    return p.parse_args(argv)


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> None:
    import torch

    from cluster import openai_protocol as proto
    from cluster.chat_inputs import to_prompt
    from cluster.request_limits import check_request
    from cluster.serve_config import Limits
    from dynllava.data.shapes import SPLIT_SEEDS, make_row
    from dynllava.model import DynamicLlava

    args = parse_args(argv)
    torch.set_num_threads(1)
    model = DynamicLlava.from_pretrained(args.model, device="cpu")
    limits, vocab = Limits(), model.config.text_config.vocab_size
    row = make_row(SPLIT_SEEDS["test"], 0)
    url = "data:image/png;base64," + base64.b64encode(row.image).decode()
    body = json.dumps({"model": model.name, "max_tokens": 64, "temperature": 0, "stop": ["\n\n"],
                       "logit_bias": {"13": 1.0}, "frequency_penalty": 0.1,
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": row.prompt}]}]}).encode()
    chat = proto.parse_request(body)
    max_tokens, _ = check_request(chat, limits, vocab)
    prompt, images = to_prompt(model.processor, chat.messages, limits, allow_remote=False)
    steps = {"parse": lambda: proto.parse_request(body),
             "checks": lambda: check_request(chat, limits, vocab),
             "inputs": lambda: to_prompt(model.processor, chat.messages, limits, allow_remote=False),
             "prepare": lambda: model.prepare([images], [prompt], max_tokens)}
    for fn in steps.values():  # warm-up
        fn()
    us = {name: round(median_us(fn, args.repeats), 1) for name, fn in steps.items()}
    total = sum(us.values())
    for name, value in us.items():
        print(f"{name:8s} {value:10.1f} us")
    emit({"benchmark": "request_checks", "model": args.model, "hardware": hardware("cpu"), "commit": commit(),
          "image_bytes": len(row.image), "median_us": us, "total_us": round(total, 1),
          "checks_share": round(us["checks"] / total, 5)}, args.output)


if __name__ == "__main__":
    main()
