"""ss-mlx bench: methods, parity check, summaries, report files, prompt loaders, machine info."""

import json

import mlx.core as mx
import pytest
from conftest import PROMPTS, save_tiny_model_dir, tiny_base, write_medusa, write_prompts

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx import tuned
from ss_mlx.bench import bench
from ss_mlx.bench.datasets import DATASETS, DatasetError, encode_prompt, load_prompts
from ss_mlx.bench.machine import describe_machine
from ss_mlx.drafters.lookup import LookupConfig
from ss_mlx.drafters.medusa import load_medusa
from ss_mlx.loader import load
from ss_mlx.prepare.init_model import init_model
from ss_mlx.tuned import machine_key


@pytest.fixture(scope="module")
def ss_dir(tmp_path_factory):
    """A tiny SS model directory (streams + tokenizer) that also has Medusa heads."""
    root = tmp_path_factory.mktemp("bench")
    save_tiny_model_dir(tiny_base("llama"), root / "base")
    d = init_model(root / "base", root / "ss", streams=3, stream_layers=2, adapter_rank=4,
                   adapter_modules=("self_attn.q_proj",), adapter_init_scale=0.1)
    write_medusa(d)
    return d


@pytest.fixture(scope="module")
def loaded(ss_dir):
    model, tokenizer = load(ss_dir)
    prompts = [encode_prompt(tokenizer, p, chat=True) for p in PROMPTS[:2]]
    return model, tokenizer, prompts


def all_methods(ss_dir, model):
    base = model.base
    return [
        bench.ar_method(base),
        bench.ss_method(model),
        bench.ss_method(model, "2,1:2"),
        bench.draft_method(base, bench.truncated_draft(ss_dir, base, 2), 2, name="draft[self]"),
        bench.lookup_method(base, LookupConfig(max_depth=3, num_candidates=2)),
        bench.medusa_method(base, load_medusa(ss_dir, base), "2,1"),
    ]


def flip_method(reference: bench.Method, index: int) -> bench.Method:
    """A deliberately wrong method: the reference with token `index` changed."""

    def gen(prompt, max_tokens):
        for i, e in enumerate(reference.generate(prompt, max_tokens)):
            yield e._replace(token=(e.token + 1) % 128) if i == index else e

    return bench.Method("flipped", "ss", gen, depth=1)


def test_all_methods_run_lossless(ss_dir, loaded):
    model, tokenizer, prompts = loaded
    methods = all_methods(ss_dir, model)
    runs = bench.run_benchmark(methods, prompts, max_tokens=12, eos=set(), warmup=1,
                               repeats=2, progress=False)
    assert len(runs) == len(methods) * (1 + 2 * len(prompts))
    report = bench.build_report(methods, runs)
    ar = next(m for m in report["methods"] if m["name"] == "ar")["summary"]
    for m in report["methods"]:
        assert m["status"] == "ok", (m["name"], m["parity"])
        s = m["summary"]
        assert s["tokens"] == 12 * len(prompts)
        assert s["speedup"] == pytest.approx(s["decode_tps"] / ar["decode_tps"])
        assert s["tokens_per_pass"] == pytest.approx(s["tokens"] / s["passes"])
        assert len(s["acceptance_by_depth"]) == m["depth"]
        if "paths" in m["config"]:  # a static tree: every pass drafts the same depths, and
            # depth d is accepted only after depth d - 1, so the rates can only fall
            acc = [a for a in s["acceptance_by_depth"] if a is not None]
            assert all(b <= a + 1e-12 for a, b in zip(acc, acc[1:], strict=False)), acc
    assert ar["speedup"] == pytest.approx(1.0)
    assert ar["tokens_per_pass"] == 1.0 and ar["acceptance_by_depth"] == []
    draft = next(m for m in report["methods"] if m["kind"] == "draft")["summary"]
    # Draft-model calls count against the method: call reduction < tokens per pass.
    assert draft["draft_calls"] > 0 and draft["call_reduction"] < draft["tokens_per_pass"]


