"""`ss-mlx server`: an OpenAI-compatible HTTP server for Speculative Streaming models.

Endpoints (request and response shapes as `mlx_lm.server` and the OpenAI API):

- ``POST /v1/chat/completions`` (``messages``) and ``POST /v1/completions`` (``prompt``), streamed
  as server-sent events (``stream: true``, ending with ``data: [DONE]``) or not;
- ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``.

Responses carry ``usage`` and an extension field ``speculative``: forward passes, tokens per pass,
accepted draft tokens and the acceptance rule.

One generation at a time: a single worker thread owns the model and serves requests in arrival
order, so concurrent requests wait in its queue (no batching). A client that disconnects,
mid-stream or while waiting, has its request cancelled, which frees the worker for the next.
Bad requests get OpenAI-style JSON errors (``{"error": {"message", "type", "param", "code"}}``)
with 4xx codes; unexpected failures a 500 with a one-line message (the traceback goes to the log).

Like mlx_lm.server this uses the standard library's ``ThreadingHTTPServer`` and has only basic
security checks: keep the default ``--host 127.0.0.1`` or put it behind a proxy.
"""

import argparse
import json
import logging
import math
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mlx_lm.sample_utils import make_logits_processors

from ss_mlx import load, stream_generate

log = logging.getLogger("ss_mlx.server")

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
QUEUE_POLL_S = 0.2  # how often a waiting handler checks that its client is still connected
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """An error answered as OpenAI does: an HTTP status and a JSON ``error`` object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientGone(Exception):
    """The client closed the connection."""


# ---------------------------------------------------------------------------------------------
# Request parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


def _field(
    body: dict[str, Any],
    name: str,
    kind: type,
    default: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> Any:
    """body[name] checked for type and range; absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise RequestError(400, f"'{name}' must be {_TYPE_NAMES[kind]}", param=name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RequestError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}", param=name)
    if hi is not None and value > hi:
        raise RequestError(400, f"'{name}' must be <= {hi}", param=name)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
    return [s for s in stop if s]


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, "'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(400, f"'{param}' must be an object", param=param)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                400, f"'{param}.role' must be one of {', '.join(ROLES)}", param=f"{param}.role"
            )
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    raise RequestError(
                        400, "only text content parts are supported", param=f"{param}.content"
                    )
                if not isinstance(part.get("text"), str):
                    raise RequestError(
                        400, "a text part needs a string 'text'", param=f"{param}.content"
                    )
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise RequestError(
                400, f"'{param}.content' must be a string or a list of text parts",
                param=f"{param}.content",
            )  # fmt: skip
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise RequestError(
        400, "'prompt' must be a string or a list of token ids (one prompt per request)",
        param="prompt",
    )  # fmt: skip


def _logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    msg = f"'logit_bias' must map token ids in [0, {vocab_size}) to numbers in [-100, 100]"
    if not isinstance(bias, dict):
        raise RequestError(400, msg, param="logit_bias")
    out = {}
    for k, v in bias.items():
        try:
            token = int(k)
        except ValueError:
            raise RequestError(400, msg, param="logit_bias") from None
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (0 <= token < vocab_size and numeric and math.isfinite(v) and -100 <= v <= 100):
            raise RequestError(400, msg, param="logit_bias")
        out[token] = float(v)
    return out


@dataclass
class Job:
    """One generation request, as handed to the worker."""

    prompt: str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages
    chat: bool
    gen_kwargs: dict[str, Any]
    template_args: dict[str, Any]
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class ParsedRequest:
    job: Job
    stream: bool
    include_usage: bool
    stops: list[str]


