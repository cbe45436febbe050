"""`ss-mlx init`: turn a plain mlx-lm model directory into an SS model with fresh streams.

Fresh streams draft poorly (trained ones come from `ss-mlx train` + `ss-mlx convert`); this is
for experiments and tests. Output is still exactly lossless: verification never depends on
the stream parameters.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from .. import cliargs
from ..config import CONFIG_KEY, STREAMS_FILE, SSConfig
from ..files import atomic_write, check_out_dir, make_temp_dir, publish_dir, write_text
from ..loader import (
    attach_streams,
    check_supported,
    load_mlx_lm,
    model_type_of,
    read_config,
    resolve_model_path,
    stream_shapes,
)
from ..model.streams import random_stream_tensors


def write_streams(model_dir: Path, cfg: SSConfig, tensors: dict[str, mx.array]) -> None:
    """Write the stream file and the config block into an existing model directory."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    config[CONFIG_KEY] = cfg.to_dict()
    atomic_write(
        model_dir / STREAMS_FILE,
        lambda p: mx.save_safetensors(str(p), tensors, metadata={"format": "mlx"}),
    )
    write_text(model_dir / "config.json", json.dumps(config, indent=2) + "\n")


def init_model(
    model: str | Path,
    out: str | Path,
    *,
    streams: int = 4,
    stream_layers: int = 4,
    stream_position_mode: str = "shifted",
    adapter_rank: int = 0,
    adapter_modules: tuple[str, ...] = (),
    adapter_init_scale: float = 0.0,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Copy `model` to `out` and add randomly initialised stream parameters. Returns `out`."""
    src = resolve_model_path(model)
    out = Path(out)
    check_out_dir(out, src)
    config = read_config(src)
    check_supported(config, src)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
    cfg = SSConfig.from_dict(
        {
            "num_streams": streams,
            "stream_layers": stream_layers,
            "stream_position_mode": stream_position_mode,
            "adapter_rank": adapter_rank,
            "adapter_modules": list(adapter_modules),
            "adapter_scale": 1.0,
        }
    )
    base, _ = load_mlx_lm(src, lazy=True)
    cfg.check_model(model_type_of(config), len(base.layers))
    tensors = random_stream_tensors(
        stream_shapes(base, cfg), seed=seed, adapter_scale=adapter_init_scale
    )
    attach_streams(base, cfg, tensors, "ss-mlx init")  # validates before anything is written

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        for f in src.iterdir():
            if f.is_file() and f.name != STREAMS_FILE:
                shutil.copyfile(f, tmp / f.name)
        write_streams(tmp, cfg, tensors)
        publish_dir(tmp, out, overwrite=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="ss-mlx init",
        description="Write an SS model directory with freshly initialised stream parameters.",
    )
    p.add_argument("--model", required=True, help="base mlx-lm model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--streams", type=int, default=4, help="number of speculative streams (gamma)")
    p.add_argument("--stream-layers", type=int, default=4, help="top layers carrying streams (Ns)")
    p.add_argument("--stream-position-mode", choices=["shifted", "anchor"], default="shifted")
    p.add_argument("--adapter-rank", type=int, default=0)
    p.add_argument("--adapter-modules", nargs="*", default=[])
    p.add_argument(
        "--adapter-init-scale",
        type=float,
        default=0.0,
        help="std of the adapters' B matrices (0 = adapters off)",
    )
    p.add_argument("--seed", type=cliargs.seed, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    try:
        out = init_model(
            args.model,
            args.out,
            streams=args.streams,
            stream_layers=args.stream_layers,
            stream_position_mode=args.stream_position_mode,
            adapter_rank=args.adapter_rank,
            adapter_modules=tuple(args.adapter_modules),
            adapter_init_scale=args.adapter_init_scale,
            seed=args.seed,
            force=args.force,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"ss-mlx init: error: {e}")
    print(f"wrote {out} ({CONFIG_KEY}: {args.streams} streams, {args.stream_layers} layers)")


if __name__ == "__main__":
    main()
