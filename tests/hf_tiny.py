"""Tiny random Hugging Face checkpoints for tests (PyTorch side). Import only from torch tests."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from ss_mlx_convert.checkpoint_io import open_checkpoint

TINY_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)

MODEL_TYPES = ("llama", "qwen2", "qwen3")


def tiny_hf_config(model_type: str, **overrides):
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "phi3": transformers.Phi3Config,
    }[model_type]
    kw = dict(TINY_COMMON)
    if model_type == "qwen3":
        kw["head_dim"] = 16
    if model_type in ("qwen2", "qwen3"):
        kw["use_sliding_window"] = False
    kw["tie_word_embeddings"] = model_type != "llama"
    kw.update(overrides)
    return cls(**kw)


def make_tiny_hf(model_type: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a random tiny causal LM (config.json + model.safetensors) to out_dir."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_hf_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Random init has tiny weights and near-uniform logits; scale up so greedy decoding is decisive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# Character-level vocabulary: 4 specials + 83 characters = 87 ids, under TINY_COMMON's vocab_size.
TINY_SPECIALS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CHARS = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-()=+*/<>|_"
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_tokenizer(out_dir: Path, chat_template: bool = True) -> Path:
    """Write a character-level HF tokenizer (ChatML template, eos <|im_end|>) to out_dir."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + tuple(TINY_CHARS))}
    assert len(vocab) <= TINY_COMMON["vocab_size"]
    # BPE without merges = one token per character; unknown characters map to <unk>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(TINY_SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return Path(out_dir)


# ---------------------------------------------------------------- SS checkpoints

STREAMS = "speculative_streams.safetensors"
LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = ["self_attn.q_proj", "mlp.down_proj"]


def make_ss_checkpoint(
    d: Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    num_streams: int = 3,
    stream_layers: int = 2,
    adapter_rank: int = 4,
    adapter_modules: tuple = tuple(ADAPTERS),
    prune_rank: int = 0,
    lora: dict | None = None,
    draft_vocab: int = 0,
) -> Path:
    """What `ss-mlx train --out` writes: HF model + tokenizer + SS block + streams (+ peft LoRA);
    `draft_vocab` > 0: the streams draft from that many random token ids."""
    make_tiny_hf(model_type, d, seed)
    make_tiny_tokenizer(d)
    block = {
        "format_version": 1,
        "num_streams": num_streams,
        "stream_layers": stream_layers,
        "stream_position_mode": "shifted",
        "adapter_rank": adapter_rank,
        "adapter_scale": 0.5,
        "adapter_modules": list(adapter_modules) if adapter_rank else [],
        "prune_rank": prune_rank,
        "tree": {"widths": [2, 2, 1][:num_streams], "node_budget": None},
    }
    if draft_vocab:
        block["draft_vocab_size"] = draft_vocab
    config = json.loads((d / "config.json").read_text())
    config["speculative_streaming"] = block
    config["ss_training"] = {"mode": "shared" if lora else "lossless"}
    (d / "config.json").write_text(json.dumps(config, indent=2))

    base = open_checkpoint(d)
    rng = np.random.default_rng(seed + 100)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    t = {"stream_embeddings": rng.standard_normal((num_streams, hidden)) * 0.5}
    for layer in range(layers - stream_layers, layers):
        for m in block["adapter_modules"]:
            d_out, d_in = base.shape(f"model.layers.{layer}.{m}.weight")
            t[f"adapters.{layer}.{m}.a"] = rng.standard_normal((num_streams, d_in, adapter_rank))
            t[f"adapters.{layer}.{m}.b"] = rng.standard_normal((num_streams, adapter_rank, d_out))
            t[f"adapters.{layer}.{m}.a"] *= 0.2
            t[f"adapters.{layer}.{m}.b"] *= 0.2
    if prune_rank:
        t["prune.a"] = rng.standard_normal((hidden, prune_rank)) * 0.1
        t["prune.b"] = rng.standard_normal((prune_rank, hidden)) * 0.1
    t = {k: v.astype(np.float32) for k, v in t.items()}
    if draft_vocab:
        ids = rng.choice(config["vocab_size"], size=draft_vocab, replace=False)
        t["draft_vocab"] = np.sort(ids).astype(np.int32)
    save_file(t, str(d / STREAMS))

    if lora is not None:
        add_peft_lora(d, seed, **lora)
    return d


def add_peft_lora(d: Path, seed: int, **kw) -> None:
    """A random (non-zero B) peft LoRA on the base, saved unmerged next to it, as peft does."""
    import peft
    import transformers

    torch.manual_seed(seed + 7)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    cfg.update(kw)
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    pm.save_pretrained(d)


def peft_merged_state(d: Path) -> dict[str, np.ndarray]:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    if not getattr(model, "_hf_peft_config_loaded", False):
        model = peft.PeftModel.from_pretrained(model, d)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    else:  # adapter attached by transformers itself
        for m in model.modules():
            if hasattr(m, "merge"):
                m.merge()
    return {
        k.replace(".base_layer", ""): v.detach().numpy()
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }
