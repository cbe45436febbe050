"""benchmarks/memory_warmup.py's block arithmetic and its stripping of third-party text."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "memory_warmup_script", ROOT / "benchmarks" / "memory_warmup.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(method: str, prompt: int, tokens: int, seconds: float, passes: int) -> dict:
    # n_tokens counts the first pass's token too (excluded from decode speed, as bench does).
    return {"method": method, "prompt": prompt, "repeat": 0, "n_tokens": tokens + 1,
            "first_pass_tokens": 1, "decode_s": seconds, "accepted": [0] * passes,
            "tokens": list(range(tokens + 1))}  # fmt: skip


def test_blocks_pool_tokens_over_time_per_block(script):
    runs = []
    for i in range(5):  # AR: 10 tokens/s everywhere; dynamic: 2x faster from prompt 2 on
        runs.append(_run("ar", i, 20, 2.0, 20))
        runs.append(_run("ss[dynamic]", i, 20, 2.0 if i < 2 else 1.0, 20 if i < 2 else 8))
    runs.append({**_run("ar", 0, 20, 9.0, 20), "repeat": 1})  # other repeats are ignored
    out = script.blocks({"runs": runs}, 2)
    assert [b["prompts"] for b in out] == [[0, 1], [2, 3], [4, 4]]
    assert [round(b["speedup"], 6) for b in out] == [1.0, 2.0, 2.0]
    assert [b["tokens_per_pass"] for b in out] == [1.0, 2.5, 2.5]


def test_a_block_without_a_method_is_an_error(script):
    runs = [_run("ar", 0, 10, 1.0, 10)]
    with pytest.raises(SystemExit, match="block 0-0 lacks"):
        script.blocks({"runs": runs}, 4)


def test_stripped_keeps_measurements_only(script):
    report = {"prompts": [{"text": "a dialogue", "ar_tokens": [1, 2], "n": 5}],
              "runs": [_run("ar", 0, 3, 1.0, 3)]}  # fmt: skip
    out = script.stripped(report)
    assert out["prompts"] == [{"text": None, "ar_tokens": None, "n": 5}]
    assert out["runs"][0]["tokens"] is None and out["runs"][0]["decode_s"] == 1.0
