"""Distilled completions as compact, resumable shards: token ids keyed by (prompt file, row).

A run folder holds `manifest.json` and `shard-00000.npz`, `shard-00001.npz`, ... Each shard is a
compressed NumPy archive (no pickles) of one slice of the run's prompt plan:

- `files`: the distinct prompt file names (str array); `file_index`: each record's file (uint16)
- `row`: the record's row in that file (int32)
- `prompt_ids`, `prompt_len`: the chat-formatted prompt ids, concatenated, and their lengths
- `completion_ids`, `completion_len`: the greedy completion, stop token excluded, likewise
- `finish`: 0 = stopped at EOS, 1 = hit max_new_tokens
- `format`: the format version

Ids are uint16 when the vocabulary fits (uint32 otherwise). No text is stored: the prompt text
comes back from the data folder by (file, row), the completion by decoding its ids.

Every file is written to a temporary name in the same folder, fsynced and renamed into place, so a
crash leaves either the whole shard or none; the manifest lists each finished shard with its
sha256, and the loader checks it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
MANIFEST = "manifest.json"
FINISH = ("eos", "length")


class ShardError(ValueError):
    """A missing, truncated, corrupt or mismatched shard: a one-line message naming the file."""


@dataclass
class Record:
    file: str
    row: int
    prompt_ids: list[int]
    completion_ids: list[int]
    finish: str  # "eos" or "length"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def remove_temp_files(folder: str | Path) -> int:
    """Delete leftovers of interrupted writes (`.<name>.tmp<pid>`); how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def encode_shard(records: list[Record], vocab_size: int) -> bytes:
    if not records:
        raise ValueError("a shard needs at least one record")
    id_dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    files = list(dict.fromkeys(r.file for r in records))
    index = {f: i for i, f in enumerate(files)}

    def cat(seqs: list[list[int]]) -> np.ndarray:
        flat = [t for s in seqs for t in s]
        if flat and (min(flat) < 0 or max(flat) >= vocab_size):
            raise ValueError(f"token id out of range for a vocabulary of {vocab_size}")
        return np.asarray(flat, dtype=id_dtype)

    arrays = dict(
        format=np.asarray(FORMAT, dtype=np.int32),
        files=np.asarray(files, dtype=str),
        file_index=np.asarray([index[r.file] for r in records], dtype=np.uint16),
        row=np.asarray([r.row for r in records], dtype=np.int32),
        prompt_ids=cat([r.prompt_ids for r in records]),
        prompt_len=np.asarray([len(r.prompt_ids) for r in records], dtype=np.int32),
        completion_ids=cat([r.completion_ids for r in records]),
        completion_len=np.asarray([len(r.completion_ids) for r in records], dtype=np.int32),
        finish=np.asarray([FINISH.index(r.finish) for r in records], dtype=np.uint8),
    )
    # np.savez_compressed stamps each member with the current time; fixed stamps make the bytes
    # (and the sha256) a function of the records alone.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard(path: str | Path, records: list[Record], vocab_size: int) -> dict[str, Any]:
    """Write one shard atomically; its manifest entry (name, sha256, counts)."""
    path = Path(path)
    data = encode_shard(records, vocab_size)
    _atomic_write_bytes(path, data)
    return summarize(path.name, hashlib.sha256(data).hexdigest(), len(data), records)


def summarize(name: str, sha256: str, size: int, records: list[Record]) -> dict[str, Any]:
    """A shard's manifest entry."""
    by_file: dict[str, int] = {}
    for r in records:
        by_file[r.file] = by_file.get(r.file, 0) + 1
    return dict(
        name=name,
        sha256=sha256,
        bytes=size,
        records=len(records),
        prompt_tokens=sum(len(r.prompt_ids) for r in records),
        completion_tokens=sum(len(r.completion_ids) for r in records),
        finished_eos=sum(r.finish == "eos" for r in records),
        by_file=by_file,
    )


