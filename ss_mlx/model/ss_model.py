"""SSModel: an mlx-lm model plus speculative streams in its top layers."""

from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..config import SSConfig
from . import arch
from .attention import with_context
from .streams import StreamParams, insert_streams


def _head(base: nn.Module, h: mx.array) -> mx.array:
    """Final norm + LM head of an mlx-lm model. h: (..., D) -> (..., V)."""
    h = base.model.norm(h)
    if hasattr(base, "lm_head"):
        return base.lm_head(h)
    return base.model.embed_tokens.as_linear(h)


def plain_tree_forward(
    base: nn.Module,
    tokens: mx.array,
    positions: mx.array,
    ancestor_mask: mx.array,
    cache: list[Any],
) -> tuple[mx.array, mx.array]:
    """A tree pass through any supported mlx-lm model, without streams.

    For draft sources other than streams (prompt lookup, Medusa heads, a draft model) that
    reuse the same tree verification. tokens, positions: (T,); ancestor_mask: (T, T).
    Returns main logits (T, V) and final hidden states (T, D) (before the final norm).
    """
    h = base.model.embed_tokens(tokens[None])  # (1, T, D)
    mask = with_context(ancestor_mask, cache[0].offset if cache else 0)
    for layer, c in zip(base.model.layers, cache or [None] * len(base.model.layers), strict=True):
        h = arch.block(layer, h, positions, mask, c)
    return _head(base, h[0]), h[0]


# One fused head call (main rows + every node's stream rows) beats two weight reads of the LM head
# while the extra rows are few; above this many rows the matmul costs more than the read saved.
FUSED_HEAD_MAX_ROWS = 24


class TreeOutput(NamedTuple):
    """One tree pass: main logits (T, V) and the streams' draft source for any node, either
    their logits (depth, T, V) when the head was fused, or their hidden states (depth, T, D)
    (stream-major, as the pass computes them; `SSModel.stream_logits_at` picks one node's)."""

    main_logits: mx.array
    streams: mx.array
    fused: bool


