"""Benchmark prompt sets: the task formats of ../shared/data, and any JSONL of prompts.

A prompt set is a list of prompt texts plus how they were made (source file, template, whether
the chat template is applied), so that a report records exactly what the model was given.
Files are only read, never copied; the data root is `$SS_MLX_DATA`, else `../shared/data`
next to the ss-mlx checkout.
"""

import csv
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import files

ENV_DATA = "SS_MLX_DATA"
WIKISQL_ANSWER = "\nA: "


class DatasetError(ValueError):
    """An unknown data set name, a missing file, or a malformed row (the message says which)."""


@dataclass(frozen=True)
class DatasetSpec:
    """A named prompt set.

    Args:
        file: path relative to the data root.
        reader: how rows become template fields (`csv_mr`, `jsonl_field:KEY`, `wikisql`,
            `jsonl_turn0`, `jsonl_prompt`).
        template: `str.format` template over the row's fields; the result is the prompt text.
        chat: apply the tokenizer's chat template (when it has one).
        exclude: files (relative to the root, same reader) whose prompts are dropped, to keep a
            held-out split free of prompts also seen in training.
        description: one line for reports.
    """

    file: str
    reader: str
    template: str = "{prompt}"
    chat: bool = True
    exclude: tuple[str, ...] = ()
    description: str = ""


# The wording the default model's streams were trained with (examples/default_model/prompts.py),
# so its E2E numbers are measured on the prompt distribution it saw, with held-out MRs.
E2E_TEMPLATE = "Write a short restaurant description from these facts: {mr}"
DIALOGSUM_TEMPLATE = "Summarize the following dialogue in a few sentences.\n\n{dialogue}"

DATASETS: dict[str, DatasetSpec] = {
    "e2e": DatasetSpec(
        "e2e/testset_w_refs.part1.csv", "csv_mr", E2E_TEMPLATE,
        description="E2E NLG test part 1, unique meaning representations",
    ),
    "e2e-dev": DatasetSpec(
        "e2e/devset.csv", "csv_mr", E2E_TEMPLATE,
        description="E2E NLG dev set, unique meaning representations",
    ),
    "dialogsum": DatasetSpec(
        "dialogsum/dialogsum.test.part1.jsonl", "jsonl_field:dialogue", DIALOGSUM_TEMPLATE,
        description="DialogSum test part 1 (CC BY-NC-SA 4.0)",
    ),
    "dialogsum-dev": DatasetSpec(
        "dialogsum/dialogsum.dev.jsonl", "jsonl_field:dialogue", DIALOGSUM_TEMPLATE,
        description="DialogSum dev (CC BY-NC-SA 4.0)",
    ),
    # WikiSQL rows are raw completion text ("...\nQ: ...\nA: SELECT ..."), as fine-tunes on the
    # mlx-examples files see them: no chat template, the prompt ends right after "A: ".
    "wikisql": DatasetSpec(
        "wikisql/test.part1.jsonl", "wikisql", chat=False,
        description="WikiSQL test part 1, text up to and including 'A: '",
    ),
    "wikisql-valid": DatasetSpec(
        "wikisql/valid.jsonl", "wikisql", chat=False,
        description="WikiSQL valid, text up to and including 'A: '",
    ),
    "vicuna": DatasetSpec(
        "chat/vicuna_bench_questions.jsonl", "jsonl_turn0",
        description="Vicuna-bench questions, first turn",
    ),
    "wwdc25": DatasetSpec(
        "chat/wwdc25_valid.jsonl", "jsonl_prompt", exclude=("chat/wwdc25_train.jsonl",),
        description="wwdc25 valid prompts not in wwdc25 train (held-out chat Q&A)",
    ),
}
# Vicuna-bench is never used for training the default model: the held-out chat set.
ALIASES = {"chat": "vicuna"}


@dataclass
class PromptSet:
    """Prompt texts and their provenance."""

    name: str
    source: str
    template: str
    chat: bool
    prompts: list[str]
    description: str = ""
    available: int = 0  # unique prompts in the source before --n / sampling
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "template": self.template,
            "chat_template": self.chat,
            "description": self.description,
            "available": self.available,
            "n": len(self.prompts),
            **self.meta,
        }


def data_root(root: str | Path | None = None) -> Path:
    """`root`, else $SS_MLX_DATA, else ../shared/data next to the checkout."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA]).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def missing_root_hint(root: str | Path | None, needed: str) -> str:
    """What to pass when a data file is absent; from an installed package (a wheel) there is no
    checkout, so no default ../shared/data, and the message says so."""
    how = f"pass --data-root DIR or set {ENV_DATA}=DIR, where DIR holds {needed}"
    if root is None and not os.environ.get(ENV_DATA):
        checkout = Path(__file__).resolve().parents[2]
        if not (checkout / "pyproject.toml").is_file():
            return (f"ss-mlx is installed as a package, so there is no default data folder "
                    f"(../shared/data beside a checkout): {how}")
        return f"the default is {data_root()} (../shared/data beside the checkout): {how}"
    return how


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; DatasetError for anything else."""
    return files.read_jsonl(path, DatasetError)


