"""The parity gate: PyTorch SS checkpoints vs their MLX conversions (fp32 logits, greedy tokens)."""

import json
import os
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

# isort: off
import ss_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

# isort: on
import numpy as np  # noqa: E402
import ss_mlx_convert.parity as parity  # noqa: E402
from hf_tiny import STREAMS, make_ss_checkpoint, make_tiny_hf, make_tiny_tokenizer  # noqa: E402  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from ss_mlx_convert.export import ConversionError, convert  # noqa: E402

pytestmark = pytest.mark.torch

CASES = {
    "llama_adapters": dict(model_type="llama"),
    "qwen2_plain": dict(model_type="qwen2", seed=1, adapter_rank=0, num_streams=2),
    "qwen3_adapters_prune": dict(model_type="qwen3", seed=2, prune_rank=4, stream_layers=4),
    "llama_shared_lora": dict(model_type="llama", seed=3, lora={}),
    "llama_draft_vocab": dict(model_type="llama", seed=4, draft_vocab=40),  # -inf logits
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, kw in CASES.items():
        src = make_ss_checkpoint(root / name, **kw)
        out[name] = (src, convert(src, root / f"{name}.mlx"))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_parity_passes(converted, case):
    src, mlx_dir = converted[case]
    report = parity.check_parity(src, mlx_dir, n_tokens=32, greedy_tokens=24)
    print(f"\n[{case}]\n{report.summary()}")
    assert report.ok, report.summary()
    streams = json.loads((src / "config.json").read_text())["speculative_streaming"]["num_streams"]
    assert len(report.stream_max_abs) == streams
    assert max(report.main_max_abs, *report.stream_max_abs) < 1e-4
    assert report.bound < 1e-3  # tiny models' logits widen it a little, never to infinity
    assert (report.exit_max_abs is not None) == ("prune" in case)
    assert report.greedy_ok and "skipped" not in report.summary()
    assert report.torch_tokens == report.mlx_tokens and len(report.torch_tokens) >= 1


def test_bound_is_atol_unless_logits_are_large():
    r = parity.ParityReport(2e-4, [], None, 1e-4, [1], [], [], rtol=1e-5, logit_scale=5.0)
    assert r.bound == 1e-4 and not r.ok
    r.logit_scale = 40.0  # SmolLM2-sized logits: fp32 noise alone is ~1e-4 there
    assert r.bound == pytest.approx(4e-4) and r.ok
    r.main_max_abs = float("nan")
    assert not r.ok


def test_bound_admits_pytorch_own_fp32_error(converted):
    r = parity.ParityReport(6e-3, [], None, 1e-4, [1], [], [], rtol=1e-5, logit_scale=32.0)
    assert not r.ok
    r.fp32_noise, r.noise_factor = 2.8e-3, 4.0  # an ill-conditioned fine-tune on random ids
    assert r.bound == pytest.approx(1.12e-2) and r.ok and "fp32-vs-fp64" in r.summary()
    # On the tiny models the fp64 run finds fp32 noise far below atol: the bound stays atol.
    src, mlx_dir = converted["llama_adapters"]
    rep = parity.check_parity(src, mlx_dir, greedy_tokens=0)
    assert 0 < rep.fp32_noise < 1e-5 and rep.bound == 1e-4


@pytest.mark.parametrize("case", ["llama_adapters", "llama_draft_vocab"])
def test_parity_fails_when_a_stream_embedding_is_perturbed(converted, tmp_path, case):
    src, mlx_dir = converted[case]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in mlx_dir.iterdir():
        os.symlink(f, bad / f.name)
    tensors = dict(mx.load(str(mlx_dir / STREAMS)))
    emb = np.array(tensors["stream_embeddings"])
    emb[1] += 0.05  # stream 2 only
    tensors["stream_embeddings"] = mx.array(emb)
    (bad / STREAMS).unlink()
    mx.save_safetensors(str(bad / STREAMS), tensors)

    report = parity.check_parity(src, bad)
    print(report.summary())
    assert not report.ok and not report.logits_ok
    assert report.main_max_abs < 1e-4 and report.stream_max_abs[0] < 1e-4
    assert report.stream_max_abs[1] >= 1e-4
    assert "stream 2" in report.summary() and "FAIL" in report.summary()


def test_convert_check_publishes_only_on_pass(converted, tmp_path, monkeypatch, capsys):
    src, _ = converted["qwen2_plain"]
    out = convert(src, tmp_path / "ok", check=True)
    assert "=> PASS" in capsys.readouterr().out and out.is_dir()

    # A quantized output cannot meet 1e-4; the gate runs on an fp32 build of the same source.
    convert(src, tmp_path / "q", quantize=True, q_bits=8, check=True)
    printed = capsys.readouterr().out
    assert "requested output (not gated)" in printed and printed.rstrip().endswith("=> PASS")

    def failing(*a, **kw):
        return parity.ParityReport(1.0, [1.0], None, 1e-4, [1], [2], [3])

    monkeypatch.setattr(parity, "check_parity", failing)
    before = set(os.listdir(tmp_path))
    with pytest.raises(ConversionError, match="parity gate failed"):
        convert(src, tmp_path / "gated", check=True)
    assert set(os.listdir(tmp_path)) == before


def test_gate_that_cannot_run_fails_cleanly(converted, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(converted["qwen2_plain"][0], src)
    # The runtime passes unknown block keys through; the trainer's StreamingLM refuses them.
    config = json.loads((src / "config.json").read_text())
    config["speculative_streaming"]["comment"] = "hand-edited"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="parity gate could not run.*comment"):
        convert(src, tmp_path / "out", check=True)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_medusa_checkpoint_carries_heads_and_gates_the_trunk(tmp_path):
    src = make_tiny_hf("qwen3", tmp_path / "src", seed=5)
    make_tiny_tokenizer(src)
    config = json.loads((src / "config.json").read_text())
    config["medusa"] = {"format_version": 1, "num_heads": 2, "num_layers": 1, "lm_head": "shared"}
    (src / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    heads = {}
    for k in range(2):
        heads[f"medusa_head.{k}.0.linear.weight"] = rng.standard_normal((64, 64)).astype(np.float32)
        heads[f"medusa_head.{k}.0.linear.bias"] = rng.standard_normal(64).astype(np.float32)
    save_file(heads, str(src / "medusa_heads.safetensors"))

    out = convert(src, tmp_path / "out")
    assert (out / "medusa_heads.safetensors").read_bytes() == (
        src / "medusa_heads.safetensors"
    ).read_bytes()
    assert json.loads((out / "config.json").read_text())["medusa"]["num_heads"] == 2
    report = parity.check_parity(src, out, greedy_tokens=12)
    assert report.ok and report.stream_max_abs == [] and "trunk" in report.summary()

    heads.pop("medusa_head.1.0.linear.bias")
    save_file(heads, str(src / "medusa_heads.safetensors"))
    with pytest.raises(ConversionError, match=r"missing medusa_head\.1\.0\.linear\.bias"):
        convert(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
