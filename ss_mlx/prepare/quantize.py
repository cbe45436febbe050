"""`ss-mlx quantize`: quantize the trunk of an MLX SS model directory, torch-free.

`mlx_lm.convert -q` on an SS directory keeps the `speculative_streaming` config block but drops
`speculative_streams.safetensors` (it writes only the files it knows). This command quantizes
the trunk with mlx-lm's own `quantize_model` (same options as `mlx_lm.convert -q`) and copies the
stream parameters (and Medusa heads) byte for byte, in the precision they were saved in: they are
small, and they draft; verification runs on the quantized trunk, so the output is exactly the
quantized model's own (what `mlx_lm.generate` gives on the new directory).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..config import CONFIG_KEY, MEDUSA_FILE, STREAMS_FILE
from ..files import check_out_dir, make_temp_dir, publish_dir, write_text
from ..loader import check_supported, read_config, resolve_model_path

MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
DTYPES = ("float16", "bfloat16", "float32")
KEEP = (STREAMS_FILE, MEDUSA_FILE)  # copied unchanged


def _is_weight_file(name: str) -> bool:
    return (name.endswith(".safetensors") and name not in KEEP) or name.endswith(
        ".safetensors.index.json"
    )


def quantize_dir(
    model: str | Path,
    out: str | Path,
    *,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_predicate: str | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write `out`: `model` with its trunk quantized and its streams unchanged. Returns `out`.

    The new directory is built beside `out` and renamed into place once it loads.
    """
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model, quantize_model, save_model

    src = resolve_model_path(model)
    out = Path(out)
    check_out_dir(out, src)
    config = read_config(src)
    check_supported(config, src)
    if CONFIG_KEY not in config or not (src / STREAMS_FILE).is_file():
        raise ValueError(
            f"{src} is not an SS model directory (it needs a '{CONFIG_KEY}' block in "
            f"config.json and {STREAMS_FILE}); for a plain model use mlx_lm.convert -q"
        )
    if "quantization" in config:
        raise ValueError(f"{src} is already quantized ({config['quantization']})")
    if q_mode not in MODES:
        raise ValueError(f"--q-mode must be one of {', '.join(MODES)}, got {q_mode!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")

    base, base_config = load_model(src, lazy=True)
    if dtype is not None:
        target = getattr(mx, dtype)
        cast = getattr(base, "cast_predicate", lambda _: True)
        base.update(
            tree_map_with_path(
                lambda k, v: v.astype(target)
                if cast(k) and mx.issubdtype(v.dtype, mx.floating)
                else v,
                base.parameters(),
            )
        )
    predicate = None
    if quant_predicate is not None:
        if q_mode != "affine":
            raise ValueError("--quant-predicate recipes work with --q-mode affine only")
        from mlx_lm.convert import mixed_quant_predicate_builder

        predicate = mixed_quant_predicate_builder(quant_predicate, base, q_group_size)
    base, qconfig = quantize_model(
        base, base_config, q_group_size, q_bits, mode=q_mode, quant_predicate=predicate
    )
    # The source config.json as written, plus mlx-lm's quantization entries (and dtype).
    new_config = dict(config)
    for key in ("quantization", "quantization_config"):
        new_config[key] = qconfig[key]
    if dtype is not None:
        new_config["torch_dtype"] = dtype

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        save_model(tmp, base, donate_model=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not _is_weight_file(f.name):
                shutil.copyfile(f, tmp / f.name)
        write_text(tmp / "config.json", json.dumps(new_config, indent=2) + "\n")
        from ..loader import load

        load(tmp, lazy=True)  # the streams fit the quantized trunk: refuse before publishing
        publish_dir(tmp, out, overwrite=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from mlx_lm.convert import QUANT_RECIPES

    from ..cli import HelpFormatter, add_version

    p = argparse.ArgumentParser(
        prog="ss-mlx quantize",
        description="Quantize the trunk of an MLX SS model directory with mlx-lm (the options "
        "of mlx_lm.convert -q); the stream parameters are copied unchanged, in full precision.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="SS model directory (or Hub repo)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--q-bits", type=int, default=None, help="bits per weight (none: the mode's)")
    p.add_argument(
        "--q-group-size", type=int, default=None, help="quantization group size (none: the mode's)"
    )
    p.add_argument("--q-mode", choices=MODES, default="affine", help="quantization mode")
    p.add_argument(
        "--quant-predicate", choices=QUANT_RECIPES, default=None, help="mixed-bit recipe"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="cast the parameters left unquantized to this dtype (none: keep theirs)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    add_version(p)
    args = p.parse_args(argv)
    try:
        out = quantize_dir(
            args.model,
            args.out,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode,
            quant_predicate=args.quant_predicate,
            dtype=args.dtype,
            force=args.force,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"ss-mlx quantize: error: {e}")
    config = read_config(out)
    print(f"wrote {out} (trunk: {config['quantization']}; {STREAMS_FILE} unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
