"""How the dynamic tree's output memory pays off as a process serves more prompts of one task.

    python benchmarks/memory_warmup.py [--sets e2e,dialogsum] [--n 32] [--block 8]
        [--max-tokens 64] [--seed S] [--out DIR]

The dynamic tree drafts from the model's earlier outputs in this process (`OutputMemory`): a
formulaic task (E2E's restaurant descriptions) repeats across prompts what no one context holds,
so a server answering many such requests drafts better the longer it runs. Per set, one `ss-mlx
bench` (mlx-lm AR and the dynamic tree, interleaved per prompt, one process, greedy, parity
checked) over the first n prompts in the data set's order (or n drawn at random with --seed: a
sorted file puts similar prompts side by side); each prompt's dynamic run starts from the memory
of the prompts before it. Reported per block of `block` prompts: speedup over AR
(decode tokens/s, first pass excluded) and tokens per pass, so the first block is the cold start
and the later ones the warm memory. Writes NAME.{md,json,png} (--name, default memory_warmup;
measurements only: the prompts and outputs stay in ../shared/data) under
benchmarks/results/<machine>/ or --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import ss_mlx  # noqa: F401  (loads OpenBLAS before mlx.core on Linux)
from ss_mlx.bench import bench
from ss_mlx.bench.machine import plot_subtitle
from ss_mlx.files import savefig, write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dynamic_tree import SETS  # noqa: E402
from example_report import RESULTS, machine_slug  # noqa: E402

AR, DYNAMIC = "ar", "ss[dynamic]"


def run_set(name: str, args: argparse.Namespace) -> dict:
    """One bench over the set's first n prompts; its report (with every run)."""
    from ss_mlx.bench.datasets import data_root

    dataset = SETS[name]
    if dataset.endswith(".jsonl"):
        dataset = str(data_root() / dataset)
    seed = [] if args.seed is None else ["--seed", str(args.seed)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.json"
        bench.main(["--dataset", dataset, "--n", str(args.n), "--max-tokens",
                    str(args.max_tokens), "--methods", "ar,ss", "--tree", "dynamic",
                    "--warmup", "1", "--repeats", "1", *seed, "--json", str(path)])  # fmt: skip
        return json.loads(path.read_text())


def blocks(report: dict, block: int) -> list[dict]:
    """Per block of prompts: each method's decode tokens, seconds and passes, and the dynamic
    tree's speedup over AR and tokens per pass."""
    runs = [r for r in report["runs"] if r["repeat"] == 0]
    n = max(r["prompt"] for r in runs) + 1
    out = []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        agg: dict[str, list[float]] = {}
        for r in runs:
            if lo <= r["prompt"] < hi:
                a = agg.setdefault(r["method"], [0.0, 0.0, 0.0])
                a[0] += r["n_tokens"] - r["first_pass_tokens"]
                a[1] += r["decode_s"]
                a[2] += len(r["accepted"])
        if AR not in agg or DYNAMIC not in agg:
            raise SystemExit(f"error: block {lo}-{hi - 1} lacks a method's runs")
        ar_tps = agg[AR][0] / agg[AR][1]
        dyn_tokens, dyn_s, dyn_passes = agg[DYNAMIC]
        out.append({"prompts": [lo, hi - 1], "speedup": dyn_tokens / dyn_s / ar_tps,
                    "tokens_per_pass": dyn_tokens / dyn_passes, "ar_tps": ar_tps,
                    "dynamic_tps": dyn_tokens / dyn_s})  # fmt: skip
    return out


def stripped(report: dict) -> dict:
    """The report without third-party text: prompts' texts and generated token ids go."""
    for row in report.get("prompts", []):
        if isinstance(row, dict):
            row.update({k: None for k in ("text", "ar_tokens") if k in row})
    for r in report.get("runs", []):
        r["tokens"] = None
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="e2e,dialogsum", help=f"comma-separated of {', '.join(SETS)}")
    p.add_argument("--n", type=int, default=32, help="prompts per set (in the set's order)")
    p.add_argument("--block", type=int, default=8, help="prompts per reported block")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=None, help="draw the n prompts at random")
    p.add_argument("--name", default="memory_warmup", help="output file stem")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    names = [s for s in args.sets.split(",") if s]
    bad = [s for s in names if s not in SETS]
    if bad or args.n < 1 or args.block < 1:
        raise SystemExit(f"error: unknown sets {bad}" if bad else "error: --n and --block >= 1")
    out = args.out or RESULTS / machine_slug()
    results, subtitle = {}, ""
    for name in names:
        print(f"\n## {name}\n", flush=True)
        report = run_set(name, args)
        results[name] = {"blocks": blocks(report, args.block), "bench": stripped(report)}
        subtitle = plot_subtitle(report.get("machine"))
    order = "in order" if args.seed is None else f"drawn at random, seed {args.seed}"
    lines = [f"Dynamic tree vs mlx-lm AR by block of {args.block} prompts (n = {args.n} "
             f"of each set, {order}, {args.max_tokens} tokens each, greedy, one process; each "
             "block's dynamic runs draft from the outputs of every prompt before them).", "",
             "| set | prompts | speedup vs AR | tokens/pass |", "|---|---|---:|---:|"]  # fmt: skip
    for name, res in results.items():
        for b in res["blocks"]:
            lines.append(f"| {name} | {b['prompts'][0]}-{b['prompts'][1]} | "
                         f"{b['speedup']:.2f}x | {b['tokens_per_pass']:.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    write_text(out / f"{args.name}.md", text)
    write_json(out / f"{args.name}.json", {"command": "python benchmarks/memory_warmup.py " +
                                            " ".join(argv if argv is not None else sys.argv[1:]),
                                            "sets": results})  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, res in results.items():
        xs = [b["prompts"][1] + 1 for b in res["blocks"]]
        axes[0].plot(xs, [b["speedup"] for b in res["blocks"]], "o-", label=name)
        axes[1].plot(xs, [b["tokens_per_pass"] for b in res["blocks"]], "o-", label=name)
    for ax, label in zip(axes, ("speedup vs mlx-lm AR (block)", "tokens per pass (block)"),
                         strict=True):
        ax.set_xlabel("prompts served so far (end of block)")
        ax.set_ylabel(label)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Dynamic tree: drafting from earlier outputs as a process serves a task")
    fig.text(0.5, 0.01, subtitle, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    savefig(fig, out / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
