"""SSModel forward passes: mask semantics, tree vs sequence consistency, stream independence."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_ss_model

from ss_mlx.decode.cache import make_cache
from ss_mlx.decode.tree import TreeSpec

TOKENS = mx.array([[3, 17, 4, 99, 21, 8, 56, 2, 64, 10]])


def tree_pass(m, tokens, positions, mask, cache):
    """Main logits (T, V) and the logits of every stream at every node (T, G, V)."""
    out = m.tree_step(tokens, positions, mask, cache, m.num_streams)
    nodes = range(tokens.shape[0])
    return out.main_logits, mx.stack([m.stream_logits_at(out, mx.array(i)) for i in nodes])


def with_streams(model, seed):
    """The same trunk with different stream parameters."""
    from ss_mlx.loader import attach_streams, stream_shapes
    from ss_mlx.model.streams import random_stream_tensors

    t = random_stream_tensors(
        stream_shapes(model.base, model.cfg), seed=seed, embed_scale=1.0, adapter_scale=0.5
    )
    return attach_streams(model.base, model.cfg, t, "test")


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
def test_main_logits_ignore_stream_parameters(model_type):
    a = tiny_ss_model(model_type, adapter_rank=4)
    b = with_streams(a, seed=99)
    main_a, streams_a = a.full_forward(TOKENS)
    main_b, streams_b = b.full_forward(TOKENS)
    assert np.array_equal(np.array(main_a), np.array(main_b))  # bit-identical
    assert not np.allclose(np.array(streams_a), np.array(streams_b))
    # The same on a tree step with a cache.
    spec = TreeSpec.parse("2,2")
    tokens = mx.array([5, 6, 7, 8, 9, 10, 11])
    outs = []
    for m in (a, b):
        cache = make_cache(m.base)
        m.base(TOKENS, cache=cache)
        logits, _ = tree_pass(m, tokens, 10 + spec.depths, spec.ancestor_mask, cache)
        outs.append(np.array(logits))
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "phi3"])
def test_full_forward_main_equals_base(model_type):
    m = tiny_ss_model(model_type)
    main, streams = m.full_forward(TOKENS)
    assert streams.shape == (1, 10, 3, 128)
    np.testing.assert_allclose(np.array(main), np.array(m.base(TOKENS)), atol=1e-4)


@pytest.mark.parametrize("position_mode", ["shifted", "anchor"])
def test_chain_tree_step_equals_sequence_view(position_mode):
    """Per-node positions, tree mask and cached context reproduce the training-time view."""
    m = tiny_ss_model("llama", adapter_rank=4, position_mode=position_mode)
    ctx, chain = TOKENS[:, :6], TOKENS[0, 6:]
    cache = make_cache(m.base)
    m.base(ctx, cache=cache)
    spec = TreeSpec.parse("1,1,1")
    logits, stream_logits = tree_pass(m, chain, 6 + spec.depths, spec.ancestor_mask, cache)
    full_main, full_streams = m.full_forward(TOKENS)
    np.testing.assert_allclose(np.array(logits), np.array(full_main[0, 6:]), atol=1e-4)
    np.testing.assert_allclose(np.array(stream_logits), np.array(full_streams[0, 6:]), atol=1e-4)


def test_branching_tree_nodes_see_only_their_ancestors():
    m = tiny_ss_model("qwen2", adapter_rank=4)
    spec = TreeSpec([[0], [1], [0, 0], [1, 0]])
    tokens = mx.array([7, 20, 30, 21, 31])
    cache = make_cache(m.base)
    m.base(TOKENS[:, :5], cache=cache)
    logits, stream_logits = tree_pass(m, tokens, 5 + spec.depths, spec.ancestor_mask, cache)
    # Node (1,0) = token 31 under 30 under 7: same as the sequence [.., 7, 30, 31].
    seq = mx.concatenate([TOKENS[:, :5], mx.array([[7, 30, 31]])], axis=1)
    full_main, full_streams = m.full_forward(seq)
    np.testing.assert_allclose(np.array(logits[4]), np.array(full_main[0, 7]), atol=1e-4)
    np.testing.assert_allclose(
        np.array(stream_logits[4]), np.array(full_streams[0, 7]), atol=1e-4
    )


def test_stream_causality():
    m = tiny_ss_model("llama", adapter_rank=4)
    _, s1 = m.full_forward(TOKENS)
    changed = TOKENS.tolist()
    changed[0][7:] = [1, 1, 1]
    _, s2 = m.full_forward(mx.array(changed))
    # Streams at t <= 6 do not see tokens after t.
    np.testing.assert_array_equal(np.array(s1[0, :7]), np.array(s2[0, :7]))
    assert not np.allclose(np.array(s1[0, 7:]), np.array(s2[0, 7:]))


def test_stream_j_ignores_higher_streams():
    m = tiny_ss_model("llama", num_streams=3, adapter_rank=4)
    _, s1 = m.full_forward(TOKENS)
    tensors = m.streams.tensors()
    emb = np.array(tensors["stream_embeddings"])
    emb[2] += 5.0  # perturb P_3
    tensors["stream_embeddings"] = mx.array(emb)
    from ss_mlx.loader import attach_streams

    m2 = attach_streams(m.base, m.cfg, tensors, "test")
    _, s2 = m2.full_forward(TOKENS)
    np.testing.assert_array_equal(np.array(s1[:, :, :2]), np.array(s2[:, :, :2]))
    assert not np.allclose(np.array(s1[:, :, 2]), np.array(s2[:, :, 2]))


def test_exit_logits():
    m = tiny_ss_model("llama", prune_rank=8)
    z = m.exit_logits(TOKENS)
    assert z.shape == (1, 10, 128)
    with pytest.raises(ValueError, match="early-exit"):
        tiny_ss_model("llama").exit_logits(TOKENS)


def test_plain_tree_forward_matches_ss_main_rows():
    from ss_mlx.model.ss_model import plain_tree_forward

    m = tiny_ss_model("qwen3")
    spec = TreeSpec.parse("2,2")
    tokens = mx.array([5, 6, 7, 8, 9, 10, 11])
    outs = []
    for fn in (
        lambda c: tree_pass(m, tokens, 10 + spec.depths, spec.ancestor_mask, c)[0],
        lambda c: plain_tree_forward(m.base, tokens, 10 + spec.depths, spec.ancestor_mask, c)[0],
    ):
        cache = make_cache(m.base)
        m.base(TOKENS, cache=cache)
        outs.append(np.array(fn(cache)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


# Shallower than the model's 3 streams (only the first streams are computed), fused head, and
# separate head calls.
@pytest.mark.parametrize("tree", ["2", "1,1", "3,3,2"])
def test_shallow_tree_step_streams_match_all_streams(tree):
    m = tiny_ss_model("llama", adapter_rank=4)
    spec = TreeSpec.parse(tree)
    tokens = mx.arange(spec.num_nodes) + 5
    outs = []
    for fn in ("all", "shallow"):
        cache = make_cache(m.base)
        m.base(TOKENS, cache=cache)
        args = (tokens, 10 + spec.depths, spec.ancestor_mask, cache)
        if fn == "all":
            logits, stream_logits = tree_pass(m, *args)
            outs.append((logits, stream_logits[:, : spec.depth]))
        else:
            out = m.tree_step(*args, spec.depth)
            assert out.fused == (tree != "3,3,2")
            per_node = mx.stack([m.stream_logits_at(out, mx.array(i))
                                 for i in range(spec.num_nodes)])
            outs.append((out.main_logits, per_node))
    for a, b in zip(outs[0], outs[1], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_tree_step_without_streams_keeps_main_logits():
    m = tiny_ss_model("llama", adapter_rank=4)
    spec = TreeSpec.parse("2,1")
    tokens = mx.arange(spec.num_nodes) + 5
    outs = []
    for depth in (None, 0):
        cache = make_cache(m.base)
        m.base(TOKENS, cache=cache)
        args = (tokens, 10 + spec.depths, spec.ancestor_mask, cache)
        if depth is None:
            outs.append(np.array(tree_pass(m, *args)[0]))
        else:
            out = m.tree_step(*args, depth)
            assert out.streams.shape[:2] == (0, spec.num_nodes)  # (depth, T)
            outs.append(np.array(out.main_logits))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_dtype_cast_keeps_integer_stream_positions():
    """Casting every parameter (as half-precision conversion does) must not touch positions."""
    from conftest import cast_model
    from mlx.utils import tree_flatten

    m = tiny_ss_model("llama")
    assert all(v.dtype != mx.int32 for _, v in tree_flatten(m.parameters()))
    cast_model(m, mx.float16)
    main, _ = m.full_forward(TOKENS)
    assert main.dtype == mx.float16


def test_prepared_adapters_follow_replaced_parameters():
    """The adapters a pass uses (sliced, scaled, cast once per layer, stream count and dtype)
    are rebuilt when the parameters behind them are replaced."""
    a = tiny_ss_model("llama", adapter_rank=4)
    b = with_streams(a, seed=7)
    before = np.array(a.full_forward(TOKENS)[1])  # prepares a's adapters
    a.streams.stream_embeddings = b.streams.stream_embeddings
    for layer, mods in b.streams.adapters.items():
        a.streams.adapters[layer] = dict(mods)
    after = np.array(a.full_forward(TOKENS)[1])
    np.testing.assert_array_equal(after, np.array(b.full_forward(TOKENS)[1]))
    assert not np.allclose(before, after)
    # The activations' dtype decides the adapters' dtype; G slices the streams.
    layer = a.first_stream_layer
    for dtype in (mx.float32, mx.float16):
        rows = a.streams.rows(layer, 1, dtype, 2)
        assert all(t.dtype == dtype for pair in rows.adapters.values() for t in pair)
        assert all(pair[0].shape[0] == 2 for pair in rows.adapters.values())
    # Scaled once: a's `a` matrices carry the adapter scale (0.5 in the tiny config).
    name, (a_raw, _) = next(iter(a.streams.adapters[layer].items()))
    ready = a.streams.rows(layer, 1, mx.float32).adapters[name][0]
    np.testing.assert_allclose(np.array(ready), 0.5 * np.array(a_raw), rtol=1e-6)
