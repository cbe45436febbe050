"""Generate text with ss-mlx's mlx-lm-style API: the same calls as mlx-lm, one import changed.

Usage: python examples/generate.py MODEL_DIR [--prompt TEXT] [--max-tokens N]
"""

# ruff: noqa: I001  (ss_mlx first: on Linux it loads OpenBLAS before mlx.core is imported)
import ss_mlx

import argparse

from mlx_lm.sample_utils import make_logits_processors, make_sampler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="SS model directory (or Hub repo)")
parser.add_argument("--prompt", default="Explain speculative decoding in one sentence.")
parser.add_argument("--max-tokens", type=int, default=48)
args = parser.parse_args()

model, tokenizer = ss_mlx.load(args.model)
messages = [{"role": "user", "content": args.prompt}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

# 1. Whole text at once; verbose=True streams it and prints speed and tokens per pass.
text = ss_mlx.generate(model, tokenizer, prompt, verbose=True, max_tokens=args.max_tokens)

# 2. Token by token, with mlx-lm's sampler and logits processors (temp 0 here: greedy, so the
#    text equals mlx_lm.generate's on the same directory).
sampler = make_sampler(temp=0.0)
processors = make_logits_processors(repetition_penalty=1.1, repetition_context_size=20)
for r in ss_mlx.stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                sampler=sampler, logits_processors=processors):
    print(r.text, end="", flush=True)
print(f"\n[{r.generation_tokens} tokens in {r.forward_passes} forward passes "
      f"({r.tokens_per_pass:.2f} per pass), finish: {r.finish_reason}]")
