"""Paper comparison: task data and metrics (ss_mlx.tasks) and `ss-mlx compare` on tiny models."""

import csv
import json
import shutil

import pytest
from conftest import save_tiny_model_dir, tiny_base, write_medusa

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx.bench import compare
from ss_mlx.bench.datasets import DatasetError
from ss_mlx.bench.tasks import EvalItem, eval_items, exact_match, get_task, rouge, train_rows
from ss_mlx.prepare.init_model import init_model

pytest.importorskip("rouge_score")


def _csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows(rows)


@pytest.fixture
def data_root(tmp_path):
    r = tmp_path / "data"
    (r / "e2e").mkdir(parents=True)
    (r / "wikisql").mkdir()
    _csv(r / "e2e" / "devset.csv", [("name[A], food[Thai]", "A serves Thai food."),
                                    ("name[A], food[Thai]", "Thai food at A."),
                                    ("name[B]", "B is a place.")])
    _csv(r / "e2e" / "testset_w_refs.part1.csv",
         [("name[C], area[riverside]", "C is by the river."),
          ("name[C], area[riverside]", "By the river: C."), ("name[D]", "D.")])
    sql = [{"text": "table: t\ncolumns: a, b\nQ: what is a?\nA: SELECT a FROM t"},
           {"text": "table: u\ncolumns: c\nQ: which c?\nA: SELECT  c FROM u WHERE c = 'A: x'"}]
    for name in ("train.jsonl", "test.part1.jsonl"):
        (r / "wikisql" / name).write_text("".join(json.dumps(x) + "\n" for x in sql))
    return r


def test_task_rows_and_eval_items(data_root):
    e2e, sql = get_task("e2e"), get_task("wikisql")
    rows = train_rows(e2e, data_root)
    assert len(rows) == 3 and rows[1]["completion"] == "Thai food at A."
    assert rows[0]["prompt"].endswith("facts: name[A], food[Thai]")
    items = eval_items(e2e, data_root)
    assert [len(it.references) for it in items] == [2, 1]
    assert items[0].references == ("C is by the river.", "By the river: C.")
    assert len(eval_items(e2e, data_root, n=1)) == 1
    srows = train_rows(sql, data_root)
    # The answer starts after the last "A: " marker of the question part, not inside the SQL.
    assert srows[0] == {"prompt": "table: t\ncolumns: a, b\nQ: what is a?\nA: ",
                        "completion": "SELECT a FROM t"}
    assert srows[1]["completion"].startswith("SELECT  c FROM u")


def test_task_errors(data_root):
    with pytest.raises(DatasetError, match="unknown task"):
        get_task("dialogsum")
    (data_root / "wikisql" / "train.jsonl").write_text(json.dumps({"text": "no answer"}) + "\n")
    with pytest.raises(DatasetError, match="train.jsonl:1: needs a 'text'"):
        train_rows(get_task("wikisql"), data_root)
    (data_root / "e2e" / "devset.csv").write_text("meaning,text\nx,y\n")
    with pytest.raises(DatasetError, match="'mr' and 'ref' columns"):
        train_rows(get_task("e2e"), data_root)
    with pytest.raises(ValueError, match="2 outputs for 1"):
        get_task("wikisql").score(["a", "b"], [EvalItem("p", ("a",))])


def test_metrics():
    items = [EvalItem("p", ("SELECT a FROM t",)), EvalItem("q", ("SELECT b FROM u",))]
    assert exact_match(["select  A from T ", "SELECT c FROM u"], items) == {"exact_match": 50.0}
    refs = [EvalItem("p", ("the cat sat on the mat", "a dog ran"))]
    assert rouge(["a dog ran"], refs) == {"rouge1": 100.0, "rougeL": 100.0}
    assert rouge(["zebra"], refs) == {"rouge1": 0.0, "rougeL": 0.0}
    half = rouge(["the cat"], refs)  # best reference: P = 1, R = 2/6
    assert half["rouge1"] == pytest.approx(100 * 2 * (1 * 2 / 6) / (1 + 2 / 6))


@pytest.fixture(scope="module")
def task_models(tmp_path_factory):
    """Baseline, an SS model on a *different* trunk (as shared-mode training makes), Medusa
    heads on a copy of the baseline, and a one-layer draft."""
    root = tmp_path_factory.mktemp("cmp")
    save_tiny_model_dir(tiny_base("llama", seed=0), root / "baseline")
    save_tiny_model_dir(tiny_base("llama", seed=1), root / "ss_base")
    ss = init_model(root / "ss_base", root / "ss", streams=3, stream_layers=2)
    shutil.copytree(root / "baseline", root / "medusa")
    write_medusa(root / "medusa")
    save_tiny_model_dir(tiny_base("llama", seed=2, num_hidden_layers=1), root / "draft")
    lossless = init_model(root / "baseline", root / "ss_lossless", streams=2, stream_layers=1,
                          adapter_rank=2, adapter_modules=("self_attn.q_proj",),
                          adapter_init_scale=0.1)
    return compare.TaskModels(root / "baseline", ss, root / "medusa", root / "draft", lossless)


