"""benchmarks/paper_recipe.py (issue 14): budget, validation split, and the carry between jobs.

No training here: the trainer and distill subprocesses are replaced by fakes that write what
they would (checkpoints in the trainer's format, a curve, an output folder). The checks on the
real E2E / WikiSQL files skip when ../shared/data is absent.
"""

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ss_mlx_convert.learning_curve import CURVE_FILE, read_curve  # noqa: E402
from ss_mlx_convert.stash import stashed_step  # noqa: E402
from ss_mlx_convert.train_state import (  # noqa: E402
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,  # noqa: E402
)

from ss_mlx.bench.datasets import data_root  # noqa: E402
from ss_mlx.bench.e2e_mr import mr_prompts, parse_mr, read_mrs  # noqa: E402
from ss_mlx.bench.tasks import get_task, train_rows  # noqa: E402

DATA = data_root()
needs_data = pytest.mark.skipif(
    not ((DATA / "e2e" / "devset.csv").is_file() and (DATA / "wikisql" / "valid.jsonl").is_file()),
    reason=f"{DATA} lacks the E2E / WikiSQL files",
)


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    sys.modules.pop("paper_recipe", None)
    import paper_recipe

    return paper_recipe


def test_budget_is_ten_times_the_first_attempt_with_curves(recipe, tmp_path):
    first = {"e2e": (120, 200), "wikisql": (60, 80)}  # (steps, draft steps) of issue 7's runs
    for name, (steps, draft) in first.items():
        plan = recipe.PLANS[name]
        assert plan["steps"] >= 10 * steps and plan["draft_steps"] >= 10 * draft
        t = tmp_path / name
        by_name = {s.name: s for s in recipe.plan_steps(name, t, tmp_path / "base", [])}
        for step in recipe.TRAIN_STEPS:
            cmd = by_name[step].cmd
            arg = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: B023, E731
            assert arg("--autocast") == "bfloat16" and int(arg("--eval-every")) > 0
            assert int(arg("--max-steps")) == (plan["draft_steps"] if step == "draft"
                                               else plan["steps"])  # fmt: skip
            own = step in ("medusa", "ss-lossless", "draft")
            assert arg("--eval") == str(t / ("distilled_valid.jsonl" if own else "valid.jsonl"))
        distill = by_name["distill-valid"].cmd
        assert distill[distill.index("--prompts") + 1] == str(t / "valid_prompts.jsonl")
        assert list(by_name).index("distill-valid") < list(by_name).index("medusa")


@needs_data
def test_validation_split_is_deterministic_disjoint_and_kept_out_of_synthesis(recipe):
    rows = train_rows(get_task("e2e"))
    train, valid, held = recipe.validation_split("e2e", rows)
    assert recipe.validation_split("e2e", rows) == (train, valid, held)  # fixed by the seed
    valid_prompts = {r["prompt"] for r in valid}
    assert len(held) == len(valid_prompts) == recipe.VALID_MRS
    assert valid_prompts == set(mr_prompts(held))
    assert not valid_prompts & {r["prompt"] for r in train}
    assert len(train) + len(valid) == len(rows)  # every reference row of a held-out MR
    # The synthesized distillation prompts neither repeat a held-out MR nor use a value that
    # only held-out MRs have: the recombination sees the training MRs alone.
    prompts, report = recipe.distill_prompts("e2e", train, 300, held)
    assert report["held_out_dev_mrs"] == recipe.VALID_MRS and report["excluded_test"] == 0
    assert not set(prompts) & valid_prompts
    kept = set(read_mrs(DATA / "e2e" / "devset.csv")) - set(held)
    values = {pair for mr in kept for pair in mr}
    synthesized = prompts[len({r["prompt"] for r in train}) :]
    for p in synthesized:
        line = next(x for x in p.splitlines() if "name[" in x)
        mr = parse_mr(line[line.index("name[") :].strip())
        assert set(mr) <= values
    train_w, valid_w, held_w = recipe.validation_split("wikisql", train_rows(get_task("wikisql")))
    assert held_w == [] and len(valid_w) == 100
    assert not {r["prompt"] for r in valid_w} & {r["prompt"] for r in train_w}


# ---- the carry between jobs, on a fake trainer ------------------------------------------------


