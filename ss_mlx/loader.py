"""Load SS model directories (an mlx-lm model dir + stream parameters), or wrap a loaded model."""

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import MODEL_REMAPPING

from .config import CONFIG_KEY, MEDUSA_FILE, STREAMS_FILE, SUPPORTED_MODEL_TYPES, SSConfig
from .decode.cache import make_cache
from .decode.tree import as_tree
from .model.ss_model import SSModel
from .model.streams import (
    DRAFT_VOCAB,
    StreamParams,
    check_draft_vocab,
    check_tensors,
    expected_shapes,
)

# mlx-lm's Hub patterns drop files it does not know; an SS repo needs its stream/head files.
SS_FILES = (STREAMS_FILE, MEDUSA_FILE)
# Any of these lets transformers build a tokenizer (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local directory, or a Hub repo (with its stream files) where the hub is reachable."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {path} is a file; pass the model directory")
        return path
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, _download

    try:
        return Path(
            _download(str(path_or_repo), revision, [*DEFAULT_ALLOW_PATTERNS, *SS_FILES])
        )
    except Exception as e:  # hub errors come in many types; all mean "not available"
        raise FileNotFoundError(
            f"model {str(path_or_repo)!r} is not a local directory and could not be fetched "
            f"from the Hugging Face Hub ({type(e).__name__}: {e})"
        ) from None


def read_config(model_path: Path) -> dict[str, Any]:
    cfg_file = model_path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{model_path} has no config.json; is it a model directory?")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object, got a {type(config).__name__}")
    return config


