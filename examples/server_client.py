"""Talk to `ss-mlx server` with the official `openai` client (pip install openai).

Start a server:  ss-mlx server --model MODEL_DIR --port 8080
Then:            python examples/server_client.py --base-url http://127.0.0.1:8080/v1
"""

import argparse

from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="the server's /v1 URL")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key="not-needed")  # the server checks no key
model = client.models.list().data[0].id
question = "What is speculative decoding?"
messages = [{"role": "user", "content": question}]

reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens)
print(f"user: {question}\nassistant: {reply.choices[0].message.content}")
spec = reply.model_extra["speculative"]  # ss-mlx's extension field, next to "usage"
print(
    f"[{reply.usage.completion_tokens} tokens in {spec['forward_passes']} forward passes: "
    f"{spec['tokens_per_pass']:.2f} tokens per pass, {spec['accepted_draft_tokens']} accepted "
    "draft tokens]"
)

# The same question, streamed as it is generated; the last chunk carries the usage.
print("streamed: ", end="", flush=True)
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=args.max_tokens,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage is not None:
        usage, spec = chunk.usage, chunk.model_extra["speculative"]
print(f"\n[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
      f"{spec['tokens_per_pass']:.2f} tokens per pass]")  # fmt: skip
