"""The dynamic hybrid draft tree: lossless for any source, and sized by what pays."""

import zlib

import mlx.core as mx
import numpy as np
import pytest
from conftest import MODEL_TYPES, tiny_ss_model
from mlx_lm.generate import generate_step

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx.decode.loop import decode
from ss_mlx.decode.sampling import SamplerConfig
from ss_mlx.decode.verify import AcceptRule
from ss_mlx.drafters.hybrid import HybridConfig, HybridDrafter, HybridStats, match_bucket
from ss_mlx.generation import ss_generate_step
from ss_mlx.tuned import DEFAULT_ROW_COST, cost_at

GREEDY = AcceptRule("greedy", SamplerConfig())


def ar_tokens(model, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model.base, max_tokens=n)]


class OracleDrafter(HybridDrafter):
    """The context source replaced: the true continuation (`right`), or tokens that are never
    the model's (`wrong`), or a mix decided per step by `rng`."""

    def __init__(self, model, truth, prompt_len, mode, rng=None, **kw):
        super().__init__(model, **kw)
        self.truth, self.prompt_len, self.mode, self.rng = truth, prompt_len, mode, rng

    def context_matches(self, history):
        done = len(history) - self.prompt_len
        future = list(self.truth[done : done + 6])
        if not future:
            return []
        wrong = [(t + 1 + i) % 128 for i, t in enumerate(future)]
        mode = self.mode
        if mode == "mixed":
            mode = "right" if self.rng.random() < 0.5 else "wrong"
        if mode == "wrong":
            return [(3, wrong)]
        cut = len(future)
        if self.rng is not None:
            cut = int(self.rng.integers(0, len(future) + 1))
        return [(3, future[:cut] + wrong[cut:])]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("mode", ["lookup", "right", "wrong", "mixed"])
def test_hybrid_is_lossless(model_type, mode):
    seed = zlib.crc32(f"{model_type}/{mode}".encode())
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    model = tiny_ss_model(model_type, num_streams=3, adapter_rank=int(rng.choice([0, 4])),
                          stream_layers=int(rng.integers(1, 4)), seed=int(rng.integers(1000)))
    motif = rng.integers(0, 128, size=5).tolist()
    prompt = rng.integers(0, 128, size=int(rng.integers(1, 6))).tolist() + motif * 2
    n = int(rng.integers(30, 60))
    truth = ar_tokens(model, prompt, n + 8)
    if mode == "lookup":
        drafter = HybridDrafter(model)
    else:
        drafter = OracleDrafter(model, truth, len(prompt), mode, rng)
    got = [s.token for s in decode(mx.array(prompt), drafter, GREEDY, max_tokens=n)]
    assert got == truth[:n], f"seed {seed}, prompt {prompt}"


def test_hopeless_drafts_give_root_only_passes():
    """A source that is always wrong and random streams: after a short warm-up the tree is the
    root alone, without streams, i.e. mlx-lm's own one-token step (cost curve of this CPU)."""
    model = tiny_ss_model("llama", seed=1)
    prompt = [5, 6, 7, 8]
    truth = ar_tokens(model, prompt, 130)
    # No clock: on a tiny model every pass costs about the same, which would make wide hopeless
    # trees pay (the measured-cost test below covers timing).
    drafter = OracleDrafter(model, truth, len(prompt), "wrong",
                            config=HybridConfig(explore_every=0), cost_curve=DEFAULT_ROW_COST,
                            clock=None)  # fmt: skip
    steps = list(decode(mx.array(prompt), drafter, GREEDY, max_tokens=120))
    assert [s.token for s in steps] == truth[:120]
    late = [s for s in steps if s.step >= 20]
    assert all(s.tree_size == 1 for s in late), [s.tree_size for s in late]
    assert drafter.stream_depth == 0


