"""Compact stashes of training checkpoints (ss_mlx_convert.stash): resume across a lost work/."""

import json
import random
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from hf_tiny import make_tiny_hf, make_tiny_tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from ss_mlx_convert import stash as stash_mod  # noqa: E402
from ss_mlx_convert import train as train_cli  # noqa: E402
from ss_mlx_convert.learning_curve import CURVE_FILE, read_curve  # noqa: E402
from ss_mlx_convert.stash import StashError, restore, stash, stashed_step  # noqa: E402
from ss_mlx_convert.train_state import list_checkpoints, load_checkpoint  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stash")
    make_tiny_hf("llama", root / "llama", eos_token_id=3, bos_token_id=None, pad_token_id=1)
    make_tiny_tokenizer(root / "llama")
    rng = random.Random(0)
    for name, n in (("train.jsonl", 24), ("eval.jsonl", 4)):
        with open(root / name, "w") as f:
            for _ in range(n):
                a, k = rng.choice("abcdefgh"), rng.randint(2, 4)
                row = {"prompt": f"cycle {a} {k}",
                       "completion": "".join(chr(ord(a) + i % k) for i in range(16))}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    return root


def train(workdir: Path, out: Path, mode: str, *extra: str):
    argv = [
        "--model", str(workdir / "llama"), "--data", str(workdir / "train.jsonl"),
        "--mode", mode, "--streams", "2", "--stream-layers", "2", "--lora-rank", "4",
        "--out", str(out), "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2",
        "--max-steps", "8", "--save-every", "3", "--log-every", "2", "--no-progress",
        "--eval", str(workdir / "eval.jsonl"), "--eval-every", "3", *extra,
    ]  # fmt: skip
    return train_cli.train(train_cli.build_parser().parse_args(argv))


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for name in (
        "speculative_streams.safetensors",
        "adapter_model.safetensors",
        "medusa_heads.safetensors",
    ):
        if (out / name).is_file():
            found.update({f"{name}:{k}": v for k, v in load_file(str(out / name)).items()})
    return found


@pytest.mark.parametrize("mode", ["shared", "lossless", "medusa"])
def test_stash_restore_resume_matches_an_uninterrupted_run(workdir, tmp_path, mode):
    straight = tmp_path / "straight"
    train(workdir, straight, mode)
    run = tmp_path / "run"
    train(workdir, run, mode, "--keep-checkpoints", "9")
    for step in list_checkpoints(run / "checkpoints")[1:]:
        shutil.rmtree(step)  # keep only step 3, as if the job had ended before step 6
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    assert ckpt.name == "step-00000003"
    # A small file limit forces the tensors into several files.
    dest = stash(ckpt, tmp_path / "stash", max_file_bytes=20_000)
    files = sorted(dest.glob("stash-*.safetensors"))
    assert len(files) > 1 and all(f.stat().st_size <= 20_000 for f in files)
    assert stashed_step(dest) == 3
    original = load_checkpoint(ckpt)
    shutil.rmtree(run)  # the session ended: work/ is gone

    step_dir = restore(dest, run / "checkpoints")
    back = load_checkpoint(step_dir)
    assert back["step"] == 3 and back["args"] == original["args"]
    assert back["scheduler"] == original["scheduler"]
    assert back["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    assert torch.equal(back["rng"]["torch"], original["rng"]["torch"])
    assert back["rng"]["python"] == original["rng"]["python"]  # tuples, exactly
    for name, t in original["trainable"].items():
        assert back["trainable"][name].dtype == t.dtype
        torch.testing.assert_close(back["trainable"][name], t, rtol=1e-3, atol=1e-4)
    for k, s in original["optimizer"]["state"].items():
        assert torch.equal(back["optimizer"]["state"][k]["step"], s["step"])
        torch.testing.assert_close(back["optimizer"]["state"][k]["exp_avg_sq"], s["exp_avg_sq"],
                                   rtol=1e-2, atol=0)  # fmt: skip
    assert (run / CURVE_FILE).is_file()  # the curve came back (resume drops what follows 3)

    train(workdir, run, mode, "--resume")
    a, b = weights(straight), weights(run)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-3)
    assert [r["step"] for r in read_curve(run / CURVE_FILE)] == [3, 6, 8]


