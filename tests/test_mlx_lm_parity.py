"""The same script, run against mlx_lm and against ss_mlx with only the import lines changed,
prints the same greedy text: generate (verbose positional), stream_generate with mlx-lm's
sampler and logits processors, max_tokens as 4th positional, a prompt cache across turns,
max_tokens=-1 (bounded by breaking), logprobs and the prompt-progress callback."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ss_dirs import make_ss_dir

REPO = Path(__file__).resolve().parents[1]

IMPORTS = {
    "mlx_lm": "from mlx_lm import load, generate, stream_generate\n"
    "from mlx_lm.models.cache import make_prompt_cache\n",
    "ss_mlx": "from ss_mlx import load, generate, stream_generate, make_prompt_cache\n",
}

# Written as an mlx-lm user writes it; {imports} is the only difference between the two runs.
SCRIPT = """
import json, sys
{imports}
from mlx_lm.sample_utils import make_logits_processors, make_sampler

model, tokenizer = load(sys.argv[1])
out = {{}}
chat = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "hello there"}}], add_generation_prompt=True
)

# generate: text prompt, token prompt, verbose as the 4th positional argument
out["generate_text"] = generate(model, tokenizer, "abc abc abc", max_tokens=24)
out["generate_ids"] = generate(model, tokenizer, chat, False, max_tokens=24)

# stream_generate with mlx-lm's sampler and logits processors (max_tokens 4th positional)
sampler = make_sampler(temp=0.0)
procs = make_logits_processors(repetition_penalty=1.3, repetition_context_size=8)
rs = list(stream_generate(model, tokenizer, chat, 20, sampler=sampler, logits_processors=procs))
out["stream_text"] = "".join(r.text for r in rs)
out["stream_tokens"] = [r.token for r in rs]
out["stream_finish"] = rs[-1].finish_reason
out["stream_counts"] = [r.generation_tokens for r in rs]
out["stream_logprobs"] = [r.logprobs[r.token].item() for r in rs]
out["stream_logprob_shape"] = list(rs[0].logprobs.shape)

# a sampler at temp > 0 that is deterministic (top-k 1), with min-p as well
hot = make_sampler(temp=0.9, top_k=1, min_p=0.05)
out["hot_text"] = generate(model, tokenizer, chat, max_tokens=16, sampler=hot)

# a prompt cache across turns: each turn passes only its new tokens
cache = make_prompt_cache(model)
turns = []
for user in ["abc", "def", "ghi"]:
    ids = tokenizer.encode(user, add_special_tokens=False)
    turns.append(generate(model, tokenizer, ids, max_tokens=12, prompt_cache=cache))
out["cache_turns"] = turns
out["cache_size"] = cache[0].offset

# max_tokens=-1: no limit, so stop after 40 tokens
tokens = []
for r in stream_generate(model, tokenizer, "x", max_tokens=-1):
    tokens.append(r.token)
    if len(tokens) == 40:
        break
out["unbounded"] = tokens

# prompt progress, as mlx-lm reports it
seen = []
generate(model, tokenizer, list(range(3, 40)), max_tokens=2, prefill_step_size=8,
         prompt_progress_callback=lambda done, total: seen.append([done, total]))
out["progress"] = seen
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def ss_dir(tmp_path_factory):
    return make_ss_dir(tmp_path_factory.mktemp("parity"), 99, 3)


def run(lib: str, model_dir: Path, tmp_path: Path) -> dict:
    script = tmp_path / f"user_script_{lib}.py"
    script.write_text(SCRIPT.format(imports=IMPORTS[lib]))
    r = subprocess.run(
        [sys.executable, str(script), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_same_script_same_output(ss_dir, tmp_path):
    theirs = run("mlx_lm", ss_dir, tmp_path)
    ours = run("ss_mlx", ss_dir, tmp_path)
    assert SCRIPT.format(imports=IMPORTS["mlx_lm"]).replace(
        IMPORTS["mlx_lm"], IMPORTS["ss_mlx"]
    ) == SCRIPT.format(imports=IMPORTS["ss_mlx"])  # nothing else differs
    lp_theirs, lp_ours = theirs.pop("stream_logprobs"), ours.pop("stream_logprobs")
    np.testing.assert_allclose(lp_ours, lp_theirs, atol=1e-4)
    assert ours == theirs
    assert theirs["generate_text"] and theirs["cache_turns"][2]
    assert len(theirs["unbounded"]) == 40



def test_generation_stream_and_wired_limit(ss_dir, monkeypatch):
    """Steps run on the given stream (default: mlx-lm's thread-local generation stream), the
    caller keeps its own default stream between tokens, and stream_generate runs inside
    wired_limit with that stream, as mlx-lm's does."""
    import contextlib

    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    import ss_mlx
    from ss_mlx import generation

    model, tokenizer = ss_mlx.load(str(ss_dir))
    mine = mx.new_stream(mx.cpu)
    inside, outside = [], []

    def spy(tokens, logits):  # called by the decoding loop, once per tree node
        inside.append(mx.default_stream(mx.default_device()))
        return logits

    caller = mx.default_stream(mx.default_device())
    for _ in ss_mlx.ss_generate_step(mx.array([1, 2, 3]), model, max_tokens=4, stream=mine,
                                     logits_processors=[spy]):  # fmt: skip
        outside.append(mx.default_stream(mx.default_device()))
    assert inside and all(x == mine for x in inside) and all(x == caller for x in outside)

    entered = []

    @contextlib.contextmanager
    def wired(m, streams):
        entered.append((m, streams))
        yield
        entered.append("exit")

    monkeypatch.setattr(generation, "wired_limit", wired)
    rs = list(ss_mlx.stream_generate(model, tokenizer, [5, 6, 7], 3))  # max_tokens positional
    assert len(rs) == 3 and entered == [(model, [generation_stream]), "exit"]
    with pytest.raises(ValueError, match="draft_model is not supported"):
        list(ss_mlx.stream_generate(model, tokenizer, [5, 6], 3, model))
