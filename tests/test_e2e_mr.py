"""E2E MR synthesis (ss_mlx.bench.e2e_mr) and its use in benchmarks/paper_recipe.py (issue 14).

The checks on the real dev and test MRs skip when ../shared/data/e2e is absent; the error cases
use small CSVs written here.
"""

import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from ss_mlx.bench.datasets import DATASETS, DatasetError, data_root
from ss_mlx.bench.e2e_mr import (
    ATTRIBUTES,
    MRStats,
    mr_prompts,
    parse_mr,
    read_mrs,
    render_mr,
    synthesize_e2e,
    synthesize_mrs,
)

E2E = data_root() / "e2e"
DEV, TEST = E2E / "devset.csv", E2E / "testset_w_refs.part1.csv"
needs_data = pytest.mark.skipif(not (DEV.is_file() and TEST.is_file()), reason=f"{E2E} is absent")
N = 4000


def _csv(path, mrs):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows((mr, "A reference.") for mr in mrs)
    return path


@pytest.fixture(scope="module")
def dev():
    return read_mrs(DEV)


@pytest.fixture(scope="module")
def synth():
    return synthesize_e2e(N, seed=0)


@needs_data
def test_dev_round_trip(dev):
    with DEV.open(encoding="utf-8", newline="") as f:
        texts = list(dict.fromkeys(r["mr"].strip() for r in csv.DictReader(f)))
    assert len(texts) == len(dev) == 547
    assert [render_mr(parse_mr(t)) for t in texts] == texts
    # Dev lists attributes in the canonical order, name first.
    assert all(mr[0][0] == "name" for mr in dev)
    assert all([ATTRIBUTES.index(a) for a, _ in mr] == sorted(ATTRIBUTES.index(a) for a, _ in mr)
               for mr in dev)  # fmt: skip


@needs_data
def test_synthesized_mrs_are_new_unique_and_drawn_from_dev(dev, synth):
    mrs, test = synth.mrs, set(read_mrs(TEST))
    assert len(mrs) == len(set(mrs)) == N
    assert not set(mrs) & set(dev) and not set(mrs) & test
    stats = MRStats.from_mrs(dev)
    dev_sets = {attrs for attrs, _ in stats.sets}
    for mr in mrs:
        d = dict(mr)
        assert tuple(d) in dev_sets  # an attribute set dev has, in dev's order
        assert all(v in stats.values[a] for a, v in mr)
        assert d.get("near") != d["name"]
        if "priceRange" in d and "customer rating" in d:
            assert (d["priceRange"], d["customer rating"]) in stats.price_rating
        assert parse_mr(render_mr(mr)) == mr
    assert synth.possible == stats.possible() > synth.excluded + N
    assert synth.excluded >= len(dev)


@needs_data
def test_attribute_sets_follow_dev(dev, synth):
    dev_freq = Counter(tuple(a for a, _ in mr) for mr in dev)
    got = Counter(tuple(a for a, _ in mr) for mr in synth.mrs)
    for attrs, c in dev_freq.items():
        # Within 3 percentage points of dev's share (n = 4000: sd < 0.8 points); the smallest
        # sets run out of new MRs sooner, so they may fall short, never exceed.
        assert got[attrs] / N <= c / len(dev) + 0.03
        if c >= 30:
            assert got[attrs] / N >= c / len(dev) - 0.03


@needs_data
def test_deterministic_for_a_seed(synth):
    again = synthesize_e2e(N, seed=0)
    assert again.mrs == synth.mrs and again.to_dict() == synth.to_dict()
    assert synthesize_e2e(50, seed=1).mrs != synth.mrs[:50]
    assert synthesize_e2e(50, seed=0).mrs == synth.mrs[:50]  # a prefix of the larger draw
    prompts = mr_prompts(synth.mrs[:2])
    assert prompts[0] == DATASETS["e2e"].template.format(mr=render_mr(synth.mrs[0]))