class FakeTrainer:
    """Stands in for `ss-mlx train`: checkpoints every 25 steps (the trainer's format), a curve
    record every 50, the output at the end; stops (a killed job) at `stop`."""

    def __init__(self) -> None:
        self.stop: int | None = None
        self.starts: list[tuple[int, bool]] = []

    def __call__(self, cmd: list[str]) -> int:
        out = Path(cmd[cmd.index("--out") + 1])
        total = int(cmd[cmd.index("--max-steps") + 1])
        found = list_checkpoints(out / "checkpoints") if "--resume" in cmd else []
        step = load_checkpoint(found[-1])["step"] if found else 0
        self.starts.append((step, "--resume" in cmd))
        curve = read_curve(out / CURVE_FILE) if step and (out / CURVE_FILE).is_file() else []
        curve = [r for r in curve if r["step"] <= step]
        while step < total:
            if step == self.stop:
                return 137
            step += 1
            if step % 50 == 0 or step == total:
                curve.append({"step": step, "main_loss": 1.0 / step, "tokens_per_pass": 1.0})
                (out / CURVE_FILE).write_text("".join(json.dumps(r) + "\n" for r in curve))
            if step % 25 == 0 or step == total:
                save_checkpoint(out / "checkpoints", step, _state(step), keep=1)
        (out / "config.json").write_text("{}\n")
        return 0


def _state(step: int) -> dict:
    w = torch.full((4, 3), float(step))
    return {
        "step": step,
        "trainable": {"w": w},
        "optimizer": {
            "state": {
                0: {"step": torch.tensor(float(step)), "exp_avg": w / 10, "exp_avg_sq": w / 1e6}
            },
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        },  # fmt: skip
        "scheduler": {"last_epoch": step, "base_lrs": [1e-3]},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "args": {"data": "train.jsonl"},
    }


def test_training_step_carries_across_jobs(recipe, tmp_path, monkeypatch):
    fake = FakeTrainer()
    monkeypatch.setattr(recipe.subprocess, "call", fake)
    work, stash = tmp_path / "work", tmp_path / "data" / "paper"
    run = work / "e2e" / "ss_t"
    step = recipe.Step("ss", run, ["ss-mlx", "train", "--out", str(run), "--max-steps", "100"])
    kept = stash / "e2e" / "ss"

    fake.stop = 60  # the first job ends at step 60: its newest checkpoint is step 50
    with pytest.raises(SystemExit, match=r"\[e2e/ss\] failed with exit code 137"):
        recipe.run_step(work, "e2e", step, stash)
    recipe.stash_task("e2e", work, stash)
    assert stashed_step(kept / "resume") == 50 and not (kept / "final").exists()
    recipe.stash_task("e2e", work, stash)  # again: step 50 is stashed already
    shutil.rmtree(work)  # the job's work/ is gone

    fake.stop = None  # the next job restores step 50 and finishes
    recipe.run_step(work, "e2e", step, stash)
    # Trained from step 50, then its output rewritten from the kept fp16 final parameters (the
    # same model a later job rebuilds).
    assert fake.starts[-2:] == [(50, True), (100, True)]
    restored = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert float(restored["trainable"]["w"][0, 0]) == 100.0
    assert step.done.exists() and (run / "config.json").is_file()
    assert [r["step"] for r in read_curve(run / CURVE_FILE)] == [50, 100]  # one curve
    assert not (kept / "resume").exists() and stashed_step(kept / "final") == 100
    final = json.loads((kept / "final" / "stash.json").read_text())
    assert final["moments"] is False and final["state"]["optimizer"]["state"] == {}
    runs = json.loads((stash / "runs.json").read_text())
    assert runs["e2e/ss"]["resumed_from_step"] == 50
    assert json.loads((work / "runs.json").read_text()) == runs

    recipe.run_step(work, "e2e", step, stash)  # done: nothing runs
    assert len(fake.starts) == 3

    shutil.rmtree(work)  # a later job rebuilds the finished step's output without training
    before = (kept / "final" / "stash.json").read_bytes()
    recipe.run_step(work, "e2e", step, stash)
    assert fake.starts[-1] == (100, True) and step.done.exists()
    assert (run / "config.json").is_file()
    assert [r["step"] for r in read_curve(run / CURVE_FILE)] == [50, 100]
    assert json.loads((stash / "runs.json").read_text()) == runs  # the training's record stays
    assert (kept / "final" / "stash.json").read_bytes() == before
    restored = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert float(restored["trainable"]["w"][0, 0]) == 100.0

    # A finished step that kept nothing (an older recipe) gets its final stash from --stash.
    shutil.rmtree(kept)
    recipe.stash_task("e2e", work, stash)
    assert stashed_step(kept / "final") == 100


