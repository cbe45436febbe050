"""SS models from the Hugging Face Hub (a fake snapshot_download: no network) fetch their stream
and head files; `ss-mlx quantize` quantizes the trunk with mlx-lm, keeps the streams byte for
byte, and its output is exactly mlx-lm's greedy output on the quantized trunk."""

import fnmatch
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import mlx_lm.utils
import pytest
from conftest import write_medusa
from mlx_lm.generate import generate_step
from ss_dirs import make_ss_dir

import ss_mlx
from ss_mlx.cli import main as ss_cli
from ss_mlx.config import CONFIG_KEY, MEDUSA_FILE, STREAMS_FILE

PROMPTS = ["abc abc", "hello there", "the cat sat"]


@pytest.fixture(scope="module")
def ss_dir(tmp_path_factory):
    """With stream adapters on two trunk modules, so the quantized trunk's linears carry them."""
    return make_ss_dir(
        tmp_path_factory.mktemp("hubq"), 99, 5, "--adapter-rank", "4",
        "--adapter-modules", "self_attn.q_proj", "mlp.down_proj", "--adapter-init-scale", "0.2",
    )  # fmt: skip


def fake_hub(monkeypatch, repos: dict[str, Path], tmp_path: Path) -> list[dict]:
    """Replace mlx-lm's snapshot_download: copy the files of a local 'repo' that match the
    allow patterns, as huggingface_hub does, into a snapshot directory."""
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "allow": list(allow_patterns)})
        if repo_id not in repos:
            raise FileNotFoundError(f"404: {repo_id}")
        snap = tmp_path / "snapshots" / repo_id.replace("/", "--") / (revision or "main")
        snap.mkdir(parents=True, exist_ok=True)
        for f in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copyfile(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(mlx_lm.utils, "snapshot_download", snapshot_download)
    return calls


def test_hub_repo_loads_with_its_stream_and_head_files(ss_dir, tmp_path, monkeypatch):
    repo = tmp_path / "remote"
    shutil.copytree(ss_dir, repo)
    write_medusa(repo, dim=64, vocab=99)
    calls = fake_hub(monkeypatch, {"someone/tiny-ss": repo}, tmp_path)
    # mlx-lm's own patterns would drop both files: that is the bug this guards against.
    assert not any(fnmatch.fnmatch(STREAMS_FILE, p) for p in mlx_lm.utils.DEFAULT_ALLOW_PATTERNS)
    model, tokenizer = ss_mlx.load("someone/tiny-ss", revision="v1")
    assert calls[0]["repo_id"] == "someone/tiny-ss" and calls[0]["revision"] == "v1"
    snap = Path(model.path)
    assert (snap / STREAMS_FILE).read_bytes() == (repo / STREAMS_FILE).read_bytes()
    assert (snap / MEDUSA_FILE).is_file()
    local, _ = ss_mlx.load(str(ss_dir))
    for p in PROMPTS[:1]:
        a = ss_mlx.generate(model, tokenizer, p, max_tokens=16)
        assert a == ss_mlx.generate(local, tokenizer, p, max_tokens=16)
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        ss_mlx.load("someone/missing")


def test_quantize_keeps_streams_and_is_exact(ss_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert ss_cli(["quantize", "--model", str(ss_dir), "--out", str(out), "--q-bits", "4",
                   "--q-group-size", "64"]) is None  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    src_config = json.loads((ss_dir / "config.json").read_text())
    assert config[CONFIG_KEY] == src_config[CONFIG_KEY]
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert (out / STREAMS_FILE).read_bytes() == (ss_dir / STREAMS_FILE).read_bytes()
    assert (out / "model.safetensors").stat().st_size < (ss_dir / "model.safetensors").stat(
    ).st_size / 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    model, tokenizer = ss_mlx.load(str(out))
    assert hasattr(model.base.layers[0].self_attn.q_proj, "bits")  # the trunk is quantized
    base, base_tok = mlx_lm.load(str(out))
    for p in PROMPTS:
        ids = mx.array(base_tok.encode(p), dtype=mx.int32)
        want = [t for t, _ in generate_step(ids, base, max_tokens=24)]
        for tree in (None, "2,1", "1,1"):
            got = [s.token for s in ss_mlx.ss_generate_step(ids, model, max_tokens=24, tree=tree)]
            assert got == want, (p, tree)
        assert ss_mlx.generate(model, tokenizer, p, max_tokens=24) == mlx_lm.generate(
            base, base_tok, p, max_tokens=24
        )


def test_quantize_refusals(ss_dir, tmp_path):
    base_dir = ss_dir.parent / "base"
    with pytest.raises(SystemExit, match="not an SS model directory"):
        ss_cli(["quantize", "--model", str(base_dir), "--out", str(tmp_path / "a")])
    out = tmp_path / "q"
    ss_cli(["quantize", "--model", str(ss_dir), "--out", str(out)])
    with pytest.raises(SystemExit, match="already quantized"):
        ss_cli(["quantize", "--model", str(out), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="exists and is not empty"):
        ss_cli(["quantize", "--model", str(ss_dir), "--out", str(out)])
    ss_cli(["quantize", "--model", str(ss_dir), "--out", str(out), "--q-bits", "8", "--force"])
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    with pytest.raises(SystemExit, match="contains the input"):
        ss_cli(["quantize", "--model", str(ss_dir), "--out", str(ss_dir.parent)])


def test_mlx_lm_convert_drops_streams_and_the_error_names_the_fix(ss_dir, tmp_path):
    out = tmp_path / "mlx_q"
    mlx_lm.convert(str(ss_dir), str(out), quantize=True, q_group_size=64, q_bits=4)
    assert CONFIG_KEY in json.loads((out / "config.json").read_text())
    assert not (out / STREAMS_FILE).exists()
    with pytest.raises(FileNotFoundError, match="ss-mlx quantize"):
        ss_mlx.load(str(out))
