"""`ss-mlx generate` and `ss-mlx cache-prompt` against `mlx_lm.generate` / `mlx_lm.cache_prompt`:
the same command line prints the same text (greedy), every mlx-lm flag is accepted with its
default, prompt-cache files cross between the two, and what SS cannot do exactly is refused
in one line. Ctrl-C keeps the text printed so far and exits 130 without a traceback."""

import importlib
import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ss_dirs import make_ss_dir

from ss_mlx.cli import CLI_MAX_TOKENS, generate_parser
from ss_mlx.cli import main as ss_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ss_dir(tmp_path_factory):
    return make_ss_dir(tmp_path_factory.mktemp("cli_generate"))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """qwen2: mlx-lm builds a rotating cache for --max-kv-size (llama builds its own cache and
    ignores the flag)."""
    return make_ss_dir(tmp_path_factory.mktemp("cli_qwen2"), model_type="qwen2")


def mlx_lm_cli(module: str, args: list[str], capsys, monkeypatch) -> str:
    """Run mlx-lm's own command-line main in this process; its stdout."""
    main = importlib.import_module(f"mlx_lm.{module}").main
    monkeypatch.setattr(sys, "argv", [f"mlx_lm.{module}", *args])
    capsys.readouterr()
    main()
    return capsys.readouterr().out


def ss_generate(args: list[str], capsys) -> str:
    capsys.readouterr()
    ss_cli(["generate", *args])
    return capsys.readouterr().out


