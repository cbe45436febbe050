"""The one tree-decoding loop, driven by a plain mlx-lm model and hand-made draft sources."""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_base
from mlx_lm.generate import generate_step

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx.decode.cache import make_cache
from ss_mlx.decode.loop import decode
from ss_mlx.decode.sampling import SamplerConfig
from ss_mlx.decode.tree import TreeSpec, root_only
from ss_mlx.decode.verify import AcceptRule, Draft
from ss_mlx.model.ss_model import plain_tree_forward

GREEDY = AcceptRule("greedy", SamplerConfig())


def ar_tokens(base, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), base, max_tokens=n)]


class ChainDrafter:
    """Drafts a chain of `depth` tokens: the true continuation where `truth` has it, corrupted
    from a random depth on when `rng` is given, and nothing where the truth runs out."""

    has_distribution = False

    def __init__(self, base, truth, prompt_len, depth, rng=None):
        self.base, self.truth, self.prompt_len, self.depth, self.rng = (
            base, truth, prompt_len, depth, rng)
        self.chain = TreeSpec([[0] * d for d in range(1, depth + 1)])

    def first_draft(self, history):
        return self._draft(history)

    def forward(self, tokens, positions, ancestor_mask, cache):
        logits, _ = plain_tree_forward(self.base, tokens, positions, ancestor_mask, cache)
        return logits, None

    def to_sync(self, out, best):
        return []

    def draft(self, history, out, best, rule):
        return self._draft(history)

    def _draft(self, history):
        done = len(history) - self.prompt_len
        future = list(self.truth[done : done + self.depth])
        if len(future) < self.depth:
            return Draft(root_only(), mx.zeros((0,), dtype=mx.int32))
        if self.rng is not None:
            cut = int(self.rng.integers(0, self.depth + 1))
            future = future[:cut] + [(t + 1) % 128 for t in future[cut:]]
        return Draft(self.chain, mx.array(future, dtype=mx.int32))


def run(base, prompt, drafter, n, **kw):
    return list(decode(mx.array(prompt), drafter, GREEDY, max_tokens=n, **kw))


def test_true_drafts_are_fully_accepted():
    base = tiny_base("llama", seed=2)
    prompt = list(range(3, 15))
    expected = ar_tokens(base, prompt, 34)
    got = run(base, prompt, ChainDrafter(base, expected, len(prompt), 4), 30)
    assert [s.token for s in got] == expected[:30]
    # The first pass already verifies a 4-token draft: every pass accepts 4 and emits 5.
    assert [s.accepted for s in got] == [4] * 30
    assert [s.step for s in got] == [i // 5 for i in range(30)]
    assert [s.from_draft for s in got[:5]] == [True] * 4 + [False]


@pytest.mark.parametrize("seed", range(4))
def test_partially_wrong_drafts_stay_lossless(seed):
    base = tiny_base("qwen2", seed=seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 128, size=int(rng.integers(1, 10))).tolist()
    expected = ar_tokens(base, prompt, 60)
    got = run(base, prompt, ChainDrafter(base, expected, len(prompt), 3, rng), 50)
    assert [s.token for s in got] == expected[:50], f"seed {seed}"
    assert len({s.accepted for s in got}) >= 2  # several acceptance lengths were exercised


def mlx_lm_cache_after(base, prompt, n):
    cache = make_cache(base)
    list(generate_step(mx.array(prompt), base, max_tokens=n, prompt_cache=cache))
    return cache


def assert_same_cache(ours, theirs):
    assert ours[0].offset == theirs[0].offset
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :]),
                                   np.array(b.keys[..., : b.offset, :]), atol=1e-5)
        np.testing.assert_allclose(np.array(a.values[..., : a.offset, :]),
                                   np.array(b.values[..., : b.offset, :]), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6, 9, 10, 11])