def parse_request(
    body: dict[str, Any], chat: bool, defaults: argparse.Namespace, vocab_size: int
) -> ParsedRequest:
    """Validate a completion request (mlx_lm.server's fields) and build its job."""
    prompt = _messages(body) if chat else _prompt(body)
    n = _field(body, "n", int, 1)
    if n != 1:
        raise RequestError(400, "only n = 1 is supported", param="n")
    max_tokens = _field(body, "max_completion_tokens", int, None, lo=1)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, defaults.max_tokens, lo=1)
    stream = _field(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = _field(options or {}, "include_usage", bool, False)
    if _field(body, "logprobs", bool, False) or _field(body, "top_logprobs", int, 0) > 0:
        raise RequestError(400, "logprobs are not supported", param="logprobs")
    if body.get("tools"):
        raise RequestError(400, "tool calling is not supported", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(400, "only response_format 'text' is supported", param="response_format")
    template_args = body.get("chat_template_kwargs")
    if template_args is not None and not isinstance(template_args, dict):
        raise RequestError(
            400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs"
        )
    processors = make_logits_processors(
        logit_bias=_logit_bias(body, vocab_size),
        repetition_penalty=_field(body, "repetition_penalty", float, None, lo=0),
        repetition_context_size=_field(body, "repetition_context_size", int, 20, lo=0),
        presence_penalty=_field(body, "presence_penalty", float, None, lo=-2, hi=2),
        frequency_penalty=_field(body, "frequency_penalty", float, None, lo=-2, hi=2),
    )
    gen_kwargs = {
        "max_tokens": max_tokens,
        "temp": _field(body, "temperature", float, defaults.temp, lo=0),
        "top_p": _field(body, "top_p", float, defaults.top_p, lo=0, hi=1, lo_open=True),
        "top_k": _field(body, "top_k", int, defaults.top_k, lo=0),
        "min_p": _field(body, "min_p", float, defaults.min_p, lo=0, hi=1),
        "seed": _field(body, "seed", int, None),
        "tree": defaults.tree,
    }
    if processors:
        gen_kwargs["logits_processors"] = processors
    job = Job(
        prompt=prompt,
        chat=chat,
        gen_kwargs=gen_kwargs,
        template_args={**defaults.chat_template_args, **(template_args or {})},
    )
    return ParsedRequest(job, stream, include_usage, _stops(body))


# ---------------------------------------------------------------------------------------------
# The worker: the only thread that touches the model


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], template_args: dict) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        # mlx_lm.server's plain layout for tokenizers without a template
        roles = {"system": "ASSISTANT's RULE: ", "user": "USER: ", "assistant": "ASSISTANT: "}
        text = "".join(f"{roles.get(m['role'], '')}{m['content']}\n" for m in messages)
        return list(tokenizer.encode((text + roles["assistant"]).rstrip()))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_args)
    if isinstance(ids, str):
        ids = tokenizer.encode(ids, add_special_tokens=False)
    elif isinstance(ids, dict):  # transformers >= 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


