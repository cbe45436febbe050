"""Periodic training checkpoints (OUT/checkpoints/step-NNNNNNNN/state.pt) for exact resume.

The state holds only tensors, numbers, strings, lists/tuples and dicts, so it is read back with
``torch.load(weights_only=True)``: a crafted file (``--resume FILE``, or one planted in
OUT/checkpoints) is refused by the restricted unpickler and never runs code.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ss_mlx.files import atomic_write

STATE_FILE = "state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")
# key -> the type its value must have in a state written by save_checkpoint.
STATE_KEYS = {
    "step": int,
    "trainable": dict,
    "optimizer": dict,
    "scheduler": dict,
    "rng": dict,
    "args": dict,
}


class TrainStateError(ValueError):
    """A training checkpoint is missing, unreadable, refused as unsafe, or malformed."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write state under root/step-NNNNNNNN (atomically) and drop all but the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp_dir = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    atomic_write(tmp_dir / STATE_FILE, lambda p: torch.save(state, p))
    shutil.rmtree(final, ignore_errors=True)
    tmp_dir.rename(final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved by `save_checkpoint`, loaded without running any code from the file.

    Raises TrainStateError naming the file when it is missing, unreadable, holds anything but
    plain data (a pickle that would run code is refused, not run) or lacks the expected keys.
    """
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise TrainStateError(f"no training checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it was not given
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).strip().splitlines()
        detail = next((line for line in why if "unsupported" in line.lower()), "")
        raise TrainStateError(
            f"{file} was refused: it holds objects other than tensors and plain data, which "
            "a training checkpoint never does, so it was not loaded (nothing in it was run)"
            + (f" ({detail.strip()})" if detail else "")
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainStateError(f"cannot read the training checkpoint {file}: {first}") from None
    if not isinstance(state, dict):
        raise TrainStateError(f"{file} is not a training checkpoint (not a dict)")
    bad = [k for k, t in STATE_KEYS.items() if not isinstance(state.get(k), t)]
    if bad or isinstance(state["step"], bool) or state["step"] < 0:
        raise TrainStateError(
            f"{file} is not a training checkpoint of ss-mlx train: missing or malformed "
            f"{', '.join(bad) or 'step'}"
        )
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor)
               for k, v in state["trainable"].items()):
        raise TrainStateError(f"{file}: 'trainable' must map parameter names to tensors")
    return state
