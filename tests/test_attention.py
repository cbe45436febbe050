import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ss_mlx.model.attention import rope_at, stream_mask, with_context


def test_rope_at_equals_rope_on_a_chain():
    rope = nn.RoPE(16, traditional=False, base=10000.0)
    x = mx.random.normal((1, 4, 7, 16), key=mx.random.key(0))
    ours = rope_at(rope, x, mx.arange(7) + 11)
    ref = rope(x, offset=11)
    np.testing.assert_allclose(np.array(ours), np.array(ref), atol=1e-6)


def test_rope_at_repeated_positions_are_per_token():
    rope = nn.RoPE(8)
    x = mx.random.normal((1, 2, 3, 8), key=mx.random.key(1))
    ours = rope_at(rope, x, mx.array([5, 6, 6]))
    np.testing.assert_allclose(
        np.array(ours[:, :, 2]), np.array(rope(x[:, :, 2:3], offset=6))[:, :, 0], atol=1e-6
    )


def test_stream_mask_literal():
    # Two nodes (node 1 child of node 0), two streams.
    main = mx.array([[1, 0], [1, 1]], dtype=mx.bool_)
    m = np.array(stream_mask(main, 2)).astype(int)
    # columns: main0 main1, then stream-major: s1(node0) s1(node1) s2(node0) s2(node1)
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],  # main 0
            [1, 1, 0, 0, 0, 0],  # main 1: never sees streams
            [1, 0, 1, 0, 0, 0],  # stream 1 of node 0: node 0 and itself
            [1, 1, 0, 1, 0, 0],  # stream 1 of node 1: ancestors + node 1, itself
            [1, 0, 1, 0, 1, 0],  # stream 2 of node 0: node 0, streams 1..2 of node 0
            [1, 1, 0, 1, 0, 1],  # stream 2 of node 1
        ]
    )
    np.testing.assert_array_equal(m, expected)


def test_with_context():
    m = with_context(mx.array([[True, False]]), 3)
    assert m.tolist() == [[True, True, True, True, False]]
    assert with_context(mx.array([[True]]), 0).tolist() == [[True]]