def test_an_oracle_source_grows_a_deep_tree():
    model = tiny_ss_model("qwen2", seed=2)
    prompt = [9, 1, 9, 1]
    truth = ar_tokens(model, prompt, 130)
    drafter = OracleDrafter(model, truth, len(prompt), "right", cost_curve=DEFAULT_ROW_COST)
    steps = list(decode(mx.array(prompt), drafter, GREEDY, max_tokens=120))
    assert [s.token for s in steps] == truth[:120]
    passes = steps[-1].step + 1
    assert len(steps) / passes > 4.0  # 6-deep chains, nearly all accepted
    assert max(s.draft_depth for s in steps) == 6
    assert {s.source for s in steps if s.from_draft} >= {"lookup"}


def test_exploration_keeps_measuring_the_streams():
    model = tiny_ss_model("llama", seed=3)
    prompt = [1, 2, 3]
    drafter = HybridDrafter(model, HybridConfig(explore_every=4))
    list(decode(mx.array(prompt), drafter, GREEDY, max_tokens=60))
    tested = drafter.stream_top1[0].trials - 4.0  # minus the prior's weight
    assert tested >= 60 // 4 // 2


def test_dynamic_is_the_default_and_reports_sources():
    model = tiny_ss_model("qwen3", seed=4)
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    got = list(ss_generate_step(mx.array(prompt), model, max_tokens=40))
    assert [s.token for s in got] == ar_tokens(model, prompt, 40)
    sources = {s.source for s in got if s.from_draft}
    assert sources and sources <= {"lookup", "streams", "lookup+streams"}
    assert {s.source for s in got if not s.from_draft} == {""}


def test_bad_config():
    with pytest.raises(ValueError, match="max_nodes"):
        HybridConfig(max_nodes=0)
    with pytest.raises(ValueError, match="max_nodes"):
        HybridConfig(max_nodes=10_000)


class FixedMatch(HybridDrafter):
    """One context match of a set length, always proposing the same six tokens."""

    length = 1

    def context_matches(self, history):
        return [(self.length, [1, 2, 3, 4, 5, 6])]


def test_lookup_confidence_rises_with_the_match_length_and_learns_per_length():
    assert [match_bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 32)] == [0, 1, 2, 3, 3, 4, 4, 5, 5]
    model = tiny_ss_model("llama", seed=3)
    stats = HybridStats(model.num_streams, lookup_depth=8)
    priors = [r.value for r in stats.lookup_first]
    assert priors == sorted(priors) and priors[0] < priors[-1] < 1.0
    # No clock: priced by the curve alone, as measured pass times would make it machine-dependent.
    drafter = FixedMatch(model, config=HybridConfig(explore_every=0), stats=stats,
                         cost_curve=DEFAULT_ROW_COST, clock=None)
    drafter.length = 16  # a copied span: worth a deep chain
    assert drafter.first_draft([0, 1, 2]).tree.num_nodes >= 4
    # Chance 1-gram matches that keep failing lose confidence: a root-only pass, while the
    # long matches, counted apart, keep theirs.
    for _ in range(40):
        stats.lookup_first[0].add(0.0)
    drafter.length = 1
    assert drafter.first_draft([0, 1, 2]).tree.num_nodes == 1
    drafter.length = 20
    assert drafter.first_draft([0, 1, 2]).tree.num_nodes >= 4


def test_lookup_only_passes_are_priced_by_the_plain_curve():
    model = tiny_ss_model("llama", seed=4)
    cheap = ((1, 1.0), (2, 1.01), (4, 1.02), (8, 1.04), (64, 1.5))
    dear = ((1, 1.0), (2, 3.0), (4, 6.0), (8, 12.0), (64, 96.0))
    config = HybridConfig(explore_every=0)
    for plain, deep in ((cheap, True), (dear, False)):
        drafter = FixedMatch(model, config=config, cost_curve=DEFAULT_ROW_COST, plain_curve=plain,
                             clock=None)
        drafter.length = 3
        draft = drafter.first_draft([0, 1, 2])
        assert (draft.tree.num_nodes >= 4) == deep, plain


