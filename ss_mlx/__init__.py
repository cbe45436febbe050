"""ss-mlx: Speculative Streaming (single-model speculative decoding) on MLX."""

from . import _blas  # noqa: F401  (must run before mlx.core is imported: loads OpenBLAS on Linux)
from .generate import (
    GenerationResponse,
    generate,
    ss_generate_step,
    stream_generate,
)
from .loader import load
from .model import SSModel
from .tree import TreeSpec

__version__ = "0.1.0"

__all__ = [
    "GenerationResponse",
    "SSModel",
    "TreeSpec",
    "generate",
    "load",
    "ss_generate_step",
    "stream_generate",
]
