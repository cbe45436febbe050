"""Cache of a frozen base's per-example outputs (lossless and medusa modes).

With the base frozen, the hidden states that enter the stream layers (and the main-stream
statistics) are the same every epoch: compute them once per example, then later epochs run only
the trainable part. Right padding means the valid positions of an example do not depend on what
it is batched with, so entries are stored unpadded, per example.
"""

from __future__ import annotations

import torch

from .loss import term_metrics
from .modeling import BaseOutput, default_position_ids


class FrozenBaseCache:
    def __init__(self) -> None:
        # example index -> (stream inputs (L_i, Ns, D), main nll (L_i-1,), main hit (L_i-1,))
        self._store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def nbytes(self) -> int:
        return sum(sum(t.numel() * t.element_size() for t in e) for e in self._store.values())

    @torch.no_grad()
    def _fill(self, core: torch.nn.Module, batch: dict[str, torch.Tensor], idx: list[int]) -> None:
        out = core.base_forward(batch["input_ids"], batch["attention_mask"])
        stacked = torch.stack(out.stream_inputs, dim=2)  # (B, L, Ns, D)
        logits = core.lm_head(out.main_hidden[:, :-1]).float()  # (B, L-1, V)
        targets = batch["input_ids"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        hit = logits.argmax(-1) == targets
        for b, i in enumerate(idx):
            n = int(batch["lengths"][b])
            self._store[i] = (
                stacked[b, :n].clone(),
                nll[b, : n - 1].clone(),
                hit[b, : n - 1].clone(),
            )

    def lookup(
        self, core: torch.nn.Module, batch: dict[str, torch.Tensor], idx: list[int]
    ) -> tuple[BaseOutput, dict[str, float]]:
        """Cached BaseOutput (logits None) for a right-padded batch, and its main-stream metrics."""
        missing = [b for b, i in enumerate(idx) if i not in self._store]
        if missing:
            sub = {k: v[missing] for k, v in batch.items()}
            width = int(sub["lengths"].max())
            sub = {k: (v[:, :width] if v.ndim == 2 else v) for k, v in sub.items()}
            self._fill(core, sub, [idx[b] for b in missing])
        B, L = batch["input_ids"].shape
        first = self._store[idx[0]][0]
        states = first.new_zeros(B, L, *first.shape[1:])  # (B, L, Ns, D); padding rows stay 0
        nll = torch.zeros(B, L - 1)
        hit = torch.zeros(B, L - 1, dtype=torch.bool)
        for b, i in enumerate(idx):
            s, n_, h_ = self._store[i]
            states[b, : s.shape[0]] = s
            nll[b, : n_.shape[0]] = n_
            hit[b, : h_.shape[0]] = h_
        mask = batch["loss_mask"][:, 1:].bool().cpu()
        n = int(mask.sum())
        loss = float(nll[mask].mean()) if n else 0.0
        metrics = term_metrics("main", loss, n, int(hit[mask].sum()))
        position_ids = default_position_ids(batch["input_ids"], batch["attention_mask"])
        inputs = tuple(states[:, :, k] for k in range(states.shape[2]))
        return BaseOutput(None, inputs, position_ids), metrics
