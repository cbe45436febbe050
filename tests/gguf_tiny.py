"""Tiny GGUF files written the way llama.cpp writes them (for tests; needs the `gguf` package).

Random llama weights in F32/F16/BF16/Q8_0/Q4_0/Q4_1, Q/K rows permuted as convert_hf_to_gguf
does, a small byte-level BPE vocabulary with merges, and a chat template.
"""

from pathlib import Path

import gguf
import numpy as np

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS, CONTEXT = 50000.0, 1e-6, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<think>"
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Storage type of each tensor (per layer for blk.N.*): every supported type, both Q/K paths.
LAYER_TYPES = [
    {
        "attn_q": "Q4_0",
        "attn_k": "Q4_1",
        "attn_v": "Q8_0",
        "attn_output": "F16",
        "ffn_gate": "Q4_1",
        "ffn_up": "Q4_0",
        "ffn_down": "Q8_0",
    },
    {
        # F32 Q/K: the permutation must be undone exactly.
        "attn_q": "F32",
        "attn_k": "F32",
        "attn_v": "BF16",
        "attn_output": "F32",
        "ffn_gate": "F16",
        "ffn_up": "BF16",
        "ffn_down": "Q4_1",
    },
]
HF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet), by byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + bytes_to_unicode() + [m.replace(" ", "") for m in MERGES] + [USER_TOKEN]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    return tokens, types


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (HF rows -> llama.cpp rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_shape(kind: str, vocab: int) -> tuple[int, ...]:
    return {
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
        "attn_norm": (HIDDEN,),
        "ffn_norm": (HIDDEN,),
        "output_norm": (HIDDEN,),
        "token_embd": (vocab, HIDDEN),
        "output": (vocab, HIDDEN),
    }[kind]


def _add(writer, name: str, x: np.ndarray, type_name: str) -> np.ndarray:
    """Store x as type_name; return what a correct reader gets back (float32)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        writer.add_tensor(name, x)
        return x
    if type_name == "F16":
        writer.add_tensor(name, x.astype(np.float16))
        return x.astype(np.float16).astype(np.float32)
    q = gguf.quants.quantize(x, qtype)
    writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    return gguf.quants.dequantize(q, qtype).astype(np.float32)


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool = False,
    arch: str = "llama",
    pre: str = "smollm",
    types: dict[str, str] | None = None,
    add_bos: bool = False,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Write a tiny llama GGUF; return (original HF tensors, what the importer must produce).

    `types` overrides storage types by GGUF tensor name (e.g. {"blk.0.ffn_up.weight": "Q5_0"}).
    """
    rng = np.random.default_rng(seed)
    tokens, token_types = tiny_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)

    plan = [("token_embd", "model.embed_tokens", "Q8_0"), ("output_norm", "model.norm", "F32")]
    if not tied:
        plan.append(("output", "lm_head", "F16"))
    for i, layer_types in enumerate(LAYER_TYPES):
        for kind, hf in HF_LAYER.items():
            plan.append((f"blk.{i}.{kind}", f"model.layers.{i}.{hf}", layer_types.get(kind, "F32")))
    originals, expected = {}, {}
    for gguf_stem, hf_stem, type_name in plan:
        kind = gguf_stem.split(".")[-1]
        shape = _hf_shape(kind, vocab)
        if len(shape) == 1:
            x = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            x = rng.standard_normal(shape) * (
                1.0 if kind == "token_embd" else 1.5 / np.sqrt(shape[1])
            )
        x = x.astype(np.float32)
        heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(kind)
        stored = permute(x, heads) if heads else x
        name = f"{gguf_stem}.weight"
        back = _add(w, name, stored, (types or {}).get(name, type_name))
        if heads:
            back = unpermute_np(back, heads)
        originals[f"{hf_stem}.weight"] = x
        expected[f"{hf_stem}.weight"] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals, expected


def unpermute_np(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )
