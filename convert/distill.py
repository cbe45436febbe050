"""`ss-mlx distill`: the base model's own greedy responses to prompts (lossless-mode targets).

Two outputs:

- `--out FILE.jsonl`, from `--prompts FILE`: input rows `{"prompt": str}`, `{"messages": [...]}`
  (responds after the last message; a trailing assistant turn is dropped) or Vicuna-bench
  `{"turns": [str, ...]}` (first turn). Output rows: `{"prompt": str, "completion": str}`, or
  `{"messages": [..., assistant]}` for multi-message input. Appends batch by batch; a rerun skips
  prompts already in the output file.
- `--shards DIR`, from `--sources` (prompt files of `--data`, see `distill_sources`): token ids
  only, keyed by (prompt file, row), in compact shards with a manifest (see `shards`). A rerun
  checks the finished shards and continues with the next; `--export-jsonl` turns a shard folder
  into the trainer's prompt/completion rows.

Generation is greedy and batched. `--engine fast` (the default for Llama-family models) decodes
with a preallocated slot KV cache and refills a slot as soon as its row stops (`fastgen`);
`--engine hf` runs `model.generate` on length-sorted, left-padded batches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import distill_sources as sources
from .data import DataError, read_jsonl
from .fastgen import Generation, generate_greedy, supports
from .shards import (
    MANIFEST,
    Record,
    ShardError,
    digest_files,
    read_manifest,
    read_shard,
    remove_temp_files,
    sha256_file,
    shard_name,
    summarize,
    tokenizer_digest,
    write_json_atomic,
    write_shard,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx distill",
        description="Generate the base model's greedy responses (batched) as training targets.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--prompts", help="JSONL of prompts (prompt / messages / turns), with --out")
    p.add_argument("--out", help="output JSONL (prompt/completion); appended to")
    p.add_argument("--shards", help="run folder of token-id shards (instead of --prompts/--out)")
    p.add_argument("--data", default="../shared/data", help="data root of --sources")
    p.add_argument(
        "--sources",
        default="permissive",
        help="with --shards: 'permissive', 'sharegpt' or comma-separated files under --data",
    )
    p.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    p.add_argument("--seed", type=int, default=0, help="prompt order (with --shards)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped")
    p.add_argument("--max-shards", type=int, default=None, help="stop after N new shards")
    p.add_argument(
        "--time-limit", type=float, default=None, help="start no new shard after this many seconds"
    )
    p.add_argument(
        "--export-jsonl", default=None, help="with --shards: write prompt/completion rows and stop"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded at once")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (--prompts)")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--engine", choices=("auto", "fast", "hf"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.shards:
            if args.prompts or args.out:
                parser.error("--shards replaces --prompts/--out")
            if args.export_jsonl:
                n = export_jsonl(args)
                print(f"wrote {n} rows to {args.export_jsonl}", file=sys.stderr)
            else:
                distill_shards(args)
            return
        if not (args.prompts and args.out):
            parser.error("give --prompts and --out (or --shards)")
        n = distill(args)
    except (ShardError, DataError) as e:
        sys.exit(f"ss-mlx distill: {e}")
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

    tokenizer, model, chat = load_model(args)
    eos_ids = stop_ids(tokenizer, model)
    engine = pick_engine(args.engine, model)

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(todo), desc="distill", unit="prompt")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    # Fast engine: chunks of several batches (slots refill within a chunk); hf: one batch each.
    chunk_size = args.batch_size * (8 if engine == "fast" else 1)
    with out_path.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            ids = [encode_prompt(tokenizer, m, chat) for m in chunk]
            gens = generate(model, tokenizer, ids, args, eos_ids, engine)
            for msgs, g in zip(chunk, gens, strict=True):
                completion = tokenizer.decode(g.ids, skip_special_tokens=True)
                f.write(json.dumps(output_row(msgs, completion), ensure_ascii=False) + "\n")
            f.flush()
            written += len(chunk)
            if progress is not None:
                progress.update(len(chunk))
    if progress is not None:
        progress.close()
    return written


def load_model(args: argparse.Namespace) -> tuple[Any, Any, bool]:
    from .pretrained import load_hf_model, load_hf_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_hf_tokenizer(args.model, "distill")
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, args.dtype)
    model = load_hf_model(args.model, dtype, "distill").to(device)  # hostile .bin: one line
    model.eval()
    chat = not args.no_chat_template and bool(getattr(tokenizer, "chat_template", None))
    return tokenizer, model, chat


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokenizer's EOS plus the generation config's eos ids."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    return ids


def pick_engine(engine: str, model: Any) -> str:
    if engine == "auto":
        return "fast" if supports(model) else "hf"
    if engine == "fast" and not supports(model):
        raise DataError(f"--engine fast does not support {model.config.model_type!r}; use hf")
    return engine


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> list[int]:
    """The prompt's token ids exactly as generation sees them."""
    text = _render(tokenizer, messages, chat)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    args: argparse.Namespace,
    eos_ids: list[int],
    engine: str,
    on_done: Any = None,
) -> list[Generation]:
    if engine == "fast":
        return generate_greedy(
            model, prompts, args.max_new_tokens, eos_ids, args.batch_size, on_done=on_done
        )
    return hf_generate(model, tokenizer, prompts, args.max_new_tokens, eos_ids, args.batch_size)


