"""The committed example report: tune on this machine, then bench chat and E2E prompts.

    python benchmarks/example_report.py [--model DIR] [--out benchmarks/results/NAME]
        [--datasets chat,e2e] [--n 12] [--max-tokens 128] [--repeats 2] [--methods ar,ss]
        [--tree 1,1 ...] [--tune-prompts FILE]

Writes into the output folder (default ``benchmarks/results/<machine>``): ``tune.{json,png}``
and ``tuned_tree.json`` (from ``ss-mlx tune --no-save``: nothing goes into the user cache), then
``chat.{md,json,png}`` and ``e2e.{md,json,png}`` from ``ss-mlx bench`` with the model's own
tree and the tuned tree as two SS rows, every other method, and a 32-node verify-cost curve.
Every number in them comes from this one machine; the exact commands are in each file.
"""

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import ss_mlx  # noqa: F401  (loads OpenBLAS before mlx.core on Linux)
from ss_mlx.bench import bench, tune
from ss_mlx.bench.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def machine_slug() -> str:
    name = f"{platform.system()}-{platform.machine()}-{cpu_model()}".lower()
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-")[:60]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the embedded default model)")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--datasets", default="chat,e2e")
    # Sized for a 2-core CPU (a few tokens/s under load): ~1 h per data set there.
    p.add_argument("--n", default="12")
    p.add_argument("--max-tokens", default="128")
    p.add_argument("--repeats", default="2")
    p.add_argument("--methods", default=None, help="bench methods (default: all)")
    p.add_argument("--tree", action="append", default=[],
                   help="extra SS tree rows (repeatable), e.g. a sweep of chain depths")
    p.add_argument("--tune-prompts", nargs="+", default=None,
                   help="prompts for tune's acceptance measurement (default: tune's); keep "
                        "them apart from the benchmarked ones so the tree is not fit to them")
    args = p.parse_args(argv)
    out = args.out or RESULTS / machine_slug()
    out.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model] if args.model else []

    tune_prompts = ["--prompts", *args.tune_prompts] if args.tune_prompts else []
    tune.main([*model, *tune_prompts, "--no-save", "--json", str(out / "tune.json"),
               "--plot", str(out / "tune.png")])
    tuned = json.loads((out / "tune.json").read_text())["tree"]
    (out / "tuned_tree.json").write_text(json.dumps(tuned, indent=1) + "\n")
    for name in args.datasets.split(","):
        print(f"\n## {name}\n", flush=True)
        bench.main([
            *model, "--dataset", name, "--n", args.n, "--max-tokens", args.max_tokens,
            "--repeats", args.repeats, "--warmup", "1",
            *(["--methods", args.methods] if args.methods else []),
            "--tree", "default", "--tree", str(out / "tuned_tree.json"),
            *(x for t in args.tree for x in ("--tree", t)),
            "--verify-curve", "32",
            "--json", str(out / f"{name}.json"), "--markdown", str(out / f"{name}.md"),
            "--plot", str(out / f"{name}.png"),
        ])
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
