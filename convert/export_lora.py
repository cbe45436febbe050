"""Merge an unmerged peft LoRA adapter (as `save_pretrained` writes it) into base weights, in fp32.

Handles what peft's LoRA writes for the supported models: `lora_A`/`lora_B` on linear layers
(optionally `lora_B.bias` with `lora_bias`), `lora_embedding_A`/`_B` on embeddings, full tensors
of `modules_to_save` and of saved embedding layers (`...base_layer.weight`), scale
`lora_alpha / r` (or `/ sqrt(r)` with rslora) with `alpha_pattern` overrides. Anything else
(DoRA, other peft types, unknown keys) is refused by name rather than silently dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .checkpoint_io import TensorStore

PEFT_PREFIX = "base_model.model."


class LoraMergeError(Exception):
    """The adapter cannot be merged exactly (unsupported feature, unknown or mismatched tensor)."""


def _pattern_value(patterns: dict, key: str, default):
    """peft's `get_pattern_key`: first pattern that matches a dotted suffix of the module name."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


@dataclass
class _Delta:
    kind: str  # "linear" | "embedding" | "bias"
    a: str | None
    b: str
    scale: float


@dataclass
class LoraMerger:
    """A validated merge plan: which base tensors change, and how. Tensors are read lazily."""

    adapter: TensorStore
    replace: dict[str, str] = field(default_factory=dict)  # base name -> adapter name
    deltas: dict[str, list[_Delta]] = field(default_factory=dict)  # base name -> deltas
    fan_in_fan_out: bool = False

    @property
    def touched(self) -> set[str]:
        return set(self.replace) | set(self.deltas)

    def apply(self, name: str, base: Callable[[], np.ndarray]) -> np.ndarray | None:
        """The merged fp32 tensor for `name`, or None when the adapter leaves it alone."""
        if name not in self.touched:
            return None
        w = self.adapter.get(self.replace[name]) if name in self.replace else base()
        w = np.array(w, dtype=np.float32)  # own copy: base arrays may be read-only mmaps
        for d in self.deltas.get(name, []):
            b = self.adapter.get(d.b).astype(np.float32)
            if d.kind == "bias":
                w += d.scale * b
                continue
            a = self.adapter.get(d.a).astype(np.float32)
            delta = b @ a
            if d.kind == "embedding" or self.fan_in_fan_out:
                delta = delta.T
            w += d.scale * delta
        return w


_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
}


def plan_lora_merge(
    config: dict, adapter: TensorStore, base_shapes: dict[str, tuple[int, ...]]
) -> LoraMerger:
    """Check the adapter against the base tensor shapes and return the merge plan.

    Raises LoraMergeError listing every tensor that cannot be merged.
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraMergeError(f"unsupported peft_type {config.get('peft_type')!r} (only LORA)")
    for key, what in _UNSUPPORTED_CONFIG.items():
        if config.get(key):
            raise LoraMergeError(f"adapter uses {what}, which the converter cannot merge")
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}

    plan = LoraMerger(adapter=adapter, fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))
    problems: list[str] = []
    pairs: dict[str, dict[str, str]] = {}  # module -> {"A"/"B"/"bias"/"EA"/"EB": adapter name}
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_B.bias": "bias",
        ".lora_embedding_A": "EA",
        ".lora_embedding_B": "EB",
    }
    for name in adapter.names():
        if not name.startswith(PEFT_PREFIX):
            problems.append(f"{name} (no {PEFT_PREFIX!r} prefix)")
            continue
        key = name[len(PEFT_PREFIX) :]
        for suffix, role in suffixes.items():
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[role] = name
                break
        else:
            if "lora_magnitude_vector" in key:
                problems.append(f"{name} (DoRA magnitude: not supported)")
            elif ".base_layer." in key:
                # A saved (possibly resized) embedding layer: replaces the base tensor.
                plan.replace[key.replace(".base_layer.", ".")] = name
            elif key in base_shapes:
                plan.replace[key] = name  # modules_to_save: a full trained copy
            else:
                problems.append(f"{name} (unknown adapter tensor)")

    for module, roles in sorted(pairs.items()):
        target = f"{module}.weight"
        if target not in base_shapes:
            problems.append(f"{module} (LoRA target not in the base weights)")
            continue
        embedding = "EA" in roles or "EB" in roles
        a, b = (roles.get("EA"), roles.get("EB")) if embedding else (roles.get("A"), roles.get("B"))
        if a is None or b is None:
            problems.append(f"{module} (LoRA A/B pair incomplete: {sorted(roles.values())})")
            continue
        a_shape, b_shape = adapter.shape(a), adapter.shape(b)
        r = a_shape[0]
        if embedding:
            want = (a_shape[1], b_shape[0])  # (num_embeddings, dim)
        else:
            want = (b_shape[0], a_shape[1])
            if plan.fan_in_fan_out:
                want = want[::-1]
        # A saved embedding layer replaces the base first; the delta applies on top of it.
        replaced = plan.replace.get(target)
        shape = adapter.shape(replaced) if replaced else base_shapes[target]
        if b_shape[1] != r or tuple(shape) != want:
            problems.append(
                f"{module} (A {a_shape} / B {b_shape} do not fit base {tuple(shape)})"
            )
            continue
        a_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        scale = a_alpha / math.sqrt(r) if rslora else a_alpha / r
        plan.deltas.setdefault(target, []).append(
            _Delta("embedding" if embedding else "linear", a, b, scale)
        )
        if "bias" in roles:
            bias = f"{module}.bias"
            if bias not in base_shapes:
                problems.append(f"{roles['bias']} (lora_bias but the base layer has no bias)")
            else:
                plan.deltas.setdefault(bias, []).append(_Delta("bias", None, roles["bias"], scale))

    for base_name, src in plan.replace.items():
        if base_name not in base_shapes:
            problems.append(f"{src} (replaces {base_name}, which is not in the base weights)")
    if problems:
        raise LoraMergeError(
            f"cannot merge the LoRA adapter ({len(problems)} problems): " + "; ".join(problems)
        )
    return plan
