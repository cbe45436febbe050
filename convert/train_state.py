"""Periodic training checkpoints (OUT/checkpoints/step-NNNNNNNN/state.pt) for exact resume."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ss_mlx.files import atomic_write

STATE_FILE = "state.pt"


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
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    return torch.load(file, map_location="cpu", weights_only=False)
