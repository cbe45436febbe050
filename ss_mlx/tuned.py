"""Stored tuned trees: the part of `ss-mlx tune` the runtime needs.

`ss-mlx tune` measures a model's acceptance and this machine's verify-cost curve and saves
the best draft tree as JSON under ``<cache root>/tuned/<model-hash>-<machine-hash>.json``;
`generate` reads it back when no tree is given. A damaged or mismatched file is ignored with a
one-line warning naming it: it can never break generation.
"""

import hashlib
import json
import math
import platform
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import _blas
from .config import CONFIG_KEY, STREAMS_FILE
from .decode.tree import TreeSpec
from .files import cache_root, dump_json, write_text

SCHEMA = "ss-mlx-tuned/1"


def run_quiet(cmd: list[str], cwd: Path | None = None) -> str | None:
    """A command's stripped stdout, or None when it fails or prints nothing."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cpu_model() -> str:
    """The chip (macOS) or CPU model name (Linux), else whatever `platform` knows."""
    if sys.platform == "darwin":
        name = run_quiet(["sysctl", "-n", "machdep.cpu.brand_string"])
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


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def blas_name() -> str:
    return _blas.BLAS_PATH or ("Accelerate" if sys.platform == "darwin" else "mlx built-in")


def machine_key(desc: dict[str, Any] | None = None) -> str:
    """A short hash of what makes timings of this machine differ from another's.

    Only what changes the cost of a forward pass: chip, architecture, OS family, device, mlx
    version and BLAS library. Without `desc` it reads just those (cheap enough for every
    `generate` call: no git, no subprocess on Linux).
    """
    if desc is None:
        desc = {"cpu": cpu_model(), "arch": platform.machine(),
                "backend": {"device": str(mx.default_device())},
                "mlx": package_version("mlx") or mx.__version__, "blas": blas_name()}
    key = {
        "cpu": desc["cpu"],
        "arch": desc["arch"],
        "system": platform.system(),
        "device": desc["backend"]["device"],
        "mlx": desc["mlx"],
        "blas": Path(str(desc["blas"])).name,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def model_hash(model_dir: str | Path) -> str:
    """A short hash identifying a model directory's content, independent of its path.

    Covers config.json (minus the stream config's default ``tree``, which tuning replaces),
    the stream parameters' bytes, and the names and sizes of the weight files (hashing
    gigabytes of weights on every load would be too slow; a fine-tune changes the streams).
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if isinstance(config, dict) and isinstance(config.get(CONFIG_KEY), dict):
        config[CONFIG_KEY] = {k: v for k, v in config[CONFIG_KEY].items() if k != "tree"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    streams = model_dir / STREAMS_FILE
    if streams.is_file():
        h.update(streams.read_bytes())
    for f in sorted(model_dir.glob("model*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def tuned_dir(home: str | Path | None = None) -> Path:
    return cache_root(home) / "tuned"


def tuned_path(model_dir: str | Path, machine: str | None = None,
               home: str | Path | None = None) -> Path:
    """Where the tuned tree of this model on this machine lives."""
    return tuned_dir(home) / f"{model_hash(model_dir)}-{machine or machine_key()}.json"


def _ignore(path: Path, why: str) -> None:
    warnings.warn(f"ignoring the tuned-tree file {path}: {why}", stacklevel=3)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def verify_cost_ok(cost: Any) -> bool:
    """A verify-cost curve as tune writes it: T = 1..n and n finite positive ratios."""
    if not isinstance(cost, dict):
        return False
    rel, sizes, plain = cost.get("relative"), cost.get("T"), cost.get("plain_seconds")
    return (
        isinstance(rel, list) and len(rel) > 0 and all(_number(x) and x > 0 for x in rel)
        and isinstance(sizes, list) and len(sizes) == len(rel)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in sizes)
        and (plain is None or (isinstance(plain, list) and len(plain) == len(sizes)
                               and all(_number(x) and x > 0 for x in plain)))
    )


def load_tuned(model_dir: str | Path, home: str | Path | None = None,
               num_streams: int | None = None,
               vocab_size: int | None = None) -> dict[str, Any] | None:
    """The full tuning record for this model on this machine, or None (also when the file is
    damaged or does not fit a model with `num_streams` streams and `vocab_size` tokens: then
    with a one-line warning naming the file)."""
    try:
        path = tuned_path(model_dir, home=home)
    except (OSError, ValueError):
        return None
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        _ignore(path, f"unreadable ({e})")
        return None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        _ignore(path, f"not a {SCHEMA} record")
        return None
    try:
        spec = TreeSpec.from_dict(record.get("tree"))
    except (ValueError, TypeError, IndexError, KeyError) as e:
        _ignore(path, f"its tree is invalid ({e})")
        return None
    if num_streams is not None and spec.depth > num_streams:
        _ignore(path, f"its tree is {spec.depth} deep, the model has {num_streams} streams")
        return None
    if vocab_size is not None and spec.max_width > vocab_size:
        _ignore(path, f"its tree is {spec.max_width} wide, the vocabulary has {vocab_size}")
        return None
    cost = record.get("verify_cost")
    if cost is not None and not verify_cost_ok(cost):
        _ignore(path, "its verify_cost is damaged")
        return None
    return record


def load_tuned_tree(model_dir: str | Path, home: str | Path | None = None,
                    num_streams: int | None = None, vocab_size: int | None = None) -> dict | None:
    """The tuned tree for this model on this machine, as a dict for ``TreeSpec.from_dict``
    (``{"widths", "node_budget", "rank_probs"}``), or None when there is no usable one."""
    record = load_tuned(model_dir, home, num_streams, vocab_size)
    return None if record is None else record["tree"]


def save_tuned(model_dir: str | Path, record: dict[str, Any],
               home: str | Path | None = None) -> Path:
    return write_text(tuned_path(model_dir, record["machine"]["key"], home), dump_json(record))


# Cost of one pass over R rows (main + stream rows), relative to mlx-lm's one-token AR step, on
# this project's reference 2-core x86 CPU (OpenBLAS sgemm: a few rows cost far more than one).
# A GPU is much flatter; `ss-mlx tune` measures the real curve and it replaces this one.
DEFAULT_ROW_COST = ((1, 1.0), (2, 1.3), (4, 1.5), (8, 1.85), (16, 2.5), (32, 3.8), (64, 6.5),
                    (128, 12.0), (256, 23.0), (1280, 110.0))


CostCurve = tuple[tuple[int, float], ...]


def row_cost_curve(record: dict[str, Any] | None, num_streams: int) -> CostCurve:
    """(rows, relative cost) points: from a tuning record's verify-cost measurement when there is
    one (its pass over T nodes runs T * (1 + min(max(T - 1, 1), G)) rows), else the default."""
    cost = (record or {}).get("verify_cost")
    if not cost or not cost.get("ar_seconds") or not cost.get("seconds"):
        return DEFAULT_ROW_COST
    ar = float(cost["ar_seconds"])
    points = {1: 1.0}
    for T, s in zip(cost["T"], cost["seconds"], strict=False):
        rows = T * (1 + min(max(T - 1, 1), num_streams))
        points[rows] = max(float(s) / ar, points.get(rows, 0.0))
    return _monotone(points)


def _monotone(points: dict[int, float]) -> CostCurve:
    """(size, relative cost) in size order, never falling (noise aside), linear beyond the
    largest measured size."""
    out, best = [], 0.0
    for size in sorted(points):
        best = max(best, points[size])
        out.append((size, best))
    last_size, last = out[-1]
    out.append((last_size * 8, last * 8))
    return tuple(out)


def plain_cost_curve(record: dict[str, Any] | None) -> CostCurve | None:
    """(T, relative cost) of a pass over T nodes without streams, from a tuning record that
    timed it (``plain_seconds``), else None."""
    cost = (record or {}).get("verify_cost") or {}
    plain, ar = cost.get("plain_seconds"), cost.get("ar_seconds")
    if not plain or not ar:
        return None
    points = {1: 1.0}  # a one-node plain pass is the AR step itself
    for T, s in zip(cost["T"], plain, strict=False):
        if T > 1:
            points[T] = float(s) / float(ar)
    return _monotone(points)


def cost_at(curve: CostCurve, rows: int) -> float:
    """The curve, interpolated linearly in the row count."""
    for (r0, c0), (r1, c1) in zip(curve, curve[1:], strict=False):
        if rows <= r1:
            return c0 + (c1 - c0) * (rows - r0) / (r1 - r0) if rows > r0 else c0
    r0, c0 = curve[-1]
    return c0 * rows / r0
