"""Training data: JSONL rows -> token ids with a response-only loss mask, and batching.

Row kinds (one JSON object per line):
- `{"prompt": str, "completion": str}`: the completion is scored.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: every assistant turn is scored.
- `{"text": str}`: the whole text is scored.
Chat rows go through the tokenizer's chat template when it has one (and `use_chat_template`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ss_mlx import files


class DataError(ValueError):
    """A bad data file or row; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens that are scored as targets


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; DataError for anything else."""
    return files.read_jsonl(path, DataError)


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_seq_len: int = 2048,
    use_chat_template: bool = True,
) -> list[Example]:
    """Tokenize every row of a JSONL file (truncated to max_seq_len tokens)."""
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for lineno, row in read_jsonl(path):
        try:
            segments = row_segments(row, tokenizer, chat)
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        ids: list[int] = []
        mask: list[int] = []
        for text_or_ids, scored in segments:
            seg = text_or_ids if isinstance(text_or_ids, list) else _encode(tokenizer, text_or_ids)
            ids += seg
            mask += [int(scored)] * len(seg)
        if len(ids) < 2:
            raise DataError(f"{path}:{lineno}: fewer than 2 tokens")
        out.append(Example(ids[:max_seq_len], mask[:max_seq_len]))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def row_segments(row: dict[str, Any], tokenizer: Any, chat: bool) -> list[tuple[Any, bool]]:
    """[(text or token ids, scored)] in order; scored segments are the model's responses."""
    if "messages" in row:
        return _messages_segments(_check_messages(row["messages"]), tokenizer, chat)
    if "prompt" in row or "completion" in row:
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
        if chat:
            msgs = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            return _messages_segments(msgs, tokenizer, chat)
        return [
            (_bos(tokenizer), False),
            (prompt, False),
            (completion, True),
            (_eos(tokenizer), True),
        ]
    if "text" in row:
        return [(_bos(tokenizer), False), (_string(row, "text"), True), (_eos(tokenizer), True)]
    raise DataError(f"row needs 'prompt'/'completion', 'messages' or 'text'; has {sorted(row)}")


def _messages_segments(
    messages: list[dict[str, str]], tokenizer: Any, chat: bool
) -> list[tuple[Any, bool]]:
    if not chat:
        raise DataError("'messages' rows need a tokenizer with a chat template")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    # Render growing prefixes; each assistant turn is the text its message adds after the
    # generation prompt, tokenized on its own as it would be generated after the prompt.
    segments: list[tuple[Any, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            # The template rewrites earlier turns (e.g. drops old reasoning): score the last turn.
            return _last_turn_segments(messages, render)
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    if not any(scored for _, scored in segments):
        raise DataError("'messages' has no assistant turn to train on")
    return segments


def _last_turn_segments(messages: list[dict[str, str]], render: Any) -> list[tuple[Any, bool]]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before, after = render(messages[:last], True), render(messages[: last + 1], False)
    if not after.startswith(before):
        raise DataError("chat template output of the prompt is not a prefix of the full chat")
    return [(before, False), (after[len(before) :], True)]


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"messages[{k}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise DataError(f"messages[{k}] needs a string 'content'")
    return messages


def _string(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Templates and the explicit bos/eos segments carry the special tokens already.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if eos is not None else []


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, loss_mask, lengths, all (B, L) or (B,)."""
    L = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        attn[b, :n] = 1
        mask[b, :n] = torch.tensor(e.loss_mask)
    lengths = attn.sum(-1)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "lengths": lengths}


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This rank's batches (example indices) for one epoch: a seeded shuffle, split evenly.

    Every rank gets the same number of batches (the shuffled tail that does not divide by
    `world` is dropped), so DDP ranks stay in step.
    """
    if num_examples < world:
        raise DataError(f"{num_examples} examples cannot be split over {world} processes")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=g).tolist()
    per_rank = num_examples // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]
