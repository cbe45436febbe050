"""Greedy verification of a draft tree (pure array code, no host syncs)."""

from typing import NamedTuple

import mlx.core as mx

from .tree import TreeSpec


class Verdict(NamedTuple):
    """Outcome of verifying one tree (all lazily evaluated arrays).

    best: () index of the deepest accepted node; accepted: () number of accepted draft tokens;
    path: (D + 1,) node indices root -> best (padded); next_token: () the main stream's token
    after `best` (the correction, or the bonus token when the whole path is accepted).
    """

    best: mx.array
    accepted: mx.array
    path: mx.array
    next_token: mx.array


def greedy_verify(tree: TreeSpec, tokens: mx.array, main_logits: mx.array) -> Verdict:
    """Longest path whose every node equals the argmax of its parent's main logits.

    tokens: (T,) the flattened tree (root first); main_logits: (T, V).
    """
    pred = mx.argmax(main_logits, axis=-1)  # (T,)
    if tree.num_nodes == 1:
        zero = mx.array(0)
        return Verdict(zero, zero, tree.path_table[0], pred[0])
    # Root counts as matching; a node is matching when its parent's prediction is its token.
    match = mx.concatenate([mx.array([True]), tokens[1:] == pred[tree.parents[1:]]])
    # Accepted iff every node on its root path matches: no mismatching ancestor-or-self.
    bad = (~match).astype(mx.float32)
    accepted = (tree.ancestor_mask.astype(mx.float32) @ bad) == 0  # (T,)
    # Siblings hold distinct tokens, so at most one node per depth matches: the deepest
    # accepted node is unique.
    best = mx.argmax(mx.where(accepted, tree.depths, -1))
    return Verdict(best, tree.depths[best], tree.path_table[best], pred[best])