def test_synthesis_excludes_and_limits(tmp_path):
    dev = read_mrs(_csv(tmp_path / "dev.csv", [
        "name[A], food[Thai], near[B]", "name[B], food[Thai], near[A]",
        "name[A], priceRange[cheap], customer rating[5 out of 5]",
        "name[B], priceRange[high], customer rating[1 out of 5]",
    ]))  # fmt: skip
    stats = MRStats.from_mrs(dev)
    # {name, food, near}: near must differ from name, so 2; price/rating: the 2 seen pairs x 2.
    assert stats.possible() == 2 + 4
    test = [parse_mr("name[A], priceRange[high], customer rating[1 out of 5]")]
    syn = synthesize_mrs(dev, 1, seed=0, exclude=test)
    assert syn.mrs == [parse_mr("name[B], priceRange[cheap], customer rating[5 out of 5]")]
    assert (syn.excluded, syn.test_excluded) == (5, 1)
    with pytest.raises(DatasetError, match="^asked for 2 synthetic E2E MRs, but .* only 1 new"):
        synthesize_mrs(dev, 2, exclude=test)
    assert synthesize_mrs(dev, 0).mrs == []


@pytest.mark.parametrize("mr, msg", [
    ("name[A], food[Thai", "expected 'attribute\\[value\\]' at character 9"),
    ("name[A]; food[Thai]", "expected ',' at character 8"),
    ("name[A], cuisine[Thai]", "unknown attribute 'cuisine'"),
    ("name[A], name[B]", "attribute 'name' appears twice"),
    ("name[A], food[ ]", "empty value for 'food'"),
    ("name[A],", "expected 'attribute\\[value\\]' at character 9"),
])  # fmt: skip
def test_bad_mr_is_a_one_line_error_naming_file_and_line(tmp_path, mr, msg):
    path = _csv(tmp_path / "dev.csv", ["name[A], food[Thai]", mr])
    with pytest.raises(DatasetError) as e:
        read_mrs(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}:3: ")
    assert re.search(msg, text)


def test_read_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("meaning,ref\nx,y\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="expected a CSV with an 'mr' column"):
        read_mrs(bad)
    with pytest.raises(DatasetError, match="no such file"):
        read_mrs(tmp_path / "absent.csv")
    with pytest.raises(DatasetError, match="E2E MR synthesis reads .*devset.csv, which does not"):
        synthesize_e2e(1, root=tmp_path)
    # Out-of-order attributes parse into the canonical order.
    assert render_mr(parse_mr("near[B], name[A]")) == "name[A], near[B]"


# ---- benchmarks/paper_recipe.py ---------------------------------------------------------------


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    sys.modules.pop("paper_recipe", None)
    import paper_recipe

    return paper_recipe


@needs_data
def test_recipe_distill_prompts(recipe):
    from ss_mlx.bench.tasks import get_task, train_rows

    rows = train_rows(get_task("e2e"))
    dev_prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    prompts, report = recipe.distill_prompts("e2e", rows, 20)
    assert prompts[: len(dev_prompts)] == dev_prompts and len(prompts) == len(dev_prompts) + 20
    assert prompts[len(dev_prompts) :] == mr_prompts(synthesize_e2e(20, recipe.SYNTH_SEED).mrs)
    assert report["synthesized"] == 20 and report["distill_prompts"] == len(prompts)
    assert recipe.distill_prompts("e2e", rows, 0) == (dev_prompts, None)
    assert recipe.PLANS["e2e"]["synth_mrs"] > 0 and recipe.PLANS["wikisql"]["synth_mrs"] == 0


def test_recipe_continues_a_partial_distillation_and_refuses_a_stale_one(recipe, tmp_path):
    out, prompt_file = tmp_path / "distilled.jsonl", tmp_path / "distill_prompts.jsonl"
    rows = [{"prompt": p, "completion": "c"} for p in ("p1", "old")]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "p2", "comp')
    assert recipe._prepare_distill("e2e", out, prompt_file, ["p1", "p2"]) == out
    # Rows of prompts no longer asked for and the torn last line go; distill answers the rest.
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["p1"]
    assert [json.loads(x)["prompt"] for x in prompt_file.read_text().splitlines()] == ["p1", "p2"]
    out.with_name(out.name + ".done").write_text("ok\n")
    assert recipe._prepare_distill("e2e", out, prompt_file, ["p1", "p2"]) == out
    with pytest.raises(SystemExit, match="answers other prompts than this plan's"):
        recipe._prepare_distill("e2e", out, prompt_file, ["p1"])
