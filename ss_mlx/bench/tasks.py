"""The paper's task fine-tunes on ../shared/data: training rows, evaluation items with their
references, and the quality metric of each task.

- ``e2e``: E2E NLG. Train on devset.csv (one row per (MR, reference) pair), evaluate on the test
  part's unique MRs against all their references; ROUGE-1 / ROUGE-L F1 (``rouge-score``, max over
  the references, as the E2E and paper metrics take the best-matching reference).
- ``wikisql``: WikiSQL text-to-SQL. Train on train.jsonl, evaluate on test.part1.jsonl; exact match
  after normalising whitespace and case.

Prompts are the benchmark's (:mod:`ss_mlx.datasets`): same template and chat-template choice, so a
task model is measured on the prompt form it was trained on.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datasets import (
    DATASETS,
    DatasetError,
    data_root,
    missing_root_hint,
    read_jsonl,
    split_wikisql,
)


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt and every reference output for it."""

    prompt: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: where its data lives, how prompts are fed, how outputs are scored."""

    name: str
    train_file: str
    eval_file: str
    dataset: str  # the ss_mlx.datasets name of the evaluation prompts
    metric: str
    chat: bool

    def score(self, outputs: Sequence[str], items: Sequence[EvalItem]) -> dict[str, float]:
        """Corpus-level metric (percent) of ``outputs`` against ``items``' references."""
        if len(outputs) != len(items):
            raise ValueError(f"{len(outputs)} outputs for {len(items)} evaluation items")
        if not items:
            raise ValueError("no evaluation items to score")
        return METRICS[self.metric](outputs, items)


TASKS: dict[str, Task] = {
    "e2e": Task("e2e", "e2e/devset.csv", "e2e/testset_w_refs.part1.csv", "e2e", "rouge", True),
    "wikisql": Task(
        "wikisql", "wikisql/train.jsonl", "wikisql/test.part1.jsonl", "wikisql", "exact_match",
        False,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DatasetError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


# ---- rows ------------------------------------------------------------------------------------


def _e2e_pairs(path: Path) -> list[tuple[str, str]]:
    template = DATASETS["e2e"].template
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected a CSV with 'mr' and 'ref' columns (E2E format)")
        pairs = []
        for lineno, row in enumerate(reader, 2):
            mr, ref = (row.get("mr") or "").strip(), (row.get("ref") or "").strip()
            if not mr or not ref:
                raise DatasetError(f"{path}:{lineno}: empty 'mr' or 'ref'")
            pairs.append((template.format(mr=mr), ref))
    return pairs


def _wikisql_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, row in read_jsonl(path):
        text = row.get("text")
        split = split_wikisql(text) if isinstance(text, str) else None
        if split is None or not split[1].strip():
            raise DatasetError(f"{path}:{lineno}: needs a 'text' string with an 'A: ' answer")
        pairs.append((split[0], split[1].strip()))
    return pairs


def _pairs(task: Task, rel: str, root: str | Path | None) -> list[tuple[str, str]]:
    path = data_root(root) / rel
    if not path.is_file():
        raise DatasetError(f"task {task.name!r} reads {path}, which does not exist; "
                           f"{missing_root_hint(root, rel)}")
    return _e2e_pairs(path) if task.name == "e2e" else _wikisql_pairs(path)


def train_rows(task: Task, root: str | Path | None = None) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` rows of the task's training file, in file order."""
    return file_rows(task, task.train_file, root)


def file_rows(task: Task, rel: str, root: str | Path | None = None) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` rows of any file of the task's format (e.g. a validation
    split), ``rel`` relative to the data root, in file order."""
    return [{"prompt": p, "completion": c} for p, c in _pairs(task, rel, root)]


def eval_items(task: Task, root: str | Path | None = None, n: int | None = None) -> list[EvalItem]:
    """Unique evaluation prompts (first ``n``) with all their references, in file order."""
    refs: dict[str, list[str]] = {}
    for prompt, ref in _pairs(task, task.eval_file, root):
        refs.setdefault(prompt, []).append(ref)
    items = [EvalItem(p, tuple(r)) for p, r in refs.items()]
    return items[:n] if n is not None else items


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows to a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- metrics ---------------------------------------------------------------------------------


def normalize_sql(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(outputs: Sequence[str], items: Sequence[EvalItem]) -> dict[str, float]:
    hits = sum(
        any(normalize_sql(o) == normalize_sql(r) for r in it.references)
        for o, it in zip(outputs, items, strict=True)
    )
    return {"exact_match": 100.0 * hits / len(items)}


def rouge(outputs: Sequence[str], items: Sequence[EvalItem]) -> dict[str, float]:
    try:
        from rouge_score import rouge_scorer
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "ROUGE needs the rouge-score package: pip install 'ss-mlx[bench]'"
        ) from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rougeL": 0.0}
    for out, it in zip(outputs, items, strict=True):
        # score_multi keeps, per metric, the reference with the best F1.
        best = scorer.score_multi(list(it.references), out)
        for key in totals:
            totals[key] += best[key].fmeasure
    return {k: 100.0 * v / len(items) for k, v in totals.items()}


METRICS: dict[str, Callable[[Sequence[str], Sequence[EvalItem]], dict[str, float]]] = {
    "rouge": rouge,
    "exact_match": exact_match,
}
