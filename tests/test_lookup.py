"""Prompt lookup as a draft source: drafting logic and losslessness."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_base
from mlx_lm.generate import generate_step

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx.decode.cache import make_cache
from ss_mlx.drafters.lookup import (
    MATCH_CAP,
    LookupConfig,
    NgramIndex,
    TreeCache,
    lookup_generate_step,
    trie_tree,
)


def ar_tokens(base, prompt, n):
    return [t for t, _ in generate_step(mx.array(prompt), base, max_tokens=n)]


def repetitive_prompt(rng, vocab=128):
    """Random tokens with repeats in them, so that n-grams recur."""
    motif = rng.integers(0, vocab, size=6).tolist()
    noise = rng.integers(0, vocab, size=10).tolist()
    return noise[:5] + motif + noise[5:] + motif[:4]


def test_ngram_index_prefers_long_and_recent_matches():
    idx = NgramIndex(1, 3)
    idx.extend([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3])
    # Suffix (2, 3): the 3-gram (5, 2, 3) never occurred before; the 2-gram did, twice: the
    # most recent match first, then the earlier one, then 1-gram matches of (3,) add nothing new.
    assert idx.continuations(2, 5) == [[7, 5], [9, 1]]
    assert idx.continuations(3, 1) == [[7, 5, 2]]
    idx.extend([7])
    # (2, 3, 7) occurred once: its continuation is preferred over shorter-n matches.
    assert idx.continuations(2, 2)[0] == [5, 2]


def test_ngram_index_reports_how_far_the_match_reaches_back():
    idx = NgramIndex(1, 2)
    # The suffix (4, 5) matched as a 2-gram, but the five tokens before the 9 all agree.
    idx.extend([1, 2, 3, 4, 5, 9, 7, 1, 2, 3, 4, 5])
    assert idx.matches(2, 1) == [(5, [9, 7])]
    # A chance 1-gram match reaches back one token only.
    idx = NgramIndex(1, 2)
    idx.extend([8, 5, 9, 6, 5])
    assert idx.matches(1, 1) == [(1, [9])]
    # Counted up to MATCH_CAP.
    idx = NgramIndex(1, 2)
    idx.extend(list(range(50)) + [99] + list(range(50)))
    assert idx.matches(1, 1) == [(MATCH_CAP, [99])]


def test_ngram_index_excludes_the_suffix_itself_and_dedupes():
    idx = NgramIndex(1, 2)
    idx.extend([4, 4, 4, 4])
    assert idx.continuations(3, 5) == [[4], [4, 4], [4, 4, 4]]
    assert NgramIndex(1, 3).continuations(3, 2) == []


def test_trie_tree_merges_shared_prefixes():
    spec, tokens = trie_tree([[5, 6, 7], [5, 8], [9]], TreeCache())
    # Root children: 5 (rank 0), 9 (rank 1); under 5: 6 (rank 0), 8 (rank 1); under (5,6): 7.
    assert spec.paths[1:] == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert tokens.tolist() == [5, 9, 6, 8, 7]
    cache = TreeCache()
    a, _ = trie_tree([[1, 2]], cache)
    b, _ = trie_tree([[3, 4]], cache)
    assert a is b  # one TreeSpec per shape


def test_lookup_config_validation():
    with pytest.raises(ValueError, match="min_ngram"):
        LookupConfig(min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError, match="max_depth"):
        LookupConfig(max_depth=0)


CONFIGS = [LookupConfig(), LookupConfig(num_candidates=3, max_depth=4),
           LookupConfig(max_ngram=1, max_depth=2)]


@pytest.mark.parametrize("model_type, configs", [("llama", CONFIGS), ("qwen3", CONFIGS[1:2]),
                                                 ("phi3", CONFIGS[:1])])
def test_lookup_is_lossless(model_type, configs):
    base = tiny_base(model_type, seed=1)
    rng = np.random.default_rng(0)
    accepted = 0
    for _ in range(2):
        prompt = repetitive_prompt(rng)
        expected = ar_tokens(base, prompt, 24)
        for config in configs:
            got = list(lookup_generate_step(mx.array(prompt), base, config=config,
                                            max_tokens=24))
            assert [s.token for s in got] == expected, config
            accepted += sum(s.from_draft for s in got)
            # Pass bookkeeping: passes in order, never more accepted than drafted.
            steps = [s.step for s in got]
            assert steps == sorted(steps) and all(s.accepted <= s.draft_depth for s in got)
    assert accepted > 0  # random models repeat themselves; lookup catches some of it


def test_stop_and_continue_from_cache():
    base = tiny_base("llama", seed=3)
    rng = np.random.default_rng(5)
    prompt = repetitive_prompt(rng)
    expected = ar_tokens(base, prompt, 30)
    cache = make_cache(base)
    first = [s.token for s in lookup_generate_step(mx.array(prompt), base, max_tokens=13,
                                                   prompt_cache=cache)]
    assert first == expected[:13]
    # The cache holds the prompt and all emitted tokens, as mlx-lm's does; to continue the same
    # sequence, step back one token and feed it again.
    assert cache[0].offset == len(prompt) + 13
    for c in cache:
        c.offset -= 1
    rest = [s.token for s in lookup_generate_step(mx.array(first[-1:]), base, max_tokens=17,
                                                  prompt_cache=cache)]
    assert first + rest == expected


def test_bad_arguments():
    base = tiny_base("llama")
    with pytest.raises(ValueError, match="empty"):
        list(lookup_generate_step(mx.array([], dtype=mx.int32), base))
    with pytest.raises(ValueError, match="max_tokens"):
        list(lookup_generate_step(mx.array([1, 2]), base, max_tokens=2.5))
    with pytest.raises(ValueError, match="1-D"):
        list(lookup_generate_step(mx.array([[1, 2]]), base))
    assert list(lookup_generate_step(mx.array([1, 2]), base, max_tokens=0)) == []
