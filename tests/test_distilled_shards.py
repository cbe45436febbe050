"""The committed distilled shards (data/distilled/*/): they load, map back to their prompt rows in
../shared/data, and are what the base model generates for those prompts.

The structural checks run everywhere; the prompt-row checks skip when ../shared/data is absent;
the regeneration spot check needs the real default model (slow).
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ss_mlx_convert import distill_sources as sources  # noqa: E402
from ss_mlx_convert.shards import load_shards, read_manifest  # noqa: E402

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parent.parent
RUNS = sorted(p.parent for p in (ROOT / "data/distilled").glob("*/manifest.json"))
DATA = ROOT.parent / "shared/data"  # ../shared/data from the repository root
SPOT_CHECK = 3  # rows regenerated per run


def run_ids(run):
    return run.name


@pytest.fixture(scope="module")
def base_dir():
    from ss_mlx.prepare.default_model import DefaultModelError, ensure_default_model

    try:
        return ensure_default_model(progress=False)
    except DefaultModelError as e:
        if "could not be obtained" in str(e):
            pytest.skip(f"default model unavailable here: {e}")
        raise


@pytest.fixture(scope="module")
def records():
    return {run: list(load_shards(run)) for run in RUNS}


def test_committed_runs_exist():
    assert RUNS, "no committed distilled shards under data/distilled/"


@pytest.mark.parametrize("run", RUNS, ids=run_ids)
def test_shards_load_and_match_manifest(run, records):
    manifest = read_manifest(run)
    recs = records[run]
    totals = manifest["totals"]
    assert len(recs) == totals["records"] > 0
    assert sum(len(r.completion_ids) for r in recs) == totals["completion_tokens"]
    assert len({(r.file, r.row) for r in recs}) == len(recs)  # each prompt once
    cfg = manifest["config"]
    assert all(0 < len(r.completion_ids) <= cfg["max_new_tokens"] or r.finish == "eos"
               for r in recs)  # fmt: skip
    assert all(r.finish == "eos" or len(r.completion_ids) == cfg["max_new_tokens"] for r in recs)
    for f in {r.file for r in recs}:
        sources.check_allowed(f)  # never a held-out or restricted set
        assert f in cfg["sources"]
    # Shards are whole slices of the plan: shard k holds plan rows [k * size, (k + 1) * size).
    assert [e["records"] for e in manifest["shards"][:-1]] == [cfg["shard_size"]] * (
        len(manifest["shards"]) - 1
    )


@pytest.mark.parametrize("run", RUNS, ids=run_ids)
def test_shards_map_back_to_prompt_rows(run, records):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent")
    manifest = read_manifest(run)
    recs = records[run]
    # The run's prompt plan, rebuilt from the data folder, starts with exactly these keys.
    counts = {s["file"]: s["rows"] for s in manifest["sources"]}
    pools = [sources.read_source(DATA, f, max_row=counts[f]) for f in manifest["config"]["sources"]]
    plan = sources.interleave(pools, manifest["config"]["seed"])
    text = {(p.file, p.row): p.text for p in plan}
    assert all((r.file, r.row) in text for r in recs)
    for r in recs[:: max(1, len(recs) // 50)]:
        assert sources.prompt_text(DATA, r.file, r.row) == text[(r.file, r.row)]


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=run_ids)
def test_shards_are_the_base_models_greedy_text(run, records, base_dir):
    """Re-tokenize the prompts; regenerate a few rows one at a time with HF `generate` (fp32)."""
    import torch
    import transformers
    from ss_mlx_convert.distill import encode_prompt, model_info

    manifest = read_manifest(run)
    cfg = manifest["config"]
    info = model_info(Path(base_dir))
    assert info["tokenizer_sha256"] == cfg["tokenizer_sha256"]
    assert info["weights_sha256"] == cfg["model_weights_sha256"]
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    recs = records[run]
    if DATA.is_dir():
        for r in recs:
            msgs = [{"role": "user", "content": sources.prompt_text(DATA, r.file, r.row)}]
            assert encode_prompt(tok, msgs, cfg["chat_template"] is not None) == r.prompt_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    # The shortest completions of different sources (cheap to regenerate), one that hit EOS.
    picked, seen = [], set()
    for r in sorted(recs, key=lambda r: (len(r.completion_ids), r.file, r.row)):
        if r.file not in seen and r.finish == "eos" and len(r.completion_ids) >= 8:
            picked.append(r)
            seen.add(r.file)
        if len(picked) == SPOT_CHECK:
            break
    assert picked
    for r in picked:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([r.prompt_ids]), do_sample=False, eos_token_id=cfg["eos_ids"],
                max_new_tokens=cfg["max_new_tokens"], pad_token_id=cfg["eos_ids"][0],
            )[0, len(r.prompt_ids) :].tolist()  # fmt: skip
        stop = [k for k, t in enumerate(out) if t in cfg["eos_ids"]]
        ref = out[: stop[0]] if stop else out
        where = json.dumps([r.file, r.row])
        assert tok.decode(r.completion_ids) == tok.decode(ref), where
        assert r.completion_ids == ref, where
