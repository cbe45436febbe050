"""Sharded distillation: fast greedy decoding, shard round trip, resume, corruption, plans."""

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hf_tiny import make_tiny_hf, make_tiny_tokenizer  # noqa: E402
from ss_mlx_convert import distill  # noqa: E402
from ss_mlx_convert import distill_sources as sources  # noqa: E402
from ss_mlx_convert.data import DataError, load_examples  # noqa: E402
from ss_mlx_convert.fastgen import generate_greedy, shared_prefix  # noqa: E402
from ss_mlx_convert.shards import (  # noqa: E402
    Record,
    ShardError,
    load_shards,
    read_manifest,
    read_shard,
    read_training_data,
    template_suffix,
    to_examples,
    write_shard,
)

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]
EOS = 3  # <|im_end|> in the tiny tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_hf("llama", d, seed=3)
    make_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_dir)


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=EOS,
            pad_token_id=1,
        )[0, len(ids) :].tolist()  # fmt: skip
    return out[: out.index(EOS)] if EOS in out else out


# ---- fast engine ------------------------------------------------------------------------------


def test_fast_greedy_equals_hf_generate_one_at_a_time(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 90, (int(n),), generator=g).tolist() for n in (5, 17, 2, 9, 30, 1)]
    # 2 slots for 6 prompts: slots refill mid-run and the batch shrinks at the end.
    gens = generate_greedy(model, prompts, 12, [EOS], batch_size=2)
    for p, gen in zip(prompts, gens, strict=True):
        assert gen.ids == hf_greedy(model, p, 12)
        assert gen.finish == ("eos" if len(gen.ids) < 12 else "length")


def test_fast_greedy_reuses_a_shared_prefix_exactly(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    head = torch.randint(4, 90, (7,), generator=g).tolist()  # a "system turn" all prompts share
    tails = [torch.randint(4, 90, (int(n),), generator=g).tolist() for n in (20, 1, 6, 3, 11)]
    prompts = [head + t for t in tails]
    assert shared_prefix(prompts) == 7
    # Lengths out of order: admission is shortest first, results come back in the caller's order.
    gens = generate_greedy(model, prompts, 9, [EOS], batch_size=2)
    for p, gen in zip(prompts, gens, strict=True):
        assert gen.ids == hf_greedy(model, p, 9)


def test_shared_prefix_leaves_every_prompt_a_token():
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix([[9, 2], [1, 2]]) == 0
    assert shared_prefix([[5]]) == 0


def test_fast_greedy_stops_at_eos(tiny):
    model, _ = tiny
    # Find a prompt whose greedy continuation hits EOS: force it with a huge EOS logit bias.
    with torch.no_grad():
        model.lm_head.weight[EOS] += 50 * model.model.norm.weight.sign()
    try:
        gens = generate_greedy(model, [[5, 6, 7], [8, 9]], 10, [EOS], batch_size=2)
        assert all(x.finish == "eos" and EOS not in x.ids for x in gens)
    finally:
        with torch.no_grad():
            model.lm_head.weight[EOS] -= 50 * model.model.norm.weight.sign()


# ---- shard files ------------------------------------------------------------------------------


def records(n=5):
    return [
        Record(f"f{i % 2}.jsonl", 10 + i, list(range(1, 4 + i)), [7] * i, ("eos", "length")[i % 2])
        for i in range(n)
    ]  # fmt: skip


def test_shard_round_trip(tmp_path):
    recs = records()
    entry = write_shard(tmp_path / "shard-00000.npz", recs, vocab_size=49152)
    assert read_shard(tmp_path / "shard-00000.npz", entry["sha256"]) == recs
    assert entry["records"] == 5 and entry["completion_tokens"] == sum(range(5))
    with np.load(tmp_path / "shard-00000.npz", allow_pickle=False) as z:
        assert z["prompt_ids"].dtype == np.uint16 and z["completion_ids"].dtype == np.uint16
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "x.npz", [Record("a", 0, [70000], [], "eos")], vocab_size=49152)


