"""Files on disk: the cache root, and writes that never leave a half-written file or directory.

Plain Python, no MLX, so the training side uses the same helpers. Every writer goes through a
temp name beside the target and one rename; files and directories get the permissions the
umask allows (a model directory is meant to be shared), not tempfile's private 0600/0700.
"""

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ENV_HOME = "SS_MLX_HOME"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $SS_MLX_HOME, else $XDG_CACHE_HOME/ss-mlx, else ~/.cache/ss-mlx."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ss-mlx"


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """A unique hidden name beside `path` (same filesystem, so the rename is atomic), with the
    same suffix: some writers (mx.save_safetensors) append theirs otherwise."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)``, then rename tmp to `path` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return write_text(path, text)


def copy_file(src: str | Path, dst: str | Path) -> Path:
    return atomic_write(dst, lambda p: shutil.copyfile(src, p))


def dump_json(obj: Any, indent: int = 1) -> str:
    """JSON with nested objects indented but lists of scalars on one line (token ids, per-pass
    counts and timings would otherwise take a line each)."""

    def enc(o: Any, level: int) -> str:
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{inner}{json.dumps(str(k))}: {enc(v, level + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in o):
                return json.dumps(list(o))
            return "[\n" + ",\n".join(inner + enc(v, level + 1) for v in o) + "\n" + pad + "]"
        return json.dumps(o)

    return enc(obj, 0) + "\n"


def savefig(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG through a temp file."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))


def make_temp_dir(out_dir: Path) -> Path:
    """A hidden build directory beside `out_dir`, created with the umask's permissions."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=False)
    return tmp


def check_out_dir(out_dir: str | Path, *inputs: str | Path) -> Path:
    """Refuse an output directory whose replacement would destroy something else.

    Publishing replaces `out_dir` whole, so it must not be the current directory, a parent of
    it, an input, or a parent of an input; and it must not be a file.
    """
    out = Path(out_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(
            f"--out {out_dir} is the current directory or one of its parents; "
            "give a new directory for the model"
        )
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or out in src.parents:
            raise ValueError(f"--out {out_dir} contains the input {src}; give another directory")
        if src in out.parents:
            raise ValueError(f"--out {out_dir} is inside the input {src}; give another directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out_dir}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--out {out_dir}: {parent} is not writable")
            break
    return out


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse, before a long run, an output file that cannot be written: a directory, or one
    under a file or an unwritable directory (writers create missing parents)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"{flag} {path} is a directory, not a file")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: {parent} is not writable")
            break
    return out


def publish_dir(tmp: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Move the finished `tmp` to `out_dir`; an existing `out_dir` is replaced only if allowed,
    and is put back if the final rename fails."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (use --force to replace it)")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            os.replace(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


def read_jsonl(
    path: str | Path, error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file; `error`, naming the
    file and line, for a missing file or anything that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
