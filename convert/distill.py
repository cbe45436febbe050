"""`ss-mlx distill`: the base model's own greedy responses to a prompt file (lossless-mode targets).

Input rows: `{"prompt": str}`, `{"messages": [...]}` (responds after the last message; a trailing
assistant turn is dropped) or Vicuna-bench `{"turns": [str, ...]}` (first turn). Output rows:
`{"prompt": str, "completion": str}`, or `{"messages": [..., assistant]}` for multi-message input.
Appends batch by batch; a rerun skips prompts already in the output file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .data import DataError, read_jsonl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx distill",
        description="Generate the base model's greedy responses (batched) as training targets.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--prompts", required=True, help="JSONL of prompts (prompt / messages / turns)")
    p.add_argument("--out", required=True, help="output JSONL (prompt/completion); appended to")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    n = distill(args)
    print(f"wrote {n} new responses to {args.out}", file=sys.stderr)


def load_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Each prompt as a chat message list (a plain prompt is one user message)."""
    out = []
    for lineno, row in read_jsonl(path):
        try:
            out.append(_messages_of(row))
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    return out


def _messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    if isinstance(row.get("turns"), list) and row["turns"] and isinstance(row["turns"][0], str):
        return [{"role": "user", "content": row["turns"][0]}]
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if msgs and all(isinstance(m.get("content"), str) for m in msgs):
            return [{"role": str(m.get("role")), "content": m["content"]} for m in msgs]
    raise DataError("row needs a string 'prompt', a 'turns' list or a 'messages' list")


def prompt_key(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def output_row(messages: list[dict[str, str]], completion: str) -> dict[str, Any]:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return {"prompt": messages[0]["content"], "completion": completion}
    return {"messages": messages + [{"role": "assistant", "content": completion}]}


def _done_keys(path: Path) -> set[str]:
    """Prompts already answered; a torn last line (crash mid-write) is dropped from the file."""
    if not path.is_file():
        return set()
    keys, good = set(), []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
            msgs = row["messages"][:-1] if "messages" in row else _messages_of(row)
        except (json.JSONDecodeError, KeyError, TypeError, DataError):
            continue
        keys.add(prompt_key(msgs))
        good.append(line if line.endswith("\n") else line + "\n")
    path.write_text("".join(good), encoding="utf-8")
    return keys


def _render(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return messages[-1]["content"]


@torch.no_grad()
def distill(args: argparse.Namespace) -> int:
    from .pretrained import load_hf_model, load_hf_tokenizer

    prompts = load_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    out_path = Path(args.out)
    done = _done_keys(out_path)
    todo, seen = [], set(done)
    for msgs in prompts:
        key = prompt_key(msgs)
        if key not in seen:
            seen.add(key)
            todo.append(msgs)
    if not todo:
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_hf_tokenizer(args.model, "distill")
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, args.dtype)
    model = load_hf_model(args.model, dtype, "distill").to(device)
    model.eval()
    chat = not args.no_chat_template and bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(todo), desc="distill", unit="prompt")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out_path.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            texts = [_render(tokenizer, m, chat) for m in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            for msgs, ids in zip(chunk, new.tolist(), strict=True):
                if eos is not None and eos in ids:
                    ids = ids[: ids.index(eos)]
                completion = tokenizer.decode(ids, skip_special_tokens=True)
                f.write(json.dumps(output_row(msgs, completion), ensure_ascii=False) + "\n")
            f.flush()
            written += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
    if progress is not None:
        progress.close()
    return written


if __name__ == "__main__":
    main()
