"""The Linux BLAS preload: `SS_MLX_BLAS` picks nothing, one library, or several in order."""

import os
import subprocess
import sys

import pytest

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.path.exists(OPENBLAS)),
    reason="needs Linux with the system OpenBLAS",
)


def _loaded(setting: str) -> str:
    code = "from ss_mlx import _blas; print(_blas.BLAS_PATH)"
    env = {**os.environ, "SS_MLX_BLAS": setting}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def test_off_loads_nothing():
    assert _loaded("off") == "None"


def test_a_list_loads_every_library_that_exists_in_order(tmp_path):
    missing = str(tmp_path / "libnothing.so")
    assert _loaded(f"{missing}{os.pathsep}{OPENBLAS}") == OPENBLAS
    assert _loaded(f"{OPENBLAS}{os.pathsep}{OPENBLAS}") == f"{OPENBLAS}{os.pathsep}{OPENBLAS}"
    assert _loaded(missing) == "None"


def test_matmul_and_lapack_work_with_the_list():
    code = ("import ss_mlx, mlx.core as mx; a = mx.eye(4) * 2; "
            "print((a @ a)[0, 0].item(), mx.linalg.inv(a, stream=mx.cpu)[0, 0].item())")
    env = {**os.environ, "SS_MLX_BLAS": f"{OPENBLAS}{os.pathsep}{OPENBLAS}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True)  # fmt: skip
    assert out.stdout.split() == ["4.0", "0.5"]