def test_perfect_draft_counts(loaded):
    """The target as its own draft (mlx-lm's test pattern) accepts every draft token."""
    model, _, prompts = loaded
    m = bench.draft_method(model.base, model.base, 3, name="draft[oracle]")
    run = bench.run_once(m, mx.array(prompts[0]), 13, set())
    assert len(run.tokens) == 13
    # Passes of 3 accepted + 1 bonus token, then one pass cut short by max_tokens.
    assert run.accepted == [3, 3, 3, 1] and run.drafted == [3, 3, 3, 1]
    s = bench.summarize_method(m, [run])
    assert s["acceptance_by_depth"] == [1.0, 1.0, 1.0]
    assert s["tokens_per_pass"] == pytest.approx(13 / 4)
    assert s["call_reduction"] == pytest.approx(13 / (4 + 10))


def test_parity_catches_a_wrong_method(loaded):
    model, _, prompts = loaded
    ar = bench.ar_method(model.base)
    methods = [ar, bench.ss_method(model), flip_method(ar, 5)]
    runs = bench.run_benchmark(methods, prompts, max_tokens=10, eos=set(), warmup=0,
                               repeats=1, progress=False)
    report = bench.build_report(methods, runs)
    bad = report["methods"][2]
    assert bad["status"] == "FAILING" and bad["summary"] is None
    flipped = [r for r in report["runs"] if r["method"] == "flipped"]
    assert all(r["tokens"] is not None and r["tokens"][5] != p["ar_tokens"][5]
               for r, p in zip(flipped, report["prompts"], strict=True))
    assert bad["parity"]["mismatched"] == len(prompts)
    fd = bad["parity"]["first_divergence"]
    assert fd["prompt"] == 0 and fd["index"] == 5 and fd["got"] == (fd["expected"] + 1) % 128
    assert report["methods"][1]["status"] == "ok"
    text = bench.format_report(report)
    assert "| flipped | FAILING: prompt 0 token 5 |" in text
    assert "FAILING the greedy parity check" in text


def test_first_divergence():
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_divergence([1, 2, 3], [1, 2]) == 2
    assert bench.first_divergence([1], [1, 2]) == 1


def test_eos_stops_every_method(loaded):
    model, _, prompts = loaded
    ar = bench.ar_method(model.base)
    ref = bench.run_once(ar, mx.array(prompts[0]), 12, set())
    eos = {ref.tokens[4]}
    stop = ref.tokens.index(ref.tokens[4]) + 1
    for m in (ar, bench.ss_method(model), bench.lookup_method(model.base)):
        run = bench.run_once(m, mx.array(prompts[0]), 12, eos)
        assert run.tokens == ref.tokens[:stop], m.name


def test_cli_report_files(ss_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))  # no tuned tree from the user
    prompts = write_prompts(tmp_path / "p.jsonl")
    out_json, out_png, out_md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    bench.main([
        "--model", str(ss_dir), "--dataset", str(prompts), "--n", "2", "--max-tokens", "8",
        "--repeats", "1", "--warmup", "0", "--draft-layers", "1", "--lookup-depth", "3",
        "--tree", "2,1", "--tree", "1,1,1", "--json", str(out_json), "--plot", str(out_png),
        "--markdown", str(out_md), "--verify-curve", "3", "--no-progress",
    ])
    table = capsys.readouterr().out
    assert "| ss[2,1] | ok |" in table and "| ss[1,1,1] | ok |" in table
    assert out_md.read_text() == table
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out_json.read_text())
    # The documented schema (benchmarks/README.md).
    assert report["schema"] == bench.SCHEMA
    for key in ("created", "command", "baseline", "machine", "model", "dataset", "settings",
                "methods", "skipped", "prompts", "verify_cost", "runs"):
        assert key in report, key
    for key in ("cpu", "os", "python", "mlx", "mlx_lm", "backend", "dtype", "blas",
                "ss_mlx_commit"):
        assert key in report["machine"], key
    assert report["model"]["dtype"] == "float32" and report["model"]["hash"]
    assert report["dataset"]["n"] == 2 and report["dataset"]["template"] == "{prompt}"
    assert report["dataset"]["chat_template_applied"] is True
    names = [m["name"] for m in report["methods"]]
    assert names[0] == "ar" and len(names) == 6, names
    for m in report["methods"]:
        assert set(m) >= {"name", "kind", "status", "depth", "extra_param_bytes", "config",
                          "parity", "summary"}
        assert set(m["summary"]) >= {
            "decode_tps", "speedup", "tokens_per_pass", "call_reduction", "acceptance_by_depth",
            "ttft_s", "peak_memory_bytes", "e2e_tps", "mean_accepted"}
    assert len(report["runs"]) == 6 * 2
    assert set(report["runs"][0]) >= {"method", "prompt", "repeat", "tokens", "n_tokens",
                                      "accepted", "drafted", "ttft_s", "decode_s",
                                      "peak_memory"}
    # Outputs equal to the reference are stored once, in prompts[].ar_tokens.
    assert all(r["tokens"] is None and r["n_tokens"] == 8 for r in report["runs"])
    assert report["prompts"][0]["text"] == PROMPTS[0]
    assert len(report["prompts"]) == 2 and report["prompts"][0]["ar_tokens"]
    assert report["verify_cost"]["T"] == [1, 2, 3]