def read_shard(path: str | Path, sha256: str | None = None) -> list[Record]:
    """The records of one shard; ShardError (one line) if it is missing, corrupt or not `sha256`."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard missing")
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            raise ShardError(
                f"{path}: corrupt or truncated shard (sha256 {got[:12]}... is not the "
                f"manifest's {sha256[:12]}...); delete it to regenerate"
            )
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        if int(a["format"]) != FORMAT:
            raise ShardError(f"{path}: shard format {int(a['format'])}, expected {FORMAT}")
        files = [str(f) for f in a["files"]]
        plen, clen = a["prompt_len"].astype(np.int64), a["completion_len"].astype(np.int64)
        n = len(a["row"])
        if not (len(a["file_index"]) == len(plen) == len(clen) == len(a["finish"]) == n):
            raise ValueError("per-record arrays differ in length")
        if plen.sum() != len(a["prompt_ids"]) or clen.sum() != len(a["completion_ids"]):
            raise ValueError("token arrays do not match their lengths")
        po = np.concatenate([[0], np.cumsum(plen)])
        co = np.concatenate([[0], np.cumsum(clen)])
        pids, cids = a["prompt_ids"].tolist(), a["completion_ids"].tolist()
        return [
            Record(
                file=files[int(a["file_index"][i])],
                row=int(a["row"][i]),
                prompt_ids=pids[po[i] : po[i + 1]],
                completion_ids=cids[co[i] : co[i + 1]],
                finish=FINISH[int(a["finish"][i])],
            )
            for i in range(n)
        ]
    except ShardError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, IndexError, OSError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ShardError(
            f"{path}: corrupt or truncated shard ({type(e).__name__}: {msg}); "
            "delete it to regenerate"
        ) from None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (not a distilled-shards folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: corrupt manifest ({e.msg})") from None
    if manifest.get("format") != "ss-mlx-distilled-shards":
        raise ShardError(f"{path}: not a distilled-shards manifest")
    return manifest


def load_shards(folder: str | Path, verify: bool = True) -> Iterator[Record]:
    """Every record of a run folder, shard by shard in manifest order (sha256-checked)."""
    folder = Path(folder)
    for entry in read_manifest(folder)["shards"]:
        recs = read_shard(folder / entry["name"], entry["sha256"] if verify else None)
        if len(recs) != entry["records"]:
            raise ShardError(
                f"{folder / entry['name']}: {len(recs)} records, manifest says {entry['records']}"
            )
        yield from recs


def digest_files(*paths: Path) -> str:
    """One sha256 over several files (each file's sha256, in order): how a manifest names the
    model weights and the tokenizer it distilled with."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_digest(model_dir: str | Path) -> str:
    return digest_files(*(p for n in TOKENIZER_FILES if (p := Path(model_dir) / n).is_file()))


def template_suffix(tokenizer: Any, eos_id: int) -> list[int]:
    """The ids a chat template writes after an assistant turn's stop token (ChatML: "\n")."""
    template = getattr(tokenizer, "chat_template", None)
    eos = tokenizer.convert_ids_to_tokens(eos_id)
    if not template or not isinstance(eos, str):
        return []
    chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    at = text.rfind(eos)
    tail = text[at + len(eos) :] if at >= 0 else ""
    return list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []


def training_examples(folder: str | Path, tokenizer: Any, max_seq_len: int) -> list:
    """A run folder as the trainer's examples, with the exact generated ids (`to_examples`).

    The ids mean something only to the tokenizer they were made with: the manifest's chat
    template and (when the tokenizer was loaded from a folder) its files must match.
    """
    from .data import Example

    folder = Path(folder)
    cfg = read_manifest(folder).get("config", {})
    template = getattr(tokenizer, "chat_template", None)
    if cfg.get("chat_template_sha256") and template is not None:
        if hashlib.sha256(template.encode()).hexdigest() != cfg["chat_template_sha256"]:
            raise ShardError(f"{folder}: distilled with another chat template than this model's")
    source = Path(str(getattr(tokenizer, "name_or_path", "")))
    if cfg.get("tokenizer_sha256") and source.is_dir():
        if tokenizer_digest(source) != cfg["tokenizer_sha256"]:
            raise ShardError(f"{folder}: distilled with another tokenizer than {source}'s")
    eos_ids = cfg.get("eos_ids") or []
    if not eos_ids:
        raise ShardError(f"{folder}: the manifest names no stop token (config.eos_ids)")
    examples = to_examples(load_shards(folder), eos_ids[0], template_suffix(tokenizer, eos_ids[0]))
    return [Example(e.input_ids[:max_seq_len], e.loss_mask[:max_seq_len]) for e in examples]


def data_paths(spec: str | Path) -> list[Path]:
    """The sources a `--data` value names: one path, or several joined by commas."""
    return [Path(p) for p in str(spec).split(",") if p]


def read_training_data(path: str | Path, tokenizer: Any, max_seq_len: int, chat: bool) -> list:
    """Training or eval examples from JSONL files (`load_examples`) and distilled-shards
    folders (`training_examples`): one path, or several joined by commas, in that order."""
    from .data import load_examples

    out: list = []
    for p in data_paths(path):
        if p.is_dir():
            out += training_examples(p, tokenizer, max_seq_len)
        else:
            out += load_examples(p, tokenizer, max_seq_len, chat)
    return out


def to_examples(records: list[Record] | Iterator[Record], eos_id: int, suffix: list[int]) -> list:
    """Trainer examples with the exact generated ids (no decode/re-encode round trip).

    Each is prompt ids + completion ids (+ `eos_id` and the template's `suffix` after the stop
    token, e.g. the "\\n" ChatML puts after <|im_end|>, when the row stopped at EOS); the loss
    mask scores the completion and what follows it, as `load_examples` does for chat rows.
    """
    from .data import Example

    out = []
    for r in records:
        tail = r.completion_ids + ([eos_id] + list(suffix) if r.finish == "eos" else [])
        out.append(Example(r.prompt_ids + tail, [0] * len(r.prompt_ids) + [1] * len(tail)))
    return out
