"""`ss-mlx convert`: a trained PyTorch SS checkpoint (HF dir) -> an MLX SS model directory.

The trunk goes through mlx-lm's own model classes (`sanitize`, strict weight loading,
`quantize_model`, `save_model`, `save_config`), so the result is an ordinary mlx-lm directory that
stock `mlx_lm.load` reads; the stream parameters are checked against the runtime's own
definition of the format (`ss_mlx.config` / `ss_mlx.streams`) and written in float, never
quantized. Everything is written into a temp dir next to `--out` and renamed only on success.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# isort: off
import ss_mlx  # noqa: F401  (preloads OpenBLAS; must precede mlx.core)
import mlx.core as mx

# isort: on
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

from ss_mlx.config import CONFIG_KEY, MEDUSA_FILE, MEDUSA_KEY, STREAMS_FILE, SSConfig
from ss_mlx.decode.tree import TreeSpec
from ss_mlx.files import check_out_dir, make_temp_dir, publish_dir
from ss_mlx.loader import attach_streams, check_supported
from ss_mlx.model.streams import DRAFT_VOCAB, check_finite

from .checkpoint_io import (
    ADAPTER_FILES,
    CheckpointError,
    TensorStore,
    open_adapter,
    open_checkpoint,
    open_tensor_file,
)
from .export_lora import LoraMergeError, LoraMerger, plan_lora_merge
from .save_model import TOKENIZER_FILES  # the trainer's list: what it copies, we copy on

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# Source tensors mlx-lm's sanitize drops on purpose and that carry no information.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(Exception):
    """The checkpoint cannot be converted exactly; the message lists every offending name."""


def _fail(what: str, names: list[str]) -> ConversionError:
    return ConversionError(f"{what} ({len(names)}): " + ", ".join(names))


# ---------------------------------------------------------------- destination handling


def check_destination(out: Path, src: Path, force: bool) -> None:
    """Refuse, before anything is read or written, an --out whose replacement would destroy
    something else (the current directory or a parent of it, the input or a folder holding it,
    a folder inside the input, a file) and a non-empty --out without `force`."""
    try:
        check_out_dir(out, src)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"--out {out} exists and is not empty (use --force to replace it)")


def build_dir(out: Path, write: Callable[[Path], None], force: bool) -> None:
    """Run ``write(tmp)`` on a fresh hidden directory beside `out` (umask permissions), then
    publish it as `out` in one rename; on any failure nothing is left behind and an old `out`
    is kept (no temp or ``.old-*`` directory remains either way)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        write(tmp)
        publish_dir(tmp, out, overwrite=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_hf_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    return config


# ---------------------------------------------------------------- the trunk


def _trunk_dtype(config: dict[str, Any], dtype: str | None) -> str:
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConversionError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        return dtype
    # Like mlx-lm's convert: keep the checkpoint's declared dtype; fall back to float32.
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in DTYPES else "float32"


def mlx_lm_config(config: dict[str, Any]) -> dict[str, Any]:
    """The HF config with transformers>=5's nested `rope_parameters` also spelled the old way.

    mlx-lm's llama/qwen2/phi3 read top-level `rope_theta` / `rope_scaling` and silently fall
    back to their own defaults (qwen2: 1e6) when absent, which changes every logit.
    """
    config = dict(config)
    rp = config.get("rope_parameters")
    if rp is None:
        return config
    if not (isinstance(rp, dict) and "rope_theta" in rp):
        raise ConversionError(f"unsupported rope_parameters (per layer type, no rope_theta): {rp}")
    if config.get("rope_theta") is None:
        config["rope_theta"] = rp["rope_theta"]
    elif config["rope_theta"] != rp["rope_theta"]:
        raise ConversionError(
            f"config has rope_theta {config['rope_theta']} and rope_parameters {rp}: ambiguous"
        )
    if rp.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
        config["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return config


def source_shapes(base: TensorStore, merger: LoraMerger | None) -> dict[str, tuple[int, ...]]:
    shapes = {n: base.shape(n) for n in base}
    if merger is not None:
        for name, src in merger.replace.items():
            shapes[name] = merger.adapter.shape(src)
    return shapes


def read_merged(base: TensorStore, merger: LoraMerger | None, name: str) -> np.ndarray:
    merged = merger.apply(name, lambda: base.get(name)) if merger is not None else None
    return merged if merged is not None else base.get(name)


def _check_trunk_names(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], tied: bool
) -> list[str]:
    """Strict name/shape check of the source against mlx-lm's model, before reading any data.

    `sanitize` runs on lazy zero placeholders so renames and drops are seen without I/O.
    Returns the source names sanitize dropped that still need a value check (tied lm_head).
    """
    placeholders = {n: mx.zeros(s, dtype=mx.float32) for n, s in shapes.items()}
    sanitized = model.sanitize(dict(placeholders)) if hasattr(model, "sanitize") else placeholders
    target = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    dropped = sorted(set(placeholders) - set(sanitized))
    to_verify = [n for n in dropped if tied and n == "lm_head.weight"]
    problems = [
        f"{n} (unconsumed source tensor)"
        for n in dropped
        if not n.endswith(IGNORABLE_SUFFIXES) and n not in to_verify
    ]
    problems += [f"{n} (unconsumed source tensor)" for n in sorted(set(sanitized) - set(target))]
    problems += [f"{n} (missing: the model needs it)" for n in sorted(set(target) - set(sanitized))]
    problems += [
        f"{n} (shape {tuple(sanitized[n].shape)}, model needs {target[n]})"
        for n in sorted(set(target) & set(sanitized))
        if tuple(sanitized[n].shape) != target[n]
    ]
    if problems:
        raise _fail("source weights do not match the model", problems)
    return to_verify


def build_trunk(
    base: TensorStore, adapter: tuple[dict, TensorStore] | None, config: dict[str, Any], dtype: str
) -> nn.Module:
    """The mlx-lm model with the (LoRA-merged) source weights, cast to `dtype`."""
    shapes = {n: base.shape(n) for n in base}
    merger = plan_lora_merge(adapter[0], adapter[1], shapes) if adapter else None
    shapes = source_shapes(base, merger)

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    for name in _check_trunk_names(model, shapes, tied):
        # A tied checkpoint may still store lm_head: dropping it is exact only if it equals embed
        embed = read_merged(base, merger, "model.embed_tokens.weight")
        if not np.array_equal(read_merged(base, merger, name), embed):
            raise _fail(
                "config ties the embeddings but the checkpoint's head differs",
                [f"{name} != model.embed_tokens.weight"],
            )

    target_dtype = DTYPES[dtype]
    cast = getattr(model, "cast_predicate", lambda _: True)
    weights: dict[str, mx.array] = {}
    for name in base.names() + sorted(set(shapes) - set(base.names())):
        w = mx.array(read_merged(base, merger, name))
        if mx.issubdtype(w.dtype, mx.floating) and cast(name):
            w = w.astype(target_dtype)
        mx.eval(w)  # materialise now so the numpy/fp32 copy can be freed
        weights[name] = w
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


# ---------------------------------------------------------------- streams, medusa, tokenizer


def read_ss_config(config: dict[str, Any], src: Path, model_type: str) -> SSConfig | None:
    if CONFIG_KEY not in config:
        return None
    try:
        cfg = SSConfig.from_dict(config[CONFIG_KEY])
        cfg.check_model(model_type, int(config["num_hidden_layers"]))
        if cfg.tree is not None:
            spec = TreeSpec.from_dict(cfg.tree)
            if spec.depth > cfg.num_streams:
                raise ValueError(f"tree is {spec.depth} deep, only {cfg.num_streams} streams")
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"{src / 'config.json'}: bad '{CONFIG_KEY}' block: {e}") from e
    return cfg


