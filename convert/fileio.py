"""Write-then-rename helpers, so a crash never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_path), then rename tmp_path to path."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        # Some writers create 0600 files; a model directory is meant to be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def copy_file(src: str | Path, dst: str | Path) -> Path:
    return atomic_write(dst, lambda p: shutil.copyfile(src, p))
