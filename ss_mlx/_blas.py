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
    """Load OpenBLAS globally on Linux; return what was loaded, or None when nothing was.

    `SS_MLX_BLAS=off` disables it; `SS_MLX_BLAS=/path/lib.so` picks a library, and a list
    joined by ":" loads each in order, the first to define a symbol serving it: e.g. BLIS for
    `cblas_sgemm` (faster at one row on some x86 CPUs) and OpenBLAS behind it for the LAPACK
    routines MLX's linalg calls, which BLIS lacks.
    """
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get("SS_MLX_BLAS", "")
    if choice.lower() in ("off", "0", "none"):
        return None
    if "mlx.core" in sys.modules:
        # Too late to interpose; MLX already bound its symbols.
        return None
    if choice:
        loaded = [path for path in choice.split(os.pathsep) if path and _load(path)]
        return os.pathsep.join(loaded) or None
    for path in [*_CANDIDATES, ctypes.util.find_library("openblas")]:
        if path and _load(path):
            return path
    return None


def _load(path: str) -> bool:
    # A bare name ("libopenblas.so.0") is the loader's to find; an absolute path must exist.
    if os.path.isabs(path) and not os.path.exists(path):
        return False
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


BLAS_PATH = preload_blas()
