"""Multi-turn chat with a prompt cache reused across turns, through ss-mlx's public API.

Usage: python examples/chat.py MODEL_DIR [--max-tokens N]

As in mlx-lm, after a reply the cache holds the prompt and the reply, so each turn prefills only
what the chat template adds after the cached tokens.
"""

# ruff: noqa: I001  (ss_mlx first: on Linux it loads OpenBLAS before mlx.core is imported)
import ss_mlx

import argparse

from mlx_lm.models.cache import trim_prompt_cache

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="SS model directory")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()

model, tokenizer = ss_mlx.load(args.model)
cache = ss_mlx.make_prompt_cache(model)
cached: list[int] = []  # the tokens whose keys and values the cache holds, in order
messages = [{"role": "system", "content": "You are a concise assistant."}]
for question in ["What is speculative decoding?", "Why is it lossless?", "Say it in five words."]:
    messages.append({"role": "user", "content": question})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # Keep the longest cached prefix of the new prompt (a template may re-render old turns
    # differently); at least one token must be left to prefill.
    held = cached[: cache[0].size()]
    keep = 0
    while keep < min(len(held), len(ids) - 1) and held[keep] == ids[keep]:
        keep += 1
    trim_prompt_cache(cache, len(held) - keep)
    print(f"user: {question}\nassistant: ", end="", flush=True)
    reply, tokens = "", []
    for r in ss_mlx.stream_generate(
        model, tokenizer, ids[keep:], max_tokens=args.max_tokens, prompt_cache=cache
    ):
        print(r.text, end="", flush=True)
        reply, tokens = reply + r.text, tokens + [r.token]
    cached = ids + tokens
    messages.append({"role": "assistant", "content": reply})
    print(f"\n[prefilled {r.prompt_tokens} of {len(ids)} tokens, {r.tokens_per_pass:.2f} per pass]")
