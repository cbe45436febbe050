"""What a decoding pass costs by row count under each BLAS this Linux machine has.

    python benchmarks/blas_curve.py [--blas NAME=LIB[:LIB] ...] [--rounds 3] [--max-t 16]

On a CPU, MLX sends every matmul to `cblas_sgemm`, so the BLAS library sets both the speed of
plain decoding (one row) and how much more a tree pass of T rows costs: the curve the dynamic
tree and `ss-mlx tune` price drafts with. Each configuration runs in a fresh process (the
library is bound when mlx.core loads; `SS_MLX_BLAS` picks it, see ss_mlx/_blas.py) that times,
on the default SS model after 256 cached tokens, mlx-lm's one-token forward (plain decoding's
step) and the SS tree pass over T = 1..max_t nodes (`ss_mlx.bench.tune.measure_verify_cost`).
Rounds alternate the configurations, so a load change hits all of them; medians over rounds.

Default configurations: the system OpenBLAS (what `import ss_mlx` loads) and, when installed
(`apt-get install libblis4-pthread`), BLIS in front of it (BLIS serves `cblas_sgemm`, OpenBLAS
the LAPACK routines BLIS lacks). Writes blas_curve.{md,json,png} under
benchmarks/results/<machine>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_report import RESULTS, machine_slug  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
BLIS = "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4"


def worker(max_t: int, repeats: int) -> None:
    """Measure in this process (its BLAS already chosen by SS_MLX_BLAS) and print JSON."""
    import ss_mlx
    from ss_mlx.bench.tune import measure_verify_cost
    from ss_mlx.prepare.default_model import ensure_default_model
    from ss_mlx.tuned import blas_name

    model, _ = ss_mlx.load(ensure_default_model(progress=False))
    m = measure_verify_cost(model, max_t=max_t, repeats=repeats, progress=False)
    print(json.dumps({"blas": blas_name(), "ar": m["ar_samples"], "ss": m["samples"]}))


def default_configs() -> dict[str, str]:
    configs = {"OpenBLAS (system)": OPENBLAS}
    if os.path.exists(BLIS):
        configs["BLIS + OpenBLAS LAPACK"] = f"{BLIS}{os.pathsep}{OPENBLAS}"
    return configs


def parse_blas(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, libs = item.partition("=")
        if not sep or not name or not libs:
            raise SystemExit(f"error: --blas wants NAME=LIB[:LIB], got {item!r}")
        missing = [p for p in libs.split(os.pathsep) if os.path.isabs(p) and not os.path.exists(p)]
        if missing:
            raise SystemExit(f"error: --blas {name}: no such file {missing[0]}")
        out[name] = libs
    return out


def measure(configs: dict[str, str], rounds: int, max_t: int, repeats: int) -> dict[str, dict]:
    from tqdm import tqdm

    runs: dict[str, dict] = {name: {"ar": [], "ss": [[] for _ in range(max_t)]} for name in configs}
    with tqdm(total=rounds * len(configs), desc="blas curve", unit="process") as bar:
        for _ in range(rounds):
            for name, libs in configs.items():
                env = {**os.environ, "SS_MLX_BLAS": libs}
                cmd = [sys.executable, __file__, "--worker", "--max-t", str(max_t),
                       "--repeats", str(repeats)]  # fmt: skip
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                if rec["blas"] != libs:
                    raise SystemExit(f"error: {name}: loaded {rec['blas']!r}, not {libs!r}")
                runs[name]["ar"] += rec["ar"]
                for t, samples in enumerate(rec["ss"]):
                    runs[name]["ss"][t] += samples
                bar.update()
    return {
        name: {"libraries": configs[name], "ar_s": float(np.median(r["ar"])),
               "ss_s": [float(np.median(s)) for s in r["ss"]], "samples": r}
        for name, r in runs.items()
    }  # fmt: skip


def report(res: dict[str, dict], out: Path, max_t: int) -> str:
    best = min(r["ar_s"] for r in res.values())
    ts = list(range(1, max_t + 1))
    lines = ["SS tree pass over T nodes (default model, 256 cached tokens), ms and in units of the "
             "fastest plain-decoding step (mlx-lm one-token forward) over all configurations.", "",
             "| BLAS | mlx-lm step ms | " + " | ".join(f"T={t}" for t in ts) + " |",
             "|---|---:|" + "---:|" * len(ts)]  # fmt: skip
    for name, r in res.items():
        cells = [f"{1e3 * s:.1f} ({s / best:.2f})" for s in r["ss_s"]]
        lines.append(f"| {name} | {1e3 * r['ar_s']:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ss_mlx.files import savefig

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, r) in enumerate(res.items()):
        ax.plot(ts, [1e3 * s for s in r["ss_s"]], "o-", color=f"C{i}", label=f"{name}: SS pass")
        ax.axhline(1e3 * r["ar_s"], color=f"C{i}", ls="--", lw=1,
                   label=f"{name}: mlx-lm one-token step")  # fmt: skip
    ax.set_xlabel("tree nodes T in the pass")
    ax.set_ylabel("ms per pass")
    ax.set_title(f"Pass cost by BLAS ({machine_slug()})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    savefig(fig, out / "blas_curve.png")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blas", action="append", default=[], help="NAME=LIB[:LIB] (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per T in each process")
    p.add_argument("--max-t", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.max_t, args.repeats)
        return
    if not sys.platform.startswith("linux"):
        raise SystemExit("error: blas_curve compares Linux BLAS libraries (macOS uses Accelerate)")
    configs = parse_blas(args.blas) if args.blas else default_configs()
    res = measure(configs, args.rounds, args.max_t, args.repeats)
    out = args.out or RESULTS / machine_slug()
    text = report(res, out, args.max_t)
    from ss_mlx.files import write_json, write_text

    write_text(out / "blas_curve.md", text)
    write_json(out / "blas_curve.json", {"max_t": args.max_t, "rounds": args.rounds,
                                         "repeats": args.repeats, "configs": res})  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
