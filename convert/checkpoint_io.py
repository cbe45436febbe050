"""Lazy, validated reading of HF checkpoints (safetensors or PyTorch .bin, sharded or not).

Every file is opened (headers / zip directories read) when the store is built, so a truncated or
corrupt file fails early with its name; tensor data is read only when asked for. Tensors come out
as numpy arrays; bfloat16 is upcast to float32 because numpy has no bfloat16 (exact).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# HF file names, in the order transformers prefers them.
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, or inconsistent with its index."""


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: {err} (is the file truncated or corrupt?)")


def _to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().contiguous().numpy()


class _SafetensorsReader:
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            # The header is parsed and the file length checked against it here.
            self._f = safe_open(str(path), framework="pt")
            self._names = list(self._f.keys())
        except Exception as e:  # SafetensorError, OSError
            raise _corrupt(path, e) from e

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        try:
            return _to_numpy(self._f.get_tensor(name))
        except Exception as e:
            raise _corrupt(self.path, e) from e


class _TorchBinReader:
    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        try:
            try:
                # mmap keeps the data on disk until a tensor is used (zip format only).
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise _corrupt(path, e) from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict)")
        self._sd = sd

    def names(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def get(self, name: str) -> np.ndarray:
        try:
            return _to_numpy(self._sd[name])
        except Exception as e:
            raise _corrupt(self.path, e) from e


def _reader(path: Path) -> _SafetensorsReader | _TorchBinReader:
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    if path.name.endswith(".safetensors"):
        return _SafetensorsReader(path)
    if path.name.endswith((".bin", ".pt", ".pth")):
        return _TorchBinReader(path)
    raise CheckpointError(f"{path}: unknown tensor file type (expected .safetensors or .bin)")


class TensorStore:
    """Read-only name -> numpy tensor mapping over one or more tensor files, read on demand."""

    def __init__(self, readers: list[_SafetensorsReader | _TorchBinReader]) -> None:
        self._where: dict[str, _SafetensorsReader | _TorchBinReader] = {}
        dupes = []
        for r in readers:
            for name in r.names():
                if name in self._where:
                    dupes.append(f"{name} ({self._where[name].path.name}, {r.path.name})")
                self._where[name] = r
        if dupes:
            raise CheckpointError("tensors stored in more than one file: " + ", ".join(dupes))
        self.files = [r.path for r in readers]

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy (bf16 -> fp32, other dtypes kept)."""
        return self._where[name].get(name)


def open_tensor_file(path: Path | str) -> TensorStore:
    """One .safetensors or .bin file."""
    return TensorStore([_reader(Path(path))])


def _open_indexed(model_dir: Path, index_name: str) -> TensorStore:
    index_path = model_dir / index_name
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read index {index_path}: {e}") from e
    readers = [_reader(model_dir / f) for f in sorted(set(weight_map.values()))]
    store = TensorStore(readers)
    # An index that disagrees with its shards means a partial copy or mixed checkpoints.
    problems = [
        f"{name} (index says {f}, not there)"
        for name, f in weight_map.items()
        if name not in store or store.file_of(name).name != f
    ]
    problems += [
        f"{n} (in {store.file_of(n).name}, not in index)" for n in store if n not in weight_map
    ]
    if problems:
        raise CheckpointError(f"{index_path} disagrees with its shards: " + ", ".join(problems))
    return store


def open_checkpoint(model_dir: Path | str) -> TensorStore:
    """The base weights of an HF model dir, as transformers would pick them (safetensors first)."""
    model_dir = Path(model_dir)
    if (model_dir / SAFETENSORS_INDEX).is_file():
        return _open_indexed(model_dir, SAFETENSORS_INDEX)
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return open_tensor_file(model_dir / SAFETENSORS_SINGLE)
    if (model_dir / BIN_INDEX).is_file():
        return _open_indexed(model_dir, BIN_INDEX)
    if (model_dir / BIN_SINGLE).is_file():
        return open_tensor_file(model_dir / BIN_SINGLE)
    shards = sorted(model_dir.glob("model-*.safetensors")) + sorted(
        model_dir.glob("pytorch_model-*.bin")
    )
    if shards:
        raise CheckpointError(
            f"{model_dir}: found shards ({', '.join(p.name for p in shards)}) but no index file "
            f"({SAFETENSORS_INDEX} / {BIN_INDEX})"
        )
    raise CheckpointError(
        f"{model_dir}: no model weights ({SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} "
        f"or {BIN_INDEX})"
    )


def open_adapter(model_dir: Path | str) -> tuple[dict, TensorStore] | None:
    """The peft adapter (config, weights) saved next to the base weights, or None when absent."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / ADAPTER_CONFIG
    weights = [model_dir / f for f in ADAPTER_FILES if (model_dir / f).is_file()]
    if not cfg_path.is_file() and not weights:
        return None
    if not cfg_path.is_file():
        raise CheckpointError(f"{weights[0]} has no {ADAPTER_CONFIG} next to it")
    if not weights:
        raise CheckpointError(f"{cfg_path} has no adapter weights ({' or '.join(ADAPTER_FILES)})")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from e
    # peft itself prefers safetensors when both exist.
    return config, open_tensor_file(weights[0])
