"""argparse types shared by the commands: a bad value is one line naming the flag (argparse
prints ``argument --seed: ...`` and exits 2), never a traceback from deep inside a run.

Plain Python, no MLX: the training side uses them too.
"""

import argparse
import math
import sys
from collections.abc import Callable

SEED_LIMIT = 2**64


def seed(text: str) -> int:
    """A PRNG seed: an integer in [0, 2**64) (what MLX, NumPy and PyTorch all accept)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text}")
    return value


def int_at_least(lo: int) -> Callable[[str], int]:
    """An integer >= `lo`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text}")
        return value

    parse.__name__ = f"int_at_least_{lo}"
    return parse


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text}")
        return value

    parse.__name__ = f"int_in_{lo}_{hi}"
    return parse


def max_tokens(text: str) -> int:
    """A token budget: an integer >= 0, or -1 for no limit (as mlx-lm)."""
    return int_at_least(-1)(text)


def finite_float(text: str) -> float:
    """A finite number (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def check_text(text: str, what: str) -> str:
    """Refuse a string holding lone surrogates: Python's stand-ins for bytes that were not
    UTF-8 (argv and the environment decode that way); a tokenizer cannot encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("utf-8", "surrogateescape")
        raise ValueError(
            f"{what} is not valid UTF-8 text (byte {bad[:1].hex()!r} at position {e.start})"
        ) from None
    return text


def utf8_text(text: str) -> str:
    """argparse type: text that is valid UTF-8 (see `check_text`)."""
    try:
        return check_text(text, "the value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_stdin_text(flag: str) -> str:
    """All of stdin as UTF-8 text; invalid bytes are a one-line error naming `flag`."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return check_text(data, f"{flag} (stdin)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{flag}: stdin is not valid UTF-8 text (byte {data[e.start : e.start + 1].hex()!r} "
            f"at position {e.start})"
        ) from None


DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's


def add_kv_cache_args(p: argparse.ArgumentParser) -> None:
    """mlx-lm's KV-cache quantization flags (`generate` and `cache-prompt` take the same)."""
    p.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        help="mlx-lm's KV cache quantization; a tree pass cannot rewind a quantized cache, so "
        "it is accepted only while the context stays below --quantized-kv-start",
    )
    p.add_argument("--kv-group-size", type=int, default=64, help="KV quantization group size")
    p.add_argument(
        "--quantized-kv-start",
        type=int,
        default=DEFAULT_QUANTIZED_KV_START,
        help="with --kv-bits, the context length where mlx-lm starts quantizing the cache",
    )
