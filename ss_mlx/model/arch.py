"""Decoder-block forward with explicit positions and masks, over an unmodified mlx-lm block.

mlx-lm blocks take positions from `cache.offset` (one scalar) and build causal masks themselves;
tree verification needs a per-token position and an arbitrary mask, and stream layers need rows
that are never cached. This module re-composes a block from the block's own submodules
(norms, projections, RoPE, MLP) instead of copying mlx-lm model files. One function serves
llama/mistral, qwen2, qwen3 (q/k norms) and phi3 (fused qkv and gate_up).
"""

from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from .attention import rope_at


class StreamRows(NamedTuple):
    """How the stream rows of a hidden-state matrix are laid out, and their adapters.

    Rows [n_main, n_main + G*T) are streams, stream-major (stream j's rows for every node, then
    stream j + 1's). `adapters` maps a module path (e.g. "self_attn.q_proj") to (a (G, in, r),
    b (G, r, out)), `a` already scaled by the adapter scale and both in the activations' dtype
    (`StreamParams.rows`).
    """

    n_main: int
    num_streams: int
    adapters: dict[str, tuple[mx.array, mx.array]]


def _stream_part(x: mx.array, rows: StreamRows | None) -> mx.array | None:
    """The stream rows of x (1, L, in) as (G, T, in), when any adapter will read them."""
    if rows is None or not rows.adapters:
        return None
    return x[0, rows.n_main :].reshape(rows.num_streams, -1, x.shape[-1])


def _linear(
    module: nn.Module, x: mx.array, xs: mx.array | None, name: str, rows: StreamRows | None
) -> mx.array:
    """module(x), plus the stream-only low-rank adapter of `name` on the stream rows xs (G, T,
    in) of x (`_stream_part`; one slice serves the modules that share an input)."""
    y = module(x)  # (1, L, out)
    if xs is None or name not in rows.adapters:
        return y
    a, b = rows.adapters[name]
    delta = ((xs @ a) @ b).reshape(1, -1, y.shape[-1])  # (1, G*T, out)
    # Zero rows in front of the streams' delta: one add over every row instead of splitting y
    # and joining it again (main rows + 0.0 stay exactly what they were).
    return y + mx.pad(delta, [(0, 0), (rows.n_main, 0), (0, 0)])


def _qkv(attn: nn.Module, x: mx.array, rows: StreamRows | None):
    xs = _stream_part(x, rows)
    if hasattr(attn, "qkv_proj"):
        qkv = _linear(attn.qkv_proj, x, xs, "self_attn.qkv_proj", rows)
        hd = qkv.shape[-1] // (attn.n_heads + 2 * attn.n_kv_heads)
        q_size, kv_size = attn.n_heads * hd, attn.n_kv_heads * hd
        return mx.split(qkv, [q_size, q_size + kv_size], axis=-1)
    return (
        _linear(attn.q_proj, x, xs, "self_attn.q_proj", rows),
        _linear(attn.k_proj, x, xs, "self_attn.k_proj", rows),
        _linear(attn.v_proj, x, xs, "self_attn.v_proj", rows),
    )


def attention(
    attn: nn.Module,
    x: mx.array,
    positions: mx.array,
    mask: mx.array,
    cache: Any | None,
    rows: StreamRows | None,
) -> mx.array:
    """Self-attention of one block.

    x: (1, L, D) with L = n_main (+ T*G stream rows); positions: (L,); mask: (L, P + L) bool over
    [cached context ; main rows ; stream rows]. Only the main rows' K/V go into `cache`.
    """
    B, L, _ = x.shape
    n_main = L if rows is None else rows.n_main
    q, k, v = _qkv(attn, x, rows)
    q = q.reshape(B, L, attn.n_heads, -1)
    k = k.reshape(B, L, attn.n_kv_heads, -1)
    v = v.reshape(B, L, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (1, H, L, Dh)
    q = rope_at(attn.rope, q, positions)
    k = rope_at(attn.rope, k, positions)
    k_main, v_main = k[:, :, :n_main], v[:, :, :n_main]
    if cache is not None:
        k_main, v_main = cache.update_and_fetch(k_main, v_main)  # (1, Hkv, P + n_main, Dh)
    sdpa = mx.fast.scaled_dot_product_attention
    if n_main < L:
        # Main rows attend over [context ; main] alone: a masked-out key still enters the
        # weighted sum as 0 * v, and a stream row's v may be inf (huge but finite stream
        # parameters overflow), so main rows must never see stream K/V at all.
        # Stream K/V join this call only; they are never cached.
        ctx = k_main.shape[2]
        k_all = mx.concatenate([k_main, k[:, :, n_main:]], axis=2)
        v_all = mx.concatenate([v_main, v[:, :, n_main:]], axis=2)
        main_mask = mask[:n_main, :ctx]
        out_main = sdpa(q[:, :, :n_main], k_main, v_main, scale=attn.scale, mask=main_mask)
        out_streams = sdpa(q[:, :, n_main:], k_all, v_all, scale=attn.scale, mask=mask[n_main:])
        out = mx.concatenate([out_main, out_streams], axis=2)
    else:
        out = sdpa(q, k_main, v_main, scale=attn.scale, mask=mask)
    out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return _linear(attn.o_proj, out, _stream_part(out, rows), "self_attn.o_proj", rows)


def mlp(module: nn.Module, x: mx.array, rows: StreamRows | None) -> mx.array:
    if rows is None or not any(n.startswith("mlp.") for n in rows.adapters):
        return module(x)
    xs = _stream_part(x, rows)
    if hasattr(module, "gate_up_proj"):
        gate_up = _linear(module.gate_up_proj, x, xs, "mlp.gate_up_proj", rows)
        gate, up = mx.split(gate_up, 2, axis=-1)
    else:
        gate = _linear(module.gate_proj, x, xs, "mlp.gate_proj", rows)
        up = _linear(module.up_proj, x, xs, "mlp.up_proj", rows)
    act = swiglu(gate, up)
    return _linear(module.down_proj, act, _stream_part(act, rows), "mlp.down_proj", rows)


def block(
    layer: nn.Module,
    x: mx.array,
    positions: mx.array,
    mask: mx.array,
    cache: Any | None,
    rows: StreamRows | None = None,
) -> mx.array:
    """One pre-norm decoder block (the structure shared by every supported family)."""
    h = x + attention(layer.self_attn, layer.input_layernorm(x), positions, mask, cache, rows)
    return h + mlp(layer.mlp, layer.post_attention_layernorm(h), rows)
