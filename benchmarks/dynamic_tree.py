"""The dynamic hybrid tree against mlx-lm AR, fixed trees and prompt lookup on held-out sets.

    python benchmarks/dynamic_tree.py [--model DIR] [--out benchmarks/results/NAME]
        [--sets vicuna,ifeval,e2e,dialogsum,wikisql] [--n 4] [--max-tokens 64]

One `ss-mlx bench` per prompt set (methods interleaved per prompt, one process, greedy, parity
checked against mlx-lm), then one table over all sets: ``dynamic_tree.{md,json,png}`` in the
output folder (default ``benchmarks/results/<machine>``), with the per-set bench JSON beside it.
"""

import argparse
import json
import sys
from pathlib import Path

import ss_mlx  # noqa: F401  (loads OpenBLAS before mlx.core on Linux)
from ss_mlx.bench import bench
from ss_mlx.bench.datasets import data_root
from ss_mlx.files import savefig, write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_report import RESULTS, machine_slug  # noqa: E402

SETS = {  # name -> bench --dataset value
    "vicuna": "vicuna",
    "ifeval": "prompts/eval_ifeval.jsonl",
    "e2e": "e2e",
    "dialogsum": "dialogsum",
    "wikisql": "wikisql",
}
TREES = ("dynamic", "1", "3,2,1")


def run(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    model = ["--model", args.model] if args.model else []
    reports = {}
    for name in args.sets.split(","):
        dataset = SETS[name]
        if dataset.endswith(".jsonl"):
            dataset = str(data_root() / dataset)
        path = out / f"dynamic_{name}-set.json"
        if not (args.resume and path.is_file()):
            print(f"\n## {name}\n", flush=True)
            bench.main([*model, "--dataset", dataset, "--n", str(args.n),
                        "--max-tokens", str(args.max_tokens), "--methods", "ar,ss,lookup",
                        *(x for t in TREES for x in ("--tree", t)),
                        "--warmup", "1", "--repeats", str(args.repeats), "--json", str(path)])
            report = json.loads(path.read_text())
            # Third-party text stays in ../shared/data: neither the prompts nor the outputs
            # (a summary quotes its dialogue) are kept, only the measurements.
            for row in report.get("prompts", []):
                if isinstance(row, dict):
                    row.update({k: None for k in ("text", "ar_tokens") if k in row})
            write_json(path, report)
        reports[name] = json.loads(path.read_text())
    return reports


def table(reports: dict[str, dict]) -> tuple[str, list[dict]]:
    rows = []
    for name, rep in reports.items():
        for m in rep["methods"]:
            s = m["summary"] or {}
            rows.append({"set": name, "method": m["name"], "status": m["status"],
                         "tokens_per_pass": s.get("tokens_per_pass"),
                         "speedup": s.get("speedup"), "decode_tps": s.get("decode_tps"),
                         "mean_tree": s.get("mean_tree_size"),
                         "by_source": s.get("accepted_by_source") or {},
                         "by_depth": s.get("acceptance_by_depth") or [],
                         "tokens": s.get("tokens"), "passes": s.get("passes"),
                         "decode_tokens": s.get("decode_tokens"), "decode_s": s.get("decode_s"),
                         "peak_gb": (s.get("peak_memory_bytes") or 0) / 1e9})
    rows += overall(rows)
    lines = ["| set | method | parity | tokens/pass | speedup vs AR | mean tree | "
             "accepted by source | acceptance at depth 1/2/3 | peak GB |",
             "|---|---|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        src = ", ".join(f"{k} {v}" for k, v in sorted(r["by_source"].items()))
        depth = " / ".join("-" if a is None else f"{a:.0%}" for a in r["by_depth"][:3])
        lines.append(
            f"| {r['set']} | {r['method']} | {r['status']} | {r['tokens_per_pass']:.2f} | "
            f"{r['speedup']:.2f}x | {r['mean_tree'] or 0:.2f} | {src} | {depth} | "
            f"{r['peak_gb']:.3f} |")
    return "\n".join(lines) + "\n", rows


def overall(rows: list[dict]) -> list[dict]:
    """Per method, every set pooled: tokens / passes, and decode tokens/s over AR's."""
    def tps(rs: list[dict]) -> float:
        return sum(r["decode_tokens"] for r in rs) / sum(r["decode_s"] for r in rs)

    ok = [r for r in rows if r["status"] == "ok" and r["decode_s"]]
    sets = {r["set"] for r in ok}
    ar = [r for r in ok if r["method"] == "ar"]
    out = []
    for m in dict.fromkeys(r["method"] for r in ok):
        rs = [r for r in ok if r["method"] == m]
        if {r["set"] for r in rs} != sets or not ar:
            continue  # pooled only over the same sets as AR
        out.append({"set": "overall", "method": m, "status": "ok",
                    "tokens_per_pass": sum(r["tokens"] for r in rs) / sum(r["passes"] for r in rs),
                    "speedup": tps(rs) / tps(ar), "decode_tps": tps(rs),
                    "mean_tree": sum((r["mean_tree"] or 0) * r["passes"] for r in rs)
                    / sum(r["passes"] for r in rs),
                    "by_source": {}, "by_depth": [], "tokens": None, "passes": None,
                    "decode_tokens": None, "decode_s": None,
                    "peak_gb": max(r["peak_gb"] for r in rs)})
    return out


def plot(rows: list[dict], subtitle: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "ar"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        by = {r["set"]: r for r in rows if r["method"] == m}
        xs = [j + i * width for j in range(len(sets))]
        axes[0].bar(xs, [by[s]["speedup"] if s in by else 0 for s in sets], width, label=m)
        axes[1].bar(xs, [by[s]["tokens_per_pass"] if s in by else 0 for s in sets], width,
                    label=m)
    for ax, label in zip(axes, ("speedup vs mlx-lm AR", "tokens per forward pass"),
                         strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
        ax.set_ylabel(label)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("Dynamic hybrid tree vs fixed trees and prompt lookup (greedy, held-out sets)")
    fig.text(0.5, 0.01, subtitle, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    savefig(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the embedded default model)")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--n", type=int, default=4, help="prompts per set")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="reuse per-set JSON already written")
    args = p.parse_args(argv)
    out = args.out or RESULTS / machine_slug()
    out.mkdir(parents=True, exist_ok=True)
    reports = run(args, out)
    md, rows = table(reports)
    first = next(iter(reports.values()))
    machine = first.get("machine", {})
    subtitle = (f"{machine.get('cpu')} ({machine.get('cpu_count')} cores), "
                f"{machine.get('backend', {}).get('device')}, dtype {machine.get('dtype')}, "
                f"model {first.get('model', {}).get('name', '')}")
    command = "python benchmarks/dynamic_tree.py " + " ".join(argv or sys.argv[1:])
    write_text(out / "dynamic_tree.md", f"{subtitle}\n\n`{command}`\n\n{md}")
    write_json(out / "dynamic_tree.json", {"command": command, "rows": rows})
    plot(rows, subtitle, out / "dynamic_tree.png")
    print(md)


if __name__ == "__main__":
    main()