@torch.no_grad()
def hf_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    batch_size: int,
) -> list[Generation]:
    """`model.generate` over length-sorted, left-padded batches; rows stop at any of eos_ids."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        L = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, L - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[b, L - len(prompts[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad,
        )
        for b, i in enumerate(idx):
            new = gen[b, L:].tolist()
            stops = [k for k, t in enumerate(new) if t in eos_ids]
            if stops:
                out[i] = Generation(new[: stops[0]], "eos")
            else:
                out[i] = Generation(new[:max_new_tokens], "length")
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- sharded runs


def source_files(spec: str) -> list[str]:
    files: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        files += list(sources.SETS[part]) if part in sources.SETS else [part] if part else []
    if not files:
        raise DataError("--sources names no prompt file")
    for f in files:
        sources.check_allowed(f)
    return list(dict.fromkeys(files))


def model_info(model_dir: Path) -> dict[str, Any]:
    weights = sorted(
        p for p in model_dir.glob("*.safetensors") if not p.name.startswith("speculative_streams")
    ) or sorted(model_dir.glob("*.bin"))
    marker = model_dir / ".ss-mlx-prepared.json"
    info: dict[str, Any] = {"name": model_dir.name}
    if marker.is_file():
        prepared = json.loads(marker.read_text())
        info.update(name=prepared.get("model", model_dir.name), prepared_from=prepared)
    info["weights"] = [p.name for p in weights]
    info["weights_sha256"] = digest_files(*weights) if weights else None
    info["tokenizer_sha256"] = tokenizer_digest(model_dir)
    return info


# Settings that decide a shard's contents: a rerun must match them to continue a folder.
FIXED = (
    "model_weights_sha256",
    "tokenizer_sha256",
    "chat_template",
    "max_new_tokens",
    "max_prompt_tokens",
    "dtype",
    "shard_size",
    "seed",
    "sources",
    "plan_sha256",
)


def build_run_plan(
    args: argparse.Namespace, tokenizer: Any, chat: bool, line_counts: dict[str, int] | None
) -> tuple[list[sources.Prompt], list[list[int]], list[dict[str, Any]], dict[str, int]]:
    """The run's prompts in order, their ids, the sources' manifest entries, skipped counts."""
    files = source_files(args.sources)
    pools, entries = [], []
    for f in files:
        upto = None if line_counts is None else line_counts[f]
        pool = sources.read_source(args.data, f, max_row=upto)
        pools.append(pool)
        n_rows = sources.row_count(args.data, f) if upto is None else upto
        entries.append(
            dict(
                file=f,
                license=sources.LICENSES.get(f, "see ../shared/data/README.md"),
                template=sources.template_of(f),
                rows=n_rows,
                distinct_prompts=len(pool),
            )
        )
    plan = sources.interleave(pools, args.seed)
    ids = [encode_prompt(tokenizer, [{"role": "user", "content": p.text}], chat) for p in plan]
    keep = [i for i, x in enumerate(ids) if 0 < len(x) <= args.max_prompt_tokens]
    skipped: dict[str, int] = {}
    for i in set(range(len(plan))) - set(keep):
        skipped[plan[i].file] = skipped.get(plan[i].file, 0) + 1
    return [plan[i] for i in keep], [ids[i] for i in keep], entries, skipped


def distill_shards(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the run folder's missing shards in order; the final manifest."""
    folder = Path(args.shards)
    folder.mkdir(parents=True, exist_ok=True)
    remove_temp_files(folder)
    old = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    tokenizer, model, chat = load_model(args)
    engine = pick_engine(args.engine, model)
    eos_ids = stop_ids(tokenizer, model)
    line_counts = None if old is None else {s["file"]: s["rows"] for s in old["sources"]}
    if old is not None and [s["file"] for s in old["sources"]] != source_files(args.sources):
        raise ShardError(
            f"{folder}: made from sources {[s['file'] for s in old['sources']]}, "
            f"not {source_files(args.sources)}"
        )
    plan, plan_ids, source_entries, skipped = build_run_plan(args, tokenizer, chat, line_counts)
    info = model_info(Path(args.model))
    template = getattr(tokenizer, "chat_template", None) if chat else None
    config = dict(
        model=info["name"],
        model_weights_sha256=info["weights_sha256"],
        model_prepared_from=info.get("prepared_from"),
        tokenizer_sha256=info["tokenizer_sha256"],
        chat_template=template,
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if template else None,
        eos_ids=eos_ids,
        vocab_size=int(model.config.vocab_size),
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        dtype=args.dtype,
        shard_size=args.shard_size,
        seed=args.seed,
        sources=[s["file"] for s in source_entries],
        plan_sha256=sources.plan_digest(plan),
        greedy=True,
    )
    if old is not None:
        diff = [k for k in FIXED if old["config"].get(k) != config[k]]
        if diff:
            raise ShardError(
                f"{folder}: made with other settings ({', '.join(diff)} differ); "
                "use a new folder or the same settings"
            )
    n_shards = math.ceil(len(plan) / args.shard_size)
    manifest = dict(
        format="ss-mlx-distilled-shards",
        version=1,
        run=folder.name,
        config=config,
        sources=source_entries,
        skipped_long_prompts=skipped,
        planned=dict(prompts=len(plan), shards=n_shards),
        shards=[] if old is None else old["shards"],
    )
    done = {e["name"]: e for e in manifest["shards"]}
    if old is None:  # record the settings before the first (slow) shard
        _write_manifest(folder, manifest)
    print(
        f"{folder}: {len(plan)} prompts in {n_shards} shards of {args.shard_size}, "
        f"{len(done)} done; engine {engine}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
        flush=True,
    )

    def keys(k: int) -> list[tuple[str, int]]:
        return [(p.file, p.row) for p in plan[k * args.shard_size : (k + 1) * args.shard_size]]

    def check(k: int, recs: list[Record], path: Path) -> None:
        if [(r.file, r.row) for r in recs] != keys(k):
            raise ShardError(f"{path}: its prompts are not the plan's shard {k}")

    # Finished shards: check them all (cheap) before adding to the folder.
    for k in range(n_shards):
        path = folder / shard_name(k)
        if path.name in done:
            check(k, read_shard(path, done[path.name]["sha256"]), path)
    pending = []
    for k in range(n_shards):
        path = folder / shard_name(k)
        if path.name in done:
            continue
        if path.is_file():  # renamed into place, manifest not yet updated: adopt it
            try:
                recs = read_shard(path)
                check(k, recs, path)
            except ShardError:
                path.unlink()
            else:
                entry = summarize(path.name, sha256_file(path), path.stat().st_size, recs)
                manifest["shards"].append(entry)
                done[path.name] = entry
                _write_manifest(folder, manifest)
                continue
        pending.append(k)
    if args.max_shards is not None:
        pending = pending[: max(args.max_shards, 0)]
    if pending:
        writer = _ShardWriter(args, plan, plan_ids, engine, folder, manifest, n_shards)
        _generate_shards(model, tokenizer, args, plan_ids, eos_ids, engine, pending, writer)
    return _write_manifest(folder, manifest)


