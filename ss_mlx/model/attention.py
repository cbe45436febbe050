"""Pure array code for tree/stream attention: per-token RoPE and the masks of eq. 2."""

import mlx.core as mx
import mlx.nn as nn


def rope_at(rope: nn.Module, x: mx.array, positions: mx.array) -> mx.array:
    """Apply an mlx-lm RoPE module at arbitrary per-token positions.

    `mx.fast.rope` takes one offset per batch element, so each token is moved onto the batch
    axis and given its own offset.
    x: (1, H, L, Dh); positions: (L,) int. Returns (1, H, L, Dh).
    """
    xt = x.transpose(2, 1, 0, 3)  # (L, H, 1, Dh)
    return rope(xt, offset=positions).transpose(2, 1, 0, 3)


def stream_mask(main_mask: mx.array, num_streams: int) -> mx.array:
    """The attention mask of a stream layer over [main rows ; stream rows].

    main_mask: (T, T) bool, main row i may see main row k (tree ancestors + self, or causal).
    Returns (T + G*T, T + G*T) bool, rows/columns ordered [main_0..main_{T-1}, stream 1 of
    nodes 0..T-1, stream 2 of nodes 0..T-1, ...] (stream-major: the rows of one stream are
    contiguous, so its adapter applies to them without a transpose). Main rows never see
    streams; stream j of node i sees what main row i sees plus streams 1..j of node i.
    """
    T, G = main_mask.shape[0], num_streams
    top = mx.concatenate([main_mask, mx.zeros((T, G * T), dtype=mx.bool_)], axis=1)
    from_main = mx.tile(main_mask, (G, 1))  # (G*T, T)
    lower = mx.tril(mx.ones((G, G), dtype=mx.bool_))[:, None, :, None]  # (G, 1, G, 1)
    same_node = mx.eye(T, dtype=mx.bool_)[None, :, None, :]  # (1, T, 1, T)
    among_streams = (lower & same_node).reshape(G * T, G * T)
    bottom = mx.concatenate([from_main, among_streams], axis=1)
    return mx.concatenate([top, bottom], axis=0)


def with_context(mask: mx.array, context_len: int) -> mx.array:
    """Prefix a mask with `context_len` always-visible cached positions.

    mask: (R, K) bool -> (R, context_len + K) bool.
    """
    if context_len == 0:
        return mask
    ones = mx.ones((mask.shape[0], context_len), dtype=mx.bool_)
    return mx.concatenate([ones, mask], axis=1)