def test_damaged_stash_stops_the_step_with_one_line(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe.subprocess, "call", FakeTrainer())
    work, stash = tmp_path / "work", tmp_path / "stash"
    run = work / "e2e" / "medusa_t"
    step = recipe.Step("medusa", run, ["train", "--out", str(run), "--max-steps", "50"])
    (stash / "e2e" / "medusa" / "resume").mkdir(parents=True)
    (stash / "e2e" / "medusa" / "resume" / "stash.json").write_text("{")
    with pytest.raises(SystemExit, match=r"^\[e2e/medusa\] .*stash.json: damaged") as e:
        recipe.run_step(work, "e2e", step, stash)
    assert "\n" not in str(e.value)


def test_distillation_is_kept_as_token_ids_and_rebuilt(recipe, tmp_path, monkeypatch):
    from hf_tiny import make_tiny_tokenizer

    calls = []
    monkeypatch.setattr(recipe.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    work, stash = tmp_path / "work", tmp_path / "stash"
    t = work / "wikisql"
    make_tiny_tokenizer(t / "baseline")
    (t / "baseline" / "config.json").write_text('{"model_type": "llama"}')
    prompts = ["what is a?", "count the b's", "select c"]
    recipe._prepare_distill("wikisql", t / "distilled.jsonl", t / "distill_prompts.jsonl", prompts)
    # distill's own output: rows in the order they finished, text only.
    rows = [{"prompt": prompts[2], "completion": "SELECT c FROM t"},
            {"prompt": prompts[0], "completion": "SELECT a\nFROM t WHERE x = 'y'"},
            {"prompt": prompts[1], "completion": "SELECT COUNT b FROM t"}]  # fmt: skip
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    step = recipe.Step("distill", t / "distilled.jsonl", ["distill"])

    def distill(cmd):
        calls.append(cmd)
        (t / "distilled.jsonl").write_text(text, encoding="utf-8")
        return 0

    monkeypatch.setattr(recipe.subprocess, "call", distill)
    recipe.run_step(work, "wikisql", step, stash)
    kept = stash / "wikisql" / "distill"
    assert len(calls) == 1 and (kept / "manifest.json").is_file()
    assert not any(
        r["completion"] in p.read_text(errors="ignore") for r in rows for p in kept.iterdir()
    )  # fmt: skip  (ids, not text)

    (t / "distilled.jsonl").unlink()
    step.done.unlink()
    recipe.run_step(work, "wikisql", step, stash)  # rebuilt from the ids: distill does not run
    assert len(calls) == 1 and step.done.exists()
    assert (t / "distilled.jsonl").read_text(encoding="utf-8") == text  # the same bytes

    # Other prompts, or another baseline, and the stored ids no longer answer: distil again.
    step.done.unlink()
    recipe._prepare_distill("wikisql", t / "distilled.jsonl", t / "distill_prompts.jsonl",
                            prompts[:2])  # fmt: skip
    assert not recipe.rebuild_distilled("wikisql/distill", t, "distill", stash / "wikisql")
    recipe._prepare_distill("wikisql", t / "distilled.jsonl", t / "distill_prompts.jsonl", prompts)
    assert recipe.rebuild_distilled("wikisql/distill", t, "distill", stash / "wikisql")
    (stash / "wikisql" / "baseline" / "final").mkdir(parents=True)
    (stash / "wikisql" / "baseline" / "final" / "stash.json").write_text("{}")
    assert not recipe.rebuild_distilled("wikisql/distill", t, "distill", stash / "wikisql")


def test_learning_curves_of_a_task(recipe, tmp_path):
    t = tmp_path / "e2e"
    for folder in ("baseline_t", "ss_t", "medusa_t"):
        (t / folder).mkdir(parents=True)
        rows = [
            {
                "step": s,
                "main_loss": 2.0 / s,
                "main_acc": 0.5,
                "stream1_acc": 0.1 * s / 100,
                "accepted_streams_mean": 0.2,
                "tokens_per_pass": 1.2,
            }
            for s in (100, 200)
        ]
        (t / folder / CURVE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe.write_curves("e2e", t, tmp_path / "results")
    out = tmp_path / "results"
    assert {p.name for p in out.iterdir()} == {
        f"paper_e2e_curves.{x}" for x in ("png", "md", "json")
    }
    md = (out / "paper_e2e_curves.md").read_text()
    assert "SS shared (references)" in md and "Medusa-1 (baseline answers)" in md