def _string(path: Path, lineno: int, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{path}:{lineno}: needs a non-empty string field {key!r}")
    return value


def _read_csv_mr(path: Path) -> Iterator[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "mr" not in reader.fieldnames:
            raise DatasetError(f"{path}: expected a CSV with an 'mr' column (E2E format)")
        for lineno, row in enumerate(reader, 2):
            if not (row.get("mr") or "").strip():
                raise DatasetError(f"{path}:{lineno}: empty 'mr'")
            yield {"mr": row["mr"].strip()}


def split_wikisql(text: str) -> tuple[str, str] | None:
    """(prompt up to and including the answer line's 'A: ', answer) of a WikiSQL row's text,
    or None when it has no answer line. The first answer line counts: the SQL itself may
    contain 'A: ' inside a quoted value."""
    cut = text.find(WIKISQL_ANSWER)
    if cut < 0:
        return None
    cut += len(WIKISQL_ANSWER)
    return text[:cut], text[cut:]


def _read_wikisql(path: Path) -> Iterator[dict[str, str]]:
    for lineno, row in read_jsonl(path):
        split = split_wikisql(_string(path, lineno, row, "text"))
        if split is None:
            raise DatasetError(f"{path}:{lineno}: WikiSQL 'text' has no 'A: ' answer line")
        yield {"prompt": split[0]}


def _read_turn0(path: Path) -> Iterator[dict[str, str]]:
    for lineno, row in read_jsonl(path):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise DatasetError(f"{path}:{lineno}: needs 'turns', a list of strings")
        yield {"prompt": turns[0]}


def _read_field(key: str) -> Callable[[Path], Iterator[dict[str, str]]]:
    def read(path: Path) -> Iterator[dict[str, str]]:
        for lineno, row in read_jsonl(path):
            yield {key: _string(path, lineno, row, key)}

    return read


def _reader(name: str) -> Callable[[Path], Iterator[dict[str, str]]]:
    if name == "csv_mr":
        return _read_csv_mr
    if name == "wikisql":
        return _read_wikisql
    if name == "jsonl_turn0":
        return _read_turn0
    if name == "jsonl_prompt":
        return _read_field("prompt")
    if name.startswith("jsonl_field:"):
        return _read_field(name.partition(":")[2])
    raise DatasetError(f"unknown reader {name!r}")


def _render(spec_template: str, fields: dict[str, str], source: Path) -> str:
    try:
        return spec_template.format(**fields)
    except (KeyError, IndexError) as e:
        raise DatasetError(
            f"template {spec_template!r} needs field {e} that {source} rows do not have "
            f"(they have {sorted(fields)})"
        ) from None


def _unique(texts: Iterator[str]) -> list[str]:
    # E2E repeats each MR once per reference; chat files repeat prompts across completions.
    return list(dict.fromkeys(texts))


def load_prompts(
    name_or_path: str | Path,
    *,
    n: int | None = None,
    seed: int | None = None,
    root: str | Path | None = None,
    template: str | None = None,
    chat: bool | None = None,
) -> PromptSet:
    """Load a named prompt set or a JSONL file with a `prompt` field.

    Args:
        name_or_path: a name from ``DATASETS`` (or ``ALIASES``), or a path to a ``.jsonl`` file
            whose rows have a ``prompt`` string (or a ``.csv`` with an ``mr`` column).
        n: keep this many prompts (the first ``n``, or a seeded sample when ``seed`` is set).
        seed: sample ``n`` prompts at random with this seed instead of taking the first ones.
        root: the data root (default: :func:`data_root`).
        template: override the set's prompt template (``str.format`` over the row's fields).
        chat: override whether the chat template is applied.

    Duplicate prompts are dropped (keeping first occurrences).
    """
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    if key in DATASETS:
        spec = DATASETS[key]
        base = data_root(root)
        path = base / spec.file
        if not path.is_file():
            raise DatasetError(
                f"data set {key!r} reads {path}, which does not exist; "
                f"{missing_root_hint(root, spec.file)} (or give a .jsonl file of prompts)"
            )
        excluded = [base / f for f in spec.exclude]
        name = key
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix not in (".jsonl", ".csv") or not path.is_file():
            known = ", ".join([*DATASETS, *ALIASES])
            what = "no such file" if path.suffix in (".jsonl", ".csv") else "not a known name"
            raise DatasetError(
                f"{str(name_or_path)!r}: {what}; give one of {known}, or a .jsonl file of "
                "{\"prompt\": ...} rows"
            )
        reader = "csv_mr" if path.suffix == ".csv" else "jsonl_prompt"
        spec = DatasetSpec(str(path), reader, E2E_TEMPLATE if reader == "csv_mr" else "{prompt}")
        excluded = []
        name = path.stem
    read = _reader(spec.reader)
    tpl = spec.template if template is None else template
    texts = _unique(_render(tpl, f, path) for f in read(path))
    if excluded:
        seen = set()
        for ex in excluded:
            if ex.is_file():
                seen.update(_render(tpl, f, ex) for f in read(ex))
        texts = [t for t in texts if t not in seen]
    if not texts:
        raise DatasetError(f"{path}: no prompts")
    available = len(texts)
    if n is not None:
        if n < 1:
            raise DatasetError(f"--n must be >= 1, got {n}")
        texts = random.Random(seed).sample(texts, min(n, len(texts))) if seed is not None \
            else texts[:n]
    return PromptSet(
        name=name,
        source=str(path),
        template=tpl,
        chat=spec.chat if chat is None else chat,
        prompts=texts,
        description=spec.description,
        available=available,
        meta={"excluded_from": [str(e) for e in excluded]} if excluded else {},
    )


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt: the chat template (as a user turn) when asked for and available,
    else the raw text with the tokenizer's special tokens."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        if isinstance(ids, str):
            ids = tokenizer.encode(ids, add_special_tokens=False)
        elif isinstance(ids, dict):  # transformers >= 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(text))