class SSModel(nn.Module):
    """Wraps a loaded mlx-lm model (`base`) without modifying it.

    The base model still runs ordinary prefill (`base(tokens, cache=cache)`); `tree_step` runs
    one verify+speculate pass; `full_forward` runs every position with its streams (the training
    view, used by the parity gate and tests).
    """

    def __init__(self, base: nn.Module, cfg: SSConfig, streams: StreamParams):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.streams = streams
        self.num_layers = len(base.layers)
        self.first_stream_layer = self.num_layers - cfg.stream_layers
        self.model_type = base.model_type
        self.path = None  # the model directory, when loaded from one
        # A plain list, not an mx.array attribute: arrays on a Module are parameters, and a
        # dtype cast of the parameters would turn these integer positions into floats.
        self._offsets = cfg.stream_position_offsets()

    @property
    def inner(self) -> nn.Module:
        return self.base.model

    @property
    def num_streams(self) -> int:
        return self.cfg.num_streams

    def head(self, h: mx.array) -> mx.array:
        """Final norm + LM head. h: (..., D) -> (..., V)."""
        return _head(self.base, h)

    def stream_head(self, h: mx.array) -> mx.array:
        """Final norm + the streams' LM head. h: (..., D) -> (..., V)."""
        return self._draft_only(self.head(h))

    def _draft_only(self, logits: mx.array) -> mx.array:
        """Stream logits (..., V) with -inf outside the streams' draft vocabulary, if they have
        one. The full head computes them (one weight read, fused with the main rows'): a copy
        of its draft-vocabulary rows would cost more memory than the small matmul saves."""
        draft = self.streams.draft
        return logits if draft is None else logits + draft.mask(logits.shape[-1], logits.dtype)

    def _forward(
        self,
        tokens: mx.array,
        positions: mx.array,
        main_mask: mx.array,
        cache: list[Any] | None,
        num_streams: int | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Run T main tokens (a tree or a sequence) and their first G streams through the model.

        tokens, positions: (T,); main_mask: (T, T) bool (tree ancestors + self, or causal).
        G = `num_streams` (default: all). Stream j sees only streams 1..j of its node, so
        streams 1..G come out the same whether or not the later ones are computed.
        Returns main hidden states (1, T, D) and stream hidden states (1, G*T, D), stream-major
        (row j*T + t: stream j of token t), both before the final norm.
        """
        T = tokens.shape[0]
        G = self.num_streams if num_streams is None else num_streams
        if not 0 <= G <= self.num_streams:
            raise ValueError(f"num_streams must be in [0, {self.num_streams}], got {G}")
        context = cache[0].offset if cache else 0
        cache = cache or [None] * self.num_layers
        h = self.inner.embed_tokens(tokens[None])  # (1, T, D)
        mask = with_context(main_mask, context)
        layers = self.inner.layers
        if G == 0:
            for i in range(self.num_layers):
                h = arch.block(layers[i], h, positions, mask, cache[i])
            return h, h[:, :0]
        for i in range(self.first_stream_layer):
            h = arch.block(layers[i], h, positions, mask, cache[i])

        x, all_pos, mask = insert_streams(
            h, positions, main_mask, self.streams.stream_embeddings[:G], self._offsets, context
        )  # (1, T + T*G, D), (T + T*G,), (T + T*G, context + T + T*G)
        for i in range(self.first_stream_layer, self.num_layers):
            rows = self.streams.rows(i, T, x.dtype, G)
            x = arch.block(layers[i], x, all_pos, mask, cache[i], rows)
        return x[:, :T], x[:, T:]

    def tree_step(
        self,
        tokens: mx.array,
        positions: mx.array,
        ancestor_mask: mx.array,
        cache: list[Any],
        depth: int,
    ) -> TreeOutput:
        """One verify+speculate pass over a flattened draft tree.

        The tree's main K/V are appended to `cache` tentatively (see `cache.commit_path`). Only
        the first `depth` streams are computed (a tree `depth` deep drafts from no others), and
        for small trees their LM head is fused with the main rows' (one read of the head).
        tokens, positions: (T,); ancestor_mask: (T, T) bool.
        """
        main, streams = self._forward(tokens, positions, ancestor_mask, cache, depth)
        T = tokens.shape[0]
        if depth > 0 and T * (1 + depth) <= FUSED_HEAD_MAX_ROWS:
            logits = self.head(mx.concatenate([main[0], streams[0]], axis=0))  # (T + depth*T, V)
            draft = self._draft_only(logits[T:]).reshape(depth, T, -1)  # (depth, T, V)
            return TreeOutput(logits[:T], draft, True)
        D = main.shape[-1]
        return TreeOutput(self.head(main[0]), streams[0].reshape(depth, T, D), False)

    def stream_logits_at(self, out: TreeOutput, node: mx.array) -> mx.array:
        """The draft logits (depth, V) of the streams of one node of a tree pass."""
        at = out.streams[:, node]  # (depth, V) or (depth, D)
        return at if out.fused else self.stream_head(at)

    def full_forward(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """Every position with its streams, no cache (the training-time computation).

        tokens: (1, L). Returns main logits (1, L, V) and stream logits (1, L, G, V).
        """
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(f"full_forward expects tokens of shape (1, L), got {tokens.shape}")
        L = tokens.shape[1]
        causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
        main, streams = self._forward(tokens[0], mx.arange(L), causal, None)
        G = self.num_streams
        streams = streams[0].reshape(G, L, -1).transpose(1, 0, 2)  # (L, G, D)
        return self.head(main), self.stream_head(streams)[None]

    def exit_logits(self, tokens: mx.array) -> mx.array:
        """Early-exit logits at the stream insertion point (needs `prune_rank` > 0).

        tokens: (1, L) -> (1, L, V).
        """
        if self.streams.prune is None:
            raise ValueError("this model has no early-exit adapter (prune_rank is 0)")
        L = tokens.shape[1]
        causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
        h = self.inner.embed_tokens(tokens)
        positions = mx.arange(L)
        for i in range(self.first_stream_layer):
            h = arch.block(self.inner.layers[i], h, positions, causal, None)
        a, b = (t.astype(h.dtype) for t in self.streams.prune)
        return self.head(h + (h @ a) @ b)
