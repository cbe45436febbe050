"""Compact, committable copies of training checkpoints ("stashes") that outlive a job's work/.

A job on a time-limited machine loses its git-ignored files (OUT/checkpoints among them) when it
ends, so a run that outlasts one job commits its newest checkpoint in this form and the next job
resumes from it. A stash folder holds:

- ``stash-NNNNN.safetensors``: the trainable parameters as float16 and Adam's per-parameter
  moments (``exp_avg``, ``exp_avg_sq``) as bfloat16 (float16 would flush ``exp_avg_sq``, ~grad^2,
  to zero), split by tensor into files of at most ``max_file_bytes`` (16 MB) each;
- ``stash.json``: the step, the scheduler state, the optimizer's hyperparameters and parameter-
  group layout, the rng state, the run's settings, each file's sha256, and every other tensor
  of the state (rng bytes, Adam's step counts) inline as exact lists;
- ``eval_curve.jsonl`` / ``train_log.jsonl`` of the run folder, when it has them (numbers only),
  so a resumed run continues its learning curve rather than starting a new one.

No pickles: safetensors and JSON only, so a stash from anywhere loads without running code.
`restore` rebuilds an ordinary ``step-N/state.pt`` (tensors cast back to their original dtypes)
that ``ss-mlx train --resume`` accepts; resuming from it continues exactly as from the original
checkpoint up to the float16 / bfloat16 rounding of the parameters and moments. A stash made with
``moments=False`` (a finished run, kept only to rebuild its output) has an empty optimizer
state: training on from it restarts Adam's moments.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ss_mlx.files import copy_file, dump_json, make_temp_dir, publish_dir, write_text

from . import train_state
from .shards import sha256_file

STASH_FILE = "stash.json"
FORMAT = "ss-mlx-train-stash"
VERSION = 1
MAX_FILE_BYTES = 16_000_000
# Files of the run folder (OUT, beside OUT/checkpoints) carried with its checkpoint.
RUN_FILES = ("eval_curve.jsonl", "train_log.jsonl")
PARAM_DTYPE = torch.float16
MOMENT_DTYPE = torch.bfloat16
# Only these dtype names are read back from a stash (never getattr(torch, <any name>)).
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}  # fmt: skip
_TAGS = ("__tensor__", "__tuple__", "__items__")


class StashError(ValueError):
    """A stash is missing, damaged or does not hold a training checkpoint (one-line message)."""


def stash(
    checkpoint: Path,
    dest: Path,
    *,
    moments: bool = True,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Path:
    """Write the checkpoint (a ``step-N`` folder or its ``state.pt``) compactly to ``dest``,
    replacing what was there in one rename; returns ``dest``."""
    checkpoint, dest = Path(checkpoint), Path(dest)
    try:
        state = train_state.load_checkpoint(checkpoint)
    except train_state.TrainStateError as e:
        raise StashError(f"cannot stash: {e}") from None
    if not moments:
        state["optimizer"] = {**state["optimizer"], "state": {}}
    external: dict[str, torch.Tensor] = {}
    tree = _encode(state, (), external, checkpoint)
    files = _pack(external, max_file_bytes, checkpoint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest)
    try:
        entries = []
        for k, keys in enumerate(files):
            name = f"stash-{k:05d}.safetensors"
            save_file({key: external[key] for key in keys}, str(tmp / name),
                      metadata={"format": FORMAT})  # fmt: skip
            size = (tmp / name).stat().st_size
            if size > max_file_bytes:  # the header estimate in _pack was too small
                raise StashError(
                    f"{name} came out at {size} bytes, over the {max_file_bytes} limit"
                )
            entries.append({"name": name, "sha256": sha256_file(tmp / name), "bytes": size})
        ckpt_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
        run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else None
        run_files = []
        for name in RUN_FILES:
            if run_dir is not None and (run_dir / name).is_file():
                copy_file(run_dir / name, tmp / name)
                run_files.append({"name": name, "sha256": sha256_file(tmp / name)})
        meta = {"format": FORMAT, "version": VERSION, "step": state["step"], "moments": moments,
                "files": entries, "run_files": run_files, "state": tree}  # fmt: skip
        # Lists of numbers on one line each: the rng state alone is ~5,700 numbers.
        write_text(tmp / STASH_FILE, dump_json(meta))
        publish_dir(tmp, dest, overwrite=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def stashed_step(stash_dir: Path) -> int | None:
    """The step a stash holds; None when ``stash_dir`` holds no stash (StashError: damaged)."""
    if not (Path(stash_dir) / STASH_FILE).is_file():
        return None
    return int(_read_meta(Path(stash_dir))["step"])


def restore(stash_dir: Path, checkpoints_root: Path) -> Path:
    """Rebuild ``checkpoints_root/step-N/state.pt`` from a stash (and, when the root is a run's
    ``OUT/checkpoints``, the run's curve and log beside it); returns the step folder."""
    stash_dir, root = Path(stash_dir), Path(checkpoints_root)
    meta = _read_meta(stash_dir)
    # Every file is checked before anything is written: a damaged stash leaves no trace.
    run_files = [_checked(stash_dir, entry) for entry in meta["run_files"]]
    tensors: dict[str, torch.Tensor] = {}
    for entry in meta["files"]:
        path = _checked(stash_dir, entry)
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise StashError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None
    meta_file = stash_dir / STASH_FILE
    state = _decode(meta["state"], tensors, meta_file)
    if not isinstance(state, dict) or state.get("step") != meta["step"]:
        raise StashError(f"{meta_file}: its state does not hold step {meta['step']}")
    final = train_state.save_checkpoint(root, meta["step"], state, keep=0)
    try:
        train_state.load_checkpoint(final)  # the trainer's own validation of what it will read
    except train_state.TrainStateError as e:
        shutil.rmtree(final, ignore_errors=True)
        raise StashError(f"{meta_file} does not rebuild a training checkpoint: {e}") from None
    if root.name == "checkpoints":
        for path in run_files:
            copy_file(path, root.parent / path.name)
    return final


# ---- encoding --------------------------------------------------------------------------------


def _encode(obj: Any, path: tuple, external: dict[str, torch.Tensor], source: Path) -> Any:
    """JSON for obj; the big tensors go to `external` under a key and are referenced by it."""
    if isinstance(obj, torch.Tensor):
        dtype = str(obj.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise StashError(f"{source}: tensor {'/'.join(map(str, path))} has dtype {dtype}")
        target = _external_dtype(path, obj)
        if target is None:
            data = obj.detach().cpu().reshape(-1).tolist()
            return {"__tensor__": {"dtype": dtype, "shape": list(obj.shape), "data": data}}
        key = "/".join(map(str, path))
        small = obj.detach().cpu().to(target).contiguous()
        if target == PARAM_DTYPE and obj.is_floating_point():
            if not bool(torch.isfinite(small).all()) and bool(torch.isfinite(obj).all()):
                raise StashError(
                    f"{source}: {key} exceeds float16's range (max |x| "
                    f"{float(obj.abs().max()):.3g}), so it cannot be stashed as float16"
                )
        external[key] = small
        return {"__tensor__": {"dtype": dtype, "shape": list(obj.shape), "key": key}}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, (*path, i), external, source) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, (*path, i), external, source) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, (*path, k), external, source) for k, v in obj.items()}
        # Non-string keys (the optimizer's parameter indices) survive as (key, value) pairs.
        return {"__items__": [[_encode(k, (*path, "key"), external, source),
                               _encode(v, (*path, k), external, source)]
                              for k, v in obj.items()]}  # fmt: skip
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise StashError(f"{source}: {'/'.join(map(str, path))} is a {type(obj).__name__}")


