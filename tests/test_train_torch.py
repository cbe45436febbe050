"""PyTorch trainer: modes, loss going down, checkpoint layout, resume, data, distill, torchrun."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from hf_tiny import make_tiny_hf, make_tiny_tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from ss_mlx_convert import train as train_cli  # noqa: E402
from ss_mlx_convert.data import DataError, collate, epoch_batches, load_examples  # noqa: E402
from ss_mlx_convert.pretrained import load_trained  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]
MODEL_TYPES = ("llama", "qwen2", "qwen3")
G, NS = 3, 2


def _row(rng: random.Random) -> dict:
    # Cyclic letters: the future is predictable from the past, so streams can learn quickly.
    a, n = rng.choice("abcdefgh"), rng.randint(2, 4)
    return {
        "prompt": f"cycle {a} {n}",
        "completion": "".join(chr(ord(a) + k % n) for k in range(16)),
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    for mt in MODEL_TYPES:
        make_tiny_hf(mt, root / mt, eos_token_id=3, bos_token_id=None, pad_token_id=1)
        make_tiny_tokenizer(root / mt)
    rng = random.Random(0)
    for name, n in (("train.jsonl", 24), ("eval.jsonl", 6)):
        with open(root / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps(_row(rng)) + "\n")
    return root


def run_train(workdir: Path, model_type: str, mode: str, out: Path, *extra: str):
    argv = [
        "--model", str(workdir / model_type), "--data", str(workdir / "train.jsonl"),
        "--mode", mode, "--streams", str(G), "--stream-layers", str(NS), "--out", str(out),
        "--batch-size", "4", "--lr", "1e-2", "--log-every", "5", "--no-progress", *extra,
    ]  # fmt: skip
    return train_cli.train(train_cli.build_parser().parse_args(argv))


def losses(out: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    if key == "streams":  # the trainable part of the loss when the base is frozen
        return [sum(r[f"stream{j}_loss"] for j in range(1, G + 1)) for r in records]
    return [r[key] for r in records]


def fresh_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return base(ids).logits


EXPECTED = {
    "shared": {
        "speculative_streams.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
    },
    "lossless": {"speculative_streams.safetensors"},
    "medusa": {"medusa_heads.safetensors"},
}
COMMON = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("mode", ["shared", "lossless", "medusa"])
def test_train_30_steps(workdir, tmp_path, model_type, mode):
    out = tmp_path / "out"
    extra = ["--prune-rank", "4"] if mode == "shared" else []
    res = run_train(workdir, model_type, mode, out, "--max-steps", "30", "--save-every", "15",
                    "--eval", str(workdir / "eval.jsonl"), *extra)  # fmt: skip
    curve = losses(out, "loss" if mode == "shared" else "streams")
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0], curve

    files = {p.name for p in out.iterdir()}
    assert COMMON | EXPECTED[mode] <= files
    others = set().union(*EXPECTED.values()) - EXPECTED[mode]
    assert not files & others
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000015", "step-00000030"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert (out / "model.safetensors").read_bytes() == (
        workdir / model_type / "model.safetensors"
    ).read_bytes()

    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((workdir / model_type / "config.json").read_text())
    assert {k: config[k] for k in base_config} == base_config
    assert config["ss_training"]["mode"] == mode
    ev = json.loads((out / "eval.json").read_text())
    assert {"main_acc", "stream1_acc", f"stream{G}_acc", "accepted_streams_mean"} <= set(ev)
    assert all(ev[f"stream{j}_top3"] >= ev[f"stream{j}_acc"] for j in range(1, G + 1))
    assert all(0.0 <= ev[f"stream{j}_echo"] <= 1.0 for j in range(1, G + 1))

    ids = torch.randint(4, 80, (2, 12))
    if mode == "medusa":
        assert config["medusa"]["num_heads"] == G and "speculative_streaming" not in config
        heads = load_file(str(out / "medusa_heads.safetensors"))
        assert heads["medusa_head.0.0.linear.weight"].shape == (64, 64)
        assert len(heads) == 2 * G
        return
    ss = config["speculative_streaming"]
    assert ss["format_version"] == 1 and ss["num_streams"] == G and ss["stream_layers"] == NS
    streams = load_file(str(out / "speculative_streams.safetensors"))
    assert all(t.dtype == torch.float32 for t in streams.values())
    assert streams["stream_embeddings"].shape == (G, 64)
    if mode == "lossless":
        assert ss["adapter_rank"] == 8 and ss["prune_rank"] == 0
        assert f"adapters.{4 - NS}.self_attn.q_proj.a" in streams
        # The frozen base is untouched, bit for bit, in memory and on reload.
        assert not any(p.requires_grad for p in res.model.base.parameters())
        want = fresh_logits(workdir / model_type, ids)
        with torch.no_grad():
            assert torch.equal(res.model(ids)[0], want)
    else:
        assert ss["adapter_rank"] == 0 and ss["prune_rank"] == 4 and "prune.a" in streams
        assert config["ss_training"]["lora_rank"] == 32
        adapter_cfg = json.loads((out / "adapter_config.json").read_text())
        assert adapter_cfg["r"] == 32 and "q_proj" in adapter_cfg["target_modules"]
    # What was written reloads to the same model.
    reloaded = load_trained(out)
    res.model.eval()
    with torch.no_grad():
        a, b = res.model(ids), reloaded(ids)
    for x, y in zip(a, b, strict=True):
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_resume_continues_exactly(workdir, tmp_path):
    common = ["--max-steps", "4", "--save-every", "2", "--grad-accum", "2"]
    straight = tmp_path / "a"
    run_train(workdir, "llama", "shared", straight, *common)
    interrupted = tmp_path / "b"
    run_train(workdir, "llama", "shared", interrupted, *common)
    # Pretend the run died after the step-2 checkpoint.
    shutil.rmtree(interrupted / "checkpoints" / "step-00000004")
    for name in ("speculative_streams.safetensors", "adapter_model.safetensors", "config.json"):
        (interrupted / name).unlink()
    run_train(workdir, "llama", "shared", interrupted, *common, "--resume")
    for name in ("speculative_streams.safetensors", "adapter_model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(interrupted / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_rejects_changed_settings(workdir, tmp_path):
    out = tmp_path / "o"
    run_train(workdir, "llama", "lossless", out, "--max-steps", "2", "--save-every", "2")
    with pytest.raises(SystemExit, match="streams"):
        argv_extra = ["--max-steps", "4", "--resume"]
        train_cli.train(
            train_cli.build_parser().parse_args(
                [
                    "--model",
                    str(workdir / "llama"),
                    "--data",
                    str(workdir / "train.jsonl"),
                    "--mode",
                    "lossless",
                    "--streams",
                    "2",
                    "--stream-layers",
                    str(NS),
                    "--out",
                    str(out),
                    "--no-progress",
                    *argv_extra,
                ]  # fmt: skip
            )
        )


def test_hidden_cache_matches_uncached(workdir, tmp_path):
    args = ["--max-steps", "12", "--save-every", "0", "--prune-rank", "2"]  # 2 epochs
    on = run_train(workdir, "qwen3", "lossless", tmp_path / "on", *args, "--cache-hidden", "on")
    off = run_train(workdir, "qwen3", "lossless", tmp_path / "off", *args, "--cache-hidden", "off")
    a, b = on.model.ss_state_dict(), off.model.ss_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    la, lb = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.parametrize("targets", ["base", "soft"])
def test_own_targets_and_sampled_positions_cached_match_uncached(workdir, tmp_path, targets):
    # --targets base / soft: the labels are the frozen base's predictions (its top-K
    # distribution), whether they come from the cache (through its file for soft) or from the
    # forward; --stream-positions draws the same positions either way.
    args = ["--max-steps", "12", "--save-every", "0", "--targets", targets,
            "--stream-positions", "3"]  # fmt: skip
    cached = ("--cache-dir", str(tmp_path / "trunk")) if targets == "soft" else ()
    run = tmp_path / "on"
    if cached:  # the second run reads the targets back from the file the first one wrote
        run_train(workdir, "llama", "lossless", tmp_path / "fill", *args, *cached)
    on = run_train(workdir, "llama", "lossless", run, *args, "--cache-hidden", "on", *cached)
    off = run_train(workdir, "llama", "lossless", tmp_path / "off", *args, "--cache-hidden", "off")
    a, b = on.model.ss_state_dict(), off.model.ss_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert losses(tmp_path / "on", "streams") == pytest.approx(
        losses(tmp_path / "off", "streams"), rel=1e-4
    )
    # A random base does not predict the random training text: other labels, other losses;
    # and a soft distribution is not its argmax.
    other = "text" if targets == "base" else "base"
    run_train(workdir, "llama", "lossless", tmp_path / other, "--max-steps", "12",
              "--save-every", "0", "--stream-positions", "3", "--targets", other)  # fmt: skip
    assert losses(tmp_path / other, "streams") != pytest.approx(
        losses(tmp_path / "on", "streams"), rel=1e-3
    )


def test_bf16_autocast_trains_close_to_fp32_with_or_without_the_cache(workdir, tmp_path):
    args = ["--max-steps", "12", "--save-every", "0", "--targets", "base"]
    fp32 = run_train(workdir, "llama", "lossless", tmp_path / "f", *args)
    on = run_train(workdir, "llama", "lossless", tmp_path / "on", *args, "--autocast",
                   "bfloat16", "--cache-dir", str(tmp_path / "trunk"))  # fmt: skip
    off = run_train(workdir, "llama", "lossless", tmp_path / "off", *args, "--autocast",
                    "bfloat16", "--cache-hidden", "off")  # fmt: skip
    # The cache of a bf16 run is its own file (other states than fp32's).
    assert len(list((tmp_path / "trunk").glob("trunk-*.safetensors"))) == 1
    a, b, c = (r.model.ss_state_dict() for r in (fp32, on, off))
    assert all(v.dtype == torch.float32 for v in b.values())  # parameters stay fp32
    moved = 0.0
    for k in a:
        # Adam's first steps amplify rounding element-wise: compare whole tensors.
        scale = float(a[k].norm()) + 1e-6
        assert float((b[k] - c[k]).norm()) < 0.05 * scale, k
        assert float((b[k] - a[k]).norm()) < 0.05 * scale, k
        moved = max(moved, float((b[k] - a[k]).abs().max()))
    assert moved > 1e-6  # bf16 really ran: not bit-identical to fp32
    assert losses(tmp_path / "on", "streams") == pytest.approx(
        losses(tmp_path / "f", "streams"), rel=5e-2
    )


def test_cache_of_a_bf16_trunk_keeps_its_dtype(workdir, tmp_path):
    # The one stored layer's input goes back through the bf16 trunk's layers: it must stay bf16.
    args = ["--max-steps", "6", "--save-every", "0", "--dtype", "bfloat16"]
    on = run_train(workdir, "llama", "lossless", tmp_path / "on", *args, "--cache-hidden", "on")
    run_train(workdir, "llama", "lossless", tmp_path / "off", *args, "--cache-hidden", "off")
    assert losses(tmp_path / "on", "streams") == pytest.approx(
        losses(tmp_path / "off", "streams"), rel=2e-2
    )
    assert all(torch.isfinite(v).all() for v in on.model.ss_state_dict().values())


def test_trunk_cache_on_disk_is_reused_and_survives_damage(workdir, tmp_path, capfd):
    cache = tmp_path / "trunk"
    args = ["--max-steps", "12", "--save-every", "0", "--cache-dir", str(cache)]
    first = run_train(workdir, "llama", "lossless", tmp_path / "a", *args)
    [saved] = list(cache.glob("trunk-*.safetensors"))
    assert "trunk states of all 24 examples saved" in capfd.readouterr().err
    second = run_train(workdir, "llama", "lossless", tmp_path / "b", *args)
    assert "trunk states of" in capfd.readouterr().err  # loaded, not recomputed
    plain = run_train(workdir, "llama", "lossless", tmp_path / "c", "--max-steps", "12",
                      "--save-every", "0", "--cache-hidden", "off")  # fmt: skip
    for other in (second, plain):
        for k, v in first.model.ss_state_dict().items():
            torch.testing.assert_close(v, other.model.ss_state_dict()[k], atol=1e-5, rtol=1e-4)
    # Other settings: another file; a damaged file: one warning, recomputed, same result.
    run_train(workdir, "llama", "lossless", tmp_path / "d", *args, "--max-seq-len", "30")
    assert len(list(cache.glob("trunk-*.safetensors"))) == 2
    # A prefix run first, then the whole file: a second part holds the other examples.
    prefix = tmp_path / "trunk2"
    run_train(workdir, "llama", "lossless", tmp_path / "p", "--max-steps", "2", "--save-every",
              "0", "--cache-dir", str(prefix), "--max-examples", "4")  # fmt: skip
    [small] = list(prefix.glob("trunk-*.safetensors"))
    size = small.stat().st_size
    capfd.readouterr()
    run_train(workdir, "llama", "lossless", tmp_path / "q", "--max-steps", "12", "--save-every",
              "0", "--cache-dir", str(prefix))  # fmt: skip
    assert "trunk states of 4 examples" in capfd.readouterr().err
    parts = sorted(prefix.glob("trunk-*.safetensors"))
    assert len(parts) == 2 and small in parts and small.stat().st_size == size
    saved.write_bytes(saved.read_bytes()[:100])
    third = run_train(workdir, "llama", "lossless", tmp_path / "e", *args)
    assert "unreadable trunk cache" in capfd.readouterr().err
    for k, v in first.model.ss_state_dict().items():
        torch.testing.assert_close(v, third.model.ss_state_dict()[k], atol=1e-5, rtol=1e-4)
    # The damaged part is gone and its examples are in a new one: no warning any more.
    run_train(workdir, "llama", "lossless", tmp_path / "f", *args)
    err = capfd.readouterr().err
    assert "unreadable" not in err and "trunk states of 24 examples" in err


def test_trunk_cache_counts_a_prefix_run_complete_only_when_it_holds_the_prefix(tmp_path):
    from ss_mlx_convert.hidden_cache import FrozenBaseCache

    cache = FrozenBaseCache(tmp_path / "trunk-x.safetensors", "k")
    entry = tuple(torch.zeros(2) for _ in range(6))
    cache._store.update({i: entry for i in range(10, 20)})  # a longer run's examples
    assert not cache.holds_all(5) and not cache.holds_all(20)
    cache._store.update({i: entry for i in range(5)})
    assert cache.holds_all(5) and not cache.holds_all(6)


def test_trunk_cache_parts_outlive_a_run_cut_short(workdir, tmp_path, capfd):
    """One epoch (6 steps here) cut after 2 steps: its checkpoints keep the 8 trunks it had."""
    cache = tmp_path / "trunk"
    args = ("--cache-dir", str(cache), "--cache-hidden", "on", "--save-every", "1")
    run_train(workdir, "llama", "lossless", tmp_path / "a", "--max-steps", "2", *args)
    assert len(list(cache.glob("trunk-*.safetensors"))) == 2  # one part per checkpoint
    capfd.readouterr()
    whole = run_train(workdir, "llama", "lossless", tmp_path / "b", "--max-steps", "6", *args)
    err = capfd.readouterr().err
    assert "trunk states of 8 examples" in err and "all 24 examples saved" in err
    plain = run_train(workdir, "llama", "lossless", tmp_path / "c", "--max-steps", "6",
                      "--cache-hidden", "off")  # fmt: skip
    for k, v in plain.model.ss_state_dict().items():
        torch.testing.assert_close(v, whole.model.ss_state_dict()[k], atol=1e-5, rtol=1e-4)


def test_own_targets_need_a_frozen_base(workdir, tmp_path):
    with pytest.raises(SystemExit, match="frozen base"):
        run_train(workdir, "llama", "shared", tmp_path / "o", "--max-steps", "1",
                  "--targets", "base")  # fmt: skip


# ---- learning curve (--eval-every) -----------------------------------------------------------

STREAM_KEYS = {f"stream{j}_{k}" for j in range(1, G + 1) for k in ("acc", "top3", "loss")}
EVAL_KEYS = {"main_loss", "main_acc", "accepted_streams_mean"} | STREAM_KEYS  # as in eval.json
CURVE_KEYS = EVAL_KEYS | {"step", "tokens_per_pass", "wall_s"}


def curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval_curve.jsonl").read_text().splitlines()]


def test_eval_every_writes_the_curve_and_reuses_its_last_point(workdir, tmp_path, monkeypatch):
    calls = []
    evaluate = train_cli.evaluate
    monkeypatch.setattr(train_cli, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    out = tmp_path / "o"
    run_train(workdir, "llama", "lossless", out, "--max-steps", "5", "--save-every", "0",
              "--eval", str(workdir / "eval.jsonl"), "--eval-every", "2")  # fmt: skip
    records = curve(out)
    assert [r["step"] for r in records] == [2, 4, 5] and len(calls) == 3  # step 5 once
    assert all(set(r) == CURVE_KEYS for r in records)
    assert all(r["tokens_per_pass"] == 1 + r["accepted_streams_mean"] for r in records)
    assert [r["wall_s"] for r in records] == sorted(r["wall_s"] for r in records)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["step"] == 5 and all(ev[k] == records[-1][k] for k in EVAL_KEYS)
    # A fresh run into the same folder (flag or not) does not keep the old curve.
    run_train(workdir, "llama", "lossless", out, "--max-steps", "1", "--save-every", "0")
    assert not (out / "eval_curve.jsonl").exists()


def test_eval_curve_resumes_without_duplicates_or_a_discarded_future(workdir, tmp_path):
    common = ["--max-steps", "6", "--save-every", "2", "--eval", str(workdir / "eval.jsonl"),
              "--eval-every", "1"]  # fmt: skip
    straight = tmp_path / "a"
    run_train(workdir, "llama", "lossless", straight, *common)
    interrupted = tmp_path / "b"
    run_train(workdir, "llama", "lossless", interrupted, *common)
    # Pretend the run died after evaluating step 6 but before its checkpoint, and mark the
    # records of steps 5-6 (the future that resuming from step 4 discards).
    shutil.rmtree(interrupted / "checkpoints" / "step-00000006")
    records = curve(interrupted)
    for r in records[4:]:
        r["main_loss"] = 999.0
    (interrupted / "eval_curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_train(workdir, "llama", "lossless", interrupted, *common, "--resume")
    want, got = curve(straight), curve(interrupted)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got, strict=True):
        assert {k: v for k, v in a.items() if k != "wall_s"} == pytest.approx(
            {k: v for k, v in b.items() if k != "wall_s"}, rel=1e-6
        )
    # Resuming the finished run: no step runs, no record is added twice.
    run_train(workdir, "llama", "lossless", interrupted, *common, "--resume")
    assert [r["step"] for r in curve(interrupted)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "extra, message",
    [(["--eval-every", "2"], "--eval-every needs --eval"),
     (["--eval-every", "-1", "--eval", "E.jsonl"], "--eval-every must be 0 or more")],
)  # fmt: skip
def test_eval_every_bad_settings_are_one_line(workdir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        run_train(workdir, "llama", "lossless", tmp_path / "o", "--max-steps", "1", *extra)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


# ---- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(workdir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(workdir / "llama")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def scored_text(tokenizer, ex) -> str:
    return tokenizer.decode([t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])


def test_data_row_kinds(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hi", "completion": "yo"},
        {"messages": [{"role": "system", "content": "be"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b1"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d2"}]},
        {"text": "whole"},
    ])  # fmt: skip
    pc, msgs, text = load_examples(path, tokenizer)
    full = tokenizer.decode(pc.input_ids)
    assert full == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert scored_text(tokenizer, pc) == "yo<|im_end|>\n"
    assert scored_text(tokenizer, msgs) == "b1<|im_end|>\nd2<|im_end|>\n"
    assert tokenizer.decode(text.input_ids) == "whole<|im_end|>" and all(text.loss_mask)
    plain_path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "completion": "yo"}])
    plain = load_examples(plain_path, tokenizer, use_chat_template=False)[0]
    assert tokenizer.decode(plain.input_ids) == "hiyo<|im_end|>"
    assert scored_text(tokenizer, plain) == "yo<|im_end|>"
    short = load_examples(path, tokenizer, max_seq_len=5)
    assert all(len(e.input_ids) <= 5 for e in short)


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"prompt": "x"}, "'completion' must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"foo": 1}, "needs 'prompt'/'completion'"),
    ],
)
def test_data_errors_name_file_and_line(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", row])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        load_examples(path, tokenizer)


def test_collate_and_sharding():
    from ss_mlx_convert.data import Example

    batch = collate([Example([5, 6, 7], [0, 1, 1]), Example([8], [1])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    r0 = epoch_batches(11, 2, seed=3, epoch=0, rank=0, world=2)
    r1 = epoch_batches(11, 2, seed=3, epoch=0, rank=1, world=2)
    flat0, flat1 = sum(r0, []), sum(r1, [])
    assert len(r0) == len(r1) == 3 and len(flat0) == len(flat1) == 5
    assert not set(flat0) & set(flat1)
    assert epoch_batches(11, 2, 3, 1) != epoch_batches(11, 2, 3, 0)


# ---- distill ---------------------------------------------------------------------------------


def test_distill_batched_greedy_and_resumable(workdir, tmp_path):
    import transformers
    from ss_mlx_convert import distill

    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "cycle a 3"}, {"turns": ["hello there, long prompt"]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                      {"role": "user", "content": "z"}]},
    ])  # fmt: skip
    out = tmp_path / "o.jsonl"
    base = ["--model", str(workdir / "llama"), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"]  # fmt: skip
    assert distill.distill(distill.build_parser().parse_args([*base, "--limit", "2"])) == 2
    assert distill.distill(distill.build_parser().parse_args(base)) == 1
    assert distill.distill(distill.build_parser().parse_args(base)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("prompt") for r in rows[:2]] == ["cycle a 3", "hello there, long prompt"]
    assert rows[2]["messages"][-1]["role"] == "assistant"
    # Batched (left-padded) generation equals one-at-a-time generation.
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "llama").eval()
    for row in rows[:2]:
        msgs = [{"role": "user", "content": row["prompt"]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gen = model.generate(ids, do_sample=False, max_new_tokens=6, eos_token_id=3, pad_token_id=1)
        new = gen[0, ids.shape[1] :].tolist()
        new = new[: new.index(3)] if 3 in new else new
        assert row["completion"] == tok.decode(new, skip_special_tokens=True)


# ---- torchrun --------------------------------------------------------------------------------


def test_torchrun_two_cpu_processes(workdir, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2", "-m", "ss_mlx_convert.train",
        "--model", str(workdir / "qwen2"), "--data", str(workdir / "train.jsonl"),
        "--eval", str(workdir / "eval.jsonl"), "--mode", "shared", "--streams", str(G),
        "--stream-layers", str(NS), "--out", str(out), "--max-steps", "4", "--batch-size", "2",
        "--grad-accum", "2", "--save-every", "2", "--log-every", "2", "--no-progress",
        "--eval-every", "2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert COMMON | EXPECTED["shared"] | {"eval.json"} <= files
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
    ]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["main_n"] > 0 and ev["examples"] == 6
    assert [r["step"] for r in curve(out)] == [2, 4]  # rank 0 wrote each point once
    assert "eval on" in proc.stdout
    load_trained(out)


def test_rerun_in_another_mode_leaves_no_stale_files(workdir, tmp_path):
    out = tmp_path / "o"
    run_train(workdir, "llama", "shared", out, "--max-steps", "1", "--save-every", "0")
    assert (out / "adapter_model.safetensors").is_file()
    run_train(workdir, "llama", "lossless", out, "--max-steps", "1", "--save-every", "0")
    files = {p.name for p in out.iterdir()}
    assert "adapter_model.safetensors" not in files and "adapter_config.json" not in files
    assert len(losses(out)) == 1  # the log restarted
    assert load_trained(out).hf().config.model_type == "llama"


def test_eval_streams_script_matches_train_eval(workdir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    run_train(workdir, "llama", "lossless", out, "--max-steps", "6", "--save-every", "0",
              "--eval", str(workdir / "eval.jsonl"))  # fmt: skip
    script = Path(__file__).resolve().parents[1] / "examples/default_model/eval_streams.py"
    r = subprocess.run([sys.executable, str(script), "--run", str(out), "--data",
                        str(workdir / "eval.jsonl"), "--out", str(tmp_path / "e.json")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    want = json.loads((out / "eval.json").read_text())
    got = json.loads((tmp_path / "e.json").read_text())
    for key in ("stream1_acc", f"stream{G}_acc", "stream1_top3", "stream1_echo",
                "accepted_streams_mean"):  # fmt: skip
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_draft_vocab_trains_converts_and_decodes_exactly(workdir, tmp_path):
    """--draft-vocab: the streams' head covers the most frequent scored tokens; it trains, ships
    as int32 ids, passes the parity gate and decodes exactly what the base does."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from ss_mlx_convert.export import convert
    from ss_mlx_convert.pretrained import load_hf_tokenizer
    from ss_mlx_convert.shards import read_training_data

    import ss_mlx

    out, n = tmp_path / "out", 12
    res = run_train(workdir, "llama", "lossless", out, "--max-steps", "30", "--save-every", "0",
                    "--draft-vocab", str(n), "--eval", str(workdir / "eval.jsonl"))  # fmt: skip
    curve = losses(out, "streams")
    assert curve[-1] < 0.8 * curve[0], curve
    config = json.loads((out / "config.json").read_text())
    assert config["speculative_streaming"]["draft_vocab_size"] == n
    ids = load_file(str(out / "speculative_streams.safetensors"))["draft_vocab"]
    assert ids.dtype == torch.int32 and ids.shape == (n,) and bool((ids.diff() > 0).all())
    # The n most frequent scored tokens of the training data: none outside is more frequent.
    tok = load_hf_tokenizer(str(workdir / "llama"), "test")
    counts: dict[int, int] = {}
    for e in read_training_data(workdir / "train.jsonl", tok, 1024, True):
        for t, m in zip(e.input_ids, e.loss_mask, strict=True):
            counts[t] = counts.get(t, 0) + m
    inside = set(ids.tolist())
    assert min(counts.get(t, 0) for t in inside) >= max(
        (c for t, c in counts.items() if t not in inside), default=0
    )
    # Stream logits are -inf exactly outside the vocabulary; the main head is untouched.
    x = torch.randint(4, 80, (1, 10))
    with torch.no_grad():
        main, streams, _ = res.model(x)
    outside = torch.ones(streams.shape[-1], dtype=torch.bool)
    outside[ids.long()] = False
    assert torch.isinf(streams[..., outside]).all() and torch.isfinite(streams[..., ~outside]).all()
    assert torch.equal(main, fresh_logits(workdir / "llama", x))
    ev = json.loads((out / "eval.json").read_text())
    assert 0.0 < ev["stream1_acc"] <= ev["stream1_top3"] <= 1.0

    mlx_dir = convert(out, tmp_path / "mlx", check=True)  # the parity gate, stream logits too
    model, _ = ss_mlx.load(mlx_dir)
    assert model.streams.draft.ids.tolist() == ids.tolist()
    prompt = mx.array([5, 9, 17, 6, 30, 8], dtype=mx.int32)
    got = [s.token for s in ss_mlx.ss_generate_step(prompt, model, max_tokens=24, tree="2,2")]
    want = [t for t, _ in generate_step(prompt, model.base, max_tokens=24)]
    assert got == want
