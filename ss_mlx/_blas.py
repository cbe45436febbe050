"""Make MLX's CPU backend use a real BLAS on Linux.

The `mlx[cpu]` wheel links the reference BLAS (~3 GFLOP/s). Loading a system OpenBLAS with
RTLD_GLOBAL *before* `mlx.core` is imported lets MLX resolve its BLAS symbols to it (~40x faster).
This must run before the first `import mlx.core` anywhere in the process.
"""

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def preload_blas() -> str | None:
    """Load OpenBLAS globally on Linux; return its path, or None when nothing was loaded.

    `SS_MLX_BLAS=off` disables it; `SS_MLX_BLAS=/path/lib.so` picks a library.
    """
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get("SS_MLX_BLAS", "")
    if choice.lower() in ("off", "0", "none"):
        return None
    if "mlx.core" in sys.modules:
        # Too late to interpose; MLX already bound its symbols.
        return None
    paths = [choice] if choice else [*_CANDIDATES, ctypes.util.find_library("openblas")]
    for path in paths:
        if path and (os.path.isabs(path) is False or os.path.exists(path)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


BLAS_PATH = preload_blas()