def test_final_stash_without_moments_rebuilds_the_output(workdir, tmp_path):
    run = tmp_path / "run"
    train(workdir, run, "lossless")
    done = weights(run)
    full = stash(list_checkpoints(run / "checkpoints")[-1], tmp_path / "full")
    final = stash(list_checkpoints(run / "checkpoints")[-1], tmp_path / "final", moments=False)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(final) < size(full) / 2  # parameters only
    shutil.rmtree(run)
    restore(final, run / "checkpoints")
    train(workdir, run, "lossless", "--resume")  # at the last step: no training, the output
    for k, v in weights(run).items():
        torch.testing.assert_close(v, done[k], rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def stashed(workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stashed")
    train(workdir, root / "run", "lossless", "--max-steps", "3")
    return stash(list_checkpoints(root / "run" / "checkpoints")[-1], root / "stash")


def _damage(d: Path, how: str) -> None:
    meta = json.loads((d / stash_mod.STASH_FILE).read_text())
    first = d / meta["files"][0]["name"]
    if how == "no folder":
        shutil.rmtree(d)
    elif how == "no json":
        (d / stash_mod.STASH_FILE).unlink()
    elif how == "bad json":
        (d / stash_mod.STASH_FILE).write_text('{"format": ')
    elif how == "not a stash":
        (d / stash_mod.STASH_FILE).write_text('{"format": "other"}')
    elif how == "missing file":
        first.unlink()
    elif how == "flipped byte":
        data = bytearray(first.read_bytes())
        data[-1] ^= 0xFF
        first.write_bytes(bytes(data))
    elif how == "missing tensor":
        meta["state"]["trainable"]["extra"] = {
            "__tensor__": {"dtype": "float32", "shape": [2], "key": "nowhere"}
        }
        (d / stash_mod.STASH_FILE).write_text(json.dumps(meta))
    elif how == "bad dtype":
        meta["state"]["trainable"]["x"] = {"__tensor__": {"dtype": "os.system", "data": []}}
        (d / stash_mod.STASH_FILE).write_text(json.dumps(meta))
    elif how == "path in name":
        meta["files"][0]["name"] = "../../etc/passwd"
        (d / stash_mod.STASH_FILE).write_text(json.dumps(meta))
    elif how == "no step":
        del meta["state"]["step"]
        (d / stash_mod.STASH_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how, message",
    [
        ("no folder", "no stash at"),
        ("no json", "stash.json missing"),
        ("bad json", "stash.json: damaged"),
        ("not a stash", "is not an ss-mlx training stash"),
        ("missing file", "stash-00000.safetensors missing: the stash is incomplete"),
        ("flipped byte", "stash-00000.safetensors is damaged"),
        ("missing tensor", "tensor nowhere is in none of the stash files"),
        ("bad dtype", "malformed tensor entry"),
        ("path in name", "malformed file entry"),
        ("no step", "does not hold step 3"),
    ],
)
def test_damaged_stash_is_a_one_line_error(stashed, tmp_path, how, message):
    d = tmp_path / "copy"
    shutil.copytree(stashed, d)
    _damage(d, how)
    with pytest.raises(StashError, match=message) as e:
        restore(d, tmp_path / "run" / "checkpoints")
    assert "\n" not in str(e.value)
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_stash_refuses_what_it_cannot_hold(workdir, stashed, tmp_path):
    with pytest.raises(StashError, match="cannot stash: no training checkpoint"):
        stash(tmp_path / "nothing", tmp_path / "s")
    ckpt = tmp_path / "ckpt" / "step-00000003"
    restore(stashed, ckpt.parent)
    with pytest.raises(StashError, match="over the 100-byte file limit"):
        stash(ckpt, tmp_path / "s", max_file_bytes=100)
    state = load_checkpoint(ckpt)
    name = next(iter(state["trainable"]))
    state["trainable"][name] = state["trainable"][name] + 1e6
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(StashError, match="exceeds float16's range"):
        stash(ckpt, tmp_path / "s")
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp*"))