class _ShardWriter:
    """Writes each shard as soon as all its prompts are generated, then lists it in the manifest.

    A shard's `seconds` (and `cpu_seconds`) are the time since the run's previous shard was
    written (or since generation began): with the fast engine the next shards' prompts are
    already decoding when one completes, so this is the time each shard adds to the run.
    """

    def __init__(self, args: argparse.Namespace, plan: list[sources.Prompt],
                 plan_ids: list[list[int]], engine: str, folder: Path, manifest: dict[str, Any],
                 n_shards: int) -> None:  # fmt: skip
        self.args, self.plan, self.plan_ids, self.engine = args, plan, plan_ids, engine
        self.folder, self.manifest, self.n_shards = folder, manifest, n_shards
        self.size = args.shard_size
        self.gens: dict[int, dict[int, Generation]] = {}  # shard -> plan index -> generation
        self.t, self.cpu = time.perf_counter(), time.process_time()
        self.t_start, self.done, self.tokens = self.t, 0, 0

    def rows(self, k: int) -> range:
        return range(k * self.size, min((k + 1) * self.size, len(self.plan)))

    def add(self, i: int, g: Generation) -> None:
        """Record plan index i's generation; write its shard when that was the last one."""
        k = i // self.size
        self.gens.setdefault(k, {})[i] = g
        self.done += 1
        self.tokens += len(g.ids)
        if not self.args.no_progress and self.done % 64 == 0:
            dt = time.perf_counter() - self.t_start
            print(f"  {self.done} prompts done, {self.tokens} tokens, {self.tokens / dt:.1f} tok/s",
                  file=sys.stderr, flush=True)  # fmt: skip
        if len(self.gens[k]) == len(self.rows(k)):
            self._write(k, self.gens.pop(k))

    def _write(self, k: int, gens: dict[int, Generation]) -> None:
        path = self.folder / shard_name(k)
        recs = [Record(self.plan[i].file, self.plan[i].row, self.plan_ids[i], gens[i].ids,
                       gens[i].finish) for i in self.rows(k)]  # fmt: skip
        entry = write_shard(path, recs, self.manifest["config"]["vocab_size"])
        now, cpu_now = time.perf_counter(), time.process_time()
        dt, cpu = now - self.t, cpu_now - self.cpu
        self.t, self.cpu = now, cpu_now
        entry.update(
            seconds=round(dt, 1),
            cpu_seconds=round(cpu, 1),
            engine=self.engine,
            batch_size=self.args.batch_size,
            threads=torch.get_num_threads(),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        self.manifest["shards"].append(entry)
        _write_manifest(self.folder, self.manifest)
        print(
            f"{path.name} ({k + 1}/{self.n_shards}): {len(recs)} prompts, "
            f"{entry['completion_tokens']} tokens in {dt:.0f} s = "
            f"{entry['completion_tokens'] / dt:.1f} tok/s (cpu {cpu:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def _generate_shards(
    model: Any,
    tokenizer: Any,
    args: argparse.Namespace,
    plan_ids: list[list[int]],
    eos_ids: list[int],
    engine: str,
    pending: list[int],
    writer: _ShardWriter,
) -> None:
    """Generate the pending shards in order, each written as it completes. No shard starts
    after --time-limit seconds. The fast engine decodes them as one stream (a finished row's
    slot takes the next prompt, of the next shard too, so no shard ends with a half-empty
    batch), each shard's prompts shortest first; the hf engine runs one shard at a time."""

    def may_start() -> bool:
        limit = args.time_limit
        return limit is None or time.perf_counter() - writer.t_start <= limit

    if engine != "fast":
        for k in pending:
            if not may_start():
                return
            rows = writer.rows(k)
            gens = generate(model, tokenizer, [plan_ids[i] for i in rows], args, eos_ids, engine)
            for i, g in zip(rows, gens, strict=True):
                writer.add(i, g)
        return
    index = [i for k in pending for i in writer.rows(k)]  # prompt j of the call is plan index[j]
    order: list[int] = []
    firsts = set()  # admission may stop only where a shard begins: none is left half done
    for k in pending:
        block = range(len(order), len(order) + len(writer.rows(k)))
        order += sorted(block, key=lambda j: len(plan_ids[index[j]]))
        firsts.add(order[block.start])
    generate_greedy(
        model,
        [plan_ids[i] for i in index],
        args.max_new_tokens,
        eos_ids,
        args.batch_size,
        on_done=lambda j, g: writer.add(index[j], g),
        order=order,
        admit=lambda j: j not in firsts or may_start(),
    )


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    shards = sorted(manifest["shards"], key=lambda e: e["name"])
    manifest["shards"] = shards
    by_file: dict[str, int] = {}
    for e in shards:
        for f, n in e.get("by_file", {}).items():
            by_file[f] = by_file.get(f, 0) + n
    manifest["totals"] = dict(
        shards=len(shards),
        records=sum(e["records"] for e in shards),
        prompt_tokens=sum(e["prompt_tokens"] for e in shards),
        completion_tokens=sum(e["completion_tokens"] for e in shards),
        finished_eos=sum(e["finished_eos"] for e in shards),
        seconds=round(sum(e.get("seconds", 0) for e in shards), 1),
    )
    manifest["totals"]["by_file"] = by_file
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def export_jsonl(args: argparse.Namespace) -> int:
    """Shards -> `{"prompt", "completion"}` rows for `ss-mlx train` (prompt text read from --data).

    The prompt's ids are checked against the stored ones; the completion is the decoded ids
    (special tokens kept, so re-encoding them gives the same ids).
    """
    import transformers

    from .shards import load_shards

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    folder = Path(args.shards)
    manifest = read_manifest(folder)
    chat = manifest["config"]["chat_template"] is not None
    rows, bad = [], 0
    for r in load_shards(folder):
        prompt = sources.prompt_text(args.data, r.file, r.row)
        if encode_prompt(tokenizer, [{"role": "user", "content": prompt}], chat) != r.prompt_ids:
            bad += 1
        completion = tokenizer.decode(r.completion_ids, skip_special_tokens=False)
        rows.append(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
    if bad:
        raise ShardError(f"{folder}: {bad} prompts do not match their stored ids (data changed?)")
    out = Path(args.export_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return len(rows)


if __name__ == "__main__":
    main()
