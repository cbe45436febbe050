"""`ss-mlx chat`: an interactive chat REPL with Speculative Streaming (like `mlx_lm.chat`).

The prompt cache lives across turns. As in mlx-lm, after a reply the cache holds the prompt and
every emitted token, so the next turn prefills only what the chat template adds after that: the
new user message and the assistant header. The template of the whole history is compared with
the tokens already cached and the cache is trimmed back to their common prefix, so a template
that re-renders earlier turns differently (or a reply whose text re-tokenizes differently) still
gets exactly the context a fresh run on the full history would see.
"""

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TextIO

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ss_mlx import cliargs, load, make_prompt_cache, stream_generate

DEFAULT_MAX_TOKENS = 256
QUIT = ("q", "/q", "/quit", "/exit")
RESET = ("/reset", "/r")
HELP_COMMANDS = ("/help", "/h", "/?")
HELP = (
    "Commands: /reset clears the history and the cache, q (or /quit) quits, /help shows this.\n"
    "Ctrl-C stops the current reply; Ctrl-C at the prompt (or twice during a reply) quits; "
    "so does end of input (Ctrl-D)."
)


def resolve_model(model: str | None) -> str:
    """The model to load: the argument, else the embedded default model (prepared on first use)."""
    if model is not None:
        return model
    # The one import outside ss_mlx's top-level API: the default model has no public entry point
    # yet, and `ss-mlx generate` resolves it the same way.
    from ss_mlx.prepare.default_model import ensure_default_model

    return str(ensure_default_model())


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """A fallback rendering for tokenizers without a chat template (mlx_lm.server's layout)."""
    roles = {"system": "ASSISTANT's RULE: ", "user": "USER: ", "assistant": "ASSISTANT: "}
    text = "".join(f"{roles.get(m['role'], '')}{m['content']}\n" for m in messages)
    return (text + roles["assistant"]).rstrip()