def test_measured_priors_replace_the_defaults_entry_by_entry():
    from ss_mlx.drafters.hybrid import LOOKUP_CONTINUE_PRIOR, LOOKUP_FIRST_PRIOR, STREAM_TOP1_PRIOR

    stats = HybridStats(4, 5, stream_prior=[0.3, None, 1.5, True],
                        lookup_first=[0.1, 0.2, "x", 0.4, 0.5, 0.99],
                        lookup_continue=[0.6, None])  # fmt: skip
    last = STREAM_TOP1_PRIOR[min(3, len(STREAM_TOP1_PRIOR) - 1)]  # the 4th, or the last for later
    assert [r.value for r in stats.stream_top1] == pytest.approx(
        [0.3, STREAM_TOP1_PRIOR[1], STREAM_TOP1_PRIOR[2], last]
    )
    assert [r.value for r in stats.lookup_first] == pytest.approx(
        [0.1, 0.2, LOOKUP_FIRST_PRIOR[2], 0.4, 0.5, 0.98]  # a measured 0.99 is not certainty
    )
    assert len(stats.lookup_rate) == 5
    assert [r.value for r in stats.lookup_rate[1:]] == pytest.approx(
        [0.6, *LOOKUP_CONTINUE_PRIOR[1:4]]
    )
    default = HybridStats(4, 5)
    assert [r.value for r in default.lookup_first] == pytest.approx(list(LOOKUP_FIRST_PRIOR))


class PricedOracle(OracleDrafter):
    """The true continuation as the context source, on a fake clock: a pass over T nodes takes
    price(T, streams) seconds."""

    def __init__(self, *a, price, **kw):
        self.now, self.price = 0.0, price
        super().__init__(*a, clock=lambda: self.now, **kw)

    def forward(self, tokens, positions, ancestor_mask, cache):
        out = super().forward(tokens, positions, ancestor_mask, cache)
        self.now += self.price(tokens.shape[0], self.stream_depth)
        return out


@pytest.mark.parametrize("dear", [False, True])
def test_measured_pass_times_correct_the_cost_curve(dear):
    """Right drafts, priced by a curve like this CPU's: drafted while passes cost what the
    curve says, dropped for root-only passes once timing shows each row costing two whole
    passes (a root-only pass at least every `probe_every` is the reference)."""
    model = tiny_ss_model("llama", seed=5)
    prompt = [7, 3, 7, 3]
    truth = ar_tokens(model, prompt, 130)
    curve = ((1, 1.0), (2, 1.3), (8, 1.9), (64, 6.0))  # like this 2-core CPU's

    def price(T, streams):  # seconds; dear: a pass of k rows takes 2k root passes' time
        return 2.0 * T * (1 + streams) - 1.0 if dear else cost_at(curve, T * (1 + streams))

    drafter = PricedOracle(model, truth, len(prompt), "right", price=price, cost_curve=curve,
                           config=HybridConfig(explore_every=0, probe_every=8))  # fmt: skip
    steps = list(decode(mx.array(prompt), drafter, GREEDY, max_tokens=120))
    assert [s.token for s in steps] == truth[:120]
    first_root = min(s.step for s in steps if s.tree_size == 1)
    assert first_root <= 8  # the timing reference: a root-only pass at least every 8
    late = [s for s in steps if s.step >= 12]
    if dear:
        # Priced out after a pass, then tried again only as the root-only passes relax the
        # correction toward the curve (and priced out again).
        drafted = {s.step for s in late if s.tree_size > 1}
        assert len(drafted) <= 3 and len(late) > 40, sorted(drafted)
        assert drafter.stats.cost_excess.value > 3.0  # 12 extra root passes for a predicted 0.8
    else:
        assert len(steps) / (steps[-1].step + 1) > 3.0
        assert drafter.stats.cost_excess.value == pytest.approx(1.0, abs=0.05)
        roots = [s.step for s in late if s.tree_size == 1]
        assert roots and all(b - a >= 8 for a, b in zip(roots, roots[1:], strict=False))


