"""Tiny random Hugging Face checkpoints for tests (PyTorch side). Import only from torch tests."""

from pathlib import Path

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
