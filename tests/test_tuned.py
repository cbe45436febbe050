"""Stored tuned trees: keys, storage, and damaged files that must never break generation."""

import json
import shutil

import mlx.core as mx
import pytest
from conftest import save_tiny_model_dir, tiny_base

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx import tuned
from ss_mlx.config import STREAMS_FILE
from ss_mlx.generation import generate, resolve_tree
from ss_mlx.loader import load
from ss_mlx.prepare.init_model import init_model


def test_model_hash_and_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    save_tiny_model_dir(tiny_base("llama"), tmp_path / "base")
    d = init_model(tmp_path / "base", tmp_path / "ss", streams=2, stream_layers=1)
    h = tuned.model_hash(d)
    shutil.copytree(d, tmp_path / "copy")
    assert tuned.model_hash(tmp_path / "copy") == h  # content, not path
    cfg = json.loads((d / "config.json").read_text())
    cfg["speculative_streaming"]["tree"] = {"widths": [2, 1]}
    (d / "config.json").write_text(json.dumps(cfg))
    assert tuned.model_hash(d) == h  # the default tree is what tuning replaces
    data = bytearray((tmp_path / "copy" / STREAMS_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / "copy" / STREAMS_FILE).write_bytes(bytes(data))
    assert tuned.model_hash(tmp_path / "copy") != h

    assert tuned.load_tuned_tree(d) is None
    tree = {"widths": [2, 1], "node_budget": 2, "rank_probs": [[0.5, 0.2], [0.4, 0.1]]}
    record = {"schema": tuned.SCHEMA, "tree": tree, "machine": {"key": tuned.machine_key()}}
    path = tuned.save_tuned(d, record)
    assert path.parent == tmp_path / "home" / "tuned" and path.name.startswith(h)
    assert tuned.load_tuned_tree(d) == tree
    assert tuned.load_tuned_tree(tmp_path / "copy") is None
    with pytest.warns(UserWarning, match="ignoring the tuned-tree file"):
        tuned.save_tuned(d, dict(record, tree={"widths": [0]}))
        assert tuned.load_tuned_tree(d) is None
    path.write_text("{not json")
    with pytest.warns(UserWarning, match=str(path.name)):
        assert tuned.load_tuned_tree(d) is None


DAMAGED = {
    "too deep for the model": {"tree": {"widths": [1, 1, 1, 1, 1, 1]}},
    "short rank_probs": {"tree": {"widths": [2, 2], "node_budget": 3, "rank_probs": [[0.5]]}},
    "tree not an object": {"tree": [1, 2]},
    "wider than any tree may be": {"tree": {"widths": [100000]}},
    "damaged verify_cost": {"tree": {"widths": [1]}, "verify_cost": {"relative": ["x"]}},
    "wrong schema": {"schema": "other/1", "tree": {"widths": [1]}},
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_tuned_file_never_breaks_generation(tmp_path, monkeypatch, case):
    """A damaged tuned file is ignored with a warning naming it; generate uses the default."""
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    save_tiny_model_dir(tiny_base("llama"), tmp_path / "base")
    d = init_model(tmp_path / "base", tmp_path / "ss", streams=2, stream_layers=1)
    record = {"schema": tuned.SCHEMA, "machine": {"key": tuned.machine_key()}, **DAMAGED[case]}
    path = tuned.save_tuned(d, record)
    model, tokenizer = load(d)
    with pytest.warns(UserWarning, match=path.name):
        spec = resolve_tree(model, None)
    assert spec.depth <= 2
    # Read once per loaded model: generation goes on with the default, without a new warning.
    text = generate(model, tokenizer, mx.array([1, 2, 3]), max_tokens=5)
    assert isinstance(text, str)