def test_cli_skips_what_the_model_lacks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    d = tmp_path / "plain"
    save_tiny_model_dir(tiny_base("qwen3"), d)
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    bench.main(["--model", str(d), "--dataset", str(prompts), "--max-tokens", "6",
                "--repeats", "1", "--warmup", "0", "--methods", "ss,lookup,medusa",
                "--no-progress", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "`ss` skipped" in out and "`medusa` skipped" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in report["methods"]] == ["ar", "lookup[7x1]"]


def test_cli_adds_the_tuned_tree(ss_dir, tmp_path, capsys, monkeypatch):

    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    args = ["--model", str(ss_dir), "--dataset", str(prompts), "--max-tokens", "6",
            "--repeats", "1", "--warmup", "0", "--methods", "ss", "--no-progress"]
    record = {"schema": tuned.SCHEMA, "machine": {"key": tuned.machine_key()},
              "tree": {"widths": [2], "node_budget": 1, "rank_probs": [[0.2, 0.5]]}}
    tuned.save_tuned(ss_dir, record)
    bench.main(args)
    assert "| ss[tuned 2:1] | ok |" in capsys.readouterr().out
    record["tree"] = {"widths": [2, 1, 1]}  # the built-in default for 3 streams
    tuned.save_tuned(ss_dir, record)
    bench.main(args)
    assert "same tree as an earlier row" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="not a known name"):
        bench.main(["--model", str(tmp_path), "--dataset", "nope"])
    with pytest.raises(SystemExit, match="unknown methods"):
        prompts = write_prompts(tmp_path / "p.jsonl")
        d = tmp_path / "m"
        save_tiny_model_dir(tiny_base("llama"), d)
        bench.main(["--model", str(d), "--dataset", str(prompts), "--methods", "ar,beam"])


# ------------------------------------------------------------------ prompt loaders


@pytest.fixture
def data_root(tmp_path):
    r = tmp_path / "data"
    for sub in ("e2e", "dialogsum", "wikisql", "chat"):
        (r / sub).mkdir(parents=True)
    (r / "e2e" / "testset_w_refs.part1.csv").write_text(
        'mr,ref\n"name[A], food[Thai]",A serves Thai.\n"name[A], food[Thai]",Thai at A.\n'
        '"name[B], area[riverside]","B, by the river."\n'
    )
    (r / "dialogsum" / "dialogsum.test.part1.jsonl").write_text(
        json.dumps({"fname": "t0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello."}) + "\n"
    )
    (r / "wikisql" / "test.part1.jsonl").write_text(
        json.dumps({"text": "table: t\ncolumns: a, b\nQ: what is a?\nA: SELECT a FROM t"}) + "\n"
    )
    (r / "chat" / "vicuna_bench_questions.jsonl").write_text(
        json.dumps({"question_id": 1, "turns": ["How?", "And then?"]}) + "\n"
    )
    (r / "chat" / "wwdc25_valid.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": "x"}) + "\n"
                for p in ["Q1?", "Q1?", "Q2?", "Q3?"])
    )
    (r / "chat" / "wwdc25_train.jsonl").write_text(json.dumps({"prompt": "Q2?"}) + "\n")
    return r


