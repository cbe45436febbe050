"""The `speculative_streaming` block of config.json (schema in docs/format.md)."""

from dataclasses import asdict, dataclass, field
from typing import Any

CONFIG_KEY = "speculative_streaming"
STREAMS_FILE = "speculative_streams.safetensors"
FORMAT_VERSION = 1

# model_type (after mlx-lm's remapping, mistral -> llama) -> modules an adapter may wrap.
_SPLIT_QKV = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
ADAPTER_MODULES = {
    "llama": _SPLIT_QKV,
    "qwen2": _SPLIT_QKV,
    "qwen3": _SPLIT_QKV,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}
SUPPORTED_MODEL_TYPES = tuple(ADAPTER_MODULES)
POSITION_MODES = ("shifted", "anchor")


@dataclass(frozen=True)
class SSConfig:
    num_streams: int
    stream_layers: int
    stream_position_mode: str = "shifted"
    adapter_rank: int = 0
    adapter_scale: float = 1.0
    adapter_modules: tuple[str, ...] = ()
    prune_rank: int = 0
    tree: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SSConfig":
        if not isinstance(d, dict):
            raise ValueError(f"'{CONFIG_KEY}' must be an object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = [k for k in ("num_streams", "stream_layers") if k not in d]
        if missing:
            raise ValueError(f"'{CONFIG_KEY}' is missing {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in known}
        kw["adapter_modules"] = tuple(kw.get("adapter_modules", ()) or ())
        cfg = cls(**kw, extra={k: v for k, v in d.items() if k not in known})
        cfg._check_fields()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["adapter_modules"] = list(self.adapter_modules)
        d.update(self.extra)
        return d

    def _check_fields(self) -> None:
        def positive_int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"'{CONFIG_KEY}.{name}' must be an integer >= {lo}, got {v!r}")

        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"'{CONFIG_KEY}.format_version' is {self.format_version!r}; "
                f"this ss-mlx reads version {FORMAT_VERSION}"
            )
        positive_int("num_streams", 1)
        positive_int("stream_layers", 1)
        positive_int("adapter_rank", 0)
        positive_int("prune_rank", 0)
        if self.stream_position_mode not in POSITION_MODES:
            raise ValueError(
                f"'{CONFIG_KEY}.stream_position_mode' must be one of {POSITION_MODES}, "
                f"got {self.stream_position_mode!r}"
            )
        if self.adapter_rank > 0 and not self.adapter_modules:
            raise ValueError(f"'{CONFIG_KEY}.adapter_rank' > 0 needs 'adapter_modules'")

    def check_model(self, model_type: str, num_layers: int) -> None:
        """Validate against the trunk this config is attached to."""
        if model_type not in ADAPTER_MODULES:
            raise ValueError(
                f"model_type {model_type!r} is not supported by ss-mlx; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (and mistral, as llama)"
            )
        if self.stream_layers > num_layers:
            raise ValueError(
                f"'{CONFIG_KEY}.stream_layers' = {self.stream_layers} but the model has "
                f"only {num_layers} layers"
            )
        if self.adapter_rank > 0:
            bad = [m for m in self.adapter_modules if m not in ADAPTER_MODULES[model_type]]
            if bad:
                raise ValueError(
                    f"adapter_modules {bad} do not exist in {model_type} blocks; "
                    f"allowed: {list(ADAPTER_MODULES[model_type])}"
                )

    @property
    def adapted_modules(self) -> tuple[str, ...]:
        return self.adapter_modules if self.adapter_rank > 0 else ()

    def stream_position_offsets(self) -> list[int]:
        """RoPE position of stream j (1-based) relative to its token; decided only here."""
        if self.stream_position_mode == "shifted":
            return list(range(1, self.num_streams + 1))
        return [0] * self.num_streams
