"""The `speculative_streaming` config block of docs/format.md: defaults and validation."""

from __future__ import annotations

from typing import Any

FORMAT_VERSION = 1

ATTN_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PHI3_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

# model_type -> linear modules of a decoder block that may carry stream adapters / LoRA.
ALLOWED_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ATTN_MODULES + MLP_MODULES,
    "mistral": ATTN_MODULES + MLP_MODULES,
    "qwen2": ATTN_MODULES + MLP_MODULES,
    "qwen3": ATTN_MODULES + MLP_MODULES,
    "phi3": PHI3_MODULES,
}
SUPPORTED_MODEL_TYPES = tuple(ALLOWED_MODULES)
POSITION_MODES = ("shifted", "anchor")

_KEYS = (
    "format_version",
    "num_streams",
    "stream_layers",
    "stream_position_mode",
    "adapter_rank",
    "adapter_scale",
    "adapter_modules",
    "prune_rank",
    "tree",
)


def check_model_type(model_type: str) -> None:
    if model_type not in ALLOWED_MODULES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def make_ss_config(
    num_streams: int,
    stream_layers: int,
    *,
    stream_position_mode: str = "shifted",
    adapter_rank: int = 0,
    adapter_scale: float = 1.0,
    adapter_modules: list[str] | tuple[str, ...] = (),
    prune_rank: int = 0,
    tree: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete `speculative_streaming` block (every key of docs/format.md present)."""
    return {
        "format_version": FORMAT_VERSION,
        "num_streams": int(num_streams),
        "stream_layers": int(stream_layers),
        "stream_position_mode": stream_position_mode,
        "adapter_rank": int(adapter_rank),
        "adapter_scale": float(adapter_scale),
        "adapter_modules": list(adapter_modules) if adapter_rank > 0 else [],
        "prune_rank": int(prune_rank),
        "tree": tree,
    }


def normalize_ss_config(ss: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """Fill optional keys, reject unknown keys and bad values (ValueError naming the key)."""
    check_model_type(model_type)
    unknown = sorted(set(ss) - set(_KEYS))
    if unknown:
        raise ValueError(f"speculative_streaming: unknown keys {unknown}")
    for key in ("num_streams", "stream_layers"):
        if key not in ss:
            raise ValueError(f"speculative_streaming: missing {key!r}")
    out = make_ss_config(
        ss["num_streams"],
        ss["stream_layers"],
        stream_position_mode=ss.get("stream_position_mode", "shifted"),
        adapter_rank=ss.get("adapter_rank", 0),
        adapter_scale=ss.get("adapter_scale", 1.0),
        adapter_modules=ss.get("adapter_modules", ()),
        prune_rank=ss.get("prune_rank", 0),
        tree=ss.get("tree"),
    )
    if ss.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"speculative_streaming: format_version must be {FORMAT_VERSION}")
    if out["num_streams"] < 1:
        raise ValueError("speculative_streaming: num_streams must be >= 1")
    if not 1 <= out["stream_layers"] <= num_layers:
        raise ValueError(f"speculative_streaming: stream_layers must be in [1, {num_layers}]")
    if out["stream_position_mode"] not in POSITION_MODES:
        raise ValueError(
            f"speculative_streaming: stream_position_mode must be one of {POSITION_MODES}"
        )
    if out["adapter_rank"] < 0 or out["prune_rank"] < 0:
        raise ValueError("speculative_streaming: ranks must be >= 0")
    if out["adapter_rank"] > 0 and not out["adapter_modules"]:
        raise ValueError("speculative_streaming: adapter_rank > 0 needs adapter_modules")
    bad = [m for m in out["adapter_modules"] if m not in ALLOWED_MODULES[model_type]]
    if bad:
        raise ValueError(
            f"speculative_streaming: adapter_modules {bad} not allowed for {model_type}; "
            f"allowed: {list(ALLOWED_MODULES[model_type])}"
        )
    if len(set(out["adapter_modules"])) != len(out["adapter_modules"]):
        raise ValueError("speculative_streaming: duplicate adapter_modules")
    return out
