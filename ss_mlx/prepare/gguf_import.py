"""Import a llama-family GGUF file (llama.cpp's format) as a Hugging Face model directory.

`ss-mlx import-gguf FILE --out DIR` writes config.json, model.safetensors (dequantized, HF tensor
names, llama.cpp's Q/K row permutation undone), tokenizer.json, tokenizer_config.json (with the chat
template) and generation_config.json. The directory loads with `mlx_lm.load` and with transformers'
`AutoModelForCausalLM` / `AutoTokenizer`.

Tensors are read with `mx.load` (MLX reads GGUF natively and returns Q4_0/Q4_1/Q8_0 as
MLX-quantized weight/scales/biases). The header is also parsed here, in plain Python, so that a
non-GGUF, truncated or unsupported file is rejected with a precise message before anything is
written.
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..files import check_out_dir, make_temp_dir, publish_dir, write_json

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


class GGUFImportError(ValueError):
    """The file is not a GGUF file this importer can convert (corrupt, unsupported, ...)."""


# ggml tensor type id -> name, for messages (ggml.h `enum ggml_type`).
_GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# Supported types: name -> (elements per block, bytes per block, MLX quantization bits or None).
_SUPPORTED_TYPES = {
    "F32": (1, 4, None),
    "F16": (1, 2, None),
    "BF16": (1, 2, None),
    "Q8_0": (32, 34, 8),
    "Q4_0": (32, 18, 4),
    "Q4_1": (32, 20, 4),
}
_QUANT_GROUP_SIZE = 32

# GGUF metadata value types (gguf.md): id -> struct format of a scalar.
_SCALAR_FORMATS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_TYPE_STRING = 8
_TYPE_ARRAY = 9

# llama.cpp tensor name (per block, without the "blk.N." prefix) -> HF name inside a decoder layer.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# tokenizer.ggml.token_type values (llama.cpp `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# The GPT-2 split regex is built into tokenizers' ByteLevel pre-tokenizer (use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> pre-tokenizer family. The names and regexes are llama.cpp's
# (llama-vocab.cpp); each family is written the way the original HF tokenizer.json spells it.
_PRE_TOKENIZER_FAMILIES = {
    # "\p{N}" then the GPT-2 regex == HF Sequence[Digits(individual), ByteLevel] (SmolLM...).
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
}


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/MLX order (GGUF stores dimensions innermost first)
    type_name: str
    offset: int  # absolute byte offset of the data in the file


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


def default_dtype() -> str:
    """float16 on macOS (Metal), float32 elsewhere (MLX's CPU backend is fastest in fp32)."""
    return "float16" if sys.platform == "darwin" else "float32"


# ---------------------------------------------------------------------------------------------
# GGUF header


class _Cursor:
    """Little-endian reader over a memory map; any read past the end raises GGUFImportError."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFImportError(
                f"{self.path}: truncated or corrupt GGUF header (at byte {self.pos})"
            ) from None
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise GGUFImportError(f"{self.path}: truncated or corrupt GGUF header (string)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _TYPE_STRING:
            return self.string()
        if vtype == _TYPE_ARRAY:
            etype, count = self.unpack("IQ")
            if etype in _SCALAR_FORMATS:
                dtype = np.dtype("<" + _SCALAR_FORMATS[etype].replace("?", "b1"))
                if self.pos + count * dtype.itemsize > len(self.buf):
                    raise GGUFImportError(f"{self.path}: truncated or corrupt GGUF header (array)")
                # Vectorized: token_type arrays have one entry per vocabulary item.
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise GGUFImportError(f"{self.path}: corrupt GGUF header (value type {vtype})")
        return self.unpack(_SCALAR_FORMATS[vtype])


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF file's metadata and tensor table (tensor data is not read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFImportError(f"{path}: not a GGUF file (missing 'GGUF' magic bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            cur.pos = 4
            version = cur.unpack("I")
            if version not in (2, 3):
                raise GGUFImportError(
                    f"{path}: unsupported GGUF version {version} (expected 2 or 3; "
                    "big-endian files are not supported)"
                )
            n_tensors, n_kv = cur.unpack("QQ")
            if n_tensors > size or n_kv > size:
                raise GGUFImportError(f"{path}: corrupt GGUF header (counts)")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.unpack("I"))
            raw_tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("I")
                if n_dims > 8:
                    raise GGUFImportError(f"{path}: corrupt GGUF tensor table ({name!r})")
                dims = [cur.unpack("Q") for _ in range(n_dims)]
                type_id, offset = cur.unpack("IQ")
                raw_tensors.append((name, dims, type_id, offset))
            header_end = cur.pos
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-header_end // alignment) * alignment
    tensors = {}
    for name, dims, type_id, offset in raw_tensors:
        type_name = _GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
        info = GGUFTensorInfo(name, tuple(reversed(dims)), type_name, data_start + offset)
        tensors[name] = info
        if type_name in _SUPPORTED_TYPES:
            block, block_bytes, _ = _SUPPORTED_TYPES[type_name]
            n = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise GGUFImportError(f"{path}: tensor {name!r} has a row not divisible by {block}")
            if info.offset + n // block * block_bytes > size:
                raise GGUFImportError(
                    f"{path}: tensor {name!r} extends past the end of the file "
                    f"({size} bytes); the file is truncated or corrupt"
                )
    return GGUFHeader(version, metadata, tensors)


# ---------------------------------------------------------------------------------------------
# config


def _meta(md: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key not in md:
        if required:
            raise GGUFImportError(f"GGUF metadata lacks {key!r}")
        return default
    return md[key]


def llama_config(header: GGUFHeader) -> dict[str, Any]:
    """The HF LlamaForCausalLM config.json implied by the GGUF metadata and tensor shapes."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(
            f"unsupported architecture {arch!r} (general.architecture); only llama-family "
            "models (llama, mistral, SmolLM, ...: general.architecture = 'llama') are supported"
        )
    embed = header.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise GGUFImportError("GGUF has no 2-D token_embd.weight tensor")
    hidden = int(_meta(md, "llama.embedding_length", required=True))
    n_heads = int(_meta(md, "llama.attention.head_count", required=True))
    n_kv = int(_meta(md, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_meta(md, "llama.attention.key_length", hidden // n_heads))
    if int(_meta(md, "llama.attention.value_length", head_dim)) != head_dim:
        raise GGUFImportError("key_length != value_length is not a llama model")
    if int(_meta(md, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFImportError("partial rotary embeddings (rope.dimension_count) are not supported")
    if "rope_freqs.weight" in header.tensors:
        raise GGUFImportError("llama3-style RoPE scaling (rope_freqs.weight) is not supported")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_meta(md, "llama.feed_forward_length", required=True)),
        "num_hidden_layers": int(_meta(md, "llama.block_count", required=True)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_meta(md, "llama.context_length", 2048)),
        "rms_norm_eps": _f32(_meta(md, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_meta(md, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(md),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    for key, gguf_key in (("bos_token_id", "bos"), ("pad_token_id", "padding")):
        if f"tokenizer.ggml.{gguf_key}_token_id" in md:
            config[key] = int(md[f"tokenizer.ggml.{gguf_key}_token_id"])
    eos = _eos_token_ids(md)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _f32(value: float) -> float:
    # GGUF stores float32: write 1e-05, not 9.999999747378752e-06 (same float32 either way).
    return float(str(np.float32(value)))


def _rope_scaling(md: dict[str, Any]) -> dict[str, Any] | None:
    kind = md.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(md["llama.rope.scaling.factor"])}
    raise GGUFImportError(f"RoPE scaling type {kind!r} is not supported")


def _eos_token_ids(md: dict[str, Any]) -> list[int]:
    # Chat models often end a turn with an EOT token that differs from EOS; stop on both.
    ids = []
    for key in ("eos", "eot", "eom"):
        value = md.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


# ---------------------------------------------------------------------------------------------
# tensors


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, f = config["hidden_size"], config["intermediate_size"]
    q, kv = (config[k] * config["head_dim"] for k in ("num_attention_heads", "num_key_value_heads"))
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], d)
    layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def check_tensors(header: GGUFHeader, config: dict[str, Any]) -> dict[str, str]:
    """Return {gguf name: hf name}; raise listing every unsupported, unknown or missing tensor."""
    bad_types = sorted(
        f"{t.name} ({t.type_name})"
        for t in header.tensors.values()
        if t.type_name not in _SUPPORTED_TYPES
    )
    if bad_types:
        shown = ", ".join(bad_types[:5]) + (
            f" and {len(bad_types) - 5} more" if len(bad_types) > 5 else ""
        )
        raise GGUFImportError(
            f"unsupported quantization type in {shown}; supported: {', '.join(_SUPPORTED_TYPES)}"
        )
    names = {g: _hf_name(g) for g in header.tensors}
    unknown = sorted(g for g, h in names.items() if h is None)
    if unknown:
        raise GGUFImportError(f"GGUF tensors with no llama equivalent: {', '.join(unknown)}")
    expected = _expected_shapes(config)
    present = {h: header.tensors[g].shape for g, h in names.items()}
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    wrong = sorted(
        f"{h} {present[h]} != {expected[h]}"
        for h in present
        if h in expected and present[h] != expected[h]
    )
    if missing or extra or wrong:
        problems = [("missing", missing), ("unexpected", extra), ("wrong shape", wrong)]
        raise GGUFImportError(
            "GGUF tensors do not match the llama config: "
            + "; ".join(f"{what}: {', '.join(v)}" for what, v in problems if v)
        )
    return names


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo convert_hf_to_gguf's `permute`, which interleaves each head's two RoPE halves.

    llama.cpp's RoPE rotates adjacent pairs (x0, x1), HF's rotates (x_i, x_{i + d/2}); the
    converter reorders each head's rows from (2, d/2) to (d/2, 2). This is its inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bf16_tensor(path: Path, info: GGUFTensorInfo) -> mx.array:
    # mx.load casts BF16 to float16 (lossy outside fp16's range); widen the raw bits to fp32.
    n = int(np.prod(info.shape))
    raw = np.fromfile(path, dtype="<u2", count=n, offset=info.offset)
    return mx.array((raw.astype(np.uint32) << 16).view(np.float32).reshape(info.shape))


def load_tensors(
    path: str | Path,
    header: GGUFHeader,
    config: dict[str, Any],
    dtype: str,
    progress: bool = False,
) -> dict[str, mx.array]:
    """Dequantized tensors under HF names, Q/K in HF row order, cast to `dtype`."""
    from tqdm import tqdm

    path = Path(path)
    names = check_tensors(header, config)
    try:
        raw = mx.load(str(path), format="gguf")
    except RuntimeError as e:
        raise GGUFImportError(f"{path}: MLX could not read the GGUF tensors: {e}") from None
    heads = {
        "self_attn.q_proj.weight": config["num_attention_heads"],
        "self_attn.k_proj.weight": config["num_key_value_heads"],
    }
    out = {}
    for gguf_name, hf_name in tqdm(
        names.items(), desc="import", unit="tensor", disable=not progress
    ):
        info = header.tensors[gguf_name]
        bits = _SUPPORTED_TYPES[info.type_name][2]
        if info.type_name == "BF16":
            w = _bf16_tensor(path, info)
        elif bits is None:
            w = raw[gguf_name].astype(mx.float32)
        else:
            # MLX names the parts of a quantized "X.weight" as X.weight / X.scales / X.biases.
            stem = gguf_name.removesuffix(".weight")
            w = mx.dequantize(
                raw[gguf_name],
                # fp32 scales: ggml dequantizes in fp32, fp16 arithmetic would add rounding error.
                raw[f"{stem}.scales"].astype(mx.float32),
                raw[f"{stem}.biases"].astype(mx.float32),
                group_size=_QUANT_GROUP_SIZE,
                bits=bits,
            )
        for suffix, n_heads in heads.items():
            if hf_name.endswith(suffix):
                w = unpermute_rows(w, n_heads)
        out[hf_name] = w.astype(getattr(mx, dtype))
        mx.eval(out[hf_name])
    return out


# ---------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(md: dict[str, Any]):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's byte-level BPE tokenizer in `md`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"unsupported tokenizer model {kind!r} (tokenizer.ggml.model); only byte-level BPE "
            "('gpt2') tokenizers are supported"
        )
    pre = md.get("tokenizer.ggml.pre")
    family = _PRE_TOKENIZER_FAMILIES.get(pre)
    if family is None:
        raise GGUFImportError(
            f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
            + ", ".join(sorted(_PRE_TOKENIZER_FAMILIES))
        )
    tokens = list(md["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if family == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif family == "digits+gpt2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _TOKEN_CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _TOKEN_USER_DEFINED
        ]
    )
    tok.post_processor = _post_processor(md, tokens, processors)
    return tok


def _post_processor(md: dict[str, Any], tokens: list[str], processors):
    # Mirror llama.cpp's add_bos/add_eos flags; without them only byte-level offsets matter.
    added = {
        where: int(md[f"tokenizer.ggml.{where}_token_id"])
        for where in ("bos", "eos")
        if md.get(f"tokenizer.ggml.add_{where}_token") and f"tokenizer.ggml.{where}_token_id" in md
    }
    if not added:
        return processors.ByteLevel(trim_offsets=False)
    pre = [tokens[added["bos"]]] if "bos" in added else []
    post = [tokens[added["eos"]]] if "eos" in added else []
    second = [f"{t}:1" for t in pre] + ["$B:1"] + [f"{t}:1" for t in post]
    return processors.TemplateProcessing(
        single=" ".join([*pre, "$A", *post]),
        pair=" ".join([*pre, "$A", *post, *second]),
        special_tokens=[(tokens[i], i) for i in added.values()],
    )


def tokenizer_config(md: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    tokens = md["tokenizer.ggml.tokens"]
    out: dict[str, Any] = {
        # The generic fast class: it uses tokenizer.json as written, with no class-specific fixups.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        idx = md.get(f"tokenizer.ggml.{key}_token_id")
        if idx is not None and 0 <= int(idx) < len(tokens):
            out[f"{name}_token"] = tokens[int(idx)]
    if "tokenizer.chat_template" in md:
        out["chat_template"] = md["tokenizer.chat_template"]
    return out


# ---------------------------------------------------------------------------------------------
# driver


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert a llama-family GGUF file into a HF model directory; returns `out_dir`.

    `dtype` is the storage type of the dequantized weights (default: float16 on macOS, float32
    elsewhere). The output appears only when complete: it is built in a temp dir next to `out_dir`
    and renamed. Raises FileNotFoundError, GGUFImportError (bad or unsupported input) or
    FileExistsError (a non-empty `out_dir` without `overwrite`).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_out_dir(out_dir, gguf_path)
    dtype = dtype or default_dtype()
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    header = read_gguf_header(gguf_path)
    config = llama_config(header)
    check_tensors(header, config)
    tokenizer = build_tokenizer(header.metadata)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (use overwrite / --force)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir)
    try:
        weights = load_tensors(gguf_path, header, config, dtype, progress=progress)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        del weights
        write_json(tmp / "config.json", {**config, "torch_dtype": dtype})
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(header.metadata, config))
        gen = {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config
        }
        write_json(tmp / "generation_config.json", gen)
        publish_dir(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ss-mlx import-gguf",
        description="Convert a llama-family GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1) into a "
        "Hugging Face model directory usable by mlx-lm and transformers.",
    )
    parser.add_argument("file", type=Path, help="the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--dtype", choices=SUPPORTED_DTYPES, default=None,
        help=f"weight dtype (default: {default_dtype()} on this platform)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = import_gguf(args.file, args.out, args.dtype, overwrite=args.force, progress=True)
    except (OSError, ValueError) as e:  # GGUFImportError, and check_out_dir's refusals
        sys.exit(f"ss-mlx import-gguf: error: {e}")
    print(out)


if __name__ == "__main__":
    main()