def export_streams(
    src: Path, dst: Path, cfg: SSConfig, model: nn.Module, dtype: mx.Dtype
) -> dict[str, tuple[int, ...]]:
    """Check the stream file with the runtime's own validation, write it in float `dtype`."""
    path = src / STREAMS_FILE
    if not path.is_file():
        raise ConversionError(f"{src}: config has a '{CONFIG_KEY}' block but no {STREAMS_FILE}")
    store = open_tensor_file(path)
    tensors = {n: store.get(n) for n in store}
    ids = tensors.pop(DRAFT_VOCAB, None)  # token ids: integers, copied as int32
    not_float = sorted(n for n, t in tensors.items() if not np.issubdtype(t.dtype, np.floating))
    if not_float:
        raise _fail(f"{path}: stream tensors must be floating point", not_float)
    if ids is not None and not np.issubdtype(ids.dtype, np.integer):
        raise _fail(f"{path}: the draft vocabulary must hold integer token ids", [DRAFT_VOCAB])
    source = {n: mx.array(t) for n, t in tensors.items()}
    try:
        check_finite(source, str(path))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    out = {n: t.astype(dtype) for n, t in source.items()}
    overflow = sorted(n for n, t in out.items() if not mx.all(mx.isfinite(t)).item())
    if overflow:
        raise _fail(
            f"{path}: stream tensors overflow {str(dtype).removeprefix('mlx.core.')} (their "
            "values exceed its range; convert with --dtype float32 or bfloat16)",
            overflow,
        )
    if ids is not None:
        out[DRAFT_VOCAB] = mx.array(ids.astype(np.int32))
    try:
        # Exactly what ss_mlx.load will do with this directory: names, shapes, RoPE, cache.
        attach_streams(model, cfg, out, str(path))
    except ValueError as e:
        raise ConversionError(str(e)) from e
    mx.save_safetensors(str(dst / STREAMS_FILE), out, metadata={"format": "mlx"})
    return {n: tuple(t.shape) for n, t in out.items()}


