"""KV-cache handling of tree steps: compaction of the accepted branch, rewinding, validation."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_ss_model
from mlx_lm.models.cache import RotatingKVCache

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx.decode.cache import check_cache, commit_path, make_cache, make_prompt_cache, rewind
from ss_mlx.decode.tree import TreeSpec

TOKENS = mx.array([[3, 17, 4, 99]])


def test_commit_path_compacts_accepted_rows():
    m = tiny_ss_model("llama")
    cache = make_cache(m.base)
    m.base(TOKENS, cache=cache)
    spec = TreeSpec([[0], [1], [1, 0]])
    tokens = mx.array([5, 6, 7, 8])
    m.tree_step(tokens, 4 + spec.depths, spec.ancestor_mask, cache, m.num_streams)
    before = np.array(cache[0].keys[..., :8, :])
    commit_path(cache, 4, spec.path_table[3].tolist(), keep=3)  # root -> (1,) -> (1,0)
    after = np.array(cache[0].keys)
    assert cache[0].offset == 7
    np.testing.assert_array_equal(after[..., :4, :], before[..., :4, :])
    np.testing.assert_array_equal(after[..., 4:7, :], before[..., [4, 6, 7], :])
    # A chain accepted in node order is already in place; the padding past `keep` is ignored.
    commit_path(cache, 4, [0, 1, 1], keep=2)
    assert cache[0].offset == 6
    np.testing.assert_array_equal(np.array(cache[0].keys), after)


def test_rewind_only_moves_offsets_back():
    m = tiny_ss_model("llama")
    cache = make_prompt_cache(m)  # an SS model or its base both work
    m.base(TOKENS, cache=cache)
    rewind(cache, 2)
    assert [c.offset for c in cache] == [2] * len(cache)
    rewind(cache, 3)  # never forward
    assert [c.offset for c in cache] == [2] * len(cache)


def test_untrimmable_caches_are_refused():
    with pytest.raises(ValueError, match="trimmable"):
        check_cache([RotatingKVCache(64)])
