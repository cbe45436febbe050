# ruff: noqa: I001
import ss_mlx  # noqa: F401  (loads OpenBLAS before mlx.core is first imported)
import importlib
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from ss_mlx.config import SSConfig
from ss_mlx.loader import attach_streams, head_vocab_size, stream_shapes
from ss_mlx.model.streams import random_stream_tensors

TINY_ARGS = dict(
    hidden_size=64,
    num_hidden_layers=4,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=128,
    rope_theta=10000.0,
    max_position_embeddings=1024,
)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
ADAPTER_MODULES = {
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}
DEFAULT_ADAPTERS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")


def tiny_base(model_type: str, seed: int = 0, **overrides):
    """A random mlx-lm model of `model_type`, with weights scaled so greedy argmax is decisive."""
    module = importlib.import_module(
        f"mlx_lm.models.{'llama' if model_type == 'mistral' else model_type}"
    )
    args = dict(TINY_ARGS, model_type=model_type, **overrides)
    if model_type == "qwen3":
        args.setdefault("head_dim", 16)
        args.setdefault("tie_word_embeddings", True)
    if model_type in ("llama", "mistral"):
        args.setdefault("tie_word_embeddings", False)
    model = module.Model(module.ModelArgs.from_dict(args))
    rng = np.random.default_rng(seed)
    params = tree_flatten(model.parameters())
    new = []
    for name, p in params:
        if "norm" in name:
            arr = 1.0 + 0.1 * rng.standard_normal(p.shape)
        elif "embed" in name:
            arr = rng.standard_normal(p.shape)
        else:
            arr = rng.standard_normal(p.shape) * (1.5 / np.sqrt(p.shape[-1]))
        new.append((name, mx.array(arr.astype(np.float32))))
    model.load_weights(new)
    mx.eval(model.parameters())
    return model


def tiny_ss_model(
    model_type: str = "llama",
    num_streams: int = 3,
    stream_layers: int = 2,
    adapter_rank: int = 0,
    position_mode: str = "shifted",
    prune_rank: int = 0,
    seed: int = 0,
    base=None,
    draft_vocab_size: int = 0,
    **overrides,
):
    base = base if base is not None else tiny_base(model_type, seed, **overrides)
    modules = ADAPTER_MODULES.get(model_type, DEFAULT_ADAPTERS) if adapter_rank else ()
    cfg = SSConfig.from_dict(
        {
            "num_streams": num_streams,
            "stream_layers": stream_layers,
            "stream_position_mode": position_mode,
            "adapter_rank": adapter_rank,
            "adapter_modules": list(modules),
            "adapter_scale": 0.5,
            "prune_rank": prune_rank,
            "draft_vocab_size": draft_vocab_size,
        }
    )
    tensors = random_stream_tensors(
        stream_shapes(base, cfg),
        seed=seed + 1,
        embed_scale=0.5,
        adapter_scale=0.3 if adapter_rank else 0.0,
        vocab_size=head_vocab_size(base),
    )
    return attach_streams(base, cfg, tensors, "test")


@pytest.fixture
def tiny_llama():
    return tiny_ss_model("llama")


def cast_model(model, dtype):
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_tokenizer(out_dir, vocab_size: int = 128) -> None:
    """A character-level tokenizer with a ChatML template (ids < vocab_size), no downloads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def save_tiny_model_dir(base, out_dir) -> None:
    """Write an mlx-lm model directory (config, weights, tokenizer) for `base`."""
    from mlx_lm.utils import save_config, save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, base)
    config = {k: v for k, v in vars(base.args).items() if v is not None}
    save_config(config, out_dir / "config.json")
    write_tiny_tokenizer(out_dir)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A plain (no streams) tiny llama model directory with a tokenizer."""
    d = tmp_path / "base"
    save_tiny_model_dir(tiny_base("llama"), d)
    return d


PROMPTS = ["hello hello hello world", "abcabcabc abc", "the cat sat on the mat, the cat"]


def write_medusa(model_dir, num_heads=3, num_layers=1, shared=True, seed=0, dim=64, vocab=128):
    """Random Medusa heads in the trainer's file format, added to `model_dir`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for k in range(num_heads):
        for i in range(num_layers):
            w = rng.standard_normal((dim, dim)) * (1.0 / np.sqrt(dim))
            tensors[f"medusa_head.{k}.{i}.linear.weight"] = mx.array(w.astype(np.float32))
            b = rng.standard_normal((dim,)) * 0.1
            tensors[f"medusa_head.{k}.{i}.linear.bias"] = mx.array(b.astype(np.float32))
        if not shared:
            w = rng.standard_normal((vocab, dim)) * (1.0 / np.sqrt(dim))
            tensors[f"medusa_head.{k}.{num_layers}.weight"] = mx.array(w.astype(np.float32))
    mx.save_safetensors(str(model_dir / "medusa_heads.safetensors"), tensors)
    cfg_file = model_dir / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["medusa"] = {
        "format_version": 1,
        "num_heads": num_heads,
        "num_layers": num_layers,
        "lm_head": "shared" if shared else "own",
    }
    cfg_file.write_text(json.dumps(cfg))


def write_prompts(path, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread for the test (the test machine is small and shared: one thread is
    several times faster than two); torch is imported only by the tests that ask for it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
