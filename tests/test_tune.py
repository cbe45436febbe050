"""ss-mlx tune: tree selection on synthetic curves/acceptance, measurements, storage, CLI."""

import itertools
import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import save_tiny_model_dir, tiny_base, tiny_ss_model, write_prompts

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx import tuned
from ss_mlx.bench import tune
from ss_mlx.decode.tree import TreeSpec
from ss_mlx.generation import ss_generate_step
from ss_mlx.loader import load
from ss_mlx.prepare.init_model import init_model

PROBS = [[0.6, 0.2, 0.1, 0.05], [0.5, 0.2, 0.1, 0.05], [0.4, 0.2, 0.1, 0.05]]


def brute_force_order(probs, width):
    """Every node of the full product, in TreeSpec.from_widths's order."""
    nodes = [p for d in range(1, len(probs) + 1)
             for p in itertools.product(range(width), repeat=d)]
    return sorted(nodes, key=lambda p: (-math.prod(probs[d][r] for d, r in enumerate(p)),
                                        len(p), p))


def test_flat_cost_fills_the_free_rows():
    # GPU-like: up to 8 rows cost the same as one, then a step up.
    cost = [1.0] * 8 + [3.0] * 8
    choice = tune.select_tree(cost, PROBS, max_width=4)
    assert choice["num_nodes"] == 8
    assert sorted(map(tuple, choice["paths"])) == sorted(brute_force_order(PROBS, 4)[:7])
    spec = TreeSpec.from_dict(choice["tree"])
    assert sorted(spec.paths[1:]) == sorted(map(tuple, choice["paths"]))
    assert choice["tree"]["node_budget"] == 7
    want = 1 + sum(tune.node_acceptance(brute_force_order(PROBS, 4)[:7], rank_probs=PROBS))
    assert choice["expected_tokens_per_pass"] == pytest.approx(want)
    assert choice["candidates"][0]["score"] == choice["score"]


def test_steep_cost_keeps_one_draft_node():
    cost = [float(t) for t in range(1, 17)]  # every row costs a full pass
    choice = tune.select_tree(cost, PROBS)
    assert choice["tree"]["widths"] == [1] and choice["num_nodes"] == 2
    assert choice["score"] == pytest.approx(1.6 / 2)


def test_moderate_cost_picks_the_best_ratio():
    cost = [1.0 + 0.1 * (t - 1) for t in range(1, 33)]
    choice = tune.select_tree(cost, PROBS, max_width=4)
    order = brute_force_order(PROBS, 4)
    acc = np.cumsum(tune.node_acceptance(order[:31], rank_probs=PROBS))
    scores = [(1 + acc[b - 1]) / cost[b] for b in range(1, 32)]
    assert choice["num_nodes"] == int(np.argmax(scores)) + 2
    assert choice["score"] == pytest.approx(max(scores))