CASES = {
    "chat template, \\n escape": ["--prompt", "hi\\nthere", "-m", "20"],
    "raw prompt": ["--prompt", "abc abc", "--ignore-chat-template", "-m", "16"],
    "system + prefill": ["--prompt", "abc", "--system-prompt", "Be brief.",
                         "--prefill-response", "Sure", "-m", "16"],
    "template config": ["--prompt", "abc", "--chat-template-config", '{"unused": 1}', "-m", "12"],
    "--max-kv-size (llama: mlx-lm ignores it)": ["--prompt", "abc", "--max-kv-size", "8",
                                                 "-m", "30"],
    "kv quantization never reached": ["--prompt", "abc", "--kv-bits", "4", "-m", "12"],
    "sampling at temp > 0, top-k 1": ["--prompt", "abc", "--temp", "0.8", "--top-k", "1",
                                      "--seed", "1", "-m", "16"],
    "small prefill steps": ["--prompt", "a longer prompt here", "--prefill-step-size", "4",
                            "-m", "12"],
    "min-p, min-tokens-to-keep at temp 0": ["--prompt", "abc", "--min-p", "0.5",
                                            "--min-tokens-to-keep", "2", "-m", "12"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_text_as_mlx_lm_generate(name, ss_dir, capsys, monkeypatch):
    args = ["--model", str(ss_dir), *CASES[name], "--verbose", "False"]
    want = mlx_lm_cli("generate", args, capsys, monkeypatch)
    got = ss_generate(args, capsys)
    assert got == want and got.strip()


def test_max_kv_size_where_mlx_lm_rotates(qwen2_dir, capsys, monkeypatch):
    """Exact while the context fits (mlx-lm's rotating cache never wraps), refused beyond."""
    args = ["--model", str(qwen2_dir), "--prompt", "abc", "-m", "30", "--verbose", "False"]
    prompt_len = 19  # the chat-templated "abc"
    fits = [*args, "--max-kv-size", str(prompt_len + 30)]
    assert ss_generate(fits, capsys) == mlx_lm_cli("generate", fits, capsys, monkeypatch)
    with pytest.raises(SystemExit, match="rotating KV cache") as e:
        ss_cli(["generate", *args, "--max-kv-size", str(prompt_len + 29)])
    assert f"is {prompt_len + 30} tokens" in str(e.value.code)
    with pytest.raises(SystemExit, match="no limit"):
        ss_cli(["generate", *args, "-m", "-1", "--max-kv-size", "4000"])


def test_extra_eos_token_stops_like_mlx_lm(ss_dir, capsys, monkeypatch):
    base = ["--model", str(ss_dir), "--prompt", "abc", "-m", "30", "--verbose", "False"]
    text = ss_generate(base, capsys)
    i = next(i for i in range(3, len(text)) if text[i] not in text[:i] and text[i].strip())
    args = [*base, "--extra-eos-token", text[i]]
    got = ss_generate(args, capsys)
    assert got == mlx_lm_cli("generate", args, capsys, monkeypatch)
    assert got == text[:i] + "\n"


def test_every_mlx_lm_flag_is_accepted_with_its_default():
    mlx_gen = importlib.import_module("mlx_lm.generate")
    theirs, ours = mlx_gen.setup_arg_parser(), generate_parser()
    ours_by_flag = {f: a for a in ours._actions for f in a.option_strings}
    skip = {"--image"}  # vision models: not supported by Speculative Streaming
    for action in theirs._actions:
        flag = action.option_strings[0]
        if flag in skip or flag in ("-h", "--help"):
            continue
        assert flag in ours_by_flag, flag
        mine = ours_by_flag[flag]
        if flag not in ("--model", "--prompt", "--num-draft-tokens"):  # own defaults, see help
            assert mine.default == action.default, flag
    assert ours.get_default("max_tokens") == CLI_MAX_TOKENS == mlx_gen.DEFAULT_MAX_TOKENS
    for action in ours._actions:  # help text on every flag, and the default shown in it
        assert action.help and action.help != "==SUPPRESS==", action.option_strings
    assert "(default: 100)" in ours.format_help()


def test_verbose_is_str2bool_default_true(ss_dir, capsys):
    base = ["--model", str(ss_dir), "--prompt", "abc", "-m", "8"]
    quiet = ss_generate([*base, "--verbose", "False"], capsys)
    for flags in ([], ["--verbose"], ["--verbose", "True"], ["--verbose", "T"]):
        out = ss_generate([*base, *flags], capsys)
        assert out.startswith("=" * 10 + "\n" + quiet.rstrip("\n")), flags
        assert "Forward passes:" in out and "tokens per pass" in out
    assert ss_generate([*base, "--verbose", "f"], capsys) == quiet
    assert "Forward passes" not in quiet


def test_version(capsys):
    from ss_mlx import __version__

    with pytest.raises(SystemExit) as e:
        ss_cli(["generate", "--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ss-mlx {__version__}"


REFUSALS = {
    "--draft-model": (["--draft-model", "x"], "drafts with the model's own streams"),
    "--num-draft-tokens": (["--num-draft-tokens", "3"], "needs no draft model"),
    "xtc": (["--temp", "0.7", "--xtc-probability", "0.5"], "XTC"),
    "kv quantization reached": (["--kv-bits", "4", "--quantized-kv-start", "10"], "quantized"),
    "template config not JSON": (["--chat-template-config", "{x"], "not valid JSON"),
    "template config not an object": (["--chat-template-config", "[1]"], "JSON object"),
    "argv not UTF-8": (["--prompt", "ab\udcffc"], "--prompt is not valid UTF-8"),
    "system prompt not UTF-8": (["--system-prompt", "\udcff"], "--system-prompt is not valid"),
    "missing cache file": (["--prompt-cache-file", "/nonexistent.safetensors"], "no such file"),
    "bad tree": (["--tree", "1,z"], "invalid tree spec"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_one_line_refusals(name, ss_dir, capsys):
    args, message = REFUSALS[name]
    with pytest.raises(SystemExit) as e:
        ss_cli(["generate", "--model", str(ss_dir), "--prompt", "abc", *args])
    text = str(e.value.code)
    assert text.startswith("ss-mlx generate: error: ") and message in text
    assert "\n" not in text
    assert capsys.readouterr().out == ""  # nothing printed before the error


def test_stdin_prompt_and_invalid_utf8_on_stdin(ss_dir, capsys, monkeypatch):
    base = ["--model", str(ss_dir), "-m", "10", "--verbose", "False"]
    want = ss_generate([*base, "--prompt", "héllo\nthere"], capsys)
    stdin = io.TextIOWrapper(io.BytesIO("héllo\nthere".encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert ss_generate([*base, "--prompt", "-"], capsys) == want
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xffc")))
    with pytest.raises(SystemExit, match="stdin is not valid UTF-8"):
        ss_cli(["generate", *base, "--prompt", "-"])


def test_ctrl_c_keeps_text_and_exits_130(ss_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ss_mlx", "generate", "--model", str(ss_dir), "--prompt", "x",
         "--ignore-chat-template", "--max-tokens", "-1", "--verbose", "False"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    out = b""
    deadline = time.time() + 240
    while len(out) < 20 and time.time() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            out += os.read(proc.stdout.fileno(), 4096)
    assert len(out) >= 20, (out, proc.poll())
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err
    assert (out + rest).startswith(out) and len(out + rest) >= 20


# --- prompt cache files ---------------------------------------------------------------------


def test_cache_prompt_files_cross_between_ss_and_mlx_lm(ss_dir, tmp_path, capsys, monkeypatch):
    ss_file, mlx_file = str(tmp_path / "ss.safetensors"), str(tmp_path / "mlx.safetensors")
    ss_cli(["cache-prompt", "--model", str(ss_dir), "--prompt", "abc def ",
            "--prompt-cache-file", ss_file])  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    mlx_lm_cli("cache_prompt", ["--model", str(ss_dir), "--prompt", "abc def ",
                                "--prompt-cache-file", mlx_file], capsys, monkeypatch)
    gen = ["--prompt", "ghi", "-m", "20", "--verbose", "False"]
    # The cached prompt is an unfinished user message that --prompt continues (mlx-lm's rule),
    # so the text equals a fresh run on the whole message.
    fresh = ss_generate(["--model", str(ss_dir), "--prompt", "abc def ghi", "-m", "20",
                         "--verbose", "False"], capsys)  # fmt: skip
    for f in (ss_file, mlx_file):
        assert ss_generate(["--prompt-cache-file", f, *gen], capsys) == fresh
        assert ss_generate(["--model", str(ss_dir), "--prompt-cache-file", f, *gen],
                           capsys) == fresh  # fmt: skip
        assert mlx_lm_cli("generate", ["--prompt-cache-file", f, *gen], capsys,
                          monkeypatch) == fresh  # fmt: skip


def test_cache_prompt_refusals(ss_dir, qwen2_dir, tmp_path, capsys, monkeypatch):
    f = str(tmp_path / "c.safetensors")
    with pytest.raises(SystemExit, match="rotating"):
        ss_cli(["cache-prompt", "--model", str(ss_dir), "--prompt", "a", "--max-kv-size", "64",
                "--prompt-cache-file", f])  # fmt: skip
    with pytest.raises(SystemExit, match="ending in .safetensors"):
        ss_cli(["cache-prompt", "--model", str(ss_dir), "--prompt", "a",
                "--prompt-cache-file", str(tmp_path / "c.bin")])  # fmt: skip
    assert not list(tmp_path.iterdir())
    # A rotating cache written by mlx_lm.cache_prompt --max-kv-size: refused by name.
    mlx_lm_cli("cache_prompt", ["--model", str(qwen2_dir), "--prompt", "abc", "--max-kv-size",
                                "64", "--prompt-cache-file", f], capsys, monkeypatch)
    with pytest.raises(SystemExit, match="RotatingKVCache") as e:
        ss_cli(["generate", "--prompt-cache-file", f, "--prompt", "x"])
    assert "ss-mlx cache-prompt" in str(e.value.code)
    good = str(tmp_path / "good.safetensors")
    ss_cli(["cache-prompt", "--model", str(ss_dir), "--prompt", "a", "--prompt-cache-file", good])
    with pytest.raises(SystemExit, match="is not the model the prompt cache was made with"):
        ss_cli(["generate", "--prompt-cache-file", good, "--model", str(qwen2_dir),
                "--prompt", "x"])  # fmt: skip
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="not a prompt cache file"):
        ss_cli(["generate", "--prompt-cache-file", str(bad), "--prompt", "x"])
