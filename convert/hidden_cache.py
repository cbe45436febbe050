"""Cache of a frozen base's per-example outputs (lossless and medusa modes).

With the base frozen, the hidden states that enter the stream layers (and the main-stream
statistics) are the same every epoch: compute them once per example, then later epochs run only
the trainable part. Right padding means the valid positions of an example do not depend on what
it is batched with, so entries are stored unpadded, per example.

With a `path`, the cache is written there once every example of the run is in it (again when
a later run on more of the data grows it), as safetensors (no pickles) with its key in the
metadata, and a later run with the same key (base weights, data file, sequence length, stream
layers, dtype) starts from it: an ablation over gamma, rank, steps or data prefixes pays for the
trunk pass once. Only the state entering the first stream layer is kept (D values per token
in the trunk's dtype; the other stream layers' inputs are recomputed from it by the base's own
layers, Ns - 1 of N, at each lookup): 2.3 KB a token for SmolLM2 in fp32, 1 GB per ~450K
tokens. Keep the file out of git.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ss_mlx.files import atomic_write

from .loss import term_metrics
from .modeling import BaseOutput, default_position_ids

# 3: also the base's top-K next-token distribution per target, in fp32 (in fp16, rounding flips
# of batched-apart trunks moved training 20x more than fp32 noise); 2 had the argmax only; 1
# stored all Ns stream layers' inputs.
FORMAT = "ss-mlx frozen-base cache 3"
SOFT_TOP_K = 8  # tokens of the base's distribution kept per position (`--targets soft`)


class FrozenBaseCache:
    def __init__(self, path: str | Path | None = None, key: str = "") -> None:
        # example index -> (first stream layer's input (L_i, D), main nll (L_i-1,), main hit
        # (L_i-1,), the base's own next-token prediction at each position (L_i-1,), its top-K
        # tokens (L_i-1, K) and their probabilities (L_i-1, K))
        self._store: dict[int, tuple[torch.Tensor, ...]] = {}
        self.path = None if path is None else Path(path)
        self.key = key
        self._on_disk = 0  # examples in the file at `path`
        if self.path is not None and self.path.is_file() and self._load(self.path):
            self._on_disk = len(self._store)

    @property
    def saved(self) -> bool:
        return self._on_disk > 0

    def save_if_complete(self, num_examples: int) -> bool:
        """Write the cache to `path` once every example of this run is in it and the file holds
        fewer (a run on a prefix of the data, then one on all of it); True when written now."""
        n = len(self._store)
        if self.path is None or n < num_examples or n <= self._on_disk:
            return False
        order = sorted(self._store)
        lengths = torch.tensor([self._store[i][0].shape[0] for i in order], dtype=torch.int64)
        tensors = {
            "index": torch.tensor(order, dtype=torch.int64),
            "lengths": lengths,
            "states": torch.cat([self._store[i][0] for i in order]).contiguous(),
            **{
                name: torch.cat([self._store[i][k] for i in order]).contiguous()
                for k, name in ((1, "nll"), (2, "hit"), (3, "pred"), (4, "top_ids"), (5, "top_p"))
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": self.key, "format": FORMAT}
        atomic_write(self.path, lambda p: save_file(tensors, str(p), metadata=meta))
        self._on_disk = n
        return True

    def _load(self, path: Path) -> bool:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key or meta.get("format") != FORMAT:
                    print(f"{path}: trunk cache of other settings; recomputing it", file=sys.stderr)
                    return False
                t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            store = {}
            a = b = 0  # offsets into the per-token (n) and per-target (n - 1) arrays
            for i, n in zip(t["index"].tolist(), t["lengths"].tolist(), strict=True):
                store[i] = (
                    t["states"][a : a + n],
                    t["nll"][b : b + n - 1],
                    t["hit"][b : b + n - 1],
                    t["pred"][b : b + n - 1],
                    t["top_ids"][b : b + n - 1],
                    t["top_p"][b : b + n - 1],
                )
                a, b = a + n, b + n - 1
            if a != t["states"].shape[0] or b != t["pred"].shape[0]:
                raise ValueError("lengths do not add up")
        except Exception as e:  # a damaged file is only a lost speed-up
            print(f"{path}: unreadable trunk cache ({e}); recomputing it", file=sys.stderr)
            return False
        self._store.update(store)
        return True

    def __len__(self) -> int:
        return len(self._store)

    def nbytes(self) -> int:
        return sum(sum(t.numel() * t.element_size() for t in e) for e in self._store.values())

    @torch.no_grad()
    def _fill(self, core: torch.nn.Module, batch: dict[str, torch.Tensor], idx: list[int]) -> None:
        out = core.base_forward(batch["input_ids"], batch["attention_mask"])
        first = out.stream_inputs[0]  # (B, L, D)
        dtype = next(core.base.parameters()).dtype
        for b, i in enumerate(idx):
            n = int(batch["lengths"][b])
            stats = main_stats(core, out.main_hidden[b, : n - 1], batch["input_ids"][b, 1:n])
            # In the trunk's own dtype: under bf16 autocast an fp32 trunk's states come out
            # bf16, and the stream layers read them as the trunk would.
            self._store[i] = (first[b, :n].to(dtype).clone(), *stats)

    def lookup(
        self, core: torch.nn.Module, batch: dict[str, torch.Tensor], idx: list[int]
    ) -> tuple[BaseOutput, dict[str, float], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Cached BaseOutput (logits None) for a right-padded batch, its main-stream metrics, the
        base's own targets: (B, L) ids whose position k+1 holds the base's prediction at k
        (position 0 keeps the input id), the labels of `--targets base`; and its soft targets
        aligned alike, (B, L, K) top-K ids and probabilities (`--targets soft`; position 0 and
        padding: the input id with probability 1)."""
        missing = [b for b, i in enumerate(idx) if i not in self._store]
        if missing:
            sub = {k: v[missing] for k, v in batch.items()}
            width = int(sub["lengths"].max())
            sub = {k: (v[:, :width] if v.ndim == 2 else v) for k, v in sub.items()}
            self._fill(core, sub, [idx[b] for b in missing])
        B, L = batch["input_ids"].shape
        first = self._store[idx[0]][0]
        states = first.new_zeros(B, L, first.shape[1])  # (B, L, D); padding rows stay 0
        nll = torch.zeros(B, L - 1)
        hit = torch.zeros(B, L - 1, dtype=torch.bool)
        own = batch["input_ids"].clone().cpu()
        top_ids, top_p = one_hot_soft(own, self._store[idx[0]][4].shape[1])
        for b, i in enumerate(idx):
            s, n_, h_, p_, ti, tp = self._store[i]
            states[b, : s.shape[0]] = s
            nll[b, : n_.shape[0]] = n_
            hit[b, : h_.shape[0]] = h_
            own[b, 1 : 1 + p_.shape[0]] = p_.long()
            top_ids[b, 1 : 1 + ti.shape[0]] = ti.long()
            top_p[b, 1 : 1 + tp.shape[0]] = tp.float()
        mask = batch["loss_mask"][:, 1:].bool().cpu()
        n = int(mask.sum())
        loss = float(nll[mask].mean()) if n else 0.0
        metrics = term_metrics("main", loss, n, int(hit[mask].sum()))
        position_ids = default_position_ids(batch["input_ids"], batch["attention_mask"])
        inputs = core.main_layer_inputs(states, position_ids)  # Ns x (B, L, D)
        device = batch["input_ids"].device
        soft = (top_ids.to(device), top_p.to(device))
        return BaseOutput(None, inputs, position_ids), metrics, own.to(device), soft