def check_tokenizer(model_path: Path) -> None:
    """Refuse a directory with no tokenizer file before transformers gives its multi-line
    advice to install sentencepiece."""
    if not any((model_path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{model_path} has no tokenizer (no tokenizer.json or other tokenizer file); "
            "copy the tokenizer files of its base model into it"
        )


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be complete (from its header alone: cheap), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it is only {size} bytes"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return f"its header needs {8 + n} bytes, the file has {size}"
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"its header is unreadable ({type(e).__name__})"
    if 8 + n + end > size:
        return f"its tensors need {8 + n + end} bytes, the file has {size}"
    return None


def check_weight_files(model_path: Path) -> None:
    """Refuse truncated .safetensors files by name, before MLX reports an offset."""
    for f in sorted(model_path.glob("*.safetensors")):
        why = safetensors_problem(f)
        if why is not None:
            raise ValueError(
                f"cannot read {f}: it is truncated or corrupt ({why}); copy or download it again"
            )


def load_mlx_lm(model_path: Path, **kwargs: Any) -> Any:
    """``mlx_lm.load`` of a local directory, with one-line errors for a missing tokenizer and
    truncated or unreadable weight files."""
    check_tokenizer(model_path)
    check_weight_files(model_path)
    try:
        return mlx_lm.load(str(model_path), **kwargs)
    except (OSError, RuntimeError) as e:  # a truncated or unreadable weight file
        raise ValueError(f"cannot load the model in {model_path}: {e}") from None


def model_type_of(config: dict[str, Any]) -> str:
    raw = config.get("model_type")
    return MODEL_REMAPPING.get(raw, raw)


def check_supported(config: dict[str, Any], source: Path) -> str:
    model_type = model_type_of(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {config.get('model_type')!r} is not supported by ss-mlx; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def module_dims(block: nn.Module, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of linear modules inside a block, quantized or not."""
    dims = {}
    for name in names:
        m = block
        for part in name.split("."):
            m = getattr(m, part)
        out_f, packed = m.weight.shape
        in_f = packed * 32 // m.bits if hasattr(m, "bits") else packed
        dims[name] = (in_f, out_f)
    return dims


def head_vocab_size(base: nn.Module) -> int:
    """Rows of the model's LM head (its own, or the tied embedding's), quantized or not."""
    head = base.lm_head if hasattr(base, "lm_head") else base.model.embed_tokens
    return int(head.weight.shape[0])


def stream_shapes(base: nn.Module, cfg: SSConfig) -> dict[str, tuple[int, ...]]:
    """The stream tensors `cfg` implies for this trunk (quantized or not)."""
    embed = base.model.embed_tokens
    hidden = embed.weight.shape[1]
    if hasattr(embed, "bits"):
        hidden = hidden * 32 // embed.bits
    dims = module_dims(base.layers[-1], cfg.adapted_modules)
    return expected_shapes(cfg, len(base.layers), dims, hidden)


def attach_streams(
    base: nn.Module,
    cfg: SSConfig | dict[str, Any],
    tensors: dict[str, mx.array],
    source: str = "stream tensors",
) -> SSModel:
    """Wrap an already loaded mlx-lm model with speculative streams (validated: names, shapes,
    finite values). `cfg` is the config's ``speculative_streaming`` block or an SSConfig."""
    if isinstance(cfg, dict):
        cfg = SSConfig.from_dict(cfg)
    layers = base.layers
    cfg.check_model(MODEL_REMAPPING.get(base.model_type, base.model_type), len(layers))
    rope = getattr(layers[0].self_attn, "rope", None)
    if rope is None or type(rope).__name__ == "DynamicNTKScalingRoPE":
        raise ValueError(
            f"{source}: this model's RoPE ({type(rope).__name__}) cannot take per-token "
            "positions, which tree verification needs"
        )
    make_cache(base)  # refuses sliding-window / rotating caches with a clear error
    if cfg.tree is not None:  # else every generate without --tree would fail on it
        try:
            as_tree(cfg.tree, cfg.num_streams, "speculative streams")
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise ValueError(
                f"{source}: the config's '{CONFIG_KEY}.tree' is invalid: {e}"
            ) from None
    check_tensors(tensors, stream_shapes(base, cfg), source)
    if cfg.draft_vocab_size > 0:
        check_draft_vocab(tensors[DRAFT_VOCAB], head_vocab_size(base), source)
    streams = StreamParams(cfg, tensors, len(layers) - cfg.stream_layers)
    return SSModel(base, cfg, streams)


def load(
    path_or_hf_repo: str | Path,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | None = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[SSModel, TokenizerWrapper] | tuple[SSModel, TokenizerWrapper, dict[str, Any]]:
    """Load an SS model directory: the mlx-lm model plus its speculative streams.

    Same arguments as ``mlx_lm.load`` (passed on to it for the base model). An `adapter_path`
    holds LoRA adapters of the trunk (mlx-lm's format); the streams were trained for the
    trunk without them, so acceptance may drop, but output stays exact for the adapted model.

    Returns:
        (SSModel, TokenizerWrapper), plus the config dict when `return_config`.
    """
    model_path = resolve_model_path(path_or_hf_repo, revision)
    config = read_config(model_path)
    check_supported(config, model_path)
    if CONFIG_KEY not in config:
        raise ValueError(
            f"{model_path} is a plain model directory (config.json has no '{CONFIG_KEY}' "
            "block); add streams with `ss-mlx init` or convert a trained checkpoint with "
            "`ss-mlx convert`"
        )
    cfg = SSConfig.from_dict(config[CONFIG_KEY])
    streams_file = model_path / STREAMS_FILE
    if not streams_file.is_file():
        raise FileNotFoundError(
            f"{model_path} has a '{CONFIG_KEY}' config but no {STREAMS_FILE} (a tool that "
            "knows nothing of streams, such as mlx_lm.convert, drops it: quantize with "
            "`ss-mlx quantize` instead, or copy the file back from the source directory)"
        )
    why = safetensors_problem(streams_file)
    if why is not None:
        raise ValueError(
            f"cannot read {streams_file}: it is truncated or corrupt ({why}); copy it again"
        )
    try:
        tensors = mx.load(str(streams_file))
    except Exception as e:  # mlx raises plain RuntimeError/ValueError for unreadable files
        raise ValueError(f"cannot read {streams_file}: {e}") from None
    base, tokenizer, base_config = load_mlx_lm(
        model_path,
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=adapter_path,
        lazy=lazy,
        return_config=True,
        trust_remote_code=trust_remote_code,
    )
    model = attach_streams(base, cfg, tensors, str(streams_file))
    model.path = model_path  # lets generation find a tree tuned for this model and machine
    if return_config:
        return model, tokenizer, base_config
    return model, tokenizer