def _external_dtype(path: tuple, t: torch.Tensor) -> torch.dtype | None:
    """float16 for a trainable parameter, bfloat16 for an optimizer tensor of a parameter's
    shape (Adam's moments); None (inline, exact) for the rest: rng bytes, step counts."""
    if not t.is_floating_point() or t.ndim == 0:
        return None
    if len(path) == 2 and path[0] == "trainable":
        return PARAM_DTYPE
    if len(path) == 4 and path[:2] == ("optimizer", "state"):
        return MOMENT_DTYPE
    return None


def _pack(tensors: dict[str, torch.Tensor], limit: int, source: Path) -> list[list[str]]:
    """Tensor keys per file, in order, each file's bytes (data + header estimate) <= limit."""
    files: list[list[str]] = []
    size = limit  # forces a first file
    for key, t in tensors.items():
        need = t.numel() * t.element_size() + _header_bytes(key, t)
        if need + 16 > limit:
            raise StashError(
                f"{source}: tensor {key} alone needs {need} bytes, over the {limit}-byte file limit"
            )
        if size + need > limit:
            files.append([])
            size = 16  # the header's length field and braces
        files[-1].append(key)
        size += need
    return files


def _header_bytes(key: str, t: torch.Tensor) -> int:
    # {"key":{"dtype":"BF16","shape":[a,b],"data_offsets":[x,y]}, with 20-digit numbers
    # and safetensors' padding of the header to 8 bytes.
    return len(json.dumps(key)) + 48 + 21 * (t.ndim + 2) + 8


