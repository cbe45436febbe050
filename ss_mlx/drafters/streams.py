"""The model's own speculative streams as the draft source (Speculative Streaming proper).

The pass that verifies a tree also runs the streams of every node; the streams of the accepted
node draft the next tree. Nothing runs before the first pass, so it verifies the root alone.
"""

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from ..decode.tree import TreeSpec, root_only
from ..decode.verify import AcceptRule, Draft
from ..model.ss_model import SSModel, TreeOutput

# (history, tree) -> the tree's T - 1 draft tokens, in node order.
Proposer = Callable[[list[int], TreeSpec], Sequence[int]]


class StreamDrafter:
    """Drafts `tree` from the streams of the accepted node.

    `propose` replaces the streams' tokens (oracle tests, an external source drafting into the
    same tree); the pass still runs the streams, so it costs and behaves as a real step, and
    verification stays the same, hence lossless. Such drafts carry no distribution.
    """

    def __init__(self, model: SSModel, tree: TreeSpec, propose: Proposer | None = None):
        self.model, self.base, self.tree, self.propose = model, model.base, tree, propose
        self.has_distribution = propose is None

    def first_draft(self, history: list[int]) -> Draft:
        return Draft(root_only(), mx.zeros((0,), dtype=mx.int32))

    def forward(
        self, tokens: mx.array, positions: mx.array, ancestor_mask: mx.array, cache: list[Any]
    ) -> tuple[mx.array, TreeOutput]:
        out = self.model.tree_step(tokens, positions, ancestor_mask, cache, self.tree.depth)
        return out.main_logits, out

    def to_sync(self, out: Any, best: mx.array) -> list[mx.array]:
        return []

    def draft(
        self, history: list[int], out: TreeOutput, best: mx.array, rule: AcceptRule
    ) -> Draft:
        if self.propose is not None:
            tokens = list(self.propose(history, self.tree))
            if len(tokens) != self.tree.num_nodes - 1:
                raise ValueError(
                    f"drafter returned {len(tokens)} tokens for a tree of "
                    f"{self.tree.num_nodes - 1} draft nodes"
                )
            return Draft(self.tree, mx.array(tokens, dtype=mx.int32))
        if self.tree.depth == 0:
            return Draft(self.tree, mx.zeros((0,), dtype=mx.int32))
        return rule.draft(self.tree, self.model.stream_logits_at(out, best))  # (depth, V) logits
