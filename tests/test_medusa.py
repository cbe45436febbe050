"""Medusa heads at runtime: the file format, the head computation, lossless tree decoding."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import save_tiny_model_dir, tiny_base, write_medusa
from mlx_lm.generate import generate_step

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx.drafters.medusa import (
    MEDUSA_FILE,
    load_medusa,
    medusa_generate_step,
    resolve_medusa_tree,
)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "m"
    save_tiny_model_dir(tiny_base("llama", seed=4), d)
    return d


def ar_tokens(base, prompt, n):
    return [t for t, _ in generate_step(mx.array(prompt), base, max_tokens=n)]


def test_no_heads_is_none(model_dir):
    assert load_medusa(model_dir, tiny_base("llama", seed=4)) is None


@pytest.mark.parametrize("num_layers, shared", [(1, True), (2, False)])
def test_head_computation_matches_the_trainer_definition(model_dir, num_layers, shared):
    base = tiny_base("llama", seed=4)
    write_medusa(model_dir, num_heads=3, num_layers=num_layers, shared=shared)
    heads = load_medusa(model_dir, base)
    assert heads.num_heads == 3 and heads.nbytes > 0
    t = mx.load(str(model_dir / MEDUSA_FILE))
    h = mx.array(np.random.default_rng(0).standard_normal(64).astype(np.float32))
    got = heads.logits(base, h)
    for k in range(3):
        # convert/medusa.py: z = h + SiLU(W z + b) per residual block, then the LM head.
        z = h
        for i in range(num_layers):
            w, b = t[f"medusa_head.{k}.{i}.linear.weight"], t[f"medusa_head.{k}.{i}.linear.bias"]
            z = z + nn.silu(w @ z + b)
        want = base.lm_head(z) if shared else t[f"medusa_head.{k}.{num_layers}.weight"] @ z
        np.testing.assert_allclose(np.array(got[k]), np.array(want), rtol=1e-5, atol=1e-5)
    assert heads.logits(base, h, 2).shape == (2, 128)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_medusa_decoding_is_lossless(tmp_path, model_type):
    d = tmp_path / model_type
    base = tiny_base(model_type, seed=5)
    save_tiny_model_dir(base, d)
    write_medusa(d, num_heads=3, seed=1)
    heads = load_medusa(d, base)
    rng = np.random.default_rng(1)
    drafted = 0
    for tree in (None, "1,1,1", "4,2:5"):
        prompt = rng.integers(0, 128, size=12).tolist()
        expected = ar_tokens(base, prompt, 24)
        got = list(medusa_generate_step(mx.array(prompt), base, heads, tree=tree, max_tokens=24))
        assert [s.token for s in got] == expected, tree
        assert got[0].draft_depth == 0  # nothing to draft from before the first pass
        drafted += sum(s.from_draft for s in got)
    assert drafted > 0


def test_strict_loading(model_dir):
    base = tiny_base("llama", seed=4)
    write_medusa(model_dir, num_heads=2)
    cfg_file = model_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["medusa"]["num_heads"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing medusa_head.2.0.linear.weight"):
        load_medusa(model_dir, base)
    cfg["medusa"]["num_heads"] = 1
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected medusa_head.1"):
        load_medusa(model_dir, base)
    write_medusa(model_dir, num_heads=2, dim=32)
    with pytest.raises(ValueError, match=r"has shape \(32, 32\), expected \(64, 64\)"):
        load_medusa(model_dir, base)
    (model_dir / MEDUSA_FILE).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_medusa(model_dir, base)


def test_tree_deeper_than_heads_is_refused(model_dir):
    base = tiny_base("llama", seed=4)
    write_medusa(model_dir, num_heads=2)
    heads = load_medusa(model_dir, base)
    assert resolve_medusa_tree(heads, None).depth == 2
    with pytest.raises(ValueError, match="only 2 Medusa heads"):
        resolve_medusa_tree(heads, "2,2,1")
