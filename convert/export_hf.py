"""Export a plain Hugging Face model dir: LoRA merged, optionally truncated to its first layers.

Used for the paper comparison's references: the LoRA baseline as an ordinary model (mlx-lm and
transformers both load it, and Medusa heads train on it), and a two-model-SD draft made of the
first K layers of a model (its embeddings, final norm and head kept). The Speculative Streaming /
Medusa / training blocks are dropped from config.json: the output is only the trunk.

    ss-mlx export-hf --torch OUT_OF_TRAIN --out DIR [--layers K] [--force]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ss_mlx.config import CONFIG_KEY, MEDUSA_KEY
from ss_mlx.files import atomic_write, copy_file, write_json

from .checkpoint_io import CheckpointError, open_adapter, open_checkpoint
from .export import (
    ConversionError,
    build_dir,
    check_destination,
    read_hf_config,
    read_merged,
    source_shapes,
)
from .export_lora import LoraMergeError, plan_lora_merge
from .save_model import TOKENIZER_FILES, TRAINING_CONFIG_KEY

LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
DROPPED_BLOCKS = (CONFIG_KEY, TRAINING_CONFIG_KEY, MEDUSA_KEY)


def export_hf(
    src: str | Path, out: str | Path, *, layers: int | None = None, force: bool = False
) -> Path:
    """Write ``src``'s trunk (peft LoRA merged) to ``out`` as a plain HF dir; return ``out``.

    Args:
        src: HF model dir, e.g. what ``ss-mlx train`` wrote (base weights + unmerged adapter).
        out: output dir; must not exist or be empty unless ``force``. Written in a temp dir and
            renamed, so a failure leaves nothing behind.
        layers: keep only decoder layers ``0 .. layers-1`` (a truncated draft model).
    """
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} is not a Hugging Face model dir (no config.json)")
    check_destination(out, src, force)
    config = read_hf_config(src)
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool):
        raise ConversionError(f"{src}/config.json has no integer num_hidden_layers")
    if layers is not None and not 1 <= layers <= n_layers:
        raise ConversionError(f"--layers must be in [1, {n_layers}], got {layers}")

    base = open_checkpoint(src)
    adapter = open_adapter(src)
    merger = (
        plan_lora_merge(adapter[0], adapter[1], {n: base.shape(n) for n in base})
        if adapter else None
    )
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(source_shapes(base, merger)):
        m = LAYER_NAME.match(name)
        if layers is not None and m and int(m.group(1)) >= layers:
            continue
        tensors[name] = np.ascontiguousarray(read_merged(base, merger, name))

    for key in DROPPED_BLOCKS:
        config.pop(key, None)
    if layers is not None:
        config["num_hidden_layers"] = layers
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = config["layer_types"][:layers]

    def write(tmp: Path) -> None:
        # Through atomic_write: safetensors writes its files 0600, atomic_write applies the umask.
        atomic_write(tmp / "model.safetensors",
                     lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
        write_json(tmp / "config.json", config)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                copy_file(src / name, tmp / name)

    build_dir(out, write, force)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx export-hf",
        description="Write a plain HF model dir: LoRA merged, SS/Medusa blocks dropped, "
        "optionally only the first --layers decoder layers.",
    )
    p.add_argument("--torch", required=True, type=Path, help="HF model dir (e.g. train --out)")
    p.add_argument("--out", required=True, type=Path, help="HF model dir to write")
    p.add_argument("--layers", type=int, default=None, help="keep the first K decoder layers")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = export_hf(args.torch, args.out, layers=args.layers, force=args.force)
    except (ConversionError, CheckpointError, LoraMergeError, OSError) as e:
        sys.exit(f"ss-mlx export-hf: error: {e}")
    print(f"[export-hf] wrote {out}")


if __name__ == "__main__":
    main()
