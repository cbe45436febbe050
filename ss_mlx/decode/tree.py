"""Static draft-tree topologies and their buffers.

A tree is a set of *rank paths*: the node (r1, r2, ..., rd) holds the r_d-th most likely token of
stream d, under the node (r1, ..., r_{d-1}). The root (the empty path) is the last emitted token.
Nodes are flattened breadth first, so parents come before children and index 0 is the root.
All buffers are computed once per topology and reused every step.
"""

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

# The most nodes a draft tree may have, the root included. A pass over T nodes with G streams
# runs T * (1 + G) rows and a mask of that size squared: past a few hundred nodes a step costs
# seconds and gigabytes, and no measured machine gains from trees a tenth that size.
MAX_NODES = 256


class TreeSpec:
    """A draft-tree topology and its precomputed buffers.

    Attributes (T = number of nodes including the root, D = max depth):
        paths: the rank path of every node, breadth first, ``paths[0] == ()``.
        parents: (T,) int32, parent index, -1 for the root.
        depths: (T,) int32.
        ranks: (T,) int32, rank of the node's token in its stream's top-k (0 for the root).
        ancestor_mask: (T, T) bool, ``[i, k]`` is True when k is i or an ancestor of i.
        path_table: (T, D + 1) int32, the nodes from the root down to i, padded with i.
        child_table: (T, K) int32, the node holding rank r under node i, or -1 (K = max width).
        levels: per depth d < D, the (n_d,) indices of the nodes at depth d.
    """

    def __init__(self, paths: Sequence[Sequence[int]]):
        nodes = _validate_paths(paths)
        self.paths: tuple[tuple[int, ...], ...] = ((),) + nodes
        index = {p: i for i, p in enumerate(self.paths)}
        T = len(self.paths)
        self.num_nodes = T
        self.depth = max(len(p) for p in self.paths)
        parents = np.array([index[p[:-1]] if p else -1 for p in self.paths], dtype=np.int32)
        depths = np.array([len(p) for p in self.paths], dtype=np.int32)
        ranks = np.array([p[-1] if p else 0 for p in self.paths], dtype=np.int32)
        anc = np.zeros((T, T), dtype=bool)
        table = np.zeros((T, self.depth + 1), dtype=np.int32)
        for i, p in enumerate(self.paths):
            chain = [index[p[:d]] for d in range(len(p) + 1)]
            anc[i, chain] = True
            table[i] = chain + [i] * (self.depth + 1 - len(chain))
        # widths[d] = how many top tokens stream d+1 must provide.
        self.widths = tuple(int(ranks[depths == d].max()) + 1 for d in range(1, self.depth + 1))
        self.parents = mx.array(parents)
        self.depths = mx.array(depths)
        self.ranks = mx.array(ranks)
        self.ancestor_mask = mx.array(anc)
        self.path_table = mx.array(table)
        K = max(self.widths or (1,))
        children = np.full((T, K), -1, dtype=np.int32)
        for i, p in enumerate(self.paths[1:], start=1):
            children[parents[i], p[-1]] = i
        self.child_table = mx.array(children)
        self.levels = [
            mx.array(np.flatnonzero(depths == d).astype(np.int32)) for d in range(self.depth)
        ]
        # Draft nodes read entry [depth - 1, rank] of the (D, K) candidates; flattened.
        self._draft_index = mx.array((depths[1:] - 1) * K + ranks[1:])

    @classmethod
    def from_widths(
        cls,
        widths: Sequence[int],
        node_budget: int | None = None,
        rank_probs: Sequence[Sequence[float]] | None = None,
    ) -> "TreeSpec":
        """Cartesian product of top-k widths per depth, optionally capped to ``node_budget``
        draft nodes.

        The cap keeps the nodes with the highest estimated path probability (the product of
        ``rank_probs[d][r]`` along the path: the chance that stream d+1's rank-r token is right).
        Without measured ``rank_probs`` a rank-decay prior is used. A child never scores above
        its parent, so the kept set is always a valid (prefix-closed) tree.
        """
        widths = list(widths)
        if not widths or any(not _is_int(k) or k < 1 for k in widths):
            raise ValueError(f"tree widths must be positive integers, got {widths!r}")
        full = sum(math.prod(widths[:d]) for d in range(1, len(widths) + 1))
        if node_budget is None and full + 1 > MAX_NODES:
            raise ValueError(
                f"tree widths {widths} give {full + 1} nodes; at most {MAX_NODES} are allowed "
                "(add a node budget, e.g. '8,4,2:32')"
            )
        if full > 100 * MAX_NODES**2:  # enumerating the product alone would take too long
            raise ValueError(f"tree widths {widths} are too wide to choose a budget from")
        paths = [
            p
            for d in range(1, len(widths) + 1)
            for p in itertools.product(*(range(k) for k in widths[:d]))
        ]
        if node_budget is not None:
            if not _is_int(node_budget) or not 1 <= node_budget < MAX_NODES:
                raise ValueError(
                    f"tree node_budget must be an integer in [1, {MAX_NODES - 1}], "
                    f"got {node_budget!r}"
                )
            if rank_probs is not None:
                _check_rank_probs(rank_probs, widths)
            # Prior: deeper streams are less accurate; lower ranks much less likely.
            probs = rank_probs or [
                [0.8 ** (d + 1) / (r + 1) ** 2 for r in range(k)] for d, k in enumerate(widths)
            ]

            def score(p: tuple[int, ...]) -> float:
                return math.prod(probs[d][r] for d, r in enumerate(p))

            order = sorted(range(len(paths)), key=lambda i: (-score(paths[i]), len(paths[i]), i))
            keep = sorted(order[:node_budget])
            paths = [paths[i] for i in keep]
        return cls(paths)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TreeSpec":
        if not isinstance(d, dict) or not ({"widths", "paths"} & d.keys()):
            raise ValueError(f"tree spec must have 'widths' or 'paths', got {d!r}")
        if "paths" in d:
            return cls(d["paths"])
        return cls.from_widths(d["widths"], d.get("node_budget"), d.get("rank_probs"))

    @classmethod
    def parse(cls, text: str) -> "TreeSpec":
        """CLI form: ``3,2,1`` (widths), ``3,2,1:8`` (widths, node budget), a JSON list of
        paths ``[[0],[1],[0,0]]``, or a path to a JSON file holding either form as an object."""
        text = text.strip()
        try:
            if text.endswith(".json"):
                return cls.from_dict(json.loads(Path(text).read_text()))
            if text.startswith("["):
                return cls(json.loads(text))
            widths, _, budget = text.partition(":")
            return cls.from_widths(
                [int(k) for k in widths.split(",")], int(budget) if budget else None
            )
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read tree spec {text!r}: {e}") from None
        except ValueError as e:
            raise ValueError(f"invalid tree spec {text!r}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"paths": [list(p) for p in self.paths[1:]]}

    @property
    def max_width(self) -> int:
        return max(self.widths or (1,))

    def top_candidates(self, stream_logits: mx.array) -> mx.array:
        """The top-K tokens of each stream, best first. stream_logits: (G, V), G >= depth.

        Returns (D, K) token ids.
        """
        k = self.max_width
        logits = stream_logits[: self.depth]  # (D, V)
        # argpartition gives the top k unordered; order them so rank 0 is the argmax.
        top = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]  # (D, k)
        vals = mx.take_along_axis(logits, top, axis=-1)
        return mx.take_along_axis(top, mx.argsort(-vals, axis=-1), axis=-1)

    def fill(self, candidates: mx.array) -> mx.array:
        """Place ranked candidates into the tree: node (.., r) at depth d gets candidates[d-1, r].

        candidates: (D, K). Returns (T - 1,) draft token ids.
        """
        if self.depth == 0:
            return mx.zeros((0,), dtype=mx.int32)
        return candidates.reshape(-1)[self._draft_index].astype(mx.int32)

    def draft_tokens(self, stream_logits: mx.array) -> mx.array:
        """Greedy drafting: rank r of stream d fills the nodes (.., r) at depth d. -> (T - 1,)"""
        if self.depth == 0:
            return mx.zeros((0,), dtype=mx.int32)
        return self.fill(self.top_candidates(stream_logits))

    def __repr__(self) -> str:
        return f"TreeSpec(nodes={self.num_nodes}, depth={self.depth}, widths={self.widths})"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_rank_probs(rank_probs: Any, widths: Sequence[int]) -> None:
    """rank_probs[d][r] for every depth and rank of `widths`: finite numbers in [0, 1]."""
    ok = isinstance(rank_probs, Sequence) and len(rank_probs) >= len(widths) and all(
        isinstance(p, Sequence) and len(p) >= k
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
                for x in p[:k])
        for p, k in zip(rank_probs, widths, strict=False)
    )
    if not ok:
        raise ValueError(
            f"tree rank_probs must give, for each of the {len(widths)} depths, a probability "
            f"in [0, 1] for each rank up to the width {list(widths)}"
        )