class Worker:
    """Runs jobs one at a time, in order, on its own thread (which also loads the model, so every
    MLX array lives on the thread that evaluates it).

    Each job's `events` queue receives ("token", GenerationResponse) items, then ("done", None)
    or ("error", RequestError). A job whose `cancelled` flag is set stops at the next token, or
    is skipped if it has not started.
    """

    def __init__(self, model_path: str, tokenizer_config: dict[str, Any] | None = None) -> None:
        self.model_path = model_path
        self.tokenizer_config = tokenizer_config
        self.model: Any = None
        self.tokenizer: Any = None
        self.vocab_size = 0
        self.generate: Callable[..., Iterator[Any]] = stream_generate
        self.submitted = 0
        self.served = 0  # jobs finished, cancelled ones included
        self.cancelled = 0  # jobs cancelled before or during generation
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._count_lock = threading.Lock()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._warmup_kwargs: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="ss-mlx-worker", daemon=True)

    def start(self, warmup_kwargs: dict[str, Any] | None = None) -> None:
        """Start the thread and wait until the model is loaded (re-raising a load error)."""
        self._warmup_kwargs = warmup_kwargs
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished (the running one included)."""
        return self.submitted - self.served

    def submit(self, job: Job) -> None:
        with self._count_lock:  # handler threads submit concurrently
            self.submitted += 1
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _load(self) -> None:
        self.model, self.tokenizer = load(self.model_path, tokenizer_config=self.tokenizer_config)
        self.vocab_size = len(self.tokenizer.get_vocab())
        if self._warmup_kwargs is not None:  # one token: fails early on a bad --tree
            first = self.tokenizer.encode("a") or [0]
            kwargs = dict(self._warmup_kwargs, max_tokens=1)
            for _ in stream_generate(self.model, self.tokenizer, first, **kwargs):
                pass

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        while (job := self._jobs.get()) is not None:
            try:
                self._serve(job)
            finally:
                self.served += 1

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.cancelled += 1
            job.events.put(("done", None))
            return
        prompt = job.prompt
        if job.chat:
            try:
                prompt = _chat_ids(self.tokenizer, job.prompt, job.template_args)
            except Exception as e:  # templates raise on messages they refuse (roles, order)
                log.warning("chat template failed: %s", _one_line(e))
                job.events.put(("error", RequestError(400, f"chat template: {_one_line(e)}")))
                return
        try:
            gen = self.generate(self.model, self.tokenizer, prompt, **job.gen_kwargs)
            try:
                for response in gen:
                    if job.cancelled.is_set():
                        self.cancelled += 1
                        break
                    job.events.put(("token", response))
            finally:
                gen.close()
        except ValueError as e:  # ss-mlx's checks of the prompt and settings
            job.events.put(("error", RequestError(400, _one_line(e))))
        except Exception as e:
            log.exception("generation failed")
            job.events.put(("error", _server_error(e)))
        else:
            job.events.put(("done", None))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _server_error(e: BaseException) -> RequestError:
    return RequestError(
        500, f"internal error: {type(e).__name__}: {_one_line(e)}", kind="server_error"
    )


# ---------------------------------------------------------------------------------------------
# Stop sequences


class StopText:
    """Accumulates generated text and finds stop sequences, also across token boundaries.

    `add` returns the text that is safe to send now: text that could still be the start of a
    stop sequence is held back until the next segment decides it.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0

    def add(self, segment: str) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.longest + 1)
        self.text += segment
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Completion:
    """What a handler accumulates from the worker's responses."""

    text: str = ""
    tokens: int = 0
    accepted: int = 0
    finish_reason: str | None = None
    last: Any = None

    def usage(self) -> dict[str, int]:
        prompt = self.last.prompt_tokens if self.last is not None else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.tokens,
            "total_tokens": prompt + self.tokens,
        }

    def speculative(self) -> dict[str, Any]:
        passes = self.last.forward_passes if self.last is not None else 0
        return {
            "forward_passes": passes,
            "tokens_per_pass": self.tokens / passes if passes else 0.0,
            "accepted_draft_tokens": self.accepted,
            "accept_rule": self.last.accept_rule if self.last is not None else None,
        }


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    server_version = "ss-mlx"
    timeout = 120  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # -- plumbing

    def _cors(self) -> None:
        origins = self.server.args.allowed_origins
        origin = self.headers.get("Origin")
        if "*" in origins:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self._cors()
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error(self, error: RequestError) -> None:
        self.close_connection = True
        self._send_json(error.status, error.body())

    def _client_gone(self) -> bool:
        """True once the client has closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, job: Job) -> tuple[str, Any]:
        """The job's next event. Checks now and then that the client is still there: one
        that waits in the queue, or for a non-streamed answer, writes nothing that could fail."""
        while True:
            now = time.monotonic()
            if now - self._checked >= QUEUE_POLL_S:
                self._checked = now
                if self._client_gone():
                    raise ClientGone
            try:
                return job.events.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                pass

    def _sse(self, body: dict[str, Any] | str) -> None:
        data = body if isinstance(body, str) else json.dumps(body)
        try:
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise ClientGone from e

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
        if n < 0:
            raise RequestError(400, "invalid Content-Length header")
        limit = self.server.args.max_request_bytes
        if n > limit:
            self._discard(n)
            raise RequestError(
                413, f"the request body is {n} bytes; the limit is {limit}",
                code="request_too_large",
            )  # fmt: skip
        return self.rfile.read(n)

    def _discard(self, n: int) -> None:
        # Reading what the client sends before answering avoids a reset that would lose the
        # answer; a body far past the limit is not worth reading.
        if n > 64 * self.server.args.max_request_bytes:
            return
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    # -- routes

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self._cors()
        self.end_headers()

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _guard(self, route: Callable[[], None]) -> None:
        self._started = False  # whether a response status line has been sent
        self._checked = time.monotonic()
        try:
            route()
        except ClientGone:
            log.info("%s disconnected", self.address_string())
            self.close_connection = True
        except RequestError as e:
            if not self._started:
                self._send_error(e)
        except Exception as e:
            log.exception("request failed")
            if not self._started:
                self._send_error(_server_error(e))

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            ok = self.server.worker.alive
            self._send_json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
        elif path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [self.server.model_card()]})
        elif path.startswith(("/v1/models/", "/models/")):
            name = path.split("/models/", 1)[1]
            self._check_model(name)
            self._send_json(200, self.server.model_card())
        else:
            raise RequestError(404, f"no route {self.path}", code="not_found")

    def _check_model(self, name: Any) -> None:
        if name is None:
            return
        if not isinstance(name, str):
            raise RequestError(400, "'model' must be a string", param="model")
        if name not in self.server.model_names:
            raise RequestError(
                404, f"the model '{name}' does not exist; this server serves "
                f"'{self.server.model_id}'", param="model", code="model_not_found",
            )  # fmt: skip

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/chat/completions": True, "/chat/completions": True}
        routes.update({"/v1/completions": False, "/completions": False})
        if path not in routes:
            raise RequestError(404, f"no route {self.path}", code="not_found")
        chat = routes[path]
        body = parse_json(self._read_body())
        self._check_model(body.get("model"))
        request = parse_request(body, chat, self.server.args, self.server.worker.vocab_size)
        self._respond(request, chat)

    def _respond(self, request: ParsedRequest, chat: bool) -> None:
        job = request.job
        self.server.worker.submit(job)
        try:
            kind, value = self._event(job)
            if kind == "error":
                raise value
            meta = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": self.server.model_id,
            }
            if request.stream:
                self._stream(job, request, chat, meta, (kind, value))
            else:
                self._complete(job, request, chat, meta, (kind, value))
        finally:
            job.cancelled.set()  # after "done" a no-op; otherwise frees the worker now

    def _events(self, job: Job, first: tuple[str, Any]) -> Iterator[Any]:
        """The responses of `job`, from its first event to "done"."""
        kind, value = first
        while True:
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
            kind, value = self._event(job)

    def _consume(
        self, job: Job, request: ParsedRequest, first: tuple[str, Any], done: Completion
    ) -> Iterator[str]:
        """Update `done` per response and yield the text safe to send; a stop sequence ends it
        early."""
        stops = StopText(request.stops)
        for r in self._events(job, first):
            done.tokens += 1
            done.accepted += bool(r.from_draft)
            done.last = r
            text, hit = stops.add(r.text)
            if hit:
                done.finish_reason = "stop"
            elif r.finish_reason is not None:
                text += stops.flush()
                done.finish_reason = r.finish_reason
            done.text = stops.text
            yield text
            if hit:
                job.cancelled.set()
                return

    def _complete(
        self, job: Job, request: ParsedRequest, chat: bool, meta: dict, first: tuple[str, Any]
    ) -> None:
        done = Completion()
        for _ in self._consume(job, request, first, done):
            pass
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason or "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"] = done.text
        choice["logprobs"] = None
        body = {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice],
            "usage": done.usage(),
            "speculative": done.speculative(),
        }
        self._started = True
        try:
            self._send_json(200, body)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise ClientGone from e

    def _stream(
        self, job: Job, request: ParsedRequest, chat: bool, meta: dict, first: tuple[str, Any]
    ) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            choice["logprobs"] = None
            choice["finish_reason"] = finish
            return {**meta, "object": obj, "choices": [choice]}

        self._started = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self._cors()
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
            raise ClientGone from e
        self.close_connection = True  # the stream ends when the connection does
        if chat:
            self._sse(chunk("", None, role=True))
        done = Completion()
        try:
            for text in self._consume(job, request, first, done):
                if text:
                    self._sse(chunk(text, None))
        except RequestError as e:  # failed after the headers: report it in the stream
            self._sse(e.body())
            self._sse("[DONE]")
            return
        final = chunk(None if chat else "", done.finish_reason or "length")
        final["speculative"] = done.speculative()
        self._sse(final)
        if request.include_usage:
            usage = {**meta, "object": obj, "choices": [], "usage": done.usage()}
            usage["speculative"] = done.speculative()
            self._sse(usage)
        self._sse("[DONE]")


class Server(ThreadingHTTPServer):
    """The HTTP server plus its generation worker. `serve_forever()` serves; `close()` stops."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, args: argparse.Namespace, worker: Worker) -> None:
        infos = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        self.address_family = family
        super().__init__(address[:2], Handler)
        self.args = args
        self.worker = worker
        self.created = int(time.time())
        self.model_id = args.served_model_name or args.model or "default_model"
        names = {self.model_id, "default_model", worker.model_path}
        if Path(worker.model_path).exists():
            names.add(str(Path(worker.model_path).resolve()))
        self.model_names = names

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "ss-mlx"}  # fmt: skip

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.worker.stop()


