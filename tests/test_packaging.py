"""The package metadata (SPDX license, LICENSE file, authors, classifiers), and a wheel built
from a copy of the sources: every subpackage and the assets inside, no setuptools warnings."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def source_packages() -> set[str]:
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ss_mlx").rglob(
        "__init__.py")}  # fmt: skip
    return found | {"ss_mlx.assets", "ss_mlx_convert"}


def test_metadata():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert project["authors"] == [{"name": "ss-mlx developers"}]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639
    assert project["urls"]
    requires = PYPROJECT["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in requires)
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == source_packages()


def test_readme_install_section_is_pypi_facing():
    readme = (REPO / "README.md").read_text()
    install = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    first = next(line for line in install.splitlines() if line.startswith("pip install"))
    assert first.startswith("pip install ss-mlx")


def test_wheel_has_every_package_and_no_warnings(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("needs setuptools >= 77")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copyfile(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "ss_mlx", src / "ss_mlx", ignore=ignore)
    shutil.copytree(REPO / "convert", src / "convert", ignore=ignore)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), "-v"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    warnings = [line for line in log.splitlines() if re.search(r"warning", line, re.I)
                and "byte-compiling is disabled" not in line and "as the 'root' user" not in line]
    assert not warnings, warnings
    (wheel,) = (tmp_path / "dist").glob("ss_mlx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dirs = {n.rsplit("/", 1)[0].replace("/", ".") for n in names}
    assert source_packages() <= dirs
    assert "ss_mlx/assets/smollm2_streams.safetensors" in names
    assert "ss_mlx/assets/smollm2_streams.json" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "ss_mlx/cache_prompt.py" in names and "ss_mlx/prepare/quantize.py" in names
