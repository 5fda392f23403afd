"""Claim: `dynllava calibrate` finds, on a sample of a user's rows, the cheapest settings within a quality
tolerance of dense, and the floor it measures holds on rows it never saw.

Draws a sample of shape scenes (the validation split by default: never the test split), runs
`dynllava calibrate` on it (the default vision x text grid, learned scorers), then `dynllava eval --data` on
fresh test-split rows with dense and the calibrated floor side by side, to check the floor's loss out of sample.
Writes the calibration (sla.yaml, calibration.md/json/png) and the held-out eval under --output, and prints one
JSON line with the hardware and commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.provenance import commit, emit, hardware  # noqa: E402
from dynllava.cli import main as dynllava  # noqa: E402
from dynllava.data.shapes import SPLIT_SEEDS, write_parquet  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model source (default: the embedded tiny)")
    p.add_argument("--rows", type=int, default=400, help="calibration sample rows (default 400)")
    p.add_argument("--held-out-rows", type=int, default=400, help="test-split rows for the check (default 400)")
    p.add_argument("--tolerance", type=float, default=1.0, help="points of score x 100 (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="per answer (default 64)")
    p.add_argument("--output", default="benchmarks/results/tiny_calibrate", help="folder for everything written")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    at = commit()  # before this run's own files make a tree holding --output dirty
    with tempfile.TemporaryDirectory() as tmp:
        sample, held_out = Path(tmp) / "sample.parquet", Path(tmp) / "held_out.parquet"
        write_parquet(str(sample), args.rows, SPLIT_SEEDS["validation"], progress=False)
        write_parquet(str(held_out), args.held_out_rows, SPLIT_SEEDS["test"], progress=False)
        common = ["--model", args.model, "--max-new-tokens", str(args.max_new_tokens)]
        start = time.perf_counter()
        assert dynllava(["calibrate", "--data", str(sample), "--tolerance", str(args.tolerance), "--output", str(out),
                         *common]) == 0
        calibrate_s = time.perf_counter() - start
        report = json.loads((out / "calibration.json").read_text())
        points = {p["label"]: p for p in report["points"]}
        floor = points[report["ladder"][-1]]
        flags = ["--vision-keep", str(floor["vision_keep"]), "--text-keep", str(floor["text_keep"]),
                 "--vision-scorer", report["scorers"][0], "--text-scorer", report["scorers"][1]]
        assert dynllava(["eval", "--data", str(held_out), "--output", str(out / "held_out"), *common, *flags]) == 0
    held = json.loads((out / "held_out" / "eval.json").read_text())["results"]
    dense, at_floor = held[0], held[-1]
    emit({"benchmark": "calibrate", "model": args.model, "rows": args.rows, "held_out_rows": args.held_out_rows,
          "tolerance": args.tolerance, "scorers": report["scorers"], "ladder": report["ladder"],
          "floor": {k: floor[k] for k in ("label", "loss", "loss_low", "loss_high", "flops_fraction",
                                          "kv_bytes_saved")},
          "held_out": {"dense_score": dense["score"], "floor_score": at_floor["score"],
                       "floor_loss_points": round((dense["score"] - at_floor["score"]) * 100, 2),
                       "floor_flops_saved": at_floor["flops_saved"], "floor_kv_saved": at_floor["kv_bytes_saved"]},
          "calibrate_s": round(calibrate_s, 1), "device": hardware("cpu"), "commit": at},
         out / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
