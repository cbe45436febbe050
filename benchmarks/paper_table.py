"""The paper comparison table (issue 7): every task model of paper_recipe.py, one process per task.

    python benchmarks/paper_recipe.py --work work/paper     # train (hours on a 2-core CPU)
    python benchmarks/paper_table.py  --work work/paper     # this: evaluate and write the table

Writes ``paper_<task>.json`` (every output and number) per task measured, and ``paper_table.md``
/ ``paper_table.png`` over all tasks measured so far, into ``benchmarks/results/<machine>/`` (or
--out): per task, Table 1 form (speedup vs the LoRA baseline's AR decoding, tokens per pass,
call-reduction ratio, quality, extra parameters) and Table 2 form (SS vs two-model speculative
decoding: calls and latency per sample), the training wall time of every model, and the paper's
own rows for the same tasks next to them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ss_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from ss_mlx.bench import compare
from ss_mlx.bench.bench import atomic_write, dump_json
from ss_mlx.bench.machine import summary_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_report import RESULTS, machine_slug  # noqa: E402
from paper_recipe import DRAFT_LAYERS, PLANS, STREAMS  # noqa: E402

# Evaluation size per task on a 2-core CPU (six methods, one process): ~10 min each.
EVAL = {"e2e": {"n": 20, "max_tokens": 96}, "wikisql": {"n": 20, "max_tokens": 64}}
# Every drafter gets the same budget: a chain of gamma = 4 tokens (the paper's Table 2 setting,
# k = 1), so the three methods verify the same number of rows per pass.
CHAIN = ",".join(["1"] * STREAMS)

PAPER = """Paper (arXiv 2402.11131 v1, Tables 1-2; A100, fp16, OPT-1.3b target, gamma = 4):

| task | method | speedup | CR ratio | metric | extra params |
|---|---|---:|---:|---:|---:|
| E2E-NLG | Medusa | 2.13 | 2.95 | 69.48/50.17 | 4.28E8 |
| E2E-NLG | SS | 2.45 | 3.72 | 69.32/50.51 | 4.096E4 |
| SqlContext | Medusa | 2.07 | 2.79 | 84.98 | 4.28E8 |
| SqlContext | SS | 2.39 | 3.57 | 87.40 | 4.096E4 |

Per-sample latency vs two-model SD (OPT-125m draft): E2E 345.72 ms (SD) vs 164.23 ms (SS);
SqlContext 269.24 ms vs 133.48 ms.
"""


def task_models(work: Path, task: str) -> compare.TaskModels:
    t = work / task
    need = {"baseline": t / "baseline", "ss": t / "ss"}
    missing = [str(p) for p in need.values() if not (p / ".done").exists()]
    if missing:
        sys.exit(f"paper_table: not trained yet: {', '.join(missing)} "
                 "(run benchmarks/paper_recipe.py first)")
    opt = {k: t / k if (t / k / ".done").exists() else None
           for k in ("medusa", "draft", "ss_lossless")}
    return compare.TaskModels(need["baseline"], need["ss"], opt["medusa"], opt["draft"],
                              opt["ss_lossless"])


def recipe_text(work: Path) -> str:
    runs_file = work / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    lines = ["Training (benchmarks/paper_recipe.py; LoRA rank 32 on all linear modules, lr 5e-4, "
             "bf16 autocast, batch and steps per task below, held-out learning curves in "
             f"paper_<task>_curves.md/png; SS gamma = {STREAMS}, alpha_j = 0.1; Medusa "
             f"{STREAMS} heads x 1 residual block on the frozen merged baseline; draft = the "
             f"baseline's first {DRAFT_LAYERS} layers, LoRA-distilled (batch 8); Medusa, SS "
             "lossless and the draft train on the baseline's greedy outputs for the training "
             f"prompts, E2E's plus {PLANS['e2e']['synth_mrs']} MRs recombined from dev's "
             "attribute values):", "",
             "| task | steps x batch | SS Ns | draft steps | run | wall time |",
             "|---|---|---:|---:|---|---:|"]
    for task, plan in PLANS.items():
        for key, r in runs.items():
            if key.startswith(f"{task}/"):
                lines.append(f"| {task} | {plan['steps']} x {plan['batch']} | "
                             f"{plan['stream_layers']} | {plan['draft_steps']} | "
                             f"{key.split('/', 1)[1]} | "
                             f"{r['wall_s'] / 60:.1f} min{_resumed(r)} |")
    return "\n".join(lines) + "\n"


def _resumed(record: dict) -> str:
    # A run carried across jobs: its wall time is the finishing job's share only.
    step = record.get("resumed_from_step")
    return f" (job resumed at step {step})" if step else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("work/paper"))
    p.add_argument("--tasks", default="e2e,wikisql")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--n", type=int, default=None, help="override the prompts per task")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tree", default=CHAIN, help="SS and Medusa tree as widths (default: a "
                   "chain of gamma); the draft model drafts a chain of the same depth")
    args = p.parse_args(argv)
    out = args.out or RESULTS / machine_slug()
    cmd = "python benchmarks/paper_table.py " + " ".join(argv if argv is not None else
                                                         sys.argv[1:])
    for task in [s for s in args.tasks.split(",") if s]:
        if task not in EVAL:
            sys.exit(f"paper_table: unknown task {task!r}; known: {', '.join(EVAL)}")
        ev = EVAL[task]
        print(f"## {task}", file=sys.stderr, flush=True)
        rep = compare.compare_task(task, task_models(args.work, task),
                                   n=args.n or ev["n"], max_tokens=ev["max_tokens"],
                                   tree=args.tree, medusa_tree=args.tree,
                                   num_draft=len(args.tree.split(",")), repeats=args.repeats)
        rep["command"] = cmd
        print(compare.format_task(rep), flush=True)
        atomic_write(out / f"paper_{task}.json", dump_json(rep))
    # The table holds every task measured so far (one file per task), so a task can be rerun
    # alone; each task's JSON records the command and machine that produced it.
    reports = [json.loads((out / f"paper_{t}.json").read_text())
               for t in EVAL if (out / f"paper_{t}.json").is_file()]
    md = [f"Machine: {summary_line(reports[0]['machine'])}", "",
          f"Greedy decoding, SS and Medusa tree `{args.tree}`, draft chain of "
          f"{len(args.tree.split(','))}; `-dynamic` rows: the same SS model with the dynamic "
          "hybrid tree (streams + prompt/output lookup, sized every step); one process per "
          "task, methods interleaved per prompt "
          f"({args.repeats} measured run(s) each after a warm-up). Speedup and CR ratio are "
          "against the LoRA baseline's AR decoding; `ss:ar` is AR decoding of the SS model "
          "itself (its lossless reference; shared-mode training changes the model).", ""]
    for r in reports:
        md += [f"Command: `{r.get('command')}`", "", compare.format_task(r)]
    md += [recipe_text(args.work), PAPER]
    atomic_write(out / "paper_table.md", "\n".join(md))
    compare.plot_reports(reports, out / "paper_table.png")
    print(f"wrote {out}/paper_table.md, paper_table.png, paper_<task>.json", file=sys.stderr)


if __name__ == "__main__":
    main()
