"""`ss-mlx chat`: multi-turn replies equal a fresh generation on the whole history, the cache
is reused (only new tokens prefilled), /reset, q, end of input and Ctrl-C, through stdin and a
pseudo-terminal; and examples/chat.py."""

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model_dir, tiny_base

import ss_mlx
from ss_mlx.chat import ChatSession, build_parser, main, template_ids
from ss_mlx.cli import main as ss_cli

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 24
SYSTEM = "You are a concise assistant."
TURNS = ["hello there", "and then?", "tell me more"]


def _ss_dir(root: Path, vocab_size: int, seed: int) -> Path:
    save_tiny_model_dir(tiny_base("llama", seed=seed, vocab_size=vocab_size), root / "base")
    out = root / "ss"
    ss_cli(["init", "--model", str(root / "base"), "--out", str(out), "--streams", "2",
            "--stream-layers", "2"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def exact_dir(tmp_path_factory):
    """Vocabulary = the tokenizer's 99 tokens: every reply re-tokenizes to the ids generated."""
    return _ss_dir(tmp_path_factory.mktemp("chat_exact"), vocab_size=99, seed=3)


@pytest.fixture(scope="module")
def lossy_dir(tmp_path_factory):
    """128 ids for 99 tokens: replies contain ids that decode to nothing, so the re-rendered
    history no longer starts with the cached tokens."""
    return _ss_dir(tmp_path_factory.mktemp("chat_lossy"), vocab_size=128, seed=0)


@pytest.fixture(scope="module")
def exact(exact_dir):
    return ss_mlx.load(str(exact_dir))


def fresh_turns(model, tokenizer, turns, max_tokens=MAX_TOKENS, system=None, partial=None):
    """Ground truth: each reply generated from scratch on the full rendered history."""
    messages = [{"role": "system", "content": system}] if system else []
    replies = []
    for i, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        ids = template_ids(tokenizer, messages)
        text = ss_mlx.generate(model, tokenizer, ids, max_tokens=max_tokens)
        if partial and i in partial:
            text = partial[i]
        replies.append(text)
        messages.append({"role": "assistant", "content": text})
    return replies


def session_turns(session, turns):
    return ["".join(r.text for r in _collect(session, user)) for user in turns]


def _collect(session, user):
    got = []
    session.reply(user, got.append)
    return got


def transcript(replies, header, end="\n"):
    """What `main` prints for these replies, without --verbose, ending at end of input."""
    return header + "".join(f">> {r}\n" for r in replies) + ">> " + end


HEADER_RE = re.compile(r"^\[chat with [^\]]*\] Commands:.*?\n.*?\n", re.S)


def _run_main(monkeypatch, capsys, argv, stdin_text):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    rc = main(argv)
    out = capsys.readouterr().out
    header = HEADER_RE.match(out)
    assert header, out[:200]
    return rc, out, header.group(0)


@pytest.mark.parametrize("which", ["exact", "lossy"])
def test_multi_turn_matches_fresh_generation(which, exact_dir, lossy_dir):
    d = exact_dir if which == "exact" else lossy_dir
    model, tok = ss_mlx.load(str(d))
    want = fresh_turns(model, tok, TURNS, system="be brief")
    session = ChatSession(model, tok, system_prompt="be brief", max_tokens=MAX_TOKENS)
    assert session_turns(session, TURNS) == want
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * 3


def test_lossy_history_is_re_prefilled_from_the_mismatch(lossy_dir):
    """A reply that re-tokenizes differently: the cache is trimmed to the common prefix."""
    model, tok = ss_mlx.load(str(lossy_dir))
    session = ChatSession(model, tok, max_tokens=MAX_TOKENS)
    first = _collect(session, TURNS[0])
    emitted = [r.token for r in first]
    assert any(t >= 99 for t in emitted), "the fixture should emit ids outside the tokenizer"
    ids2 = template_ids(tok, session.messages + [{"role": "user", "content": TURNS[1]}])
    cached = session.cached_tokens
    shared = next(i for i, (a, b) in enumerate(zip(cached, ids2, strict=False)) if a != b)
    second = _collect(session, TURNS[1])
    assert second[-1].prompt_tokens == len(ids2) - shared


def test_each_turn_prefills_only_its_new_tokens(exact):
    """mlx-lm's semantics: after a reply the cache holds the prompt and every emitted token, so
    the next turn prefills exactly what the template adds after them."""
    model, tok = exact
    session = ChatSession(model, tok, max_tokens=MAX_TOKENS)
    held = 0
    for user in TURNS:
        ids = template_ids(tok, session.messages + [{"role": "user", "content": user}])
        got = _collect(session, user)
        assert ids[:held] == session.cached_tokens[:held]
        assert got[-1].prompt_tokens == len(ids) - held
        held = len(ids) + len(got)
        assert {c.size() for c in session.cache} == {held}


def test_cache_reuse_prefills_less_than_the_history(exact):
    """Holds under either cache semantics: turn 2 prefills a handful of tokens, not the history."""
    model, tok = exact
    session = ChatSession(model, tok, max_tokens=MAX_TOKENS)
    first = _collect(session, TURNS[0])
    ids2 = template_ids(tok, session.messages + [{"role": "user", "content": TURNS[1]}])
    second = _collect(session, TURNS[1])
    new = len(ids2) - (first[-1].prompt_tokens + len(first))
    assert new <= second[-1].prompt_tokens <= new + 1 < len(ids2)


def test_main_transcript_reset_and_eof(exact_dir, exact, monkeypatch, capsys):
    model, tok = exact
    replies = fresh_turns(model, tok, TURNS[:2])
    after_reset = fresh_turns(model, tok, TURNS[2:])
    stdin = f"{TURNS[0]}\n\n{TURNS[1]}\n/reset\n{TURNS[2]}\n"  # an empty line is skipped
    argv = ["--model", str(exact_dir), "--max-tokens", str(MAX_TOKENS)]
    rc, out, header = _run_main(monkeypatch, capsys, argv, stdin)
    assert rc == 0
    want = (
        header
        + "".join(f">> {r}\n" for r in replies[:1])
        + ">> "  # the empty line
        + "".join(f">> {r}\n" for r in replies[1:])
        + ">> [history and cache cleared]\n"
        + "".join(f">> {r}\n" for r in after_reset)
        + ">> \n"
    )
    assert out == want


def test_q_quits_without_reading_further(exact_dir, monkeypatch, capsys):
    rc, out, header = _run_main(
        monkeypatch, capsys, ["--model", str(exact_dir), "-m", "4"], "q\nhello\n"
    )
    assert rc == 0 and out == header + ">> "


def test_verbose_prints_tokens_per_pass(exact_dir, exact, monkeypatch, capsys):
    argv = ["--model", str(exact_dir), "-m", str(MAX_TOKENS), "--verbose", "--system-prompt", "hi"]
    rc, out, _ = _run_main(monkeypatch, capsys, argv, f"{TURNS[0]}\n{TURNS[1]}\n")
    stats = re.findall(
        r"\[prefilled (\d+) tokens, (\d+) generated, (\d+) forward passes, ([\d.]+) tokens per "
        r"pass, (\d+) draft tokens accepted, [\d.]+ tokens/s\]",
        out,
    )
    assert rc == 0 and len(stats) == 2
    for _prefilled, generated, passes, per_pass, accepted in stats:
        assert int(passes) >= 1 and int(accepted) < int(generated)
        assert float(per_pass) == pytest.approx(int(generated) / int(passes), abs=0.005)
    assert int(stats[1][0]) < int(stats[0][0]) + int(stats[0][1])  # only the new turn


class _InterruptingOut(io.StringIO):
    """Sends SIGINT to this process `times` times in a row once `after` chunks of reply text
    have been written (as a user pressing Ctrl-C while tokens stream)."""

    def __init__(self, after: int, times: int = 1):
        super().__init__()
        self.after, self.times, self.chunks, self.armed = after, times, 0, False

    def write(self, s):
        n = super().write(s)
        if self.armed and s and not s.startswith(("[", ">>", "\n")):
            self.chunks += 1
            if self.chunks == self.after:
                for _ in range(self.times):
                    signal.raise_signal(signal.SIGINT)
        if s == ">> ":
            self.armed = True
        return n


def _main_with(monkeypatch, argv, stdin, stdout):
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    return main(argv)


def test_ctrl_c_stops_the_reply_then_the_chat_goes_on(exact_dir, exact, monkeypatch):
    model, tok = exact
    session = ChatSession(model, tok, max_tokens=MAX_TOKENS)
    full = "".join(r.text for r in _collect(session, TURNS[0]))
    assert len(full) > 6
    out = _InterruptingOut(after=3)
    argv = ["--model", str(exact_dir), "-m", str(MAX_TOKENS)]
    rc = _main_with(monkeypatch, argv, io.StringIO(f"{TURNS[0]}\n{TURNS[1]}\n"), out)
    text = out.getvalue()
    assert rc == 0
    assert "[reply stopped]" in text
    partial = text.split(">> ", 2)[1].split("\n[reply stopped]")[0]
    assert 0 < len(partial) < len(full) and full.startswith(partial)
    # The next turn sees the partial reply in its history, exactly as a fresh run would.
    want = fresh_turns(model, tok, TURNS[:2], partial={0: partial})[1]
    assert text.endswith(f"[reply stopped]\n>> {want}\n>> \n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_ctrl_c_quits(exact_dir, monkeypatch):
    out = _InterruptingOut(after=2, times=2)
    argv = ["--model", str(exact_dir), "-m", str(MAX_TOKENS)]
    rc = _main_with(monkeypatch, argv, io.StringIO(f"{TURNS[0]}\n{TURNS[1]}\n"), out)
    assert rc == 130 and out.getvalue().endswith("\n[quit]\n")


def test_ctrl_c_at_the_prompt_quits(exact_dir, monkeypatch):
    class Interrupted(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    out = io.StringIO()
    assert _main_with(monkeypatch, ["--model", str(exact_dir)], Interrupted(), out) == 0


def test_default_model_is_resolved(exact_dir, monkeypatch, capsys):
    import ss_mlx.prepare.default_model

    monkeypatch.setattr(ss_mlx.prepare.default_model, "ensure_default_model", lambda: exact_dir)
    rc, out, header = _run_main(monkeypatch, capsys, ["-m", "2"], "")
    assert rc == 0 and str(exact_dir) in header


def test_parser_defaults_and_help():
    args = build_parser().parse_args([])
    assert (args.model, args.max_tokens, args.temp, args.top_p, args.top_k) == (
        None, 256, 0.0, 1.0, 0)  # fmt: skip
    assert (args.min_p, args.seed, args.tree, args.verbose) == (0.0, 0, None, False)
    text = build_parser().format_help()
    assert "/reset" in text and "--system-prompt" in text


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_through_a_pseudo_terminal(exact_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ss_mlx.chat", "--model", str(exact_dir), "-m", "8", "--verbose"],
        env=_env(),
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect_exact(">> ")
        child.sendline(TURNS[0])
        child.expect(r"tokens per pass")
        child.expect_exact(">> ")
        child.sendline("/reset")
        child.expect_exact("[history and cache cleared]")
        child.expect_exact(">> ")
        child.sendintr()  # Ctrl-C at the prompt quits
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_example_chat_script(exact_dir, exact):
    model, tok = exact
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "chat.py"), str(exact_dir), "--max-tokens", "16"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    turns = re.findall(r"^user: (.*)$", proc.stdout, re.M)
    replies = re.findall(r"^assistant: (.*?)\n\[", proc.stdout, re.M | re.S)
    assert len(turns) >= 2 and len(replies) == len(turns)
    assert replies == fresh_turns(model, tok, turns, max_tokens=16, system=SYSTEM)
