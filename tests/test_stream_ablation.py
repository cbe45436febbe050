"""The ablation's cross-job carry: a stashed checkpoint comes back under the run it left."""

import importlib.util
import shutil
from pathlib import Path

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


def _checkpoint(root: Path, step: int, payload: bytes) -> Path:
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(payload)
    return d


def test_stash_keeps_only_the_newest_and_restore_brings_it_back(tmp_path, monkeypatch):
    mod = _module(tmp_path, monkeypatch)
    assert mod.stash("size-200") is None  # no checkpoint yet: nothing stashed
    ckpts = tmp_path / "work" / "size-200" / "checkpoints"
    _checkpoint(ckpts, 50, b"fifty")
    assert mod.stash("size-200") == tmp_path / "stash" / "size-200" / "step-00000050"
    _checkpoint(ckpts, 100, b"hundred")
    assert mod.stash("size-200").name == "step-00000100"
    assert mod.stash("size-200") is None  # already stashed at that step
    assert [p.name for p in (tmp_path / "stash" / "size-200").iterdir()] == ["step-00000100"]

    # A new job: work/ is gone; restore puts the stashed step back for --resume.
    shutil.rmtree(tmp_path / "work")
    mod.restore("size-200")
    assert (ckpts / "step-00000100" / "state.pt").read_bytes() == b"hundred"

    # A run that got further than the stash keeps its own newer checkpoint.
    _checkpoint(ckpts, 150, b"newer")
    mod.restore("size-200")
    assert mod._newest(ckpts).name == "step-00000150"
    assert (ckpts / "step-00000150" / "state.pt").read_bytes() == b"newer"
