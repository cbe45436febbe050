"""Load and write SS model directories (an mlx-lm model dir + stream parameters)."""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import MODEL_REMAPPING

from .cache import make_cache
from .config import CONFIG_KEY, STREAMS_FILE, SUPPORTED_MODEL_TYPES, SSConfig
from .model import SSModel
from .streams import StreamParams, check_tensors, expected_shapes


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local directory, or a Hub repo fetched through mlx-lm where the hub is reachable."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {path} is a file; pass the model directory")
        return path
    from mlx_lm.utils import _download

    try:
        return Path(_download(str(path_or_repo)))
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
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None


def model_type_of(config: dict[str, Any]) -> str:
    raw = config.get("model_type")
    return MODEL_REMAPPING.get(raw, raw)


def check_supported(config: dict[str, Any], source: Path) -> str:
    model_type = model_type_of(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {config.get('model_type')!r} is not supported by ss-mlx; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (and mistral, as llama)"
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


def stream_shapes(base: nn.Module, cfg: SSConfig) -> dict[str, tuple[int, ...]]:
    """The stream tensors `cfg` implies for this trunk (quantized or not)."""
    embed = base.model.embed_tokens
    hidden = embed.weight.shape[1]
    if hasattr(embed, "bits"):
        hidden = hidden * 32 // embed.bits
    dims = module_dims(base.layers[-1], cfg.adapted_modules)
    return expected_shapes(cfg, len(base.layers), dims, hidden)


def attach_streams(
    base: nn.Module, cfg: SSConfig, tensors: dict[str, mx.array], source: str
) -> SSModel:
    """Validate stream tensors against `base` and wrap it."""
    layers = base.layers
    cfg.check_model(MODEL_REMAPPING.get(base.model_type, base.model_type), len(layers))
    rope = getattr(layers[0].self_attn, "rope", None)
    if rope is None or type(rope).__name__ == "DynamicNTKScalingRoPE":
        raise ValueError(
            f"{source}: this model's RoPE ({type(rope).__name__}) cannot take per-token "
            "positions, which tree verification needs"
        )
    make_cache(base)  # refuses sliding-window / rotating caches with a clear error
    check_tensors(tensors, stream_shapes(base, cfg), source)
    streams = StreamParams(cfg, tensors, len(layers) - cfg.stream_layers)
    return SSModel(base, cfg, streams)


def load(
    path_or_repo: str | Path,
    tokenizer_config: dict[str, Any] | None = None,
) -> tuple[SSModel, TokenizerWrapper]:
    """Load an SS model directory: the mlx-lm model plus its speculative streams.

    Args:
        path_or_repo: a local SS model directory (or a Hub repo, where the hub is reachable).
        tokenizer_config: passed to mlx-lm's tokenizer loader.

    Returns:
        (SSModel, TokenizerWrapper)
    """
    model_path = resolve_model_path(path_or_repo)
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
        raise FileNotFoundError(f"{model_path} has a '{CONFIG_KEY}' config but no {STREAMS_FILE}")
    try:
        tensors = mx.load(str(streams_file))
    except Exception as e:
        raise ValueError(f"cannot read {streams_file}: {e}") from None
    base, tokenizer = mlx_lm.load(str(model_path), tokenizer_config=tokenizer_config)
    model = attach_streams(base, cfg, tensors, str(streams_file))
    model.path = model_path  # lets generation find a tree tuned for this model and machine
    return model, tokenizer


def write_streams(model_dir: Path, cfg: SSConfig, tensors: dict[str, mx.array]) -> None:
    """Write the stream file and the config block into an existing model directory."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    config[CONFIG_KEY] = cfg.to_dict()
    mx.save_safetensors(str(model_dir / STREAMS_FILE), tensors, metadata={"format": "mlx"})
    atomic_write_text(model_dir / "config.json", json.dumps(config, indent=2) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
