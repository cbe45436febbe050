"""benchmarks/learning_curve.py on synthetic curves; the curve file's resume rules (no torch)."""

import importlib.util
import json
from pathlib import Path

import pytest
from ss_mlx_convert.learning_curve import CURVE_FILE, LearningCurve, curve_record, read_curve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "learning_curve_script", ROOT / "benchmarks" / "learning_curve.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def metrics(k: int, streams: int = 2) -> dict:
    m = {"main_loss": 3.0 - 0.1 * k, "main_acc": 0.2 + 0.01 * k, "accepted_streams_mean": 0.1 * k}
    for j in range(1, streams + 1):
        m.update({f"stream{j}_acc": 0.05 * k / j, f"stream{j}_top3": 0.1 * k / j,
                  f"stream{j}_loss": 4.0 - 0.1 * k, f"stream{j}_echo": 0.1})  # fmt: skip
    return m


def write_run(folder: Path, steps: list[int], streams: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [curve_record(s, metrics(k, streams), 10.0 * k) for k, s in enumerate(steps, 1)]
    (folder / CURVE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_table_and_json(script, tmp_path, capsys):
    a = write_run(tmp_path / "run-a", [10, 20, 30])
    b = write_run(tmp_path / "run-b", [10, 20], streams=3)
    script.main([str(a), str(b), "--out", str(tmp_path / "res" / "curve")])
    res = tmp_path / "res"
    assert sorted(p.name for p in res.iterdir()) == ["curve.json", "curve.md", "curve.png"]
    assert (res / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (res / "curve.md").read_text().splitlines()
    assert "s3 top-1" in md[0] and md[2].startswith("| run-a | 30 |") and len(md) == 4
    assert "1.300 (30)" in md[2]  # best tokens per pass and its step
    runs = json.loads((res / "curve.json").read_text())
    assert [r["label"] for r in runs] == ["run-a", "run-b"]
    assert [r["step"] for r in runs[0]["records"]] == [10, 20, 30]
    assert "| run-b | 20 |" in capsys.readouterr().out
    script.main([str(a), "--labels", "lr 1e-3", "--out", str(tmp_path / "one.png")])
    assert "| lr 1e-3 |" in (tmp_path / "one.md").read_text()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no folder", "no such run folder"),
        ("no file", "eval_curve.jsonl missing"),
        ("empty", "eval_curve.jsonl is empty"),
        ("bad json", "eval_curve.jsonl:2: invalid JSON"),
        ("no step", "eval_curve.jsonl:1: expected an object with a positive integer 'step'"),
        ("repeated step", "eval_curve.jsonl:2: step 10 after step 10"),
        ("no loss", "the step-10 record lacks ['main_loss']"),
        ("labels", "2 --labels for 1 runs"),
    ],
)
def test_bad_input_is_one_line(script, tmp_path, damage, message):
    run = tmp_path / "run"
    extra = []
    if damage != "no folder":
        run.mkdir()
    curve = run / CURVE_FILE
    good = json.dumps(curve_record(10, metrics(1), 1.0))
    text = {"empty": "\n", "bad json": good + "\n{oops\n", "no step": '{"main_loss": 1}\n',
            "repeated step": good + "\n" + good + "\n",
            "no loss": json.dumps({"step": 10, "tokens_per_pass": 1.0}) + "\n"}  # fmt: skip
    if damage in text:
        curve.write_text(text[damage])
    if damage == "labels":
        write_run(tmp_path / "ok", [1])
        run, extra = tmp_path / "ok", ["--labels", "a,b"]
    with pytest.raises(SystemExit) as e:
        script.main([str(run), "--out", str(tmp_path / "o"), *extra])
    assert str(e.value).startswith("error: ") and message in str(e.value)
    assert "\n" not in str(e.value) and not list(tmp_path.glob("o.*"))


def test_resume_keeps_the_records_up_to_its_step(tmp_path):
    write_run(tmp_path, [2, 4, 6, 8])
    before = (tmp_path / CURVE_FILE).stat().st_mtime_ns
    assert LearningCurve.start(tmp_path, 8).last_step == 8  # nothing to drop: not rewritten
    assert (tmp_path / CURVE_FILE).stat().st_mtime_ns == before
    resumed = LearningCurve.start(tmp_path, 5)
    assert [r["step"] for r in read_curve(tmp_path / CURVE_FILE)] == [2, 4]
    resumed.add(curve_record(6, metrics(9), 1.0))
    assert [r["step"] for r in read_curve(tmp_path / CURVE_FILE)] == [2, 4, 6]
    assert read_curve(tmp_path / CURVE_FILE)[-1]["tokens_per_pass"] == pytest.approx(1.9)
    fresh = LearningCurve.start(tmp_path, 0)
    assert fresh.last_step == 0 and not (tmp_path / CURVE_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
