"""`ss-mlx <command> ...`: route to the command module's `main(argv)`.

Modules are imported lazily, so `ss-mlx --help` starts fast, `ss-mlx generate` never imports
torch or the measurement code, and a missing optional extra only fails the command that needs it.
"""

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

TRAIN = "ss-mlx[train]"
DEFAULT_PROMPT = "Write a haiku about speculative decoding."

# command -> ("module:function", one-line description, what to install when the import fails)
COMMANDS = {
    "generate": ("ss_mlx.cli:generate_main", "generate text with Speculative Streaming", None),
    "cache-prompt": (
        "ss_mlx.cache_prompt:main",
        "save a prompt's KV cache for generate (like mlx_lm.cache_prompt)",
        None,
    ),
    "chat": ("ss_mlx.chat:main", "an interactive chat REPL (like mlx_lm.chat)", None),
    "server": ("ss_mlx.server:main", "an OpenAI-compatible HTTP server", None),
    "init": ("ss_mlx.prepare.init_model:main", "add fresh (untrained) streams to a model", None),
    "quantize": (
        "ss_mlx.prepare.quantize:main",
        "quantize an SS model's trunk (streams kept in full precision)",
        None,
    ),
    "models": ("ss_mlx.prepare.default_model:main", "prepare / locate the default model", None),
    "import-gguf": ("ss_mlx.prepare.gguf_import:main", "convert a llama-family GGUF file", None),
    "bench": ("ss_mlx.bench.bench:main", "benchmark AR / SS / draft / lookup / Medusa", None),
    "tune": ("ss_mlx.bench.tune:main", "fit the draft tree to this model and machine", None),
    "compare": ("ss_mlx.bench.compare:main", "the paper's task comparison table", None),
    "train": ("ss_mlx_convert.train:main", "train streams or Medusa heads (PyTorch)", TRAIN),
    "distill": ("ss_mlx_convert.distill:main", "the base model's own answers as targets", TRAIN),
    "convert": ("ss_mlx_convert.export:main", "export a trained checkpoint to MLX", TRAIN),
    "export-hf": ("ss_mlx_convert.export_hf:main", "merge LoRA, export a HF model", TRAIN),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ss-mlx <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc, _) in COMMANDS.items()]
    lines += ["", "Run `ss-mlx <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] == "--version":
        from ._version import __version__

        print(f"ss-mlx {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"ss-mlx: unknown command {command!r}\n{usage()}")
    target, _, extra = COMMANDS[command]
    module_name, _, function = target.partition(":")
    if from_console:
        _torch_first(extra)
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if extra is None or e.name is None or e.name.startswith("ss_mlx"):
                raise
            sys.exit(f"ss-mlx {command}: needs {e.name!r}; install it with: pip install '{extra}'")
        code = getattr(module, function)(rest)
    except KeyboardInterrupt:  # Ctrl-C in any command: one line, status 130, no traceback
        sys.stdout.flush()
        print(f"\nss-mlx {command}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


def _torch_first(extra: str | None) -> None:
    """Run a PyTorch command in a fresh interpreter that loads torch before ss_mlx.

    `import ss_mlx` preloads OpenBLAS with RTLD_GLOBAL so that MLX binds to it; torch loaded
    after that binds some of its BLAS calls to it too instead of its own MKL, and the two
    thread pools fight: `ss-mlx train` ran 2.5x slower than `python -m ss_mlx_convert.train`
    on 2 cores. Only from the console script (an in-process call must not replace its caller),
    only where a BLAS was preloaded, and never twice (torch is then already imported).
    """
    import importlib.util

    from . import _blas

    if extra != TRAIN or _blas.BLAS_PATH is None or "torch" in sys.modules:
        return
    if importlib.util.find_spec("torch") is None:
        return  # the import below fails with the usual "install ss-mlx[train]" line
    sys.stdout.flush()
    boot = "import torch\nfrom ss_mlx.cli import main\nmain()"
    os.execv(sys.executable, [sys.executable, "-c", boot, *sys.argv[1:]])


# mlx_lm.generate's CLI defaults (its API's max_tokens default, 256, is generation's)
CLI_MAX_TOKENS = 100
DEFAULT_XTC_THRESHOLD = 0.1
DEFAULT_PREFILL_STEP_SIZE = 2048


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def str2bool(string: str) -> bool:
    """mlx-lm's: anything but 'false' / 'f' (any case) is True."""
    return string.lower() not in ("false", "f")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --adapter-path, --trust-remote-code (shared with `ss-mlx cache-prompt`)."""
    p.add_argument(
        "--model",
        default=None,
        help="SS model directory or Hugging Face repo; none: the embedded default model",
    )
    p.add_argument(
        "--adapter-path",
        default=None,
        help="LoRA adapters of the trunk (mlx-lm's adapter directory)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="trust remote code for the tokenizer",
    )


def add_version(p: argparse.ArgumentParser) -> None:
    from ._version import __version__

    p.add_argument("--version", action="version", version=f"ss-mlx {__version__}")


def generate_parser() -> argparse.ArgumentParser:
    from . import cliargs
    from .decode.verify import ACCEPT_RULES, TypicalParams

    p = argparse.ArgumentParser(
        prog="ss-mlx generate",
        description="Generate text with Speculative Streaming. The flags of mlx_lm.generate "
        "work the same (greedy output is identical to it); the draft-tree and acceptance "
        "flags are Speculative Streaming's own.",
        formatter_class=HelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--extra-eos-token",
        nargs="+",
        default=(),
        help="more tokens (text or ids) that stop generation",
    )
    p.add_argument(
        "--system-prompt", default=None, help="system message for the chat template"
    )
    p.add_argument(
        "--prompt",
        "-p",
        default=DEFAULT_PROMPT,
        help="the message ('-' reads stdin; \\n and \\t in it become a newline and a tab)",
    )
    p.add_argument(
        "--prefill-response",
        default=None,
        help="start of the assistant's reply, continued by the model (chat template only)",
    )
    p.add_argument(
        "--max-tokens",
        "-m",
        type=cliargs.max_tokens,
        default=CLI_MAX_TOKENS,
        help="maximum number of tokens to generate (-1: no limit)",
    )
    number = cliargs.finite_float
    p.add_argument("--temp", type=number, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=number, default=1.0, help="nucleus sampling top-p (1: off)")
    p.add_argument("--min-p", type=number, default=0.0, help="min-p sampling (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument(
        "--xtc-probability",
        type=float,
        default=0.0,
        help="XTC sampling probability; XTC is random, so it cannot be verified exactly over "
        "a draft tree and is refused above temp 0 (at temp 0 mlx-lm ignores it too)",
    )
    p.add_argument(
        "--xtc-threshold",
        type=float,
        default=DEFAULT_XTC_THRESHOLD,
        help="XTC threshold (see --xtc-probability)",
    )
    p.add_argument(
        "--min-tokens-to-keep",
        type=int,
        default=1,
        help="minimum tokens min-p sampling keeps",
    )
    p.add_argument("--seed", type=cliargs.seed, default=None, help="PRNG seed")
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="feed the prompt as raw text, without the tokenizer's chat template",
    )
    p.add_argument(
        "--use-default-chat-template",
        action="store_true",
        help="accepted for mlx_lm.generate command lines; it has no effect there either",
    )
    p.add_argument(
        "--chat-template-config",
        default=None,
        help="JSON object of extra apply_chat_template arguments, e.g. "
        "'{\"enable_thinking\": false}'",
    )
    p.add_argument(
        "--verbose",
        type=str2bool,
        nargs="?",
        const=True,
        default=True,
        help="True: stream the text, then speed and acceptance statistics; False: the text "
        "only (--verbose alone means True)",
    )
    p.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="mlx-lm's rotating KV cache size (mlx-lm ignores it for models that build their "
        "own cache, such as llama, and so does ss-mlx); Speculative Streaming cannot rewind a "
        "rotating cache, so elsewhere it is accepted only when prompt + --max-tokens fits "
        "(then the output is mlx-lm's exactly) and refused otherwise",
    )
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=DEFAULT_PREFILL_STEP_SIZE,
        help="prompt tokens processed at a time (smaller: lower peak memory in prefill)",
    )
    p.add_argument(
        "--prompt-cache-file",
        default=None,
        help="a prompt cache saved by `ss-mlx cache-prompt` or mlx_lm.cache_prompt: the prompt "
        "continues it",
    )
    p.add_argument(
        "--quantize-activations",
        "-qa",
        action="store_true",
        help="quantize activations as the layer's weights (mlx-lm's model option)",
    )
    cliargs.add_kv_cache_args(p)
    p.add_argument(
        "--draft-model",
        default=None,
        help="mlx-lm's separate draft model; refused: the model drafts with its own streams "
        "(see --tree)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        help="only with --draft-model (refused); the draft here is --tree",
    )
    p.add_argument(
        "--tree",
        default=None,
        help="draft tree: widths '3,2,1', widths with a node budget '4,2,1:8', a JSON list of "
        "rank paths, or a .json file; none: the tree `ss-mlx tune` saved, else the model's",
    )
    p.add_argument(
        "--accept-rule",
        choices=ACCEPT_RULES,
        default="auto",
        help="auto: greedy at temp 0, exact rejection sampling ('rrs') above; "
        "'typical' and 'coarse' are relaxed rules whose output is NOT the model's distribution",
    )
    p.add_argument(
        "--typical-threshold",
        type=float,
        default=TypicalParams.threshold,
        help="threshold of the relaxed 'typical' rule",
    )
    p.add_argument(
        "--typical-alpha",
        type=float,
        default=TypicalParams.alpha,
        help="entropy factor of the relaxed 'typical' rule",
    )
    p.add_argument(
        "--coarse-theta",
        type=float,
        default=0.8,
        help="embedding-cosine threshold of the relaxed 'coarse' rule's token groups",
    )
    p.add_argument(
        "--repetition-penalty",
        type=cliargs.positive_float,
        default=None,
        help="mlx-lm's repetition penalty logits processor (none: off)",
    )
    p.add_argument(
        "--repetition-context-size",
        type=cliargs.int_at_least(1),
        default=20,
        help="tokens the repetition penalty looks back over",
    )
    add_version(p)
    return p


def check_text(value: str | None, what: str) -> None:
    """Refuse text that is not valid UTF-8 (argv bytes arrive as surrogate escapes)."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CLIError(f"{what} is not valid UTF-8 (at character {e.start})") from None


def read_stdin() -> str:
    """All of stdin as UTF-8 text; invalid bytes are a one-line error."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a replaced sys.stdin (tests, embedding)
        return sys.stdin.read()
    data = buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"the prompt on stdin is not valid UTF-8 (byte {e.start})") from None


def read_prompt(raw: str) -> str:
    """mlx_lm.generate's --prompt: \\n and \\t escapes become characters; '-' reads stdin."""
    check_text(raw, "--prompt")
    prompt = raw.replace("\\n", "\n").replace("\\t", "\t")
    return read_stdin() if prompt == "-" else prompt


def same_model(given: str, cached: str) -> bool:
    """Whether --model names the model a prompt cache was made with (the same string, or the
    same local directory)."""
    if given == cached:
        return True
    a, b = Path(given).expanduser(), Path(cached).expanduser()
    return a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


def load_cache_file(path: str) -> tuple[list[Any], dict[str, str]]:
    """A prompt cache saved by mlx-lm's save_prompt_cache, checked for Speculative Streaming."""
    from mlx_lm.models.cache import load_prompt_cache

    from .decode.cache import check_cache

    if not Path(path).is_file():
        raise CLIError(f"--prompt-cache-file {path}: no such file")
    try:
        cache, metadata = load_prompt_cache(path, return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError / ValueError / KeyError for bad files
        raise CLIError(f"--prompt-cache-file {path}: not a prompt cache file ({e})") from None
    for key in ("model", "tokenizer_config"):
        if key not in metadata:
            raise CLIError(f"--prompt-cache-file {path}: its metadata has no {key!r}")
    try:
        if not isinstance(json.loads(metadata["tokenizer_config"]), dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CLIError(f"--prompt-cache-file {path}: bad tokenizer_config metadata ({e})") from None
    try:
        check_cache(cache)
    except ValueError as e:
        raise CLIError(
            f"--prompt-cache-file {path}: {e}; make it with `ss-mlx cache-prompt` (or "
            "mlx_lm.cache_prompt without --max-kv-size / --kv-bits)"
        ) from None
    return cache, metadata


def chat_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    system_prompt: str | None = None,
    prefill_response: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    using_cache: bool = False,
) -> str:
    """The prompt text exactly as mlx_lm.generate builds it with the chat template; with a
    prompt cache, only the part after the cached prefix (mlx-lm's '<query>' suffix rule)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": prompt})
    has_prefill = prefill_response is not None
    if has_prefill:
        messages.append({"role": "assistant", "content": prefill_response})
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        continue_final_message=has_prefill,
        add_generation_prompt=not has_prefill,
        **(template_kwargs or {}),
    )
    if using_cache:
        messages[-1]["content"] = "<query>"
        test = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            continue_final_message=has_prefill,
            add_generation_prompt=not has_prefill,
        )
        text = text[test.index("<query>") :]
    return text


def _generate(argv: list[str] | None) -> None:
    args = generate_parser().parse_args(argv)
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from .decode.verify import TypicalParams
    from .generation import generate, stream_generate
    from .loader import load

    for value, what in (
        (args.system_prompt, "--system-prompt"),
        (args.prefill_response, "--prefill-response"),
        (args.chat_template_config, "--chat-template-config"),
        *((t, "--extra-eos-token") for t in args.extra_eos_token),
    ):
        check_text(value, what)
    if args.draft_model is not None or args.num_draft_tokens is not None:
        raise CLIError(
            "--draft-model / --num-draft-tokens: Speculative Streaming drafts with the "
            "model's own streams and needs no draft model (shape the draft with --tree; "
            "`ss-mlx bench --methods draft` measures two-model speculative decoding)"
        )
    if args.xtc_probability > 0 and args.temp > 0:
        raise CLIError(
            "--xtc-probability: XTC drops likely tokens at random, so a draft tree cannot be "
            "verified exactly against it; use temp/top-p/min-p/top-k (or --temp 0)"
        )
    template_kwargs: dict[str, Any] = {}
    if args.chat_template_config is not None:
        try:
            template_kwargs = json.loads(args.chat_template_config)
        except json.JSONDecodeError as e:
            raise CLIError(f"--chat-template-config is not valid JSON: {e}") from None
        if not isinstance(template_kwargs, dict):
            raise CLIError("--chat-template-config must be a JSON object")
    if args.seed is not None:
        mx.random.seed(args.seed)

    using_cache = args.prompt_cache_file is not None
    prompt_cache, metadata = load_cache_file(args.prompt_cache_file) if using_cache else (None, {})
    tokenizer_config = json.loads(metadata["tokenizer_config"]) if using_cache else {}
    tokenizer_config["trust_remote_code"] = args.trust_remote_code
    model_path = args.model
    if using_cache:
        if model_path is None:
            model_path = metadata["model"]
        elif not same_model(model_path, metadata["model"]):
            raise CLIError(
                f"--model {model_path} is not the model the prompt cache was made with "
                f"({metadata['model']})"
            )
    if model_path is None:
        from .prepare.default_model import ensure_default_model

        model_path = str(ensure_default_model())
    model_config = {"quantize_activations": True} if args.quantize_activations else None
    model, tokenizer = load(
        model_path,
        tokenizer_config=tokenizer_config,
        model_config=model_config,
        adapter_path=args.adapter_path,
        trust_remote_code=args.trust_remote_code,
    )
    for token in args.extra_eos_token:
        tokenizer.add_eos_token(token)

    prompt = read_prompt(args.prompt)
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        prompt = chat_prompt(
            tokenizer,
            prompt,
            system_prompt=args.system_prompt,
            prefill_response=args.prefill_response,
            template_kwargs=template_kwargs,
            using_cache=using_cache,
        )
    ids = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)
    sampler = make_sampler(
        args.temp,
        args.top_p,
        args.min_p,
        args.min_tokens_to_keep,
        top_k=args.top_k,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )
    kwargs = dict(
        max_tokens=args.max_tokens,
        sampler=sampler,
        logits_processors=make_logits_processors(
            repetition_penalty=args.repetition_penalty,
            repetition_context_size=args.repetition_context_size,
        ),
        max_kv_size=args.max_kv_size,
        prefill_step_size=args.prefill_step_size,
        prompt_cache=prompt_cache,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
        tree=args.tree,
        accept_rule=args.accept_rule,
        typical=TypicalParams(args.typical_threshold, args.typical_alpha),
        coarse_theta=args.coarse_theta,
    )
    if args.verbose:
        generate(model, tokenizer, ids, verbose=True, **kwargs)
        return
    for r in stream_generate(model, tokenizer, ids, **kwargs):
        print(r.text, end="", flush=True)
    print(flush=True)


def generate_main(argv: list[str] | None = None) -> int:
    """`ss-mlx generate`: the text streams to stdout as it is generated. Ctrl-C stops it,
    keeps what was printed and exits with 130 (no traceback)."""
    try:
        _generate(argv)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nss-mlx generate: interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # e.g. `| head`: the reader is gone, nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CLIError, ValueError, FileNotFoundError) as e:
        sys.stdout.flush()
        sys.exit(f"ss-mlx generate: error: {e}")  # one line on stderr, status 1
    return 0


if __name__ == "__main__":
    main()
