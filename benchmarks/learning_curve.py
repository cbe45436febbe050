"""Held-out learning curves of `ss-mlx train --eval-every N` runs, side by side.

    python benchmarks/learning_curve.py RUN [RUN ...] --out PREFIX [--labels a,b,...]

Reads each run folder's `eval_curve.jsonl` (one record per evaluated step) and writes
`PREFIX.png` (held-out main next-token loss, stream top-1 and greedy-chain tokens per pass, each
against the optimizer step), `PREFIX.md` (each run's last point and its best tokens per pass) and
`PREFIX.json` (every record of every run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ss_mlx_convert.learning_curve import CURVE_FILE, read_curve

from ss_mlx.files import savefig, write_json, write_text

REQUIRED = ("main_loss", "tokens_per_pass")


def load_run(folder: Path) -> list[dict[str, Any]]:
    """A run folder's curve records; SystemExit with one line if the folder or file is bad."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no such run folder")
    path = folder / CURVE_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} missing (train with --eval E.jsonl --eval-every N)")
    try:
        records = read_curve(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {e}") from None
    if not records:
        raise SystemExit(f"error: {path} is empty")
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise SystemExit(f"error: {path}: the step-{r['step']} record lacks {missing}")
    return records


def num_streams(records: list[dict[str, Any]]) -> int:
    j = 0
    while f"stream{j + 1}_acc" in records[0]:
        j += 1
    return j


def table(runs: list[dict[str, Any]]) -> list[str]:
    G = max(num_streams(r["records"]) for r in runs)
    head = ["run", "last step", "main loss", *(f"s{j} top-1" for j in range(1, G + 1)),
            "tokens/pass", "best tokens/pass (step)", "wall min"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        last = run["records"][-1]
        best = max(run["records"], key=lambda r: r["tokens_per_pass"])
        cells = [run["label"], str(last["step"]), f"{last['main_loss']:.4f}"]
        cells += [
            f"{last[f'stream{j}_acc']:.1%}" if f"stream{j}_acc" in last else "-"
            for j in range(1, G + 1)
        ]
        wall = f"{last['wall_s'] / 60:.1f}" if "wall_s" in last else "-"
        cells += [f"{last['tokens_per_pass']:.3f}",
                  f"{best['tokens_per_pass']:.3f} ({best['step']})", wall]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax, tpp_ax) = plt.subplots(1, 3, figsize=(15, 4))
    styles = ["-", "--", ":", "-."]
    for k, run in enumerate(runs):
        color = f"C{k % 10}"
        rec = run["records"]
        steps = [r["step"] for r in rec]
        loss_ax.plot(steps, [r["main_loss"] for r in rec], "o-", ms=3, color=color,
                     label=run["label"])  # fmt: skip
        # One colour per run, one line style per stream.
        for j in range(1, num_streams(rec) + 1):
            acc_ax.plot(steps, [100 * r.get(f"stream{j}_acc", float("nan")) for r in rec],
                        styles[(j - 1) % len(styles)], marker="o", ms=3, color=color,
                        label=f"{run['label']} s{j}")  # fmt: skip
        tpp_ax.plot(steps, [r["tokens_per_pass"] for r in rec], "o-", ms=3, color=color,
                    label=run["label"])  # fmt: skip
    loss_ax.set_ylabel("held-out main next-token loss")
    acc_ax.set_ylabel("held-out stream top-1 (%)")
    tpp_ax.set_ylabel("tokens per pass (greedy chain)")
    for ax in (loss_ax, acc_ax, tpp_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="`ss-mlx train --out` folders")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: folder names)")
    p.add_argument("--out", required=True, type=Path, help="path prefix of the .png/.md/.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    labels = args.labels.split(",") if args.labels is not None else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} --labels for {len(args.runs)} runs")
    runs = [
        {"label": label, "run": str(folder), "records": load_run(folder)}
        for label, folder in zip(labels, args.runs, strict=True)
    ]
    out = args.out.with_suffix("") if args.out.suffix in (".png", ".md", ".json") else args.out
    lines = table(runs)
    write_text(out.with_name(out.name + ".md"), "\n".join(lines) + "\n")
    write_json(out.with_name(out.name + ".json"), runs)
    plot(runs, out.with_name(out.name + ".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