def test_truncated_or_corrupt_shard_is_one_line_error(tmp_path):
    path = tmp_path / "shard-00000.npz"
    entry = write_shard(path, records(), vocab_size=100)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    for sha in (None, entry["sha256"]):
        with pytest.raises(ShardError) as e:
            read_shard(path, sha)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert "corrupt or truncated" in str(e.value)
    path.write_bytes(data[:-200] + bytes(200))  # corrupt tail, same size
    with pytest.raises(ShardError, match="corrupt or truncated"):
        read_shard(path)


def test_to_examples_scores_completion_and_stop():
    recs = [Record("f", 0, [1, 2], [5, 6], "eos"), Record("f", 1, [1], [5], "length")]
    a, b = to_examples(recs, eos_id=3, suffix=[4])
    assert a.input_ids == [1, 2, 5, 6, 3, 4] and a.loss_mask == [0, 0, 1, 1, 1, 1]
    assert b.input_ids == [1, 5] and b.loss_mask == [0, 1]


# ---- sources ----------------------------------------------------------------------------------


def make_data(root: Path) -> Path:
    (root / "prompts").mkdir(parents=True)
    (root / "e2e").mkdir()
    big = [{"prompt": f"add {i} and {i + 1}", "source": "x"} for i in range(12)]
    big.insert(3, big[1])  # a repeated prompt: only its first row counts
    small = [{"prompt": f"hello {c}", "source": "y"} for c in "abcd"]
    for name, rows in (("big", big), ("small", small)):
        (root / f"prompts/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "e2e/devset.csv").write_text('mr,ref\n"name[A], food[B]",x\n"name[A], food[B]",y\n')
    return root


def test_plan_interleaves_sources_in_proportion(tmp_path):
    data = make_data(tmp_path)
    plan = sources.build_plan(data, ["prompts/big.jsonl", "prompts/small.jsonl"], seed=1)
    assert len(plan) == 16 and len({p.text for p in plan}) == 16
    assert 3 not in [p.row for p in plan if p.file == "prompts/big.jsonl"]  # the repeat
    # Every prefix holds each source in proportion (12:4), within one prompt.
    for k in range(1, 17):
        n_small = sum(p.file == "prompts/small.jsonl" for p in plan[:k])
        assert abs(n_small - k * 4 / 16) <= 1
    assert plan == sources.build_plan(data, ["prompts/big.jsonl", "prompts/small.jsonl"], seed=1)
    for p in plan:
        assert sources.prompt_text(data, p.file, p.row) == p.text
    e2e = sources.read_source(data, "e2e/devset.csv")
    assert [(p.row, p.text) for p in e2e] == [
        (0, sources.E2E_TEMPLATE.format(mr="name[A], food[B]"))
    ]


def test_held_out_sources_are_refused(tmp_path):
    held_out = ("prompts/eval_ifeval.jsonl", "chat/vicuna_bench_questions.jsonl",
                "e2e/testset_w_refs.part1.csv", "chat/wwdc25_valid.jsonl",
                "dialogsum/dialogsum.dev.jsonl")  # fmt: skip
    for f in held_out:
        with pytest.raises(DataError, match="held-out or restricted"):
            sources.read_source(tmp_path, f)
    assert all(not any(w in f for w in sources.FORBIDDEN) for f in sources.PERMISSIVE)


# ---- sharded runs -----------------------------------------------------------------------------


def run(tiny_dir, data, out, *extra):
    args = ["--model", str(tiny_dir), "--shards", str(out), "--data", str(data),
            "--sources", "prompts/big.jsonl,prompts/small.jsonl", "--shard-size", "5",
            "--max-new-tokens", "8", "--batch-size", "3", "--no-progress", *extra]  # fmt: skip
    return distill.distill_shards(distill.build_parser().parse_args(args))


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.npz"))}


def test_interrupted_run_resumes_to_the_same_shards(tiny_dir, tiny, tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")
    full = run(tiny_dir, data, tmp_path / "full")
    assert full["totals"]["shards"] == 4 and full["totals"]["records"] == 16

    part = tmp_path / "part"
    run(tiny_dir, data, part, "--max-shards", "1")
    assert read_manifest(part)["totals"]["shards"] == 1
    # Crash in the middle of the third shard, after the second was renamed into place but
    # before the manifest listed it, with a temporary file of the crashed write lying around.
    real_write = distill.write_json_atomic
    calls = {"n": 0}

    def crash_on_manifest(path, obj):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(distill, "write_json_atomic", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, data, part)
    monkeypatch.setattr(distill, "write_json_atomic", real_write)
    assert (part / "shard-00001.npz").exists()
    assert read_manifest(part)["totals"]["shards"] == 1
    (part / ".shard-00002.npz.tmp999").write_bytes(b"half a shard")
    resumed = run(tiny_dir, data, part)
    assert not list(part.glob(".*"))
    assert shard_bytes(part) == shard_bytes(tmp_path / "full")
    assert [e["sha256"] for e in resumed["shards"]] == [e["sha256"] for e in full["shards"]]
    # A finished folder reruns as a no-op.
    again = run(tiny_dir, data, part)["totals"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in full["totals"].items() if k != "seconds"
    }

    # Records map back to their prompts and are the model's greedy completions.
    model, tok = tiny
    recs = list(load_shards(part))
    assert len({(r.file, r.row) for r in recs}) == 16
    for r in recs[:4]:
        text = sources.prompt_text(data, r.file, r.row)
        assert r.prompt_ids == distill.encode_prompt(tok, [{"role": "user", "content": text}], True)
        assert r.completion_ids == hf_greedy(model, r.prompt_ids, 8)


def test_run_refuses_other_settings_and_corrupt_shards(tiny_dir, tmp_path, capsys):
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    run(tiny_dir, data, out, "--max-shards", "2")
    with pytest.raises(ShardError, match="max_new_tokens differ"):
        run(tiny_dir, data, out, "--max-new-tokens", "9")
    shard = out / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        distill.main(["--model", str(tiny_dir), "--shards", str(out), "--data", str(data),
                      "--sources", "prompts/big.jsonl,prompts/small.jsonl", "--shard-size", "5",
                      "--max-new-tokens", "8", "--no-progress"])  # fmt: skip
    msg = str(e.value)
    assert msg.startswith("ss-mlx distill: ") and "\n" not in msg
    assert "shard-00001.npz: corrupt or truncated shard" in msg
    with pytest.raises(ShardError, match="corrupt or truncated"):
        list(load_shards(out))


def test_export_jsonl_rebuilds_training_rows(tiny_dir, tiny, tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    run(tiny_dir, data, out, "--max-shards", "1")
    jsonl = tmp_path / "train.jsonl"
    args = distill.build_parser().parse_args(
        [
            "--model",
            str(tiny_dir),
            "--shards",
            str(out),
            "--data",
            str(data),
            "--export-jsonl",
            str(jsonl),
        ]  # fmt: skip
    )
    assert distill.export_jsonl(args) == 5
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    _, tok = tiny
    for row, rec in zip(rows, load_shards(out), strict=True):
        assert row["prompt"] == sources.prompt_text(data, rec.file, rec.row)
        # The tiny model's vocabulary is larger than its tokenizer's: compare decoded text.
        assert row["completion"] == tok.decode(rec.completion_ids, skip_special_tokens=False)


def test_shards_train_with_their_exact_ids(tiny_dir, tiny, tmp_path):
    import shutil

    import transformers

    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    run(tiny_dir, data, out, "--max-shards", "2")
    _, tok = tiny
    suffix = template_suffix(tok, EOS)
    # The suffix is what a chat row of the trainer's JSONL puts after the stop token.
    jsonl = tmp_path / "row.jsonl"
    jsonl.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    row = load_examples(jsonl, tok, 512)[0]
    k = len(row.input_ids) - 1 - row.input_ids[::-1].index(EOS)
    assert suffix and row.input_ids[k + 1 :] == suffix and all(row.loss_mask[k:])

    recs = list(load_shards(out))
    examples = read_training_data(out, tok, 512, True)
    assert len(examples) == len(recs) == 10
    assert {r.finish for r in recs} >= {"length"}
    for e, r in zip(examples, recs, strict=True):
        tail = r.completion_ids + ([EOS, *suffix] if r.finish == "eos" else [])
        assert e.input_ids == r.prompt_ids + tail
        assert e.loss_mask == [0] * len(r.prompt_ids) + [1] * len(tail)
    assert all(len(e.input_ids) == 6 for e in read_training_data(out, tok, 6, True))
    # Several sources joined by commas: read in that order.
    both = read_training_data(f"{jsonl},{out}", tok, 512, True)
    assert both == [row, *examples]
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_training_data(f"{out},{tmp_path / 'nope.jsonl'}", tok, 512, True)

    # Ids made with another tokenizer are refused, not trained on.
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    with pytest.raises(ShardError, match="another tokenizer"):
        read_training_data(out, transformers.AutoTokenizer.from_pretrained(other), 512, True)
    template = tok.chat_template
    try:
        tok.chat_template = template.replace("assistant", "bot")
        with pytest.raises(ShardError, match="another chat template"):
            read_training_data(out, tok, 512, True)
    finally:
        tok.chat_template = template


def test_train_reads_a_shards_folder(tiny_dir, tmp_path):
    from ss_mlx_convert import train as train_cli

    out = tmp_path / "run"
    run(tiny_dir, make_data(tmp_path / "data"), out, "--max-shards", "1")
    model = tmp_path / "model"
    argv = ["--model", str(tiny_dir), "--data", str(out), "--eval", str(out), "--mode", "lossless",
            "--streams", "2", "--stream-layers", "1", "--out", str(model), "--batch-size", "4",
            "--max-steps", "2", "--log-every", "1", "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    train_cli.train(train_cli.build_parser().parse_args(argv))
    assert list((tmp_path / "cache").glob("trunk-*.safetensors"))
    log = [json.loads(x) for x in (model / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    evaluated = json.loads((model / "eval.json").read_text())
    assert evaluated["examples"] == 5 and evaluated["stream1_n"] > 0


def test_fast_greedy_admits_in_the_given_order_until_told_to_stop(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 90, (int(n),), generator=g).tolist() for n in (3, 8, 5, 2, 6, 4)]
    asked = []

    def admit(i):
        asked.append(i)
        return i != 2

    gens = generate_greedy(model, prompts, 6, [EOS], batch_size=2, order=[5, 4, 3, 2, 1, 0],
                           admit=admit)  # fmt: skip
    assert asked == [5, 4, 3, 2]
    assert gens[0] is gens[1] is gens[2] is None
    for i in (3, 4, 5):
        assert gens[i].ids == hf_greedy(model, prompts[i], 6)
    with pytest.raises(ValueError, match="every prompt index once"):
        generate_greedy(model, prompts, 6, [EOS], order=[0, 0, 1, 2, 3, 4])


def test_time_limit_stops_between_shards_and_never_halfway(tiny_dir, tmp_path, monkeypatch):
    # A clock that jumps 1,000 s whenever a shard is written: with a 500 s limit, only the
    # shards whose first prompt was admitted before the first write may run, and each of
    # those must be finished and listed.
    out = tmp_path / "run"
    clock = lambda: 1000.0 * len(list(out.glob("shard-*.npz")))  # noqa: E731
    monkeypatch.setattr(distill.time, "perf_counter", clock)
    manifest = run(tiny_dir, make_data(tmp_path / "data"), out, "--time-limit", "500")
    names = sorted(p.name for p in out.glob("shard-*.npz"))
    assert 1 <= len(names) < 4
    assert [e["name"] for e in manifest["shards"]] == names
    assert sum(e["records"] for e in manifest["shards"]) == 5 * len(names)
    assert not list(out.glob(".*"))
    # A shard's seconds are the time since the previous shard was written (the clock's jump).
    assert [e["seconds"] for e in manifest["shards"]] == [1000.0] * len(names)