def test_compare_task_checks_each_method_against_its_own_reference(task_models, data_root):
    rep = compare.compare_task("e2e", task_models, max_tokens=10, root=data_root, warmup=0,
                               progress=False)
    rows = {r["name"]: r for r in rep["methods"]}
    assert list(rows) == ["ar", "ss:ar", "ss", "ss-dynamic", "ss-lossless",
                          "ss-lossless-dynamic", "medusa", "draft"]
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["parity"] for k, r in
                                                             rows.items()}
    assert rows["ss"]["reference"] == "ss:ar" and rows["medusa"]["reference"] == "ar"
    # Different trunks: SS is lossless w.r.t. its own model, not the baseline's outputs.
    assert rows["ss"]["outputs"] == rows["ss-dynamic"]["outputs"] == rows["ss:ar"]["outputs"]
    assert rows["ss-dynamic"]["reference"] == "ss:ar"
    assert rows["ss-lossless-dynamic"]["reference"] == "ar"
    assert rows["ss-lossless-dynamic"]["outputs"] == rows["ar"]["outputs"]
    assert rows["ss-dynamic"]["config"] == {"tree": "dynamic"}
    assert rows["ss"]["outputs"] != rows["ar"]["outputs"]
    assert rows["medusa"]["outputs"] == rows["draft"]["outputs"] == rows["ar"]["outputs"]
    # Streams on the baseline's own trunk: checked against (and equal to) the baseline.
    assert rows["ss-lossless"]["reference"] == "ar"
    assert rows["ss-lossless"]["outputs"] == rows["ar"]["outputs"]
    assert rows["ss-lossless"]["extra_params"] == 2 * 64 + 2 * (64 * 2 + 2 * 64)
    assert rows["ar"]["speedup"] == 1.0 and rows["ar"]["cr_ratio"] == 1.0
    assert rows["ar"]["tokens_per_pass"] == 1.0
    for r in rows.values():
        assert set(r["quality"]) == {"rouge1", "rougeL"}
    assert rows["ss"]["extra_params"] == 3 * 64  # gamma x hidden, no adapters
    assert rows["medusa"]["extra_params"] == 3 * (64 * 64 + 64)
    assert rows["draft"]["draft_calls"] > 0 and rows["ss"]["draft_calls"] == 0
    md = compare.format_task(rep)
    assert "| ss | ok |" in md and "two-model SD" in md and "| ss-lossless |" in md


def test_compare_flags_a_method_that_is_not_lossless(task_models, data_root, monkeypatch):
    real = compare.build_methods

    def broken(*a, **kw):
        methods, info, tok = real(*a, **kw)
        # Medusa heads on a different trunk than the baseline: its greedy output differs.
        medusa = next(m for m in methods if m.name == "medusa")
        ss_ar = next(m for m in methods if m.name == "ss:ar")
        methods[methods.index(medusa)] = compare._renamed(ss_ar, "medusa")
        return methods, info, tok

    monkeypatch.setattr(compare, "build_methods", broken)
    rep = compare.compare_task("e2e", task_models, max_tokens=10, root=data_root, warmup=0,
                               progress=False)
    rows = {r["name"]: r for r in rep["methods"]}
    assert rows["medusa"]["status"] == "FAILING" and "speedup" not in rows["medusa"]
    assert "`medusa` differs from `ar`" in compare.format_task(rep)


def test_cli_writes_reports(task_models, data_root, tmp_path, capsys):
    out = tmp_path / "r"
    compare.main(["--task", "wikisql", "--baseline", str(task_models.baseline),
                  "--ss", str(task_models.ss), "--data-root", str(data_root),
                  "--max-tokens", "6", "--warmup", "0", "--no-progress", "--no-dynamic",
                  "--json", str(out / "t.json"), "--markdown", str(out / "t.md"),
                  "--plot", str(out / "t.png")])
    rep = json.loads((out / "t.json").read_text())
    assert rep["task"]["name"] == "wikisql" and rep["task"]["n"] == 2
    assert [r["name"] for r in rep["methods"]] == ["ar", "ss:ar", "ss"]
    assert rep["settings"]["dynamic"] is False
    assert set(rep["methods"][0]["quality"]) == {"exact_match"}
    assert (out / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert "exact_match" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--ss .* is not a model directory"):
        compare.main(["--task", "e2e", "--baseline", str(task_models.baseline),
                      "--ss", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown task"):
        compare.main(["--task", "x", "--baseline", str(task_models.baseline),
                      "--ss", str(task_models.ss), "--data-root", str(data_root)])