def test_output_memory_matches_within_outputs_and_stays_bounded():
    from ss_mlx.drafters.lookup import OutputMemory

    mem = OutputMemory(min_n=2, max_n=3, max_tokens=40)
    mem.add([1, 2, 3, 4, 5])
    mem.add([9, 2, 3, 7, 8])
    # Newest first; the continuation stops at its output's end; the match length counts the
    # agreeing tokens before the n-gram.
    assert mem.matches([2, 3], depth=4, limit=5) == [(2, [7, 8]), (2, [4, 5])]
    assert mem.matches([0, 1, 2, 3], depth=2, limit=5) == [(3, [4, 5]), (2, [7, 8])]
    assert mem.matches([5, 9], depth=3, limit=5) == []  # never across two outputs
    assert mem.matches([2, 3], depth=4, limit=1) == [(2, [7, 8])]
    for k in range(20):  # far past the budget: the oldest outputs go
        mem.add([100 + k, 101 + k, 102 + k])
    assert len(mem.tokens) <= 40
    assert mem.matches([2, 3], depth=4, limit=5) == []
    assert mem.matches([119, 120], depth=2, limit=5) == [(2, [121])]
    # The rebuilt index points into the kept tokens only.
    assert all(0 < e <= len(mem.tokens) for ends in mem.index._ends.values() for e in ends)


def test_earlier_outputs_draft_later_generations_losslessly():
    """The same formulaic request again: its second answer is drafted from the first (source
    "memory"), and every generation is still exactly the base's."""
    model = tiny_ss_model("llama", seed=6)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 128, size=6).tolist() for _ in range(3)]
    runs = []
    for prompt in [*prompts, prompts[0], prompts[1]]:
        steps = list(ss_generate_step(mx.array(prompt), model, max_tokens=40))
        assert [s.token for s in steps] == ar_tokens(model, prompt, 40)
        runs.append(steps)
    first, again = runs[0], runs[3]
    assert any("memory" in s.source for s in again if s.from_draft)
    assert len(again) / (again[-1].step + 1) > 2 * len(first) / (first[-1].step + 1)
    assert model._hybrid_stats.memory.tokens  # kept on the model, across generations


def test_seeded_sampling_ignores_what_earlier_requests_taught():
    """A seed gives the same sample again even after greedy requests moved the model's shared
    acceptance rates (which drafts get verified decides which random draws are used)."""
    model = tiny_ss_model("llama", seed=7)
    sampler = SamplerConfig(temp=0.9)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]

    def sample():
        mx.random.seed(7)
        return [s.token for s in ss_generate_step(mx.array(prompt), model, sampler=sampler,
                                                  max_tokens=40)]  # fmt: skip

    first = sample()
    for p in ([1, 2, 3, 1, 2, 3, 1, 2], [9, 8, 7, 6, 9, 8, 7, 6]):
        list(ss_generate_step(mx.array(p), model, max_tokens=60))
    priors = HybridStats(model.num_streams, HybridConfig().lookup_depth)
    learned = model._hybrid_stats
    assert [r.value for r in learned.stream_top1] != [r.value for r in priors.stream_top1]
    assert sample() == first


def test_no_streams_when_capped_at_zero():
    model = tiny_ss_model("llama", seed=8)
    prompt = [2, 3, 4, 2, 3, 4, 2, 3]
    drafter = HybridDrafter(model, HybridConfig(max_stream_depth=0, explore_every=2))
    depths = []
    forward = drafter.forward

    def spy(tokens, positions, mask, cache):
        depths.append(drafter.stream_depth)
        return forward(tokens, positions, mask, cache)

    drafter.forward = spy
    got = [s.token for s in decode(mx.array(prompt), drafter, GREEDY, max_tokens=30)]
    assert got == ar_tokens(model, prompt, 30)
    assert depths and set(depths) == {0}
    with pytest.raises(ValueError, match="max_stream_depth"):
        HybridConfig(max_stream_depth=-1)