def _validate_paths(paths: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise ValueError(f"tree paths must be a list of lists of ranks, got {paths!r}")
    if len(paths) + 1 > MAX_NODES:
        raise ValueError(
            f"the tree has {len(paths) + 1} nodes; at most {MAX_NODES} are allowed"
        )
    nodes = []
    for p in paths:
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"tree path {p!r} must be a non-empty list of ranks")
        if any(not _is_int(r) or r < 0 for r in p):
            raise ValueError(f"tree path {list(p)} must hold non-negative integer ranks")
        nodes.append(tuple(p))
    seen = set(nodes)
    if len(seen) != len(nodes):
        dup = sorted({p for p in nodes if nodes.count(p) > 1})
        raise ValueError(f"tree paths are repeated: {[list(p) for p in dup]}")
    orphans = [list(p) for p in nodes if len(p) > 1 and p[:-1] not in seen]
    if orphans:
        raise ValueError(f"tree paths {orphans} have no parent path (every prefix must be listed)")
    return tuple(sorted(nodes, key=lambda p: (len(p), p)))


def root_only() -> TreeSpec:
    """The tree of the first step after prefill: no draft yet."""
    return TreeSpec([])


def default_tree(num_streams: int) -> TreeSpec:
    """A small tree for models without a tuned one (CPUs and M1/M2 verify ~8 rows cheaply):
    two candidates at each depth, one branch each."""
    widths = [2] + [1] * max(0, num_streams - 1)
    return TreeSpec.from_widths(widths[:num_streams])


def as_tree(tree: "TreeSpec | str | dict", max_depth: int, source: str) -> TreeSpec:
    """A tree argument (TreeSpec, CLI string, or dict) as a TreeSpec no deeper than
    `max_depth` (the draft depths `source` can provide)."""
    if isinstance(tree, TreeSpec):
        spec = tree
    elif isinstance(tree, str):
        spec = TreeSpec.parse(tree)
    elif isinstance(tree, dict):
        spec = TreeSpec.from_dict(tree)
    else:
        raise ValueError(f"tree must be a TreeSpec, a spec string or a dict, got {type(tree)}")
    if spec.depth > max_depth:
        raise ValueError(
            f"the draft tree is {spec.depth} deep but there are only {max_depth} {source}"
        )
    return spec
