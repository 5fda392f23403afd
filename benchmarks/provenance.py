"""Where a benchmark ran: the hardware and the commit, recorded with every result."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def hardware(device: str) -> str:
    """The GPU's name, or the CPU model with its core and torch thread counts."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model} x{os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def commit() -> str:
    """Short git SHA (+"-dirty" with uncommitted changes outside benchmarks/results); DYNLLAVA_COMMIT where git
    is missing."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except FileNotFoundError:
            return ""
    sha = git("rev-parse", "--short", "HEAD") or os.environ.get("DYNLLAVA_COMMIT", "unknown")
    # a benchmark writes its own results (a plot before its JSON): those do not make the code dirty
    return sha + ("-dirty" if git("status", "--porcelain", "--", ".", ":!benchmarks/results") else "")


def emit(result: dict, output: str | Path | None) -> None:
    """Print the result as one JSON line, and write it to `output` (parents created) when given."""
    line = json.dumps(result)
    print(line)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(line + "\n")
