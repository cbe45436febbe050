"""`ss-mlx cache-prompt`: save a prompt's KV cache to a file, like `mlx_lm.cache_prompt`.

The file is mlx-lm's format (`mlx_lm.models.cache.save_prompt_cache`, metadata `model` and
`tokenizer_config`), so `ss-mlx generate --prompt-cache-file` and `mlx_lm.generate
--prompt-cache-file` both continue it. As in mlx-lm, with a chat template the prompt is cached
as an unfinished user message: the `--prompt` given to generate continues that message.
"""

import argparse
import json
import sys
import time
from typing import Any

from . import cliargs
from .cli import CLIError, HelpFormatter, add_model_args, add_version, check_text, read_stdin


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx cache-prompt",
        description="Cache the state of a prompt for `ss-mlx generate --prompt-cache-file` "
        "(the file is mlx_lm.cache_prompt's format; mlx_lm.generate reads it too).",
        formatter_class=HelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--eos-token", default=None, help="end of sequence token for the tokenizer")
    p.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="refused: generation continuing the file would need a rotating cache, which "
        "Speculative Streaming cannot rewind",
    )
    p.add_argument(
        "--prompt-cache-file",
        required=True,
        help="the file to write (a .safetensors name)",
    )
    p.add_argument("--prompt", required=True, help="the prompt to cache ('-' reads stdin)")
    cliargs.add_kv_cache_args(p)
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=2048,
        help="prompt tokens processed at a time",
    )
    add_version(p)
    return p


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """mlx_lm.cache_prompt's tokens: an unfinished user message with the chat template."""
    if tokenizer.has_chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=False,
            continue_final_message=True,
        )
        if isinstance(ids, dict):  # transformers >= 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(prompt))


def cache_prompt(
    model_path: str,
    prompt: str,
    out_file: str,
    *,
    adapter_path: str | None = None,
    trust_remote_code: bool = False,
    eos_token: str | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = cliargs.DEFAULT_QUANTIZED_KV_START,
    prefill_step_size: int = 2048,
    progress: bool = True,
) -> int:
    """Prefill `prompt` and save the cache to `out_file`; returns the number of cached tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import save_prompt_cache

    from .decode.cache import make_prompt_cache
    from .files import atomic_write
    from .generation import ss_generate_step
    from .loader import load

    if not out_file.endswith(".safetensors"):
        raise CLIError(
            f"--prompt-cache-file {out_file}: give a name ending in .safetensors (MLX adds that "
            "suffix to any other name, and the file would not be found under the given one)"
        )
    tokenizer_config: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if eos_token is not None:
        tokenizer_config["eos_token"] = eos_token
    model, tokenizer = load(
        model_path,
        tokenizer_config=tokenizer_config,
        adapter_path=adapter_path,
        trust_remote_code=trust_remote_code,
    )
    ids = mx.array(prompt_ids(tokenizer, prompt), dtype=mx.int32)
    cache = make_prompt_cache(model)
    start = time.time()
    width = 0

    def callback(done: int, total: int) -> None:
        nonlocal width
        speed = done / max(time.time() - start, 1e-9)
        msg = f"\rProcessed {done:6d} tokens ({speed:6.2f} tok/s)"
        width = max(width, len(msg))
        print(msg.ljust(width), end="", flush=True)

    # max_tokens=0: prefill only; the loop leaves the cache holding every prompt token.
    for _ in ss_generate_step(
        ids,
        model,
        max_tokens=0,
        prompt_cache=cache,
        prefill_step_size=prefill_step_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        prompt_progress_callback=callback if progress else None,
    ):
        pass
    if progress:
        print()
        print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
        print("Saving...")
    metadata = {"model": str(model_path), "tokenizer_config": json.dumps(tokenizer_config)}
    atomic_write(out_file, lambda p: save_prompt_cache(str(p), cache, metadata))
    return cache[0].offset


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_text(args.prompt, "--prompt")
        if args.max_kv_size is not None:
            raise CLIError(
                "--max-kv-size: the cached prompt is continued by later generations, and "
                "Speculative Streaming cannot continue a rotating cache (a tree pass must "
                "rewind its rejected nodes); leave it unset"
            )
        prompt = read_stdin() if args.prompt == "-" else args.prompt
        model = args.model
        if model is None:
            from .prepare.default_model import ensure_default_model

            model = str(ensure_default_model())
        n = cache_prompt(
            model,
            prompt,
            args.prompt_cache_file,
            adapter_path=args.adapter_path,
            trust_remote_code=args.trust_remote_code,
            eos_token=args.eos_token,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
            prefill_step_size=args.prefill_step_size,
        )
    except KeyboardInterrupt:
        print("\nss-mlx cache-prompt: interrupted (nothing written)", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"ss-mlx cache-prompt: error: {e}")
    print(f"wrote {args.prompt_cache_file} ({n} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