def medusa_shapes(block: dict[str, Any], hidden: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names/shapes of the trainer's Medusa heads (convert/medusa.py): per head k,
    `num_layers` residual blocks `medusa_head.{k}.{i}.linear` and, unless the LM head is
    shared, its own head `medusa_head.{k}.{num_layers}.weight`."""
    try:
        heads, layers = int(block["num_heads"]), int(block.get("num_layers", 1))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"bad '{MEDUSA_KEY}' config block {block!r}: {e}") from e
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(heads):
        for i in range(layers):
            shapes[f"medusa_head.{k}.{i}.linear.weight"] = (hidden, hidden)
            shapes[f"medusa_head.{k}.{i}.linear.bias"] = (hidden,)
        if block.get("lm_head", "shared") != "shared":
            shapes[f"medusa_head.{k}.{layers}.weight"] = (vocab, hidden)
    return shapes


def carry_medusa(src: Path, dst: Path, config: dict[str, Any]) -> bool:
    """Copy Medusa heads verbatim (and keep their config block) after a strict name/shape check;
    both file and block or neither must be there."""
    has_file, has_block = (src / MEDUSA_FILE).is_file(), MEDUSA_KEY in config
    if has_file != has_block:
        missing = f"'{MEDUSA_KEY}' config block" if has_file else MEDUSA_FILE
        raise ConversionError(f"{src}: Medusa heads are incomplete: no {missing}")
    if not has_file:
        return False
    store = open_tensor_file(src / MEDUSA_FILE)  # fails now, by name, if truncated
    want = medusa_shapes(config[MEDUSA_KEY], config["hidden_size"], config["vocab_size"])
    bad = [f"missing {n}" for n in want if n not in store]
    bad += [f"unexpected {n}" for n in store if n not in want]
    bad += [
        f"{n} has shape {store.shape(n)}, expected {s}"
        for n, s in want.items()
        if n in store and tuple(store.shape(n)) != s
    ]
    if bad:
        raise _fail(f"{src / MEDUSA_FILE} does not match config['{MEDUSA_KEY}']", bad)
    shutil.copyfile(src / MEDUSA_FILE, dst / MEDUSA_FILE)
    return True


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copyfile(src / f, dst / f)  # not copy2: the umask decides, not the source's mode
    if not any(f.startswith("tokenizer") for f in copied):
        print(
            f"[convert] warning: {src} has no tokenizer files; the output has no usable tokenizer",
            file=sys.stderr,
        )
    return copied


def _check_no_stray_tensor_files(src: Path, used: set[str]) -> None:
    # A .safetensors file we do not know is tensors we would silently drop.
    stray = sorted(p.name for p in src.glob("*.safetensors") if p.name not in used)
    if stray:
        raise _fail(f"{src}: unknown tensor files (nothing would consume them)", stray)


# ---------------------------------------------------------------- the conversion


def write_model_dir(
    src: Path,
    dst: Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
) -> None:
    """Write the complete MLX SS model directory into the existing empty dir `dst`."""
    config = read_hf_config(src)
    config = mlx_lm_config(config)
    try:
        model_type = check_supported(config, src)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if "quantization_config" in config or "quantization" in config:
        raise ConversionError(f"{src}: quantized checkpoints are not supported (dequantize first)")
    cfg = read_ss_config(config, src, model_type)
    base = open_checkpoint(src)
    adapter = open_adapter(src)
    used = {p.name for p in base.files} | {STREAMS_FILE, MEDUSA_FILE, *ADAPTER_FILES}
    _check_no_stray_tensor_files(src, used)
    trunk_dtype = _trunk_dtype(config, dtype)
    # Streams stay at full precision unless a float dtype was asked for explicitly.
    stream_dtype = DTYPES[dtype] if dtype is not None else mx.float32

    model = build_trunk(base, adapter, config, trunk_dtype)
    if cfg is not None:
        export_streams(src, dst, cfg, model, stream_dtype)
        config[CONFIG_KEY] = cfg.to_dict()
    elif (src / STREAMS_FILE).is_file():
        raise ConversionError(f"{src}: {STREAMS_FILE} present but config has no '{CONFIG_KEY}'")
    carry_medusa(src, dst, config)

    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = trunk_dtype
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    copy_tokenizer(src, dst)


def convert(
    torch_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    check: bool = False,
    force: bool = False,
) -> Path:
    """Convert a trained HF/PyTorch SS checkpoint dir into an MLX SS model dir; return its path.

    Args:
        torch_path: HF model dir (config.json with the `speculative_streaming` block, base
            weights, tokenizer, `speculative_streams.safetensors`, optional peft adapter and
            Medusa heads).
        mlx_path: output dir; must not exist or be empty (unless `force`).
        dtype: trunk dtype (float16 / bfloat16 / float32); default: the checkpoint's. Stream
            parameters are written in this dtype when given, else in float32.
        quantize, q_bits, q_group_size: quantize the trunk with mlx-lm (streams stay float).
        check: run the parity gate before publishing the output (see `parity.check_parity`).
        force: replace a non-empty `mlx_path`.

    Raises:
        ConversionError / CheckpointError / LoraMergeError naming every offending tensor or
        file; nothing is left at `mlx_path` (nor a temp dir) on failure.
    """
    src, out = Path(torch_path), Path(mlx_path)
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} is not a Hugging Face model dir (no config.json)")
    check_destination(out, src, force)
    opts = dict(dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size)

    def write(tmp: Path) -> None:
        write_model_dir(src, tmp, **opts)
        if check:
            _parity_gate(src, tmp, exact=(dtype in (None, "float32") and not quantize), opts=opts)

    build_dir(out, write, force)
    return out


def _parity_gate(src: Path, built: Path, *, exact: bool, opts: dict[str, Any]) -> None:
    """fp32 parity of the conversion. A half/quantized output cannot meet 1e-4, so the gate
    then runs on an fp32 build of the same source (same code path) and the requested output's
    own differences are reported for information."""
    from .parity import check_parity

    config = json.loads((built / "config.json").read_text())
    try:
        if exact and config.get("dtype", config.get("torch_dtype", "float32")) == "float32":
            report = check_parity(src, built)
        else:
            with tempfile.TemporaryDirectory(prefix=".parity-", dir=built.parent) as ref:
                write_model_dir(src, Path(ref), **{**opts, "dtype": "float32", "quantize": False})
                report = check_parity(src, ref)
            # Logits only: greedy tokens of a lossy trunk may legitimately differ.
            info = check_parity(src, built, atol=float("inf"), greedy_tokens=0)
            print("[convert] requested output (not gated):\n" + info.summary())
    except (ConversionError, CheckpointError, LoraMergeError):
        raise
    except Exception as e:  # a model or tokenizer that does not even load fails the gate
        raise ConversionError(f"parity gate could not run: {type(e).__name__}: {e}") from e
    print(report.summary())
    if not report.ok:
        raise ConversionError("parity gate failed:\n" + report.summary())


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx convert",
        description="Convert a trained PyTorch Speculative Streaming checkpoint to an MLX dir.",
    )
    p.add_argument("--torch", required=True, type=Path, help="HF checkpoint dir (train --out)")
    p.add_argument("--out", required=True, type=Path, help="MLX model dir to write")
    p.add_argument("--dtype", choices=list(DTYPES), help="trunk dtype (default: the source's)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the trunk, not streams")
    p.add_argument("--q-bits", type=int, choices=(2, 3, 4, 5, 6, 8), default=4)
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--check", action="store_true", help="run the PyTorch/MLX parity gate")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = convert(
            args.torch,
            args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            check=args.check,
            force=args.force,
        )
    except (ConversionError, CheckpointError, LoraMergeError, OSError) as e:
        sys.exit(f"ss-mlx convert: error: {e}")
    print(f"[convert] wrote {out}")


__all__ = ["ConversionError", "DTYPES", "build_parser", "convert", "main", "write_model_dir"]
