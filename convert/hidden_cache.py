"""Cache of a frozen base's per-example outputs (lossless and medusa modes).

With the base frozen, the hidden states that enter the stream layers (and the main-stream
statistics) are the same every epoch: compute them once per example, then later epochs run only
the trainable part. Right padding means the valid positions of an example do not depend on what
it is batched with, so entries are stored unpadded, per example.

With a `path`, the cache is written there in parts, each holding the examples computed since the
last write (`flush`, at every checkpoint and when an epoch has filled it): `path` itself, then
`<stem>.1.safetensors`, `<stem>.2...`, as safetensors (no pickles) with the key in each part's
metadata. A later run with the same key (base weights, data file, sequence length, stream
layers, dtype) starts from every part: an ablation over gamma, rank, steps or data prefixes pays
for the trunk pass once, and a one-epoch run cut short by the end of a job keeps what it had
computed (a 2M-token epoch outlasts a three-hour job here). Only the state entering the first
stream layer is kept (D values per token in the trunk's dtype; the other stream layers' inputs
are recomputed from it by the base's own layers, Ns - 1 of N, at each lookup): 2.3 KB a token
for SmolLM2 in fp32, 1 GB per ~450K tokens. Keep the files out of git.
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
        self._on_disk: set[int] = set()  # examples in the part files
        self._parts = 0  # the next part's number
        if self.path is not None:
            for k, part in self._part_files():
                self._parts = k + 1
                self._on_disk.update(self._load(part))

    def _part_files(self) -> list[tuple[int, Path]]:
        """(number, file) of each part on disk, in order."""
        assert self.path is not None
        stem = self.path.name.removesuffix(".safetensors")
        parts = [(0, self.path)] if self.path.is_file() else []
        for f in self.path.parent.glob(f"{stem}.*.safetensors"):
            k = f.name[len(stem) + 1 : -len(".safetensors")]
            if k.isdigit():
                parts.append((int(k), f))
        return sorted(parts)

    def holds_all(self, num_examples: int) -> bool:
        """Whether examples 0..num_examples-1 are all in (a run on a prefix of the data may
        find the cache holding others too)."""
        return len(self._store) >= num_examples and all(
            i in self._store for i in range(num_examples))  # fmt: skip

    @property
    def saved(self) -> bool:
        return bool(self._on_disk)

    def flush(self) -> int:
        """Write the examples not yet on disk as the next part file; how many (0: nothing new)."""
        if self.path is None or len(self._on_disk) == len(self._store):
            return 0
        new = sorted(set(self._store) - self._on_disk)
        lengths = torch.tensor([self._store[i][0].shape[0] for i in new], dtype=torch.int64)
        tensors = {
            "index": torch.tensor(new, dtype=torch.int64),
            "lengths": lengths,
            "states": torch.cat([self._store[i][0] for i in new]).contiguous(),
            **{
                name: torch.cat([self._store[i][k] for i in new]).contiguous()
                for k, name in ((1, "nll"), (2, "hit"), (3, "pred"), (4, "top_ids"), (5, "top_p"))
            },
        }
        stem = self.path.name.removesuffix(".safetensors")
        part = self.path if self._parts == 0 else self.path.with_name(
            f"{stem}.{self._parts}.safetensors")  # fmt: skip
        part.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": self.key, "format": FORMAT}
        atomic_write(part, lambda p: save_file(tensors, str(p), metadata=meta))
        self._parts += 1
        self._on_disk.update(new)
        return len(new)

    def _load(self, path: Path) -> set[int]:
        """The examples of one part file, into the store (none from a damaged or foreign one)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key or meta.get("format") != FORMAT:
                    print(f"{path}: trunk cache of other settings; recomputing it", file=sys.stderr)
                    return set()
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
        except Exception as e:  # a damaged part is only a lost speed-up
            # Removed, or it would warn in every later run; flush writes its examples anew.
            print(f"{path}: unreadable trunk cache ({e}); removing it, its examples are "
                  "recomputed", file=sys.stderr)  # fmt: skip
            path.unlink(missing_ok=True)
            return set()
        self._store.update(store)
        return set(store)

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
