"""`ss-mlx server` on 127.0.0.1 with a tiny model: the official `openai` client (chat and
completions, streaming and not) gets the greedy text of `ss_mlx.generate`; bad requests get
OpenAI-style 4xx JSON errors; a client that disconnects frees the worker; 8 concurrent clients
x 5 requests all get the single-request output; examples/server_client.py runs against it."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai  # the test extra: these tests are what CI must run, so no importorskip
import pytest
from conftest import save_tiny_model_dir, tiny_base

import ss_mlx
from ss_mlx.server import StopText, build_parser, create_server

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16
MAX_REQUEST_BYTES = 65536


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The tokenizer's 99 tokens are the whole vocabulary, so every generated id decodes.
    root = tmp_path_factory.mktemp("server")
    save_tiny_model_dir(tiny_base("llama", seed=5, vocab_size=99), root / "base")
    from ss_mlx.cli import main as ss_cli

    ss_cli(["init", "--model", str(root / "base"), "--out", str(root / "ss"), "--streams", "2",
            "--stream-layers", "2"])  # fmt: skip
    return root / "ss"


@pytest.fixture(scope="module")
def reference(model_dir):
    return ss_mlx.load(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir):
    args = build_parser().parse_args(
        ["--model", str(model_dir), "--port", "0", "--max-tokens", str(MAX_TOKENS),
         "--max-request-bytes", str(MAX_REQUEST_BYTES), "--log-level", "WARNING"]
    )  # fmt: skip
    srv = create_server(args)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def wait_idle(server, timeout=20.0):
    """Wait until the worker has no job: the test then may run MLX on its own thread."""
    deadline = time.monotonic() + timeout
    while server.worker.pending:
        assert time.monotonic() < deadline, "the worker did not become idle"
        time.sleep(0.02)


def truth(server, reference, prompt, max_tokens=MAX_TOKENS, chat=False, **kwargs):
    """(text, token count, prompt tokens, finish reason) of a fresh single generation."""
    model, tok = reference
    wait_idle(server)
    if chat:
        prompt = tok.apply_chat_template(prompt, add_generation_prompt=True)
    rs = list(ss_mlx.stream_generate(model, tok, prompt, max_tokens=max_tokens, **kwargs))
    text = "".join(r.text for r in rs)
    assert text == ss_mlx.generate(model, tok, prompt, max_tokens=max_tokens, **kwargs)
    return text, len(rs), rs[-1].prompt_tokens, rs[-1].finish_reason


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def _check_speculative(extra, completion_tokens):
    spec = extra["speculative"]
    assert spec["forward_passes"] >= 1
    assert spec["tokens_per_pass"] == pytest.approx(completion_tokens / spec["forward_passes"])
    assert 0 <= spec["accepted_draft_tokens"] < completion_tokens
    assert spec["accept_rule"] == "greedy"


def test_chat_completion(server, reference, client):
    text, n, prompt_n, finish = truth(server, reference, CHAT, chat=True)
    model_id = client.models.list().data[0].id
    r = client.chat.completions.create(model=model_id, messages=CHAT)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_id
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_n, n)
    assert r.usage.total_tokens == prompt_n + n
    _check_speculative(r.model_extra, n)


def test_chat_completion_streaming(server, reference, client):
    text, n, prompt_n, finish = truth(server, reference, CHAT, chat=True)
    chunks = list(
        client.chat.completions.create(
            model="default_model", messages=CHAT, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == finish
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == n
    assert usage.usage.prompt_tokens == prompt_n
    _check_speculative(usage.model_extra, n)


@pytest.mark.parametrize("stream", [False, True])
def test_text_completion(server, reference, client, stream):
    prompt = "The quick brown fox"
    text, n, prompt_n, finish = truth(server, reference, prompt, max_tokens=12)
    r = client.completions.create(model="default_model", prompt=prompt, max_tokens=12,
                                  stream=stream)  # fmt: skip
    if stream:
        chunks = list(r)
        assert all(c.object == "text_completion" for c in chunks)
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == finish
    else:
        assert r.object == "text_completion" and r.choices[0].text == text
        assert r.choices[0].finish_reason == finish
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_n, n)


def test_token_id_prompt_and_max_completion_tokens(server, reference, client):
    ids = [5, 17, 33, 40, 41]
    text, n, _, finish = truth(server, reference, ids, max_tokens=4)
    r = client.completions.create(model="default_model", prompt=ids, max_tokens=4)
    assert r.choices[0].text == text and r.usage.completion_tokens == n
    r = client.chat.completions.create(model="default_model", messages=CHAT,
                                       max_completion_tokens=3)  # fmt: skip
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def _stop_for(text):
    """A two-character stop string whose first occurrence is at least 2 characters in."""
    for i in range(2, len(text) - 1):
        s = text[i : i + 2]
        if text.find(s) == i and "\n" not in s:
            return s, i
    pytest.skip("greedy text too short for a stop test")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_are_trimmed(server, reference, client, stream):
    prompt = "abcdefgh"
    text, _, _, _ = truth(server, reference, prompt, max_tokens=MAX_TOKENS)
    stop, at = _stop_for(text)
    r = client.completions.create(model="default_model", prompt=prompt, stream=stream,
                                  stop=["never-appears", stop])  # fmt: skip
    if stream:
        chunks = list(r)
        got = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens <= at + 2  # generation stopped at the stop sequence
    assert (got, finish) == (text[:at], "stop")


def test_stop_text_across_boundaries():
    s = StopText(["END", "xy"])
    sent = []
    for seg in ["ab", "cE", "N", "q", "x", "Yz", "E", "ND", "tail"]:
        out, hit = s.add(seg)
        sent.append(out)
        if hit:
            break
    assert "".join(sent) == "abcENqxYz" and hit
    assert sent[1] == "c" and sent[2] == ""  # "E", then "EN", held back until decided
    s = StopText([])
    assert s.add("abc") == ("abc", False) and s.flush() == ""
    s = StopText(["aa"])
    assert s.add("xa") == ("x", False) and s.flush() == "a"


def test_seeded_sampling_matches_generate(server, reference, client):
    text, _, _, _ = truth(server, reference, "seeded", temp=0.9, seed=7)
    again = [
        client.completions.create(model="default_model", prompt="seeded", temperature=0.9, seed=7)
        .choices[0]
        .text  # fmt: skip
        for _ in range(2)
    ]
    assert again == [text, text]
    wait_idle(server)
    r = client.completions.create(model="default_model", prompt="seeded", temperature=0.9,
                                  seed=7)  # fmt: skip
    # The default dynamic tree's drafts carry no distribution: the exact rule needing none.
    assert r.model_extra["speculative"]["accept_rule"] == "simple"


def test_logit_bias_and_repetition_penalty(server, reference, client):
    _, tok = reference
    a = tok.convert_tokens_to_ids("A")
    r = client.completions.create(model="default_model", prompt="hi", max_tokens=6,
                                  logit_bias={str(a): 100})  # fmt: skip
    assert r.choices[0].text == "A" * 6
    text, _, _, _ = truth(server, reference, "hi", max_tokens=8, logits_processors=_rep(1.3))
    r = client.completions.create(model="default_model", prompt="hi", max_tokens=8,
                                  extra_body={"repetition_penalty": 1.3})  # fmt: skip
    assert r.choices[0].text == text


def _rep(penalty):
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(repetition_penalty=penalty)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server.model_id]
    status, body = _request(server, "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    status, body = _request(server, "GET", "/v1/models/" + "default_model")
    assert status == 200 and body["id"] == server.model_id


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(server.server_address[0], server.server_address[1],
                                      timeout=30)  # fmt: skip
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    assert b"Traceback" not in raw
    return resp.status, json.loads(raw)


def _msg(content="hi"):
    return [{"role": "user", "content": content}]


BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b'{"messages": [], "temperature": NaN}', 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": _msg(), "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": _msg(), "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": _msg(), "max_tokens": True}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": _msg(), "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": _msg(), "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": _msg(), "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": _msg(), "top_k": 1.5}, 400, "top_k"),
    ("/v1/chat/completions", {"messages": _msg(), "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": _msg(), "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": _msg(), "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": _msg(), "seed": "x"}, 400, "seed"),
    ("/v1/chat/completions", {"messages": _msg(), "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": _msg(), "logit_bias": {"5000": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": _msg(), "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": _msg(), "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": _msg(), "chat_template_kwargs": "x"}, 400,
     "chat_template_kwargs"),
    # apply_chat_template(add_generation_prompt=...) twice: the template step refuses it
    ("/v1/chat/completions", {"messages": _msg(),
                              "chat_template_kwargs": {"add_generation_prompt": False}}, 400, None),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, None),  # empty: found by the prompt checks
    ("/v1/completions", {"prompt": "x" * 2000}, 400, None),  # longer than the context
    ("/v1/nothing", {"prompt": "x"}, 404, None),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    got, resp = _request(server, "POST", path, body)
    assert got == status, resp
    err = resp["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str)
    assert err["message"] and "\n" not in err["message"]
    assert err["param"] == param


def test_the_openai_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.chat.completions.create(model="default_model", messages=_msg(), n=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=_msg())
    assert e.value.code == "model_not_found"


def _raw(server, data: bytes) -> bytes:
    with socket.create_connection(server.server_address[:2], timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _post_bytes(path, body, extra=""):
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def test_missing_length_and_body_too_large(server):
    out = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 411")
    body = json.dumps({"prompt": "x" * (MAX_REQUEST_BYTES + 10)}).encode()
    out = _raw(server, _post_bytes("/v1/completions", body))
    assert out.startswith(b"HTTP/1.0 413")
    err = json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "request_too_large"


def test_unexpected_error_is_a_500_json_line(server, client):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
        yield

    wait_idle(server)
    original, server.worker.generate = server.worker.generate, boom
    try:
        status, body = _request(server, "POST", "/v1/completions", {"prompt": "hi"})
    finally:
        server.worker.generate = original
    assert status == 500
    assert body["error"]["type"] == "server_error"
    assert body["error"]["message"] == "internal error: RuntimeError: boom"
    assert client.completions.create(model="default_model", prompt="hi").choices[0].text


def _open_stream(server, max_tokens, eos):
    body = json.dumps({"prompt": "abc", "stream": True, "max_tokens": max_tokens,
                       "logit_bias": {str(eos): -100}}).encode()  # fmt: skip
    s = socket.create_connection(server.server_address[:2], timeout=30)
    s.sendall(_post_bytes("/v1/completions", body))
    return s


def _wait_for(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_worker(server, reference, client):
    _, tok = reference
    text, _, _, _ = truth(server, reference, "after", max_tokens=8)
    before = server.worker.cancelled
    s = _open_stream(server, 900, tok.eos_token_id)  # minutes of tokens if nobody stopped it
    got = b""
    while got.count(b"data:") < 2:
        got += s.recv(4096)
    assert got.startswith(b"HTTP/1.0 200")
    s.close()
    _wait_for(lambda: server.worker.cancelled == before + 1)
    r = client.completions.create(model="default_model", prompt="after", max_tokens=8)
    assert r.choices[0].text == text


def test_disconnect_while_generating_a_non_streamed_answer(server, reference, client):
    _, tok = reference
    wait_idle(server)
    before = server.worker.cancelled
    body = json.dumps({"prompt": "abc", "max_tokens": 900,
                       "logit_bias": {str(tok.eos_token_id): -100}}).encode()  # fmt: skip
    s = socket.create_connection(server.server_address[:2], timeout=30)
    s.sendall(_post_bytes("/v1/completions", body))
    _wait_for(lambda: server.worker.pending == 1)
    time.sleep(0.3)
    s.close()
    _wait_for(lambda: server.worker.cancelled == before + 1)
    assert client.completions.create(model="default_model", prompt="hi").choices[0].text


def test_disconnect_while_queued_is_skipped(server, reference):
    _, tok = reference
    wait_idle(server)
    before, served = server.worker.cancelled, server.worker.served
    busy = _open_stream(server, 900, tok.eos_token_id)
    busy.recv(4096)  # the worker is generating for it
    queued = socket.create_connection(server.server_address[:2], timeout=30)
    queued.sendall(_post_bytes("/v1/completions", json.dumps({"prompt": "q"}).encode()))
    _wait_for(lambda: server.worker.pending == 2)
    queued.close()
    time.sleep(0.6)  # the waiting handler notices within its poll interval
    busy.close()
    _wait_for(lambda: server.worker.served == served + 2)
    assert server.worker.cancelled == before + 2


LOAD = [
    dict(chat=True, prompt=CHAT, stream=False),
    dict(chat=True, prompt=[{"role": "user", "content": "what now?"}], stream=True),
    dict(chat=False, prompt="The quick brown fox", stream=False),
    dict(chat=False, prompt="jumps over", stream=True),
    dict(chat=False, prompt="the lazy dog", stream=False),
]


def _ask(client, req, max_tokens):
    if req["chat"]:
        r = client.chat.completions.create(model="default_model", messages=req["prompt"],
                                           max_tokens=max_tokens, stream=req["stream"])  # fmt: skip
        if req["stream"]:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content
    r = client.completions.create(model="default_model", prompt=req["prompt"],
                                  max_tokens=max_tokens, stream=req["stream"])  # fmt: skip
    return "".join(c.choices[0].text for c in r) if req["stream"] else r.choices[0].text


def test_load_8_clients_x_5_requests(server, reference):
    max_tokens = 12
    want = [truth(server, reference, q["prompt"], max_tokens, chat=q["chat"])[0] for q in LOAD]
    assert len(set(want)) == len(want)  # distinct answers, so a mix-up would show
    results: list[tuple[int, int, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_thread(c: int) -> None:
        cl = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                           timeout=120)  # fmt: skip
        try:
            for k in range(len(LOAD)):
                i = (c + k) % len(LOAD)
                text = _ask(cl, LOAD[i], max_tokens)
                with lock:
                    results.append((c, i, text))
        except BaseException as e:
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 8 * len(LOAD)
    assert sorted((c, i) for c, i, _ in results) == [(c, i) for c in range(8) for i in range(5)]
    for _, i, text in results:
        assert text == want[i]
    print(f"40 requests in {time.monotonic() - t0:.1f} s")


def test_example_server_client(server, reference):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    wait_idle(server)
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "server_client.py"), "--base-url",
         server.url + "/v1", "--max-tokens", "10"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    question = out.split("user: ", 1)[1].split("\n", 1)[0]
    reply = out.split("assistant: ", 1)[1].split("\n[", 1)[0]
    streamed = out.split("streamed: ", 1)[1].split("\n[", 1)[0]
    want = truth(server, reference, [{"role": "user", "content": question}], 10, chat=True)[0]
    assert reply == want and streamed == want
    assert "tokens per pass" in out


def test_parser_defaults_and_help():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.max_tokens, args.temp, args.model) == (
        "127.0.0.1", 8080, 512, 0.0, None)  # fmt: skip
    assert args.chat_template_args == {} and args.allowed_origins == ["*"]
    assert "One generation runs at a time" in " ".join(build_parser().format_help().split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--chat-template-args", "[1]"])