def create_server(args: argparse.Namespace) -> Server:
    """Load the model (on the worker thread) and bind the HTTP server; does not serve yet."""
    from ss_mlx.chat import resolve_model

    tokenizer_config: dict[str, Any] = {}
    if args.trust_remote_code:
        tokenizer_config["trust_remote_code"] = True
    if args.chat_template:
        tokenizer_config["chat_template"] = args.chat_template
    worker = Worker(resolve_model(args.model), tokenizer_config or None)
    worker.start(warmup_kwargs={"tree": args.tree})
    return Server(args, worker)


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx server",
        description="OpenAI-compatible HTTP server for an SS model: /v1/chat/completions, "
        "/v1/completions (streaming or not), /v1/models, /health. One generation runs at a "
        "time; concurrent requests queue and are served in arrival order. A client that "
        "disconnects frees its place. Only basic security checks: keep it on localhost or "
        "behind a proxy.",
    )
    p.add_argument("--model", help="SS model directory or Hub repo (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks one)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id in /v1/models and responses (default: the --model value); requests "
        "naming another model get 404",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"default max_tokens of a request (default: {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--temp", type=float, default=0.0, help="default temperature (default: 0.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="default top_p (default: 1.0, off)")
    p.add_argument("--top-k", type=int, default=0, help="default top_k (default: 0, off)")
    p.add_argument("--min-p", type=float, default=0.0, help="default min_p (default: 0.0, off)")
    p.add_argument(
        "--tree",
        default=None,
        help="draft tree, as for `ss-mlx generate` (default: the tuned or configured tree)",
    )
    p.add_argument(
        "--chat-template", default="", help="a chat template replacing the tokenizer's own"
    )
    p.add_argument(
        "--chat-template-args",
        type=_json_object,
        default={},
        help="JSON object of apply_chat_template arguments, e.g. '{\"enable_thinking\": false}'; "
        "a request's chat_template_kwargs override them (default: {})",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="let the tokenizer run custom code"
    )
    p.add_argument(
        "--allowed-origins",
        type=lambda x: x.split(","),
        default=["*"],
        help="comma-separated CORS origins (default: *)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request body accepted (default: {DEFAULT_MAX_REQUEST_BYTES}); larger "
        "ones get 413",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default: INFO)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        server = create_server(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"ss-mlx server: error: {e}", file=sys.stderr)
        return 1
    log.info("serving %s at %s/v1 (one generation at a time)", server.model_id, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