# ---- decoding --------------------------------------------------------------------------------


def _read_meta(stash_dir: Path) -> dict[str, Any]:
    file = stash_dir / STASH_FILE
    if not stash_dir.is_dir():
        raise StashError(f"no stash at {stash_dir}")
    if not file.is_file():
        raise StashError(f"{stash_dir} is not a stash: {STASH_FILE} missing")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StashError(f"{file}: damaged ({_first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StashError(f"{file} is not an ss-mlx training stash")
    if meta.get("version") != VERSION:
        raise StashError(f"{file}: stash version {meta.get('version')}, expected {VERSION}")
    step = meta.get("step")
    ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
    files, run_files = meta.get("files"), meta.get("run_files")
    if not ok or not isinstance(files, list) or not isinstance(run_files, list):
        raise StashError(f"{file}: malformed (step, files or run_files)")
    for entry in files + run_files:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise StashError(f"{file}: malformed file entry {str(entry)[:80]}")
        if not isinstance(entry.get("sha256"), str):
            raise StashError(f"{file}: file entry {name} lacks its sha256")
    return meta


def _checked(stash_dir: Path, entry: dict[str, Any]) -> Path:
    path = stash_dir / entry["name"]
    if not path.is_file():
        raise StashError(f"{path} missing: the stash is incomplete")
    if sha256_file(path) != entry["sha256"]:
        raise StashError(f"{path} is damaged: its sha256 differs from {STASH_FILE}'s")
    return path


def _decode(obj: Any, tensors: dict[str, torch.Tensor], file: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, file) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        spec = obj["__tensor__"]
        dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec, dict) else None
        if dtype is None:
            raise StashError(f"{file}: malformed tensor entry {str(spec)[:80]}")
        try:
            if "key" in spec:
                if spec["key"] not in tensors:
                    raise StashError(f"{file}: tensor {spec['key']} is in none of the stash files")
                t = tensors[spec["key"]].to(dtype)
            else:
                t = torch.tensor(spec["data"], dtype=dtype)
            return t.reshape(spec["shape"]).clone()
        except StashError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise StashError(f"{file}: malformed tensor entry ({_first_line(e)})") from None
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, file) for v in obj["__tuple__"])
    if "__items__" in obj:
        try:
            return {_decode(k, tensors, file): _decode(v, tensors, file)
                    for k, v in obj["__items__"]}  # fmt: skip
        except (TypeError, ValueError) as e:
            raise StashError(f"{file}: malformed entry ({_first_line(e)})") from None
    return {k: _decode(v, tensors, file) for k, v in obj.items()}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
