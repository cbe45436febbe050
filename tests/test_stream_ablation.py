"""The ablation's cross-job carry: a stashed checkpoint comes back under the run it left."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ss_mlx_convert.train_state import load_checkpoint, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _module(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "stream_ablation", ROOT / "examples" / "default_model" / "stream_ablation.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "work")
    monkeypatch.setattr(mod, "STASH", tmp_path / "stash")
    return mod


def _checkpoint(root: Path, step: int, value: float) -> Path:
    state = {"step": step, "trainable": {"w": torch.full((3, 2), value)},
             "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "rng": {},
             "args": {}}  # fmt: skip
    return save_checkpoint(root, step, state, keep=0)


def _value(step_dir: Path) -> float:
    return float(load_checkpoint(step_dir)["trainable"]["w"][0, 0])


def test_stash_keeps_only_the_newest_and_restore_brings_it_back(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch)
    assert mod.stash("size-200") is None  # no checkpoint yet: nothing stashed
    ckpts = tmp_path / "work" / "size-200" / "checkpoints"
    stashed = tmp_path / "stash" / "size-200"
    _checkpoint(ckpts, 50, 0.5)
    assert mod.stash("size-200") == stashed
    _checkpoint(ckpts, 100, 1.0)
    assert mod.stash("size-200") == stashed
    assert mod.stash("size-200") is None  # already stashed at that step
    assert (stashed / "stash.json").is_file() and not list(stashed.glob("step-*"))

    # A new job: work/ is gone; restore rebuilds the stashed step for --resume.
    shutil.rmtree(tmp_path / "work")
    mod.restore("size-200")
    assert mod._newest(ckpts).name == "step-00000100" and _value(ckpts / "step-00000100") == 1.0

    # A run that got further than the stash keeps its own newer checkpoint.
    _checkpoint(ckpts, 150, 1.5)
    mod.restore("size-200")
    assert mod._newest(ckpts).name == "step-00000150" and _value(ckpts / "step-00000150") == 1.5

    # A damaged stash stops the run with one line, and --stash replaces it.
    (stashed / "stash.json").write_text("{")
    shutil.rmtree(ckpts)
    with pytest.raises(SystemExit, match="stash.json: damaged"):
        mod.restore("size-200")
    _checkpoint(ckpts, 200, 2.0)
    assert mod.stash("size-200") == stashed


def test_a_points_epochs_set_its_steps_and_are_no_trainer_flag(tmp_path, monkeypatch):
    # run_point's command for a one-epoch point: steps = conversations / batch 4, and "epochs"
    # (the script's own knob) never reaches `ss-mlx train` as a flag.
    mod = _module(tmp_path, monkeypatch)
    seen = []

    def fake_run(cmd, check):
        seen.append(cmd)
        raise RuntimeError("stop before the record")  # the command is what this test needs

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    manifest = {"format": "ss-mlx-distilled-shards", "totals": {"records": 20000}}
    (distilled / "manifest.json").write_text(json.dumps(manifest))
    sources = {"sharegpt": str(tmp_path / "d.jsonl"), "permissive": str(distilled),
               "mixed": f"{tmp_path / 'nothing'},{distilled}"}  # fmt: skip
    points = (("distilled-17900-ns8", 17900 // 4), ("size-2100", 2 * 2100 // 4),
              ("distilled-900-ns8", 2 * 900 // 4), ("distilled-1750-ns8-soft", 2 * 1750 // 4),
              ("fixed-7000-ns8", 7000 // 4))  # fmt: skip
    for name, steps in points:
        with pytest.raises(RuntimeError, match="stop before"):
            mod.run_point(name, "base", sources, tmp_path / "e.jsonl", tmp_path)
        cmd = seen[-1]
        assert cmd[cmd.index("--max-steps") + 1] == str(steps)
        assert "--epochs" not in cmd
    assert seen[0][seen[0].index("--stream-layers") + 1] == "8"
    # "data" picks the source and is no trainer flag either.
    assert [c[c.index("--data") + 1] for c in seen] == [
        str(distilled), sources["sharegpt"], str(distilled), str(distilled), sources["sharegpt"]]
    assert all(c.count("--data") == 1 for c in seen)
    assert [c[c.index("--targets") + 1] for c in seen] == ["base", "base", "base", "soft", "base"]
    assert all(c.count("--targets") == 1 for c in seen)
    # Every point caches its trunk, one-epoch points too (the variants of the largest point
    # with the same data and Ns reuse it); the distilled points' draft vocabulary, which the
    # fixed-text variant of the largest point keeps (one setting changed).
    assert all(c[c.index("--cache-hidden") + 1] == "on" for c in seen)
    assert seen[0][seen[0].index("--draft-vocab") + 1] == "16384" and "--draft-vocab" not in seen[1]
    assert seen[4][seen[4].index("--draft-vocab") + 1] == "16384"
    # Counted over all the folders of a source.
    manifest["totals"]["records"] = 5000
    (distilled / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="needs 17900 distilled rows, mixed has 5000"):
        mod.run_point("mixed-17900-ns8", "base", sources, tmp_path / "e.jsonl", tmp_path)
    # A point never trains on fewer distilled rows than it names.
    with pytest.raises(SystemExit, match="needs 5200 distilled rows, permissive has 5000"):
        mod.run_point("distilled-5200-ns8", "base", sources, tmp_path / "e.jsonl", tmp_path)
    assert len(seen) == 5


def _record(point: str, tokens: int, s1: float, **settings) -> dict:
    st = {"streams": 4, "stream-layers": 8, "adapter-rank": 8, **settings}
    ev = {"stream1_echo": 0.1, "accepted_streams_mean": 0.5}
    for j in range(1, st["streams"] + 1):
        ev[f"stream{j}_acc"], ev[f"stream{j}_top3"] = s1 / j, 2 * s1 / j
    data = "sharegpt" if point.startswith(("size", "fixed")) else "permissive"
    return {"point": point, "data": data, "scored_tokens": tokens, "settings": st,
            "wall_s": 600, "eval": ev}  # fmt: skip


def test_report_names_each_points_recipe_and_plots_curves_and_ablation(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch)
    records = [_record("size-200", 55_000, 0.15, **{"stream-layers": 4}),
               _record("size-400", 110_000, 0.2, **{"stream-layers": 4}),
               _record("distilled-900-ns8", 100_000, 0.3),
               _record("distilled-17900-ns8", 2_000_000, 0.5),
               _record("distilled-17900-ns8-g3", 2_000_000, 0.45, streams=3),
               _record("fixed-7000-ns8", 2_000_000, 0.4)]  # fmt: skip
    mod.report(records, tmp_path)
    md = (tmp_path / "stream_ablation.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()[2:]}
    assert "| self-distilled / 3 / 8 / 8 |" in rows["distilled-17900-ns8-g3"]
    assert "| ShareGPT text / 4 / 4 / 8 |" in rows["size-200"]
    assert "| ShareGPT text / 4 / 8 / 8 |" in rows["fixed-7000-ns8"]
    # A 3-stream point has no stream-4 cell.
    assert rows["distilled-17900-ns8-g3"].count("| - |") >= 1
    # The scaling curves hold only the size points of one recipe (no variant of a size).
    curves = {label: [r["point"] for r in rs] for label, rs in mod.scaling_curves(records).items()}
    assert curves == {"fixed text, Ns 4": ["size-200", "size-400"],
                      "self-distilled, Ns 8": ["distilled-900-ns8", "distilled-17900-ns8"]}
    assert (tmp_path / "stream_ablation.png").read_bytes()[:4] == b"\x89PNG"