def test_max_width_and_max_nodes_are_respected():
    cost = [1.0] * 64
    choice = tune.select_tree(cost, PROBS, max_width=2, max_nodes=5)
    assert max(choice["tree"]["widths"]) <= 2 and choice["num_nodes"] == 6
    with pytest.raises(ValueError, match="T = 2"):
        tune.select_tree([1.0], PROBS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grown_trees_are_what_from_widths_builds(seed):
    rng = np.random.default_rng(seed)
    # Rounded probabilities make many ties: the tie-break must match too.
    probs = [sorted(np.round(rng.uniform(0, 1, 3), 1).tolist(), reverse=True) for _ in range(3)]
    order = tune.grow_tree(probs, 3, 30)
    assert order == brute_force_order(probs, 3)[:30]
    for b in range(1, 31):
        spec = TreeSpec.from_widths(tune.widths_of(order[:b]), b, probs)
        assert sorted(spec.paths[1:]) == sorted(order[:b])


def test_measured_ranks_keep_correlations():
    # Stream 2 is right exactly when stream 1's top choice is wrong.
    ranks = np.array([[0, 5], [0, 5], [1, 0], [1, 0]])
    paths = [(0,), (1,), (0, 0), (1, 0)]
    assert tune.node_acceptance(paths, ranks) == [0.5, 0.5, 0.0, 0.5]
    probs = tune.rank_probs_from_ranks(ranks, width=2, prior=0.0)
    assert probs == [[0.5, 0.5], [0.5, 0.0]]
    assert tune.node_acceptance(paths, rank_probs=probs) == [0.5, 0.5, 0.25, 0.25]
    assert tune.expected_tokens_per_pass(paths, ranks) == pytest.approx(2.5)


def test_rank_probs_smoothing_orders_unseen_ranks():
    probs = tune.rank_probs_from_ranks(np.array([[0], [0], [1], [9]]), width=4)
    p = probs[0]
    assert p[0] > p[1] > p[2] > p[3] > 0 and sum(p) < 1


def test_monotone_cost():
    assert tune.monotone_cost([1, 2, 3]) == [1, 2, 3]
    assert tune.monotone_cost([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert tune.monotone_cost([1.0, 0.8, 1.3]) == pytest.approx([0.9, 0.9, 1.3])


def test_verify_cost_measurement_shapes():
    model = tiny_ss_model("llama")
    for target in (model, model.base):
        curve = tune.measure_verify_cost(target, max_t=3, context=16, repeats=2, warmup=1,
                                         progress=False)
        assert curve["T"] == [1, 2, 3] and curve["relative"][0] == 1.0
        assert len(curve["samples"][2]) == 2 and curve["ar_seconds"] > 0
        # The SS model's record also prices passes without streams (lookup-only trees).
        assert ("plain_seconds" in curve) == (target is model)
    plain = tune.measure_verify_cost(model, max_t=3, context=16, repeats=2, warmup=1,
                                     progress=False)
    assert len(plain["plain_seconds"]) == 3 and all(s > 0 for s in plain["plain_seconds"])
    assert tuned.verify_cost_ok(plain)
    points = tuned.plain_cost_curve({"verify_cost": plain})
    assert points[0] == (1, 1.0) and [t for t, _ in points[:3]] == [1, 2, 3]
    assert all(b >= a for (_, a), (_, b) in zip(points, points[1:], strict=False))
    assert tuned.plain_cost_curve({"verify_cost": {**plain, "plain_seconds": None}}) is None
    assert not tuned.verify_cost_ok({**plain, "plain_seconds": [1.0, -1.0, 2.0]})


def test_stream_ranks_match_the_streams():
    model = tiny_ss_model("llama", num_streams=3)
    seq = np.random.default_rng(0).integers(0, 128, size=20).tolist()
    ranks = tune.stream_ranks(model, seq, 5)
    assert ranks.shape == (20 - 2 - 3 - 5 + 1, 3)
    _, streams = model.full_forward(mx.array(seq)[None])
    logits = np.array(streams[0])  # (L, G, V)
    for i, t in enumerate(range(5, 5 + ranks.shape[0])):
        for d in range(3):
            true = seq[t + 2 + d]
            assert ranks[i, d] == int((logits[t, d] > logits[t, d, true]).sum())
    assert tune.stream_ranks(model, seq[:6], 5).shape == (0, 3)


def test_measure_ranks_over_prompts():
    model = tiny_ss_model("llama", num_streams=2)
    ranks = tune.measure_ranks(model, [[1, 2, 3], [4, 5, 6, 7]], max_tokens=8, progress=False)
    # Positions from the last prompt token while token t+1+G exists: 8 + 1 - 1 - 2 = 6 each.
    assert ranks.shape == (12, 2)


def test_lookup_acceptance_by_match_length_and_depth():
    # seq 5 1 2 3 7 1 2 | 3 8. Predicting the 3: "1 2" matched 2 tokens back (bucket 2),
    # proposing 3 7 1 2: first right, then 7 vs 8 wrong. Predicting the 8: "1 2 3" matched 3
    # back (bucket 3), proposing 7: wrong.
    got = tune.lookup_acceptance([[5, 1, 2, 3, 7, 1, 2]], [[3, 8]])
    assert got["positions"] == 2
    assert got["first_by_match"] == [None, 1.0, 0.0, None, None, None]
    assert got["first_trials"] == [0, 1, 1, 0, 0, 0]
    assert got["continue_by_depth"] == [0.0] + [None] * 6


def test_chain_top1_is_conditional_on_the_earlier_streams():
    ranks = np.array([[0, 0], [0, 1], [1, 0], [0, 0]])
    assert tune.chain_top1(ranks) == [0.75, pytest.approx(2 / 3)]
    assert tune.chain_top1(np.array([[1, 0]])) == [0.0, None]


def test_cli_tunes_saves_and_the_tree_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    save_tiny_model_dir(tiny_base("llama"), tmp_path / "base")
    d = init_model(tmp_path / "base", tmp_path / "ss", streams=3, stream_layers=2)
    prompts = write_prompts(tmp_path / "p.jsonl")
    tune.main(["--model", str(d), "--prompts", str(prompts), "--n", "2", "--max-t", "4",
               "--max-tokens", "10", "--repeats", "1", "--context", "8", "--no-progress",
               "--plot", str(tmp_path / "t.png"), "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert "Chosen tree: widths" in out and "Saved:" in out
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["verify_cost"]["T"] == [1, 2, 3, 4]
    assert record["choice"]["num_nodes"] <= 4
    assert len(record["acceptance"]["rank_probs"]) == 3
    acc = record["acceptance"]
    assert len(acc["top1_chain"]) == 3 and len(acc["lookup"]["first_by_match"]) == 6
    tree = tuned.load_tuned_tree(d)
    assert tree == record["tree"]
    model, _ = load(d)
    prompt = mx.array([5, 6, 7, 8])
    ss = [s.token for s in ss_generate_step(prompt, model, tree=tree, max_tokens=12)]
    from mlx_lm.generate import generate_step

    assert ss == [t for t, _ in generate_step(prompt, model.base, max_tokens=12)]
    # The dynamic tree starts from what tune measured (a None: nothing measured, the default).
    from ss_mlx.drafters.hybrid import STREAM_TOP1_PRIOR
    from ss_mlx.generation import dynamic_drafter

    stats = dynamic_drafter(model)
    for d, p in enumerate(acc["top1_chain"]):
        want = STREAM_TOP1_PRIOR[min(d, len(STREAM_TOP1_PRIOR) - 1)] if p is None else min(p, 0.98)
        assert stats.stream_top1[d].value == pytest.approx(want)
