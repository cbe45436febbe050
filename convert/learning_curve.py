"""The held-out learning curve of `ss-mlx train --eval-every N`: OUT/eval_curve.jsonl.

One JSON object per evaluated optimizer step, in step order. The whole file is rewritten
through a temp name at each record (it holds a few hundred short lines at most), so a run killed
at any moment leaves a complete file. A resumed run first drops the records after its
checkpoint's step: the interrupted run computed them from a future that resuming discards, and
the resumed run computes those steps again.

Plain Python (no torch): benchmarks/learning_curve.py reads curves with `read_curve`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ss_mlx.bench.datasets import read_jsonl
from ss_mlx.files import write_jsonl

CURVE_FILE = "eval_curve.jsonl"


def curve_record(step: int, metrics: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The curve's record of one `train.evaluate` result at optimizer step `step`."""
    record: dict[str, Any] = {
        "step": step,
        "main_loss": metrics["main_loss"],
        "main_acc": metrics["main_acc"],
    }
    j = 1
    while f"stream{j}_acc" in metrics:
        for key in ("acc", "top3", "loss"):
            record[f"stream{j}_{key}"] = metrics[f"stream{j}_{key}"]
        j += 1
    accepted = metrics["accepted_streams_mean"]
    record["accepted_streams_mean"] = accepted
    # The greedy chain's tokens per verification pass: the main token plus accepted streams.
    record["tokens_per_pass"] = 1.0 + accepted
    record["wall_s"] = round(wall_s, 3)
    return record


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The records of a curve file; ValueError (one line naming file and line) if malformed."""
    records: list[dict[str, Any]] = []
    for n, record in read_jsonl(path):
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"{path}:{n}: expected an object with a positive integer 'step'")
        if records and step <= records[-1]["step"]:
            raise ValueError(f"{path}:{n}: step {step} after step {records[-1]['step']}")
        records.append(record)
    return records


class LearningCurve:
    """OUT/eval_curve.jsonl of one run (written by the main process only)."""

    def __init__(self, path: Path, records: list[dict[str, Any]]) -> None:
        self.path = path
        self.records = records

    @classmethod
    def start(cls, out_dir: Path, start_step: int) -> LearningCurve:
        """A fresh run (start_step 0) starts an empty curve; a resumed one keeps the records up
        to its checkpoint's step and rewrites the file without the rest."""
        path = out_dir / CURVE_FILE
        if start_step == 0 or not path.exists():
            path.unlink(missing_ok=True)
            return cls(path, [])
        records = read_curve(path)
        kept = [r for r in records if r["step"] <= start_step]
        if len(kept) < len(records):
            write_jsonl(path, kept)
        return cls(path, kept)

    @property
    def last_step(self) -> int:
        return self.records[-1]["step"] if self.records else 0

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        write_jsonl(self.path, self.records)


def format_point(record: dict[str, Any]) -> str:
    """One progress line: `eval step 40: main loss 2.31, s1 top-1 0.284, 1.32 tokens/pass`."""
    s1 = record.get("stream1_acc", math.nan)
    return (
        f"eval step {record['step']}: main loss {record['main_loss']:.4f}, "
        f"s1 top-1 {s1:.3f}, {record['tokens_per_pass']:.3f} tokens/pass"
    )
