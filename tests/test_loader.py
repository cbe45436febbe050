"""SS model directories: init, load, strict validation, and the CLI."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from conftest import save_tiny_model_dir, tiny_base

import ss_mlx
from ss_mlx.config import STREAMS_FILE
from ss_mlx.prepare.init_model import init_model


@pytest.fixture
def ss_dir(tiny_model_dir, tmp_path):
    return init_model(
        tiny_model_dir,
        tmp_path / "ss",
        streams=3,
        stream_layers=2,
        adapter_rank=4,
        adapter_modules=("self_attn.q_proj", "mlp.down_proj"),
        adapter_init_scale=0.1,
    )


def test_init_load_roundtrip_and_stock_mlx_lm(ss_dir):
    model, tok = ss_mlx.load(ss_dir)
    assert model.num_streams == 3 and model.first_stream_layer == 2
    ss_text = ss_mlx.generate(model, tok, "hi there", max_tokens=24)
    base, tok2 = mlx_lm.load(str(ss_dir))  # the same directory is an ordinary mlx-lm model
    assert ss_text == mlx_lm.generate(base, tok2, "hi there", max_tokens=24)


def test_stream_generate_responses(ss_dir):
    model, tok = ss_mlx.load(ss_dir)
    responses = list(ss_mlx.stream_generate(model, tok, "abc", max_tokens=12))
    assert len(responses) == 12
    last = responses[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 12
    assert last.forward_passes >= 1 and last.tokens_per_pass == 12 / last.forward_passes
    assert all(r.finish_reason is None for r in responses[:-1])
    assert last.peak_memory > 0 and last.generation_tps > 0
    ids = tok.encode("abc")
    by_ids = [r.token for r in ss_mlx.stream_generate(model, tok, ids, max_tokens=12)]
    assert by_ids == [r.token for r in responses]


def test_eos_stops_exactly(ss_dir):
    model, tok = ss_mlx.load(ss_dir)
    tokens = [r.token for r in ss_mlx.stream_generate(model, tok, "abc", max_tokens=30)]
    eos = tokens[9]
    first = tokens.index(eos)
    tok.eos_token_ids = {eos}
    out = list(ss_mlx.stream_generate(model, tok, "abc", max_tokens=30, tree="1,1"))
    assert [r.token for r in out] == tokens[: first + 1]
    assert out[-1].finish_reason == "stop"


def test_chat_template(ss_dir):
    model, tok = ss_mlx.load(ss_dir)
    with_t = ss_mlx.generate(model, tok, "hi", max_tokens=8, apply_chat_template=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    base, tok2 = mlx_lm.load(str(ss_dir))
    assert with_t == mlx_lm.generate(base, tok2, ids, max_tokens=8)


def _edit_streams(ss_dir, fn):
    f = ss_dir / STREAMS_FILE
    tensors = mx.load(str(f))
    fn(tensors)
    mx.save_safetensors(str(f), tensors)


@pytest.mark.parametrize(
    "edit,msg",
    [
        (lambda t: t.pop("stream_embeddings"), "missing tensors: \\['stream_embeddings'\\]"),
        (lambda t: t.update(extra=mx.zeros((2,))), "unexpected tensors: \\['extra'\\]"),
        (lambda t: t.update(stream_embeddings=mx.zeros((3, 65))), "wrong shapes"),
        (lambda t: t.pop("adapters.3.mlp.down_proj.b"), "adapters.3.mlp.down_proj.b"),
    ],
)
def test_bad_stream_tensors(ss_dir, edit, msg):
    _edit_streams(ss_dir, edit)
    with pytest.raises(ValueError, match=msg):
        ss_mlx.load(ss_dir)


def _with_draft_vocab(ss_dir, ids):
    """Give the directory a draft vocabulary of these ids (config and tensor)."""
    _edit_config(ss_dir, lambda c: c["speculative_streaming"].update(draft_vocab_size=len(ids)))
    _edit_streams(ss_dir, lambda t: t.update(draft_vocab=ids))


@pytest.mark.parametrize(
    "ids,msg",
    [
        (mx.array([1.0, 2.0, 3.0]), "'draft_vocab' must hold integer token ids"),
        (mx.array([1, 3, 2], dtype=mx.int32), "distinct ascending token ids in \\[0, 128\\)"),
        (mx.array([1, 2, 2], dtype=mx.int32), "distinct ascending"),
        (mx.array([1, 2, 128], dtype=mx.int32), "distinct ascending"),
        (mx.array([-1, 2, 3], dtype=mx.int32), "distinct ascending"),
    ],
)
def test_bad_draft_vocab(ss_dir, ids, msg):
    _with_draft_vocab(ss_dir, ids)
    with pytest.raises(ValueError, match=msg):
        ss_mlx.load(ss_dir)


def test_draft_vocab_missing_or_unannounced(ss_dir):
    _edit_config(ss_dir, lambda c: c["speculative_streaming"].update(draft_vocab_size=3))
    with pytest.raises(ValueError, match="missing tensors: \\['draft_vocab'\\]"):
        ss_mlx.load(ss_dir)
    _edit_config(ss_dir, lambda c: c["speculative_streaming"].update(draft_vocab_size=0))
    _edit_streams(ss_dir, lambda t: t.update(draft_vocab=mx.array([1, 2, 3], dtype=mx.int32)))
    with pytest.raises(ValueError, match="unexpected tensors: \\['draft_vocab'\\]"):
        ss_mlx.load(ss_dir)


def test_draft_vocab_loads_and_decodes_like_mlx_lm(ss_dir):
    _with_draft_vocab(ss_dir, mx.array([2, 5, 7, 11, 60, 99], dtype=mx.int32))
    model, tok = ss_mlx.load(ss_dir)
    assert model.streams.draft.ids.tolist() == [2, 5, 7, 11, 60, 99]
    base, tok2 = mlx_lm.load(str(ss_dir))
    assert ss_mlx.generate(model, tok, "hello", max_tokens=12) == mlx_lm.generate(
        base, tok2, "hello", max_tokens=12
    )


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit,msg",
    [
        (lambda c: c.update(model_type="gemma"), "not supported.*llama, mistral, qwen2"),
        (lambda c: c.pop("speculative_streaming"), "plain model directory"),
        (lambda c: c["speculative_streaming"].update(stream_layers=9), "only 4 layers"),
        (lambda c: c["speculative_streaming"].update(num_streams=0), "num_streams"),
        (lambda c: c["speculative_streaming"].update(stream_position_mode="x"), "position_mode"),
        (
            lambda c: c["speculative_streaming"].update(adapter_modules=["mlp.bogus"]),
            "do not exist",
        ),
    ],
)
def test_bad_config(ss_dir, edit, msg):
    _edit_config(ss_dir, edit)
    with pytest.raises(ValueError, match=msg):
        ss_mlx.load(ss_dir)


def test_corrupt_streams_file(ss_dir):
    (ss_dir / STREAMS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        ss_mlx.load(ss_dir)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        ss_mlx.load(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ss_mlx.load(tmp_path / "f")


def test_sliding_window_model_is_refused(tmp_path):
    base = tiny_base(
        "llama", layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=16
    )
    d = tmp_path / "swa"
    save_tiny_model_dir(base, d)
    with pytest.raises(ValueError, match="trimmable KVCache.*RotatingKVCache"):
        init_model(d, tmp_path / "out", streams=2, stream_layers=1)
    assert not (tmp_path / "out").exists()


def test_init_refuses_nonempty_out(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        init_model(tiny_model_dir, out)
    assert (out / "x").read_text() == "keep"


def test_cli_init_and_generate(tiny_model_dir, tmp_path, capsys):
    from ss_mlx.cli import main

    out = tmp_path / "cli_ss"
    main(
        [
            "init",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--streams",
            "2",
            "--stream-layers",
            "2",
        ]
    )
    capsys.readouterr()
    main(
        [
            "generate",
            "--model",
            str(out),
            "--prompt",
            "hello",
            "--max-tokens",
            "10",
            "--ignore-chat-template",
            "--verbose",
            "False",
        ]
    )
    text = capsys.readouterr().out.strip()
    base, tok = mlx_lm.load(str(out))
    assert text == mlx_lm.generate(base, tok, "hello", max_tokens=10).strip()
    main(
        [
            "generate",
            "--model",
            str(out),
            "--prompt",
            "hello",
            "--max-tokens",
            "10",
            "--verbose",
            "--tree",
            "2,1",
        ]
    )
    assert "tokens per pass" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="invalid tree spec"):
        main(["generate", "--model", str(out), "--tree", "1,1,1"[:-2] + ",z"])
    with pytest.raises(SystemExit, match="unknown command"):
        main(["bogus"])


def test_python_m_entry_point(tiny_model_dir, tmp_path):
    out = tmp_path / "m_ss"
    init_model(tiny_model_dir, out, streams=2, stream_layers=1)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ss_mlx",
            "generate",
            "--model",
            str(out),
            "--prompt",
            "x",
            "--max-tokens",
            "5",
            "--verbose",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "Forward passes" in r.stdout


def test_quantized_model_dir(tmp_path):
    """A 4-bit mlx-lm directory: adapter shapes come from logical dims, output stays lossless."""
    from conftest import write_tiny_tokenizer
    from mlx_lm.utils import quantize_model, save_config, save_model

    base = tiny_base("llama", hidden_size=128, intermediate_size=256)
    config = {k: v for k, v in vars(base.args).items() if v is not None}
    base, config = quantize_model(base, config, group_size=64, bits=4)
    d = tmp_path / "q4"
    d.mkdir()
    save_model(d, base)
    save_config(config, d / "config.json")
    write_tiny_tokenizer(d)
    out = init_model(d, tmp_path / "q4ss", streams=2, stream_layers=2, adapter_rank=2,
                     adapter_modules=("self_attn.q_proj", "mlp.down_proj"),
                     adapter_init_scale=0.1)
    model, tok = ss_mlx.load(out)
    assert model.streams.adapters[3]["mlp.down_proj"][0].shape == (2, 256, 2)
    ref_model, ref_tok = mlx_lm.load(str(out))
    assert ss_mlx.generate(model, tok, "quant", max_tokens=20) == mlx_lm.generate(
        ref_model, ref_tok, "quant", max_tokens=20
    )