def test_cache_matches_mlx_lm_after_max_tokens(n):
    """Stopping anywhere in a pass (inside the accepted drafts, at the bonus token) leaves the
    cache exactly as mlx-lm leaves it: the prompt and every emitted token."""
    base = tiny_base("llama", seed=5)
    prompt = [4, 9, 2, 7]
    expected = ar_tokens(base, prompt, 20)
    cache = make_cache(base)
    got = run(base, prompt, ChainDrafter(base, expected, len(prompt), 4), n, prompt_cache=cache)
    assert [s.token for s in got] == expected[:n]
    assert_same_cache(cache, mlx_lm_cache_after(base, prompt, n))


@pytest.mark.parametrize("stop_after", [1, 3, 5, 7])
def test_cache_matches_mlx_lm_when_closed_early(stop_after):
    base = tiny_base("phi3", seed=1)
    prompt = [11, 3, 8]
    expected = ar_tokens(base, prompt, 20)
    cache = make_cache(base)
    gen = decode(mx.array(prompt), ChainDrafter(base, expected, len(prompt), 3), GREEDY,
                 max_tokens=100, prompt_cache=cache)
    got = [s.token for s in itertools.islice(gen, stop_after)]
    gen.close()
    assert got == expected[:stop_after]
    assert_same_cache(cache, mlx_lm_cache_after(base, prompt, stop_after))


def test_two_turns_with_a_kept_cache_equal_one_run_on_the_history():
    """mlx-lm-style multi-turn: keep the cache, pass only the new turn's tokens."""
    base = tiny_base("qwen3", seed=4)
    turn1, turn2 = [5, 6, 7, 8], [40, 41, 42]
    cache = make_cache(base)
    out1 = [s.token for s in run(base, turn1, ChainDrafter(base, [], 4, 2), 9,
                                 prompt_cache=cache)]
    out2 = [s.token for s in run(base, turn2, ChainDrafter(base, [], 3, 2), 12,
                                 prompt_cache=cache)]
    history = turn1 + out1 + turn2
    assert out2 == ar_tokens(base, history, 12)
    # ... and the same cache as mlx-lm after the same two turns.
    ar_cache = make_cache(base)
    list(generate_step(mx.array(turn1), base, max_tokens=9, prompt_cache=ar_cache))
    list(generate_step(mx.array(turn2), base, max_tokens=12, prompt_cache=ar_cache))
    assert_same_cache(cache, ar_cache)


def test_no_limit_and_zero_tokens():
    base = tiny_base("llama", seed=3)
    prompt = [1, 2, 3]
    expected = ar_tokens(base, prompt, 40)
    gen = decode(mx.array(prompt), ChainDrafter(base, expected, 3, 2), GREEDY, max_tokens=-1)
    assert [s.token for s in itertools.islice(gen, 40)] == expected
    gen.close()
    cache = make_cache(base)
    assert run(base, prompt, ChainDrafter(base, expected, 3, 2), 0, prompt_cache=cache) == []
    assert cache[0].offset == len(prompt)  # as mlx-lm: the whole prompt is in the cache


class FailingDrafter(ChainDrafter):
    def forward(self, tokens, positions, ancestor_mask, cache):
        if tokens.shape[0] > 1:  # the first pass with a draft: interrupted after two layers
            for c in cache[:2]:
                junk = mx.zeros_like(c.keys[..., : tokens.shape[0], :])
                c.update_and_fetch(junk, junk)
            raise KeyboardInterrupt
        return super().forward(tokens, positions, ancestor_mask, cache)


def test_an_interrupted_pass_leaves_a_consistent_cache():
    """Ctrl-C in the middle of a pass (some layers appended rows, others not) rewinds every
    layer to the committed rows, so the cache is usable for the next turn."""
    base = tiny_base("llama", seed=6)
    prompt = [3, 1, 4, 1, 5]
    expected = ar_tokens(base, prompt, 10)
    cache = make_cache(base)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for s in decode(mx.array(prompt), FailingDrafter(base, expected, 5, 2), GREEDY,
                        max_tokens=10, prompt_cache=cache):
            got.append(s.token)
    assert got == expected[: len(got)]
    assert {c.offset for c in cache} == {len(prompt) + len(got)}
    assert_same_cache(cache, mlx_lm_cache_after(base, prompt, len(got)))
