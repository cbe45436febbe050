"""THE model-format schema (docs/format.md): config keys, file names, adapter modules, SSConfig.

Plain Python, no MLX: the PyTorch trainer and converter import it too, so the runtime and the
training side can never disagree on the format.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any

CONFIG_KEY = "speculative_streaming"
STREAMS_FILE = "speculative_streams.safetensors"
FORMAT_VERSION = 1

MEDUSA_KEY = "medusa"
MEDUSA_FILE = "medusa_heads.safetensors"

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# model_type -> linear modules of a decoder block that may carry stream adapters (or LoRA).
# mistral is listed for the training side; mlx-lm remaps it to llama at runtime.
ADAPTER_MODULES: dict[str, tuple[str, ...]] = {
    "llama": _ATTN + _MLP,
    "mistral": _ATTN + _MLP,
    "qwen2": _ATTN + _MLP,
    "qwen3": _ATTN + _MLP,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}
SUPPORTED_MODEL_TYPES = tuple(ADAPTER_MODULES)
POSITION_MODES = ("shifted", "anchor")


def check_model_type(model_type: str) -> None:
    if model_type not in ADAPTER_MODULES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by ss-mlx; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


@dataclass(frozen=True)
class SSConfig:
    num_streams: int
    stream_layers: int
    stream_position_mode: str = "shifted"
    adapter_rank: int = 0
    adapter_scale: float = 1.0
    adapter_modules: tuple[str, ...] = ()
    prune_rank: int = 0
    # > 0: the streams' LM head covers only these many tokens (the `draft_vocab` tensor lists
    # them), EAGLE-3's draft vocabulary: a fraction of the head's cost in training and drafting.
    draft_vocab_size: int = 0
    tree: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any, strict: bool = False) -> "SSConfig":
        """Validate a config block. `strict` (the trainer's choice) refuses unknown keys; the
        runtime keeps them in `extra` so newer files still load."""
        if not isinstance(d, dict):
            raise ValueError(f"'{CONFIG_KEY}' must be an object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = [k for k in ("num_streams", "stream_layers") if k not in d]
        if missing:
            raise ValueError(f"'{CONFIG_KEY}' is missing {', '.join(missing)}")
        unknown = sorted(set(d) - known)
        if strict and unknown:
            raise ValueError(f"'{CONFIG_KEY}' has unknown keys {unknown}")
        kw = {k: v for k, v in d.items() if k in known}
        modules = kw.get("adapter_modules", ()) or ()
        if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) for m in modules):
            raise ValueError(f"'{CONFIG_KEY}.adapter_modules' must be a list of module names")
        kw["adapter_modules"] = tuple(modules)
        cfg = cls(**kw, extra={k: d[k] for k in unknown})
        cfg._check_fields()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["adapter_modules"] = list(self.adapter_modules)
        d.update(self.extra)
        return d

    def _check_fields(self) -> None:
        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"'{CONFIG_KEY}.{name}' must be an integer >= {lo}, got {v!r}")

        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"'{CONFIG_KEY}.format_version' is {self.format_version!r}; "
                f"this ss-mlx reads version {FORMAT_VERSION}"
            )
        integer("num_streams", 1)
        integer("stream_layers", 1)
        integer("adapter_rank", 0)
        integer("prune_rank", 0)
        integer("draft_vocab_size", 0)
        scale = self.adapter_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(
            scale
        ):
            raise ValueError(f"'{CONFIG_KEY}.adapter_scale' must be a finite number, got {scale!r}")
        if self.stream_position_mode not in POSITION_MODES:
            raise ValueError(
                f"'{CONFIG_KEY}.stream_position_mode' must be one of {POSITION_MODES}, "
                f"got {self.stream_position_mode!r}"
            )
        if self.adapter_rank > 0 and not self.adapter_modules:
            raise ValueError(f"'{CONFIG_KEY}.adapter_rank' > 0 needs 'adapter_modules'")
        if len(set(self.adapter_modules)) != len(self.adapter_modules):
            raise ValueError(f"'{CONFIG_KEY}.adapter_modules' lists a module twice")
        if self.tree is not None and not isinstance(self.tree, dict):
            raise ValueError(f"'{CONFIG_KEY}.tree' must be an object or null, got {self.tree!r}")

    def check_model(self, model_type: str, num_layers: int) -> None:
        """Validate against the trunk this config is attached to."""
        check_model_type(model_type)
        if self.stream_layers > num_layers:
            raise ValueError(
                f"'{CONFIG_KEY}.stream_layers' = {self.stream_layers} but the model has "
                f"only {num_layers} layers"
            )
        bad = [m for m in self.adapted_modules if m not in ADAPTER_MODULES[model_type]]
        if bad:
            raise ValueError(
                f"'{CONFIG_KEY}.adapter_modules' {bad} do not exist in {model_type} blocks, so "
                f"they are not allowed; allowed: {list(ADAPTER_MODULES[model_type])}"
            )

    @property
    def adapted_modules(self) -> tuple[str, ...]:
        return self.adapter_modules if self.adapter_rank > 0 else ()

    def stream_position_offsets(self) -> list[int]:
        """RoPE position of stream j (1-based) relative to its token; decided only here."""
        if self.stream_position_mode == "shifted":
            return list(range(1, self.num_streams + 1))
        return [0] * self.num_streams


def medusa_config(num_heads: int, num_layers: int = 1) -> dict[str, Any]:
    """The config.json block of Medusa heads (see ss_mlx/drafters/medusa.py)."""
    return {
        "format_version": 1,
        "num_heads": int(num_heads),
        "num_layers": int(num_layers),
        "lm_head": "shared",
    }
