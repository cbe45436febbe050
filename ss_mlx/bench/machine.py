"""Describe the machine a measurement was taken on (for reports and for keying tuned trees)."""

import os
import platform
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..tuned import blas_name, cpu_model, package_version, run_quiet

_REPO = Path(__file__).resolve().parents[2]


def memory_bytes() -> int | None:
    """Total physical memory, or None when the OS does not say."""
    if sys.platform == "darwin":
        out = run_quiet(["sysctl", "-n", "hw.memsize"])
        return int(out) if out and out.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def os_description() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    return platform.platform()


def git_commit(repo: Path = _REPO) -> str | None:
    """The ss-mlx checkout's commit, with "-dirty" when tracked files have local changes."""
    if not (repo / ".git").exists():
        return None
    head = run_quiet(["git", "rev-parse", "HEAD"], cwd=repo)
    if head is None:
        return None
    dirty = run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return head + ("-dirty" if dirty else "")


def backend() -> dict[str, Any]:
    device = mx.default_device()
    info: dict[str, Any] = {"device": str(device), "metal": bool(mx.metal.is_available())}
    if mx.metal.is_available():
        try:
            info["gpu"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int))}
        except (AttributeError, RuntimeError):
            pass
    return info


def describe_machine(dtype: str | None = None) -> dict[str, Any]:
    """Everything a reader needs to judge or reproduce a number taken on this machine.

    Args:
        dtype: the model's compute dtype, when known (e.g. "float32").
    """
    from .._version import __version__

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "os": os_description(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "mlx": package_version("mlx") or mx.__version__,
        "mlx_lm": package_version("mlx-lm"),
        "backend": backend(),
        "dtype": dtype,
        "blas": blas_name(),
        "ss_mlx": __version__,
        "ss_mlx_commit": git_commit(),
    }


def summary_line(desc: dict[str, Any]) -> str:
    """One line for the top of a report."""
    mem = desc.get("memory_bytes")
    mem_s = f", {mem / 2**30:.0f} GiB" if mem else ""
    return (
        f"{desc['cpu']} ({desc['cpu_count']} cores{mem_s}), {desc['os']}, "
        f"{desc['backend']['device']}, mlx {desc['mlx']}, mlx-lm {desc['mlx_lm']}, "
        f"Python {desc['python']}, dtype {desc['dtype']}, BLAS {desc['blas']}, "
        f"ss-mlx {desc['ss_mlx']} ({desc['ss_mlx_commit'] or 'no git'})"
    )


# Distinct markers, so lines that coincide stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def model_label(model: str | Path | None) -> str:
    """A model's name for a plot: a local directory's own name, never its absolute path (a Hub
    repo id is kept whole)."""
    if not model:
        return ""
    text = str(model)
    path = Path(text).expanduser()
    return path.name if path.is_absolute() or path.exists() or text.startswith(".") else text


def plot_subtitle(
    machine: dict[str, Any] | None, model: str | Path | None = None, dtype: str | None = None
) -> str:
    """The line under a plot's title: model, dtype and machine (no local paths)."""
    m = machine or {}
    parts = []
    if model_label(model):
        parts.append(f"model {model_label(model)}")
    if dtype or m.get("dtype"):
        parts.append(str(dtype or m.get("dtype")))
    if m.get("cpu"):
        parts.append(f"{m['cpu']} ({m.get('cpu_count')} cores)")
    device = str((m.get("backend") or {}).get("device") or "")
    if device:
        device = device.removeprefix("Device(").split(",")[0].rstrip(")")  # "Device(cpu, 0)"
        parts.append(f"MLX {m.get('mlx', '')} {device}".replace("  ", " "))
    if m.get("os"):
        parts.append(str(m["os"]).split("-with-")[0])
    return " | ".join(parts)


def require_matplotlib(command: str) -> None:
    """Exit with a one-line fix before any measuring when --plot cannot be drawn."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        sys.exit(f"ss-mlx {command}: error: --plot needs matplotlib, which is not installed: "
                 "pip install 'ss-mlx[bench]' (or drop --plot)")
