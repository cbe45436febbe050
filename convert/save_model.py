"""The trainer's output: a Hugging Face model dir plus the SS (or Medusa) parameters.

OUT/
  config.json                       base config + "speculative_streaming" (or "medusa")
                                    + "ss_training"
  model*.safetensors[.index.json]   the base weights, copied unchanged (or pytorch_model*.bin)
  tokenizer files                   copied
  speculative_streams.safetensors   docs/format.md names, float32      (shared, lossless)
  adapter_model.safetensors         peft LoRA, unmerged                 (shared)
  adapter_config.json               peft's config                       (shared)
  medusa_heads.safetensors          see medusa.py                       (medusa)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ss_mlx.config import MEDUSA_FILE, STREAMS_FILE
from ss_mlx.files import atomic_write, copy_file, write_json

TRAINING_CONFIG_KEY = "ss_training"
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")

WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Floats as float32 (integers, such as token ids, kept), contiguous, on CPU; written under a
    temp name and renamed."""
    flat = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in tensors.items()
    }
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata={"format": "pt"}))


def copy_base_files(base_dir: str | Path, out_dir: str | Path, tokenizer: Any = None) -> list[str]:
    """Copy the base weights and tokenizer files; returns the copied names."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    names = sorted({p.name for pat in WEIGHT_PATTERNS for p in base_dir.glob(pat)})
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise FileNotFoundError(f"{base_dir}: no model*.safetensors or pytorch_model*.bin to copy")
    tok_names = [n for n in TOKENIZER_FILES if (base_dir / n).is_file()]
    for name in names + tok_names:
        copy_file(base_dir / name, out_dir / name)
    if tokenizer is not None and not any(n.startswith("tokenizer") for n in tok_names):
        tokenizer.save_pretrained(out_dir)
    return names + tok_names


def save_peft_adapter(peft_model: Any, out_dir: str | Path) -> None:
    """peft's save_pretrained into a temp dir, then move its two files into out_dir."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".peft-") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for name in PEFT_FILES:
            copy_file(Path(tmp, name), out_dir / name)


def remove_stale(out_dir: str | Path, keep: set[str]) -> None:
    """Delete mode-specific files an earlier run may have left that this run does not write
    (a stale adapter_model.safetensors would otherwise be merged by the converter)."""
    for name in (STREAMS_FILE, MEDUSA_FILE, *PEFT_FILES):
        if name not in keep:
            Path(out_dir, name).unlink(missing_ok=True)


def write_config(
    base_dir: str | Path, out_dir: str | Path, blocks: dict[str, Any]
) -> dict[str, Any]:
    """The base config.json, unchanged, plus the given top-level blocks."""
    config = json.loads(Path(base_dir, "config.json").read_text())
    config.update(blocks)
    write_json(Path(out_dir, "config.json"), config)
    return config