def one_hot_soft(ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets that are the ids themselves: (B, L, k) ids (the id k times) and probabilities
    (1 on the first, 0 on the rest)."""
    top_ids = ids[..., None].repeat(*([1] * ids.ndim), k)
    top_p = torch.zeros(top_ids.shape, dtype=torch.float32, device=ids.device)
    top_p[..., 0] = 1.0
    return top_ids, top_p


def main_stats(
    core: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, rows: int = 512
) -> tuple[torch.Tensor, ...]:
    """Main-stream nll, hit and prediction (n,) each, and the top-K ids (n, K, int32) and
    probabilities (n, K, float32), for LM-head inputs (n, D) and targets (n,).

    In chunks of rows: a (rows, V) block of logits at a time instead of (B, L, V) (0.8 GB at
    4 x 1024 positions and SmolLM2's 49K vocabulary), which ran the fill at a third of the speed.
    """
    nll, hit, pred, top_ids, top_p = [], [], [], [], []
    for k in range(0, hidden.shape[0], rows):
        logits = core.lm_head(hidden[k : k + rows]).float()  # (r, V)
        tg = targets[k : k + rows]
        nll.append(torch.nn.functional.cross_entropy(logits, tg, reduction="none"))
        p = logits.argmax(-1)
        hit.append(p == tg)
        pred.append(p.to(torch.int32))
        probs, ids = logits.softmax(-1).topk(min(SOFT_TOP_K, logits.shape[-1]), dim=-1)  # (r, K)
        top_ids.append(ids.to(torch.int32))
        top_p.append(probs)
    return tuple(torch.cat(x) for x in (nll, hit, pred, top_ids, top_p))
