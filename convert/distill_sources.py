"""Prompt sources for sharded distillation: which rows of `../shared/data` are prompts, in order.

A prompt is keyed by (file, row): `file` is its path relative to the data root
(`prompts/gsm8k_train.jsonl`), `row` the 0-based line index in a JSONL file (blank lines count)
or the 0-based data row of a CSV file. The data folder promises rows are only ever appended, so
keys stay valid; a run records each file's row count and reads no further when it resumes. A
repeated prompt keeps its first row, within a file and across files.

Held-out and restricted sets are refused by name: IFEval, Vicuna-bench, every test or valid split
and DialogSum (non-commercial).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .data import DataError

# The same prompt templates as examples/default_model/prompts.py.
E2E_TEMPLATE = "Write a short restaurant description from these facts: {mr}"
SQL_TEMPLATE = "{context}\nWrite the SQL query that answers the question."

PERMISSIVE = (
    "prompts/gsm8k_train.jsonl",  # MIT
    "prompts/gpteacher_codegen.jsonl",  # MIT
    "prompts/gpteacher_roleplay.jsonl",  # MIT
    "prompts/awesome_chatgpt_prompts.jsonl",  # CC0-1.0
    "prompts/self_instruct_user_oriented.jsonl",  # Apache-2.0
    "prompts/chatterbot_english.jsonl",  # BSD-3-Clause
    "chat/wwdc25_train.jsonl",  # MIT
    "wikisql/train.jsonl",  # BSD-3-Clause / MIT
    "e2e/devset.csv",  # CC BY-SA 4.0
)
SHAREGPT = ("prompts/sharegpt_first_turns.jsonl",)  # license unclear upstream: a separate run
SETS = {"permissive": PERMISSIVE, "sharegpt": SHAREGPT}
LICENSES = {
    "prompts/gsm8k_train.jsonl": "MIT",
    "prompts/gpteacher_codegen.jsonl": "MIT",
    "prompts/gpteacher_roleplay.jsonl": "MIT",
    "prompts/awesome_chatgpt_prompts.jsonl": "CC0-1.0",
    "prompts/self_instruct_user_oriented.jsonl": "Apache-2.0",
    "prompts/chatterbot_english.jsonl": "BSD-3-Clause",
    "chat/wwdc25_train.jsonl": "MIT",
    "wikisql/train.jsonl": "BSD-3-Clause (WikiSQL); MIT (files)",
    "e2e/devset.csv": "CC BY-SA 4.0",
    "prompts/sharegpt_first_turns.jsonl": "unclear (ShareGPT user turns)",
}
FORBIDDEN = ("eval_ifeval", "vicuna", "test", "valid", "dialogsum")


@dataclass(frozen=True)
class Prompt:
    file: str
    row: int
    text: str


def check_allowed(file: str) -> None:
    low = file.lower()
    for word in FORBIDDEN:
        if word in low:
            raise DataError(f"{file}: held-out or restricted data ({word!r}); never distill it")


def template_of(file: str) -> str:
    if file.startswith("wikisql/"):
        return SQL_TEMPLATE
    if file.startswith("e2e/"):
        return E2E_TEMPLATE
    return "{prompt}"


def row_count(data_root: str | Path, file: str) -> int:
    """Rows in a file as keys count them (JSONL lines, CSV data rows)."""
    path = Path(data_root) / file
    if file.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            return sum(1 for _ in csv.DictReader(f))
    lines = path.read_text(encoding="utf-8").split("\n")
    return len(lines) - (lines[-1] == "")


def read_source(data_root: str | Path, file: str, max_row: int | None = None) -> list[Prompt]:
    """The distinct prompts of one file (rows below max_row), in file order."""
    check_allowed(file)
    path = Path(data_root) / file
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file")
    out: list[Prompt] = []
    if file.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            for row, rec in enumerate(csv.DictReader(f)):
                if max_row is not None and row >= max_row:
                    break
                out.append(Prompt(file, row, E2E_TEMPLATE.format(mr=rec["mr"])))
    else:
        for row, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
            if max_row is not None and row >= max_row:
                break
            if not line.strip():
                continue
            rec = json.loads(line)
            if file.startswith("wikisql/"):
                text = SQL_TEMPLATE.format(context=rec["text"].split("\nA:")[0])
            else:
                text = rec["prompt"]
            out.append(Prompt(file, row, text))
    seen: set[str] = set()
    distinct = []
    for p in out:
        if p.text not in seen:
            seen.add(p.text)
            distinct.append(p)
    return distinct


def interleave(pools: list[list[Prompt]], seed: int) -> list[Prompt]:
    """All prompts, each pool shuffled (seeded) and spread evenly over the whole order.

    Item j of a pool of n sits at (j + u) / n for a seeded offset u, so every prefix of the result
    holds each pool in proportion to its size: any first k shards are a balanced mix.
    """
    rng = random.Random(seed)
    keyed = []
    for s, pool in enumerate(pools):
        pool = list(pool)
        rng.shuffle(pool)
        u = rng.random()
        keyed += [((j + u) / len(pool), s, p) for j, p in enumerate(pool)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    out, seen = [], set()
    for _, _, p in keyed:
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def build_plan(data_root: str | Path, files: list[str], seed: int = 0) -> list[Prompt]:
    return interleave([read_source(data_root, f) for f in files], seed)


def plan_digest(plan: list[Prompt]) -> str:
    h = hashlib.sha256()
    for p in plan:
        h.update(f"{p.file}\t{p.row}\n".encode())
    return h.hexdigest()


def prompt_text(data_root: str | Path, file: str, row: int) -> str:
    """The prompt text of one key, read back from the data folder."""
    check_allowed(file)
    path = Path(data_root) / file
    if file.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            for r, rec in enumerate(csv.DictReader(f)):
                if r == row:
                    return E2E_TEMPLATE.format(mr=rec["mr"])
        raise DataError(f"{path}: no row {row}")
    lines = path.read_text(encoding="utf-8").split("\n")
    if not 0 <= row < len(lines) or not lines[row].strip():
        raise DataError(f"{path}: no row {row}")
    rec = json.loads(lines[row])
    if file.startswith("wikisql/"):
        return SQL_TEMPLATE.format(context=rec["text"].split("\nA:")[0])
    return rec["prompt"]
