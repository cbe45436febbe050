"""KV-cache handling for tree steps: accepted-branch compaction and validation.

A tree step appends the K/V of all T tree nodes at cache positions [P, P + T). After
verification only the root and the accepted path survive: their rows are gathered to the
contiguous positions [P, P + n) and the offset is set to P + n; rows past the offset are
overwritten by the next step.
"""

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache


def make_prompt_cache(model: Any) -> list[KVCache]:
    """A fresh prompt cache for an SS model or its mlx-lm base (mlx-lm's function, checked)."""
    return make_cache(getattr(model, "base", model))


def make_cache(base: Any) -> list[KVCache]:
    """A fresh prompt cache for `base`, refusing caches a tree step cannot rewind."""
    cache = mlx_cache.make_prompt_cache(base)
    check_cache(cache)
    return cache


def check_cache(cache: list[Any]) -> None:
    bad = sorted({type(c).__name__ for c in cache if type(c) is not KVCache})
    if bad:
        raise ValueError(
            f"Speculative Streaming needs a plain, trimmable KVCache in every layer; this "
            f"model/cache uses {', '.join(bad)} (sliding-window, rotating, quantized or "
            f"recurrent caches cannot drop rejected tree nodes)"
        )


def commit_path(cache: list[KVCache], start: int, path: Sequence[int], keep: int) -> None:
    """Keep the accepted branch of the last tree step.

    start: the cache offset before the step (P); path: node indices from the root (host ints;
    entries past `keep` are ignored); keep: how many of them are accepted (root included).
    """
    # Rows already in place are not moved: a root-only pass, or a chain accepted along nodes
    # 1, 2, .., moves nothing. A slice update of a buffer that a pending gather still reads
    # copies the whole buffer (every layer's K and V: 4-7% of a step on this project's CPU), so
    # the moved rows are gathered first; the updates then write into the buffers in place.
    lo = next((i for i in range(keep) if path[i] != i), keep)
    if lo < keep:
        rows = mx.array([start + p for p in path[lo:keep]], dtype=mx.int32)  # (keep - lo,)
        moved = [(c.keys[..., rows, :], c.values[..., rows, :]) for c in cache]  # (B, H, n, d)
        mx.eval(moved)
        for c, (k, v) in zip(cache, moved, strict=True):
            c.keys[..., start + lo : start + keep, :] = k
            c.values[..., start + lo : start + keep, :] = v
    for c in cache:
        c.offset = start + keep


def rewind(cache: list[KVCache], offset: int) -> None:
    """Drop every row at or past `offset` (rows past a layer's offset are overwritten later)."""
    for c in cache:
        c.offset = min(c.offset, offset)
