"""`ss-mlx import-gguf` on tiny GGUF files written the way llama.cpp writes them.

The fixture uses the `gguf` package (llama.cpp's own Python writer and quantizer): random llama
weights in F32/F16/BF16/Q8_0/Q4_0/Q4_1, Q/K rows permuted as convert_hf_to_gguf does, a small
byte-level BPE vocabulary with merges, and a chat template.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import ss_mlx  # noqa: F401  (OpenBLAS before first mlx use)
from ss_mlx.prepare.gguf_import import GGUFImportError, import_gguf, main, unpermute_rows

gguf = pytest.importorskip("gguf")

from gguf_tiny import (  # noqa: E402
    CONTEXT,
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    RMS_EPS,
    ROPE_THETA,
    USER_TOKEN,
    permute,
    tiny_vocab,
    write_tiny_gguf,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    originals, expected = write_tiny_gguf(root / "tiny.gguf")
    out = import_gguf(root / "tiny.gguf", root / "model", dtype="float32")
    return root / "tiny.gguf", out, originals, expected


def test_unpermute_inverts_llama_cpp_permute():
    x = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(np.array(unpermute_rows(mx.array(permute(x, 8)), 8)), x)


def test_tensors_round_trip(tiny):
    _, out, originals, expected = tiny
    got = mx.load(str(out / "model.safetensors"))
    assert set(got) == set(expected)
    for name, ref in expected.items():
        arr = np.array(got[name])
        assert arr.dtype == np.float32 and arr.shape == ref.shape, name
        # Same values as gguf's own dequantizer (up to fp32 rounding of scale*q + bias).
        np.testing.assert_allclose(arr, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))
        # ... and the original weights within the quantization error (4-bit: < 1 step).
        step = np.abs(originals[name]).max() / 7
        assert np.abs(arr - originals[name]).max() <= step, name
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ):
        assert np.array_equal(
            np.array(got[name]), originals[name]
        )  # F32: permutation undone exactly


def test_config(tiny, tmp_path):
    _, out, _, _ = tiny
    cfg = json.loads((out / "config.json").read_text())
    vocab = len(tiny_vocab()[0])
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (
        LAYERS,
        HIDDEN,
        FFN,
    )
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert (cfg["rope_theta"], cfg["rms_norm_eps"]) == (ROPE_THETA, RMS_EPS)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (vocab, CONTEXT)
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2

    write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    tied = import_gguf(tmp_path / "tied.gguf", tmp_path / "tied", dtype="float32")
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in mx.load(str(tied / "model.safetensors"))


def _reference_logits(expected: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits of an mlx-lm llama built directly from the original (HF-order) tensors."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        vocab_size=expected["model.embed_tokens.weight"].shape[0],
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    model.load_weights([(k, mx.array(v)) for k, v in expected.items()])
    return np.array(model(mx.array([tokens]))[0])


TOKENS = [5, 77, 130, 263, 9, 201, 44, 264, 3, 100, 17, 250]


def test_logits_match_original_tensors(tiny):
    from mlx_lm import load

    _, out, _, expected = tiny
    model, _ = load(str(out))
    got = np.array(model(mx.array([TOKENS]))[0])
    ref = _reference_logits(expected, TOKENS)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # The check has teeth: keeping llama.cpp's Q/K row order changes the logits.
    permuted = dict(expected)
    for name, n in (("q_proj", HEADS), ("k_proj", KV_HEADS)):
        key = f"model.layers.1.self_attn.{name}.weight"
        permuted[key] = permute(expected[key], n)
    assert np.abs(_reference_logits(permuted, TOKENS) - ref).max() > 1e-2


def test_tokenizer_and_chat_template(tiny):
    from mlx_lm import load
    from transformers import AutoTokenizer

    _, out, _, _ = tiny
    tokens, _ = tiny_vocab()
    ids = {t: i for i, t in enumerate(tokens)}
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.encode("hello world", add_special_tokens=False) == [ids["hello"], ids["Ġworld"]]
    # SmolLM's pre-tokenizer splits digits individually; specials and user tokens stay whole.
    assert tok.encode("12", add_special_tokens=False) == [ids["1"], ids["2"]]
    assert tok.encode("<|im_start|>hi<think>", add_special_tokens=False) == [
        ids["<|im_start|>"],
        ids["h"],
        ids["i"],
        ids[USER_TOKEN],
    ]
    text = "hello world 123, naïve  café!\n\tend"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    messages = [{"role": "user", "content": "hello"}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"

    _, mtok = load(str(out))
    assert mtok.encode("hello world", add_special_tokens=False) == [ids["hello"], ids["Ġworld"]]
    assert mtok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == chat
    assert ids["<|im_end|>"] in mtok.eos_token_ids


def test_llama3_pre_tokenizer_and_bos(tmp_path):
    from transformers import AutoTokenizer

    write_tiny_gguf(tmp_path / "l3.gguf", pre="llama-bpe", add_bos=True)
    out = import_gguf(tmp_path / "l3.gguf", tmp_path / "l3", dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(out))
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("hello 12345")
    assert [p for p, _ in pieces] == ["hello", "Ġ", "123", "45"]  # digits in groups of 3
    ids = tok.encode("hello")
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "hello"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype(tiny, tmp_path, dtype):
    gguf_path, _, _, expected = tiny
    out = import_gguf(gguf_path, tmp_path / "m", dtype=dtype)
    got = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in got.values()} == {getattr(mx, dtype)}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _truncated(tmp_path, tiny):
    data = tiny[0].read_bytes()
    (tmp_path / "in.gguf").write_bytes(data[: len(data) - 1000])


BAD_INPUTS = {
    "missing": (lambda tmp, tiny: None, FileNotFoundError, "not found"),
    "not gguf": (
        lambda tmp, tiny: (tmp / "in.gguf").write_bytes(b"PK\x03\x04" + bytes(200)),
        GGUFImportError,
        "not a GGUF file",
    ),
    "truncated": (_truncated, GGUFImportError, "truncated"),
    "architecture": (
        lambda tmp, tiny: write_tiny_gguf(tmp / "in.gguf", arch="qwen2"),
        GGUFImportError,
        "unsupported architecture 'qwen2'",
    ),
    "quant type": (
        lambda tmp, tiny: write_tiny_gguf(tmp / "in.gguf", types={"blk.0.ffn_up.weight": "Q5_0"}),
        GGUFImportError,
        "unsupported quantization type in blk.0.ffn_up.weight (Q5_0)",
    ),
    "pre-tokenizer": (
        lambda tmp, tiny: write_tiny_gguf(tmp / "in.gguf", pre="mystery"),
        GGUFImportError,
        "unsupported pre-tokenizer 'mystery'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_clear_error_and_no_output(tiny, tmp_path, case):
    make, exc, message = BAD_INPUTS[case]
    make(tmp_path, tiny)
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_gguf(tmp_path / "in.gguf", tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_existing_output(tiny, tmp_path):
    gguf_path = tiny[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        import_gguf(gguf_path, out, dtype="float32")
    assert (out / "keep.txt").exists()
    import_gguf(gguf_path, out, dtype="float32", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_cli(tiny, tmp_path, capsys):
    main([str(tiny[0]), "--out", str(tmp_path / "cli"), "--dtype", "float16"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / "tokenizer.json").exists()
    with pytest.raises(SystemExit, match="ss-mlx import-gguf: error: .*not found"):
        main([str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x")])


@pytest.mark.torch
def test_transformers_loads_import(tiny):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    _, out, _, expected = tiny
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([TOKENS])).logits[0].numpy()
    ref = _reference_logits(expected, TOKENS)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