def test_loaders_parse_each_format(data_root):
    e2e = load_prompts("e2e", root=data_root)
    assert e2e.prompts == [DATASETS["e2e"].template.format(mr="name[A], food[Thai]"),
                           DATASETS["e2e"].template.format(mr="name[B], area[riverside]")]
    assert e2e.available == 2 and e2e.chat and "{mr}" in e2e.template
    ds = load_prompts("dialogsum", root=data_root)
    assert ds.prompts[0].endswith("#Person1#: Hi.\n#Person2#: Hello.")
    sql = load_prompts("wikisql", root=data_root)
    assert sql.prompts == ["table: t\ncolumns: a, b\nQ: what is a?\nA: "] and not sql.chat
    chat = load_prompts("chat", root=data_root)
    assert chat.name == "vicuna" and chat.prompts == ["How?"]
    wwdc = load_prompts("wwdc25", root=data_root)  # valid minus train prompts, deduped
    assert wwdc.prompts == ["Q1?", "Q3?"] and wwdc.to_dict()["excluded_from"]


def test_loader_options_and_errors(data_root, tmp_path, monkeypatch):
    assert load_prompts("e2e", root=data_root, template="MR: {mr}").prompts[0] == \
        "MR: name[A], food[Thai]"
    assert load_prompts("e2e", root=data_root, n=1).prompts == \
        load_prompts("e2e", root=data_root).prompts[:1]
    sampled = load_prompts("wwdc25", root=data_root, n=1, seed=3)
    assert len(sampled.prompts) == 1 and sampled.available == 2
    monkeypatch.setenv("SS_MLX_DATA", str(data_root))
    assert load_prompts("vicuna").source == str(data_root / "chat" / "vicuna_bench_questions.jsonl")
    custom = write_prompts(tmp_path / "mine.jsonl", ["a", "b", "a"])
    ps = load_prompts(str(custom))
    assert ps.prompts == ["a", "b"] and ps.name == "mine" and ps.template == "{prompt}"
    with pytest.raises(DatasetError, match="not a known name"):
        load_prompts("squad")
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_prompts("dialogsum-dev", root=data_root)
    with pytest.raises(DatasetError, match="needs field"):
        load_prompts("e2e", root=data_root, template="{dialogue}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(DatasetError, match="bad.jsonl:1"):
        load_prompts(str(bad))
    (data_root / "wikisql" / "test.part1.jsonl").write_text('{"text": "no marker"}\n')
    with pytest.raises(DatasetError, match="'A: '"):
        load_prompts("wikisql", root=data_root)


def test_encode_prompt_chat_and_raw(loaded):
    _, tokenizer, _ = loaded
    chat = encode_prompt(tokenizer, "hi", chat=True)
    raw = encode_prompt(tokenizer, "hi", chat=False)
    assert tokenizer.decode(chat).startswith("<|im_start|>user\nhi")
    assert tokenizer.decode(raw) == "hi"


def test_machine_description():
    d = describe_machine("float32")
    assert d["dtype"] == "float32" and d["cpu"] and d["mlx"] and d["python"]
    assert d["backend"]["device"]
    assert machine_key(d) == machine_key(dict(d, ss_mlx_commit="other"))
    assert machine_key(d) != machine_key(dict(d, cpu="Apple M4 Max"))


def test_dynamic_runs_never_draft_their_own_earlier_answer():
    """The output memory in a benchmark: a prompt's warm-up and repeats (here the same prompt
    twice) start from the memory of the prompts before it, so none drafts its own answer."""
    from conftest import tiny_ss_model

    from ss_mlx.generation import ss_generate_step

    model = tiny_ss_model("llama", seed=6)
    m = bench.ss_method(model, "dynamic")
    p = [3, 9, 27, 81, 50, 7]
    runs = bench.run_benchmark([bench.ar_method(model.base), m], [p, p], max_tokens=40,
                               eos=set(), warmup=1, repeats=2, progress=False)  # fmt: skip
    assert all(v["ok"] for v in bench.check_parity(runs).values())
    mine = [r for r in runs if r.method == m.name]
    assert len(mine) == 5 and not any("memory" in k for r in mine for k in r.by_source)
    # Outside the benchmark the same prompt again does draft its answer from memory.
    steps = list(ss_generate_step(mx.array(p), model, max_tokens=40))
    assert any("memory" in s.source for s in steps if s.from_draft)