def template_ids(
    tokenizer: Any, messages: list[dict[str, str]], template_args: dict[str, Any] | None = None
) -> list[int]:
    """Token ids of `messages` with the chat template and the assistant header appended."""
    if getattr(tokenizer, "chat_template", None) is None:
        return list(tokenizer.encode(plain_chat_prompt(messages)))
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, **(template_args or {})
    )
    if isinstance(ids, str):
        ids = tokenizer.encode(ids, add_special_tokens=False)
    elif isinstance(ids, dict):  # transformers >= 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with one model whose prompt cache is reused from turn to turn.

    Args:
        model, tokenizer: from :func:`ss_mlx.load`.
        system_prompt: an optional system message at the start of every history.
        template_args: extra keyword arguments for the tokenizer's ``apply_chat_template``.
        generate_kwargs: passed to :func:`ss_mlx.stream_generate` every turn (``max_tokens``,
            ``temp``, ``tree``, ...).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system_prompt: str | None = None,
        template_args: dict[str, Any] | None = None,
        **generate_kwargs: Any,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.template_args = dict(template_args or {})
        self.generate_kwargs = generate_kwargs
        self.messages: list[dict[str, str]] = []
        self.cache: list[Any] | None = None
        self.cached_tokens: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Forget the history and start from an empty cache."""
        self.messages = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self._new_cache()

    def _new_cache(self) -> None:
        # None when the model cannot build one: every turn then prefills the whole history.
        self.cache = make_prompt_cache(self.model)
        self.cached_tokens = []

    def _cache_size(self) -> int | None:
        sizes = {c.size() for c in self.cache} if self.cache else {0}
        return sizes.pop() if len(sizes) == 1 else None

    def tokens_to_prefill(self, ids: list[int]) -> list[int]:
        """Trim the cache to its longest prefix shared with `ids`; return the rest of `ids`.

        The cache's own length is the truth about what it holds (`cached_tokens` may run one
        token past it), and at least one token is always left to prefill, since generation
        starts from the last prompt token.
        """
        if self.cache is None:
            return ids
        size = self._cache_size()
        if size is None or size > len(self.cached_tokens):
            self._new_cache()  # layers disagree, or it holds tokens we cannot name: start over
            return ids
        held = self.cached_tokens[:size]
        keep = min(_common_prefix(held, ids), len(ids) - 1)
        if keep < size:
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, size - keep)
            else:
                self._new_cache()
                return ids
        self.cached_tokens = held[:keep]
        return ids[keep:]

    def reply(
        self,
        user: str,
        on_response: Callable[[Any], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any:
        """Answer `user`, calling `on_response` with every streamed response as it comes.

        `should_stop` is polled after every token; when it returns True the reply ends there and
        the partial answer stays in the history (and in the cache). Returns the last response
        (None if nothing was generated).
        """
        messages = self.messages + [{"role": "user", "content": user}]
        ids = template_ids(self.tokenizer, messages, self.template_args)
        feed = self.tokens_to_prefill(ids)
        emitted: list[int] = []
        text: list[str] = []
        last = None
        gen = stream_generate(
            self.model, self.tokenizer, feed, prompt_cache=self.cache, **self.generate_kwargs
        )
        try:
            for last in gen:
                emitted.append(last.token)
                text.append(last.text)
                if on_response is not None:
                    on_response(last)
                if should_stop is not None and should_stop():
                    break
        except BaseException:
            gen.close()
            self._new_cache()  # what a failed step left in the cache is unknown
            raise
        gen.close()  # trims the cache back to a token boundary before its size is read
        self.messages = messages + [{"role": "assistant", "content": "".join(text)}]
        self.cached_tokens = self.cached_tokens + feed + emitted
        return last


@contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
    """While active, a first Ctrl-C only raises a flag (the reply stops at the next token, so the
    cache stays consistent); a second one raises KeyboardInterrupt as usual."""
    hit = [False]

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if hit[0]:
            raise KeyboardInterrupt
        hit[0] = True

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        yield lambda: False
        return
    try:
        yield lambda: hit[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def turn_stats(last: Any, accepted: int) -> str:
    """The --verbose line after a reply."""
    return (
        f"[prefilled {last.prompt_tokens} tokens, {last.generation_tokens} generated, "
        f"{last.forward_passes} forward passes, {last.tokens_per_pass:.2f} tokens per pass, "
        f"{accepted} draft tokens accepted, {last.generation_tps:.1f} tokens/s]"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx chat",
        description="Chat with an SS model in the terminal. The prompt cache is reused across "
        "turns, so each turn prefills only its new tokens. " + HELP,
    )
    p.add_argument("--model", help="SS model directory or Hub repo (default: the embedded model)")
    p.add_argument("--system-prompt", default=None, help="system message (default: none)")
    p.add_argument(
        "--max-tokens",
        "-m",
        type=cliargs.max_tokens,
        default=DEFAULT_MAX_TOKENS,
        help=f"maximum tokens per reply (default: {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default: 0, greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus top-p (default: 1.0, off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k (default: 0, off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p (default: 0.0, off)")
    p.add_argument("--seed", type=cliargs.seed, default=0,
                   help="PRNG seed, set once (default: 0)")
    p.add_argument(
        "--tree",
        default=None,
        help="draft tree, as for `ss-mlx generate` (default: the tuned or configured tree)",
    )
    p.add_argument(
        "--chat-template-args",
        type=json.loads,
        default={},
        help='JSON object of extra apply_chat_template arguments, e.g. \'{"enable_thinking": '
        "false}' (default: {})",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="after each reply print prefilled tokens, forward passes and tokens per pass",
    )
    return p


def _read(prompt: str, stdin: TextIO, stdout: TextIO) -> str | None:
    """One line of input, or None at end of input. input() is used on the real terminal so
    line editing works."""
    if stdin is sys.stdin and stdout is sys.stdout:
        try:
            return input(prompt)
        except EOFError:
            return None
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def run_repl(
    session: ChatSession,
    stdin: TextIO,
    stdout: TextIO,
    *,
    verbose: bool = False,
    title: str = "ss-mlx chat",
) -> int:
    """The read-reply loop; returns the exit status."""
    print(f"[{title}] {HELP}", file=stdout, flush=True)
    while True:
        try:
            line = _read(">> ", stdin, stdout)
        except KeyboardInterrupt:
            line = None
        if line is None:
            print(file=stdout)
            return 0
        query = line.strip()
        if not query:
            continue
        if query in QUIT:
            return 0
        if query in RESET:
            session.reset()
            print("[history and cache cleared]", file=stdout, flush=True)
            continue
        if query in HELP_COMMANDS:
            print(HELP, file=stdout, flush=True)
            continue
        accepted = 0

        def show(r: Any) -> None:
            nonlocal accepted
            accepted += r.from_draft
            stdout.write(r.text)
            stdout.flush()

        try:
            with interruptible() as stopped:
                last = session.reply(line, show, stopped)
                interrupted = stopped()
        except KeyboardInterrupt:
            print("\n[quit]", file=stdout, flush=True)
            return 130
        except ValueError as e:  # e.g. the history outgrew the context, or a bad --tree
            print(f"\n[error: {e}; the turn was dropped, /reset starts over]", file=stdout)
            continue
        print(file=stdout)
        if interrupted:
            print("[reply stopped]", file=stdout, flush=True)
        if verbose and last is not None:
            print(turn_stats(last, accepted), file=stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not isinstance(args.chat_template_args, dict):
        sys.exit("ss-mlx chat: error: --chat-template-args must be a JSON object")
    try:
        model_path = resolve_model(args.model)
        model, tokenizer = load(model_path)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"ss-mlx chat: error: {e}")
    mx.random.seed(args.seed)
    session = ChatSession(
        model,
        tokenizer,
        system_prompt=args.system_prompt,
        template_args=args.chat_template_args,
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        tree=args.tree,
    )
    return run_repl(
        session, sys.stdin, sys.stdout, verbose=args.verbose, title=f"chat with {model_path}"
    )


if __name__ == "__main__":
    sys.exit(main())
