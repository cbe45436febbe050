"""The streams' draft vocabulary: the tokens their LM head covers (EAGLE-3's reduced draft head).

A stream can only draft what its head scores, and most of a 49K vocabulary is never the answer:
the 8,192 most frequent target tokens of the self-distilled data cover 96.7% of held-out targets.
The head is most of a stream row's cost in training (its (rows, V) logits and their gradient), so
a draft vocabulary cuts that part by V / V_d. The main head is untouched: output stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import Example


def frequent_tokens(examples: Sequence[Example], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent scored tokens of `examples` (ties: the lower id), ascending ids
    (size,); when fewer distinct tokens are scored, the lowest unused ids fill it up."""
    if not 0 < size <= vocab_size:
        raise ValueError(f"--draft-vocab must be in [1, {vocab_size}] (the vocabulary), got {size}")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for e in examples:
        ids, mask = np.asarray(e.input_ids), np.asarray(e.loss_mask, dtype=bool)
        counts += np.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count desc, then id asc
    return torch.from_numpy(np.sort(order[:size]))


def coverage(examples: Sequence[Example], ids: torch.Tensor) -> float:
    """Share of the scored tokens of `examples` inside the vocabulary `ids`."""
    inside = set(ids.tolist())
    total = hit = 0
    for e in examples:
        scored = [t for t, m in zip(e.input_ids, e.loss_mask, strict=True) if m]
        total += len(scored)
        hit += sum(t in inside for t in scored)
    return hit / total if total else float("nan")
