import mlx.core as mx
import numpy as np
import pytest

from ss_mlx.decode.tree import TreeSpec, default_tree, root_only


def test_hand_built_tree_buffers():
    # root; depth 1: (0), (1); depth 2: (0,0), (0,1), (1,0)
    t = TreeSpec([[1], [0, 1], [0], [1, 0], [0, 0]])
    assert t.paths == ((), (0,), (1,), (0, 0), (0, 1), (1, 0))
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2]
    assert t.ranks.tolist() == [0, 0, 1, 0, 1, 0]
    assert t.widths == (2, 2)
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(np.array(t.ancestor_mask), expected)
    assert t.path_table.tolist() == [
        [0, 0, 0],
        [0, 1, 1],
        [0, 2, 2],
        [0, 1, 3],
        [0, 1, 4],
        [0, 2, 5],
    ]


def test_chain_is_causal():
    t = TreeSpec.from_widths([1, 1, 1])
    np.testing.assert_array_equal(np.array(t.ancestor_mask), np.tril(np.ones((4, 4), bool)))
    assert t.depths.tolist() == [0, 1, 2, 3]


def test_cartesian_widths_and_budget():
    full = TreeSpec.from_widths([3, 2, 2])
    assert full.num_nodes == 1 + 3 + 6 + 12
    capped = TreeSpec.from_widths([3, 2, 2], node_budget=5)
    assert capped.num_nodes == 6
    # The cap keeps a prefix-closed set favouring rank 0 at every depth.
    assert (0,) in capped.paths and (0, 0) in capped.paths and (0, 0, 0) in capped.paths
    for p in capped.paths[1:]:
        assert p[:-1] in capped.paths
    # Measured rank probabilities steer the cap.
    probs = [[0.5, 0.45, 0.05], [0.9, 0.1], [0.9, 0.1]]
    steered = TreeSpec.from_widths([3, 2, 2], node_budget=4, rank_probs=probs)
    assert set(steered.paths[1:]) == {(0,), (1,), (0, 0), (1, 0)}


def test_root_only_and_default():
    r = root_only()
    assert r.num_nodes == 1 and r.depth == 0
    assert default_tree(1).depth == 1
    assert default_tree(4).widths == (2, 1, 1, 1) and default_tree(4).num_nodes == 9


@pytest.mark.parametrize(
    "text,nodes",
    [("2,2", 1 + 2 + 4), ("3,2,1:5", 6), ("[[0],[1],[0,0]]", 4)],
)
def test_parse(text, nodes):
    assert TreeSpec.parse(text).num_nodes == nodes


def test_parse_json_file(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text('{"widths": [2, 1], "node_budget": 2}')
    assert TreeSpec.parse(str(f)).num_nodes == 3


@pytest.mark.parametrize(
    "bad,msg",
    [
        ([[0, 0]], "no parent"),
        ([[0], [0]], "repeated"),
        ([[-1]], "non-negative"),
        ([[]], "non-empty"),
        ("x", "list of lists"),
    ],
)
def test_invalid_paths(bad, msg):
    with pytest.raises(ValueError, match=msg):
        TreeSpec(bad)


@pytest.mark.parametrize("text", ["0,1", "a,b", "2,2:0", "[[0],[2,0]]", "missing.json", ""])
def test_invalid_strings(text):
    with pytest.raises(ValueError, match="tree spec"):
        TreeSpec.parse(text)


def test_draft_tokens_follow_ranks():
    t = TreeSpec([[0], [1], [0, 0], [0, 1], [1, 0]])
    logits = mx.array(
        np.array(
            [
                [0.0, 5.0, 1.0, 3.0],  # stream 1: rank0 = 1, rank1 = 3
                [9.0, 0.0, 8.0, 1.0],  # stream 2: rank0 = 0, rank1 = 2
                [0.0, 0.0, 0.0, 9.0],  # stream 3 is not used by a depth-2 tree
            ],
            dtype=np.float32,
        )
    )
    assert t.draft_tokens(logits).tolist() == [1, 3, 0, 2, 0]
