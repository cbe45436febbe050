"""Describe the machine a measurement was taken on (for reports and for keying tuned trees)."""

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import _blas

_REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cpu_model() -> str:
    """The chip (macOS) or CPU model name (Linux), else whatever `platform` knows."""
    if sys.platform == "darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if name:
            return name
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; some arm64 kernels only give "Hardware" or "CPU part".
            if key.strip() in ("model name", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def memory_bytes() -> int | None:
    """Total physical memory, or None when the OS does not say."""
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        return int(out) if out and out.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def os_description() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    return platform.platform()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = _REPO) -> str | None:
    """The ss-mlx checkout's commit, with "-dirty" when tracked files have local changes."""
    if not (repo / ".git").exists():
        return None
    head = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if head is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
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
    from . import __version__

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "os": os_description(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "mlx": _version("mlx") or mx.__version__,
        "mlx_lm": _version("mlx-lm"),
        "backend": backend(),
        "dtype": dtype,
        "blas": _blas_name(),
        "ss_mlx": __version__,
        "ss_mlx_commit": git_commit(),
    }


def _blas_name() -> str:
    return _blas.BLAS_PATH or ("Accelerate" if sys.platform == "darwin" else "mlx built-in")


def machine_key(desc: dict[str, Any] | None = None) -> str:
    """A short hash of what makes timings of this machine differ from another's.

    Only what changes the cost of a forward pass: chip, architecture, OS family, device, mlx
    version and BLAS library. Not the OS minor version or the ss-mlx commit. Without `desc`
    it reads just those (cheap enough for every `generate` call: no git, no subprocess on
    Linux).
    """
    if desc is None:
        desc = {"cpu": cpu_model(), "arch": platform.machine(),
                "backend": {"device": str(mx.default_device())},
                "mlx": _version("mlx") or mx.__version__, "blas": _blas_name()}
    key = {
        "cpu": desc["cpu"],
        "arch": desc["arch"],
        "system": platform.system(),
        "device": desc["backend"]["device"],
        "mlx": desc["mlx"],
        "blas": Path(str(desc["blas"])).name,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


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
