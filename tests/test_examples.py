"""Every script in examples/ runs on a tiny model (chat.py and server_client.py in test_chat.py
and test_server.py; the others here), and each one is covered by some test."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest
from ss_dirs import make_ss_dir

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def ss_dir(tmp_path_factory):
    return make_ss_dir(tmp_path_factory.mktemp("examples"))


def run_example(name: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_generate_example_prints_mlx_lm_text(ss_dir):
    out = run_example("generate.py", str(ss_dir), "--prompt", "abc", "--max-tokens", "20")
    model, tokenizer = mlx_lm.load(str(ss_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "abc"}],
                                        add_generation_prompt=True)  # fmt: skip
    want = mlx_lm.generate(model, tokenizer, ids, max_tokens=20)
    assert out.startswith("=" * 10 + "\n" + want + "\n" + "=" * 10 + "\n")
    assert "tokens per pass" in out and re.search(r"\[20 tokens in \d+ forward passes", out)


def test_embed_in_app_cancels_from_another_thread_with_bounded_memory(ss_dir):
    out = run_example("embed_in_app.py", str(ss_dir), "--stop-after", "9", "--requests", "3")
    lines = re.findall(r"request (\d): (\w+) after (\d+) tokens, peak memory ([\d.]+) MB", out)
    assert [(i, how, n) for i, how, n, _ in lines] == [(str(i), "cancelled", "9")
                                                       for i in range(3)]  # fmt: skip
    peaks = [float(p) for *_, p in lines]
    assert max(peaks) <= peaks[0] * 1.05 + 0.1  # later requests do not grow memory


def test_every_example_is_run_by_a_test():
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for script in sorted(EXAMPLES.glob("*.py")):
        assert f'"{script.name}"' in tests, f"examples/{script.name} is not run by any test"


def test_export_assets_keeps_the_draft_vocabulary_ids(tmp_path):
    """export_assets.py casts the stream weights to fp16 but leaves integer tensors (the draft
    vocabulary's token ids, which fp16 cannot hold above 2048) as they are."""
    import json

    import mlx.core as mx

    from ss_mlx.config import CONFIG_KEY, STREAMS_FILE

    src = make_ss_dir(tmp_path / "src")
    ids = mx.array([0, 3, 7, 50, 98], dtype=mx.int32)
    cfg = json.loads((src / "config.json").read_text())
    cfg[CONFIG_KEY]["draft_vocab_size"] = int(ids.size)
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = mx.load(str(src / STREAMS_FILE))
    mx.save_safetensors(str(src / STREAMS_FILE), {**tensors, "draft_vocab": ids})
    out = tmp_path / "assets"
    run_example("default_model/export_assets.py", "--model", str(src), "--out", str(out))
    (asset,) = out.glob("*.safetensors")
    got = mx.load(str(asset))
    assert got["draft_vocab"].dtype == mx.int32 and got["draft_vocab"].tolist() == ids.tolist()
    weights = {k: v for k, v in got.items() if k != "draft_vocab"}
    assert weights and all(v.dtype == mx.float16 for v in weights.values())
    (block,) = out.glob("*.json")
    assert json.loads(block.read_text())["draft_vocab_size"] == 5
