"""`ss-mlx convert`: tiny HF checkpoints (+ synthetic streams, + peft LoRA) -> MLX model dirs."""

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

# isort: off
import ss_mlx  # noqa: E402  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

# isort: on
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hf_tiny import (  # noqa: E402
    STREAMS,
    make_ss_checkpoint,
    peft_merged_state,
)
from safetensors.numpy import load_file, save_file  # noqa: E402
from ss_mlx_convert.checkpoint_io import CheckpointError, open_checkpoint  # noqa: E402
from ss_mlx_convert.export import ConversionError, convert, main  # noqa: E402
from ss_mlx_convert.export_lora import LoraMergeError  # noqa: E402

pytestmark = pytest.mark.torch

def mlx_weights(out: Path) -> dict[str, np.ndarray]:
    w = {}
    for f in sorted(out.glob("model*.safetensors")):
        w.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
    return w


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One source checkpoint per case, built once per module; tests copy before mutating."""
    root = tmp_path_factory.mktemp("src")
    return {
        "llama": make_ss_checkpoint(root / "llama", "llama"),
        "qwen2": make_ss_checkpoint(root / "qwen2", "qwen2", seed=1, adapter_rank=0),
        "qwen3": make_ss_checkpoint(root / "qwen3", "qwen3", seed=2, prune_rank=4),
        "llama_lora": make_ss_checkpoint(
            root / "llama_lora",
            "llama",
            seed=3,
            lora=dict(
                target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"],
                alpha_pattern={"down_proj": 3},
                rank_pattern={"layers.1.self_attn.q_proj": 2},
            ),
        ),
        "qwen3_rslora": make_ss_checkpoint(
            root / "qwen3_rslora", "qwen3", seed=4, lora=dict(use_rslora=True, r=8, lora_alpha=4)
        ),
    }


def copy_src(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(src, d)
    return d


def assert_nothing_left(parent: Path, before: set[str], out: Path) -> None:
    assert not out.exists()
    assert set(os.listdir(parent)) == before, "a temp dir was left behind"


# ---------------------------------------------------------------- happy paths


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_convert_loads_in_mlx_lm_and_ss_mlx(sources, tmp_path, case):
    import mlx_lm
    import transformers

    src = sources[case]
    out = convert(src, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", STREAMS, "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    block = json.loads((src / "config.json").read_text())["speculative_streaming"]
    assert config["speculative_streaming"]["num_streams"] == block["num_streams"]
    assert config["rope_theta"] == 10000.0  # spelled out for mlx-lm (transformers 5 nests it)
    assert "quantization" not in config

    # Stream tensors: same values, float32.
    src_t, out_t = load_file(str(src / STREAMS)), mx.load(str(out / STREAMS))
    assert set(src_t) == set(out_t)
    for k, v in out_t.items():
        assert v.dtype == mx.float32
        np.testing.assert_array_equal(np.array(v), src_t[k])

    # Stock mlx-lm reads it as an AR model with the same logits as transformers.
    model, _ = mlx_lm.load(str(out))
    ids = [[5, 17, 33, 2, 60, 71]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.array(model(mx.array(ids)))
    assert np.abs(got - ref).max() < 1e-4

    ss_model, _ = ss_mlx.load(out)
    assert ss_model.num_streams == block["num_streams"]


@pytest.mark.parametrize("case", ["llama_lora", "qwen3_rslora"])
def test_lora_merge_matches_peft(sources, tmp_path, case):
    src = sources[case]
    out = convert(src, tmp_path / "out")
    got = mlx_weights(out)
    want = peft_merged_state(src)
    if json.loads((src / "config.json").read_text()).get("tie_word_embeddings"):
        want.pop("lm_head.weight", None)
    assert set(got) == set(want)
    touched = 0
    base = open_checkpoint(src)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=2e-6, err_msg=k)
        touched += not np.array_equal(base.get(k), v)
    assert touched >= 8  # the adapter really changed the weights


def test_quantized_trunk_keeps_streams_float(sources, tmp_path):
    import mlx_lm

    out = convert(sources["qwen3"], tmp_path / "out", quantize=True, q_bits=4, q_group_size=64)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    trunk = mx.load(str(out / "model.safetensors"))
    assert trunk["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert "model.layers.0.self_attn.q_proj.scales" in trunk
    streams = mx.load(str(out / STREAMS))
    assert all(v.dtype == mx.float32 for v in streams.values())
    assert "prune.a" in streams
    mlx_lm.load(str(out))
    model, _ = ss_mlx.load(out)
    main, streams_logits = model.full_forward(mx.array([[3, 4, 5, 6]]))
    assert streams_logits.shape == (1, 4, 3, 96)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_option(sources, tmp_path, dtype):
    out = convert(sources["llama"], tmp_path / "out", dtype=dtype)
    want = getattr(mx, dtype)
    assert {v.dtype for v in mx.load(str(out / "model.safetensors")).values()} == {want}
    assert {v.dtype for v in mx.load(str(out / STREAMS)).values()} == {want}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    ss_mlx.load(out)


def test_bin_shards_convert_like_safetensors(sources, tmp_path):
    """pytorch_model-0000x-of-0000y.bin + index (bf16) gives the same weights as safetensors."""
    src = copy_src(sources["llama"], tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(sd)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    weight_map = {}
    for fname, part in halves.items():
        torch.save({n: torch.from_numpy(sd[n]).to(torch.bfloat16) for n in part}, src / fname)
        weight_map.update({n: fname for n in part})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = convert(src, tmp_path / "out", dtype="float32")
    got = mlx_weights(out)
    for n in names:
        want = torch.from_numpy(sd[n]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(got[n], want, err_msg=n)


def test_cli_and_dispatcher(sources, tmp_path, capsys):
    from ss_mlx.cli import main as cli_main

    main(["--torch", str(sources["qwen2"]), "--out", str(tmp_path / "a"), "--dtype", "float32"])
    assert (tmp_path / "a" / STREAMS).is_file()
    cli_main(["convert", "--torch", str(sources["qwen2"]), "--out", str(tmp_path / "b"), "-q"])
    assert "quantization" in json.loads((tmp_path / "b" / "config.json").read_text())
    # Errors exit with a message, not a traceback.
    with pytest.raises(SystemExit) as e:
        main(["--torch", str(sources["qwen2"]), "--out", str(tmp_path / "a")])
    assert "not empty" in str(e.value) and "--force" in str(e.value)


def test_refuses_non_empty_out_unless_force(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert(sources["qwen2"], out)
    assert (out / "keep.txt").is_file()
    convert(sources["qwen2"], out, force=True)
    assert not (out / "keep.txt").exists() and (out / STREAMS).is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "empty").mkdir()
    convert(sources["qwen2"], tmp_path / "empty")  # an empty dir is fine


# ---------------------------------------------------------------- strictness


def _mutate_safetensors(path: Path, fn) -> None:
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def _expect_failure(src: Path, tmp_path: Path, exc, *names: str) -> str:
    parent = tmp_path / "dst"
    parent.mkdir()
    before = set(os.listdir(parent))
    out = parent / "out"
    with pytest.raises(exc) as e:
        convert(src, out)
    msg = str(e.value)
    for n in names:
        assert n in msg, msg
    assert_nothing_left(parent, before, out)
    return msg


def test_extra_trunk_tensors_are_named(sources, tmp_path):
    src = copy_src(sources["llama"], tmp_path)

    def add(t):
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((4, 4), np.float32)
        t["model.mystery"] = np.zeros(3, np.float32)

    _mutate_safetensors(src / "model.safetensors", add)
    _expect_failure(
        src, tmp_path, ConversionError, "model.layers.0.self_attn.extra.weight", "model.mystery"
    )


def test_missing_and_misshapen_trunk_tensors_are_named(sources, tmp_path):
    src = copy_src(sources["llama"], tmp_path)

    def mutate(t):
        del t["model.layers.2.mlp.up_proj.weight"]
        t["model.layers.1.self_attn.o_proj.weight"] = np.zeros((64, 63), np.float32)

    _mutate_safetensors(src / "model.safetensors", mutate)
    msg = _expect_failure(
        src, tmp_path, ConversionError,
        "model.layers.2.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight",
    )
    assert "missing" in msg and "(64, 63)" in msg


def test_missing_stream_parameter_is_named(sources, tmp_path):
    src = copy_src(sources["llama"], tmp_path)
    _mutate_safetensors(src / STREAMS, lambda t: t.pop("adapters.3.mlp.down_proj.b"))
    _expect_failure(src, tmp_path, ConversionError, "adapters.3.mlp.down_proj.b")


def test_wrong_and_extra_stream_tensors_are_named(sources, tmp_path):
    src = copy_src(sources["llama"], tmp_path)

    def mutate(t):
        t["stream_embeddings"] = np.zeros((3, 65), np.float32)
        t["adapters.0.self_attn.q_proj.a"] = np.zeros((3, 64, 4), np.float32)  # not a stream layer

    _mutate_safetensors(src / STREAMS, mutate)
    _expect_failure(
        src, tmp_path, ConversionError, "stream_embeddings", "adapters.0.self_attn.q_proj.a"
    )


def test_truncated_safetensors_names_the_file(sources, tmp_path):
    src = copy_src(sources["llama"], tmp_path)
    path = src / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    msg = _expect_failure(src, tmp_path, CheckpointError, str(path))
    assert "truncated" in msg


def test_truncated_stream_file_and_bad_index_are_named(sources, tmp_path):
    src = copy_src(sources["llama"], tmp_path)
    with open(src / STREAMS, "r+b") as f:
        f.truncate(100)
    _expect_failure(src, tmp_path, CheckpointError, STREAMS)

    src2 = copy_src(sources["qwen2"], tmp_path / "b")
    (src2 / "model.safetensors").rename(src2 / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}
    (src2 / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_failure(
        src2, tmp_path / "b", CheckpointError, "model.embed_tokens.weight", "not in index"
    )


def test_bad_lora_and_stray_files_are_named(sources, tmp_path):
    src = copy_src(sources["llama_lora"], tmp_path)
    bad = "base_model.model.model.layers.0.mlp.nonsense.lora_A.weight"
    _mutate_safetensors(
        src / "adapter_model.safetensors", lambda t: t.update({bad: np.zeros((4, 4), np.float32)})
    )
    _expect_failure(src, tmp_path, LoraMergeError, "model.layers.0.mlp.nonsense")

    src2 = copy_src(sources["qwen2"], tmp_path / "b")
    save_file({"x": np.zeros(2, np.float32)}, str(src2 / "exit_head.safetensors"))
    _expect_failure(src2, tmp_path / "b", ConversionError, "exit_head.safetensors")


def test_bad_config_block_is_reported(sources, tmp_path):
    src = copy_src(sources["qwen2"], tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["speculative_streaming"]["stream_layers"] = 9
    (src / "config.json").write_text(json.dumps(config))
    _expect_failure(src, tmp_path, ConversionError, "stream_layers")
