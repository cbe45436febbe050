"""Coarse-grained (PCG-style) acceptance: a relaxed rule, NOT exact.

Tokens are grouped by the cosine similarity of the model's own input embeddings:
G(k) = {t : cos(E_k, E_t) > theta}, one group seeded per token, so groups overlap and the groups
containing t are S(t) = G(t) (similarity is symmetric). Each token spreads its probability
equally over its groups, w_{k,t} = 1 / |S(t)|, giving coarse distributions
P_c(k) = sum_t w_{k,t} p(t) and Q_c(k) = sum_t w_{k,t} q(t).

A draft token x (drawn from the streams' q) is tested on a group g drawn uniformly from S(x) and
accepted with probability min(1, P_c(g) / Q_c(g)); the accepted token x then stands in for its
group. On rejection a group is drawn from the residual max(0, P_c - Q_c) and a token from within
it with probability proportional to w_{g,t} p(t). Group-level decisions are those of exact
speculative sampling; the token-level output is not p (x replaces a same-group token), which is
the quality cost this rule trades for acceptance. theta -> 1 leaves singleton groups and gives
exact speculative sampling back.
"""

import hashlib
from pathlib import Path

import mlx.core as mx
import numpy as np


class CoarseGroups:
    """Sparse group membership (CSR over seed tokens) for one embedding matrix and theta."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, theta: float):
        self.theta = theta
        self.vocab_size = len(indptr) - 1
        sizes = np.diff(indptr)
        self.indptr = mx.array(indptr.astype(np.int32))
        self.indices = mx.array(indices.astype(np.int32))  # (nnz,) member tokens, row by row
        self.rows = mx.array(np.repeat(np.arange(self.vocab_size), sizes).astype(np.int32))
        self.inv_size = mx.array((1.0 / sizes).astype(np.float32))  # (V,) 1 / |S(t)|

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        theta: float,
        cache_dir: Path | None = None,
        chunk: int = 2048,
    ) -> "CoarseGroups":
        """Group tokens by embedding cosine > theta (chunked V x V similarity, cached on disk)."""
        if not -1.0 <= theta <= 1.0:
            raise ValueError(f"coarse theta must be in [-1, 1], got {theta!r}")
        emb = np.asarray(embeddings, dtype=np.float32)
        key = hashlib.sha256(emb.tobytes()[: 1 << 20] + str(emb.shape).encode()).hexdigest()[:16]
        path = cache_dir / f"groups-{key}-{theta:.4f}.npz" if cache_dir else None
        if path is not None and path.exists():
            try:
                data = np.load(path)
                return cls(data["indptr"], data["indices"], theta)
            except Exception:  # a damaged cache file (bad zip, missing keys): rebuild it
                pass
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        unit_mx = mx.array(unit)
        counts, members = [], []
        for start in range(0, len(unit), chunk):
            sim = np.array(unit_mx[start : start + chunk] @ unit_mx.T)  # (c, V)
            hit = sim > theta
            # A token always belongs to its own group, even if its norm is 0.
            hit[np.arange(hit.shape[0]), np.arange(start, start + hit.shape[0])] = True
            r, c = np.nonzero(hit)
            counts.append(np.bincount(r, minlength=hit.shape[0]))
            members.append(c)
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
        indices = np.concatenate(members)
        if path is not None:
            try:  # only a cache: an unwritable one costs the rebuild next time, nothing else
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, indptr=indptr, indices=indices)
                tmp.replace(path)
            except OSError:
                pass
        return cls(indptr, indices, theta)

    def _row_sums(self, x: mx.array) -> mx.array:
        """sum over each group's members of x[member]. x: (N, V) -> (N, V)."""
        vals = x[:, self.indices]  # (N, nnz)
        csum = mx.concatenate([mx.zeros((x.shape[0], 1)), mx.cumsum(vals, axis=-1)], axis=-1)
        return csum[:, self.indptr[1:]] - csum[:, self.indptr[:-1]]

    def coarse(self, probs: mx.array) -> mx.array:
        """P_c(k) = sum_{t in G(k)} p(t) / |S(t)|. probs: (N, V) -> (N, V)."""
        return self._row_sums(probs * self.inv_size)

    def random_group(self, tokens: mx.array) -> mx.array:
        """A group drawn uniformly from S(t) for each token. tokens: (N,) -> (N,)."""
        start = self.indptr[tokens]
        size = self.indptr[tokens + 1] - start
        pick = mx.floor(mx.random.uniform(shape=tokens.shape) * size).astype(mx.int32)
        return self.indices[start + mx.minimum(pick, size - 1)]

    def token_from_group_residual(self, p: mx.array, resid: mx.array) -> mx.array:
        """Draw g ~ resid (unnormalised, over groups) then t in G(g) with prob ~ p(t)/|S(t)|,
        in one categorical over tokens. p, resid: (V,) -> () token.

        P(t) = p(t)/|S(t)| * sum_{g in S(t)} resid(g) / P_c(g), normalised.
        """
        pc = self.coarse(p[None])[0]
        ratio = mx.where(pc > 0, resid / mx.maximum(pc, 1e-30), 0.0)
        weight = p * self.inv_size * self._row_sums(ratio[None])[0]
        return mx.random.categorical(mx.log(mx.maximum(weight, 0.0)))


def groups_for_model(embed, theta: float, cache_dir: Path | None = None) -> CoarseGroups:
    """Groups from an mlx-lm embedding layer (dequantized when quantized)."""
    if hasattr(embed, "bits"):
        weight = mx.dequantize(
            embed.weight, embed.scales, embed.biases, embed.group_size, embed.bits
        )
    else:
        weight = embed.weight
    return CoarseGroups.build(np.array(weight.astype(mx.float32)), theta, cache_dir)
