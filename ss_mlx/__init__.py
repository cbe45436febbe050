"""ss-mlx: Speculative Streaming (single-model speculative decoding) on MLX.

The public API is imported lazily, so `import ss_mlx.config` (the format schema the PyTorch side
shares) never imports MLX. The BLAS preload runs here, before anything can import mlx.core.
"""

from importlib import import_module
from typing import Any

from . import _blas  # noqa: F401  (loads OpenBLAS on Linux; must precede mlx.core)
from ._version import __version__

# public name -> module that defines it
_API = {
    "GenerationResponse": "ss_mlx.generation",
    "generate": "ss_mlx.generation",
    "stream_generate": "ss_mlx.generation",
    "ss_generate_step": "ss_mlx.generation",
    "load": "ss_mlx.loader",
    "attach_streams": "ss_mlx.loader",
    "SSModel": "ss_mlx.model.ss_model",
    "TreeSpec": "ss_mlx.decode.tree",
    "SamplerConfig": "ss_mlx.decode.sampling",
    "make_prompt_cache": "ss_mlx.decode.cache",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'ss_mlx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
