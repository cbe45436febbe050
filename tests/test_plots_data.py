"""Plots name the model (never a local path) and the machine and dtype, use distinct markers and
label every y axis; `--plot` without matplotlib fails before measuring, and `tune` saves the
tuned tree before it plots; the bench data root from an installed package says what to pass."""

import importlib.util
import json

import pytest
from conftest import save_tiny_model_dir, tiny_base, write_prompts

from ss_mlx import tuned
from ss_mlx.bench import bench, compare, datasets, tune
from ss_mlx.bench.machine import describe_machine
from ss_mlx.prepare.init_model import init_model

MACHINE = describe_machine("float32")
LOCAL = "/home/someone/models/my-ss-model"


def captured(monkeypatch, module):
    figs = []
    monkeypatch.setattr(module, "savefig", lambda fig, path: figs.append(fig))
    return figs


def check_figure(fig, model_name="my-ss-model"):
    texts = [fig._suptitle.get_text() if fig._suptitle else ""]
    texts += [ax.get_title() for ax in fig.axes]
    joined = "\n".join(texts)
    assert "/home/" not in joined and model_name in joined
    assert MACHINE["cpu"] in joined and "float32" in joined
    for ax in fig.axes:
        assert ax.get_ylabel(), ax.get_title()
        markers = [m for m in (line.get_marker() for line in ax.get_lines())
                   if m not in (None, "", "None")]  # axhline / axvline have none
        assert len(markers) == len(set(markers)), (ax.get_title(), markers)


def test_bench_plot(monkeypatch):
    figs = captured(monkeypatch, bench)
    acc = [0.5, 0.3, 0.1]
    methods = [{"name": n, "kind": k, "summary": {"decode_tps": 10.0, "speedup": 1.0,
                                                  "acceptance_by_depth": acc}}
               for n, k in [("ar", bench.BASELINE), ("ss 1,1", "ss"), ("ss 2,1", "ss"),
                            ("lookup", "lookup")]]  # fmt: skip
    report = {"methods": methods, "dataset": {"name": "chat"}, "machine": MACHINE,
              "model": {"path": LOCAL, "dtype": "float32"},
              "verify_cost": {"T": [1, 2, 3], "relative": [1.0, 1.1, 1.3], "pass": "tree"}}
    bench.plot_report(report, "x.png")
    check_figure(figs[0])


def test_compare_plot(monkeypatch):
    figs = captured(monkeypatch, compare)
    rows = [{"name": n, "speedup": 1.0, "tokens_per_pass": 1.2, "quality": {"rouge1": 80.0},
             "model": LOCAL} for n in ("baseline", "ss", "medusa")]
    compare.plot_reports([{"methods": rows, "task": {"name": "e2e"}, "machine": MACHINE}],
                         "x.png")
    check_figure(figs[0])


def test_tune_plot(monkeypatch):
    figs = captured(monkeypatch, tune)
    record = {"model": {"path": LOCAL}, "machine": MACHINE, "choice": {"num_nodes": 3},
              "verify_cost": {"T": [1, 2, 3, 4], "relative": [1.0, 1.2, 1.1, 1.5]},
              "acceptance": {"rank_probs": [[0.3, 0.1, 0.05, 0.01], [0.2, 0.1, 0.05, 0.02]]}}
    tune.plot_tuning(record, "x.png")
    check_figure(figs[0])


@pytest.mark.parametrize("command", ["tune", "bench", "compare"])
def test_plot_without_matplotlib_fails_first(command, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    module = {"tune": tune, "bench": bench, "compare": compare}[command]
    argv = ["--plot", str(tmp_path / "p.png")]
    argv += (["--task", "e2e", "--baseline", str(tmp_path), "--ss", str(tmp_path)]
             if command == "compare" else ["--model", str(tmp_path / "nonexistent")])
    with pytest.raises(SystemExit, match="--plot needs matplotlib.*ss-mlx\\[bench\\]"):
        module.main(argv)  # before the model is even looked at


def test_tune_saves_the_tree_before_plotting(tmp_path, monkeypatch):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    save_tiny_model_dir(tiny_base("llama"), tmp_path / "base")
    d = init_model(tmp_path / "base", tmp_path / "ss", streams=2, stream_layers=2)

    def broken(record, path):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(tune, "plot_tuning", broken)
    with pytest.raises(RuntimeError, match="the plot failed"):
        tune.main(["--model", str(d), "--prompts", str(write_prompts(tmp_path / "p.jsonl")),
                   "--n", "2", "--max-t", "3", "--max-tokens", "8", "--repeats", "1",
                   "--context", "8", "--no-progress", "--plot", str(tmp_path / "t.png")])
    assert tuned.load_tuned_tree(d) is not None


def test_data_root_from_an_installed_package(tmp_path, monkeypatch):
    """A wheel puts ss_mlx in site-packages: no checkout, so no default ../shared/data."""
    monkeypatch.delenv(datasets.ENV_DATA, raising=False)
    fake = tmp_path / "site-packages" / "ss_mlx" / "bench" / "datasets.py"
    monkeypatch.setattr(datasets, "__file__", str(fake))
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_prompts("e2e")
    msg = str(e.value)
    assert "installed as a package" in msg and "--data-root" in msg and "SS_MLX_DATA" in msg
    root = tmp_path / "data"
    (root / "e2e").mkdir(parents=True)
    (root / "e2e" / "testset_w_refs.part1.csv").write_text(
        'mr,ref\n"name[Aromi], food[Thai]","Aromi serves Thai."\n')
    assert len(datasets.load_prompts("e2e", root=root).prompts) == 1
    monkeypatch.setenv(datasets.ENV_DATA, str(root))
    assert len(datasets.load_prompts("e2e").prompts) == 1
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert datasets.load_prompts(str(rows)).prompts == ["hi"]
