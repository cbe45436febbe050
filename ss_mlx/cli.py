"""`ss-mlx <command> ...`: route to the command module's `main(argv)`.

Modules are imported lazily, so `ss-mlx --help` starts fast, `ss-mlx generate` never imports
torch or the measurement code, and a missing optional extra only fails the command that needs it.
"""

import argparse
import importlib
import sys

TRAIN = "ss-mlx[train]"
DEFAULT_PROMPT = "Write a haiku about speculative decoding."

# command -> ("module:function", one-line description, what to install when the import fails)
COMMANDS = {
    "generate": ("ss_mlx.cli:generate_main", "generate text with Speculative Streaming", None),
    "chat": ("ss_mlx.chat:main", "an interactive chat REPL (like mlx_lm.chat)", None),
    "server": ("ss_mlx.server:main", "an OpenAI-compatible HTTP server", None),
    "init": ("ss_mlx.prepare.init_model:main", "add fresh (untrained) streams to a model", None),
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
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if extra is None or e.name is None or e.name.startswith("ss_mlx"):
            raise
        sys.exit(f"ss-mlx {command}: needs {e.name!r}; install it with: pip install '{extra}'")
    code = getattr(module, function)(rest)
    if isinstance(code, int) and code:
        sys.exit(code)


def generate_parser() -> argparse.ArgumentParser:
    from . import cliargs
    from .decode.verify import ACCEPT_RULES, TypicalParams
    from .generation import DEFAULT_MAX_TOKENS

    p = argparse.ArgumentParser(
        prog="ss-mlx generate", description="Generate text with Speculative Streaming."
    )
    p.add_argument("--model", help="SS model directory (default: the embedded default model)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, type=cliargs.utf8_text,
                   help="prompt text ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=cliargs.max_tokens, default=DEFAULT_MAX_TOKENS)
    p.add_argument(
        "--tree",
        help="draft tree: widths '3,2,1', widths with node budget "
        "'4,2,1:8', a JSON list of rank paths, or a .json file",
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=cliargs.seed, default=None)
    p.add_argument(
        "--accept-rule",
        choices=ACCEPT_RULES,
        default="auto",
        help="auto: greedy at temp 0, exact rejection sampling ('rrs') above; "
        "'typical' is a relaxed rule whose output is NOT the model's distribution",
    )
    p.add_argument("--typical-threshold", type=float, default=TypicalParams.threshold)
    p.add_argument("--typical-alpha", type=float, default=TypicalParams.alpha)
    p.add_argument(
        "--coarse-theta",
        type=float,
        default=0.8,
        help="embedding-cosine threshold of the relaxed 'coarse' rule's token groups",
    )
    p.add_argument("--repetition-penalty", type=cliargs.positive_float, default=None)
    p.add_argument("--repetition-context-size", type=cliargs.int_at_least(1), default=20)
    p.add_argument("--system-prompt", default=None, type=cliargs.utf8_text)
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="feed the prompt as raw text, without the chat template",
    )
    p.add_argument("--verbose", action="store_true", help="print speed and acceptance statistics")
    return p


def generate_main(argv: list[str] | None = None) -> None:
    args = generate_parser().parse_args(argv)
    from mlx_lm.sample_utils import make_logits_processors

    from .cliargs import read_stdin_text
    from .decode.verify import TypicalParams
    from .generation import generate
    from .loader import load

    try:
        if args.model is None:
            from .prepare.default_model import ensure_default_model

            args.model = ensure_default_model()
        model, tokenizer = load(args.model)
        prompt = read_stdin_text("--prompt -") if args.prompt == "-" else args.prompt
        processors = make_logits_processors(
            repetition_penalty=args.repetition_penalty,
            repetition_context_size=args.repetition_context_size,
        )
        text = generate(
            model,
            tokenizer,
            prompt,
            verbose=args.verbose,
            max_tokens=args.max_tokens,
            tree=args.tree,
            apply_chat_template=not args.ignore_chat_template,
            system_prompt=args.system_prompt,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            accept_rule=args.accept_rule,
            logits_processors=processors,
            typical=TypicalParams(args.typical_threshold, args.typical_alpha),
            coarse_theta=args.coarse_theta,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"ss-mlx generate: error: {e}")
    if not args.verbose:
        print(text)



if __name__ == "__main__":
    main()
