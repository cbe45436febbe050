"""Train the task models of the paper comparison (issue 7), resumably, one step after another.

For each task (E2E, WikiSQL), on identical data and step budget:
  baseline   LoRA rank 32, next-token loss only (shared-mode trainer with alpha_j = 0 and a
             single one-layer stream that gets no gradient), merged into a plain HF directory
  ss         Speculative Streaming, shared mode (LoRA rank 32, alpha_j = 0.1, gamma = 4,
             Ns per task)
  medusa     Medusa-1: 4 heads, one residual block each, on the frozen merged baseline
  ss-lossless  SS streams on the frozen merged baseline (lossless mode: P_j plus rank-8
             stream-only adapters in 4 stream layers, about Medusa's parameter count)
  draft      the baseline's first K layers (a truncated copy), LoRA-distilled: mlx-lm's
             draft-model partner

Baseline and SS shared learn the task from the real references (E2E dev, WikiSQL train). The
three methods that only predict the baseline's output (medusa, ss-lossless, draft) train on one
distillation: the baseline's greedy answers (`ss-mlx distill`, WORK/TASK/distilled.jsonl) to
the task's training prompts plus, for E2E, `synth_mrs` new MRs recombined from dev's attribute
values (ss_mlx.bench.e2e_mr; dev has only 547 distinct MRs; the held-out test MRs are read only
to exclude collisions). WORK/TASK/synth_mrs.json records how many were synthesized and how many
the recombination allows.

Every step writes OUT/.done when it succeeded and is skipped afterwards; training steps pass
--resume when a checkpoint exists, so killing and rerunning this script continues where it
stopped. Wall time per step goes to WORK/runs.json.

    python benchmarks/paper_recipe.py --work work/paper            # all tasks
    python benchmarks/paper_recipe.py --work work/paper --tasks e2e
    python benchmarks/paper_table.py  --work work/paper            # then the table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ss_mlx  # noqa: F401  (OpenBLAS preload before anything imports mlx)
from ss_mlx.bench.datasets import DatasetError
from ss_mlx.bench.e2e_mr import mr_prompts, synthesize_e2e
from ss_mlx.bench.tasks import get_task, train_rows, write_jsonl
from ss_mlx.files import dump_json, write_text
from ss_mlx.prepare.default_model import ensure_default_model

# Per task: the trainer budget shared by baseline, SS and Medusa, and the SS / draft shapes.
# Ns: the paper uses N/6 for SQL and N/2 for E2E; N/2 = 15 of SmolLM2's 30 layers would triple
# the training cost on this CPU, so E2E gets 6.
# Distillation (the lossless-mode data): the first `distill_prompts` distinct training prompts
# (None: all 547 E2E dev MRs; WikiSQL: at least steps x batch, so Medusa and SS lossless see no
# row twice) plus `synth_mrs` synthesized E2E MRs, each answered in up to `draft_tokens` tokens.
PLANS = {
    "e2e": {"steps": 120, "batch": 4, "stream_layers": 6, "distill_prompts": None,
            "synth_mrs": 4000, "draft_tokens": 64, "draft_steps": 200},
    "wikisql": {"steps": 60, "batch": 4, "stream_layers": 5, "distill_prompts": 256,
                "synth_mrs": 0, "draft_tokens": 48, "draft_steps": 80},
}
SYNTH_SEED = 0
COMMON = ["--lr", "5e-4", "--warmup-steps", "10", "--max-seq-len", "256", "--seed", "0",
          "--save-every", "25", "--keep-checkpoints", "1", "--log-every", "10"]
STREAMS = 4
# The parameters each method adds (SS: P_j; Medusa: the heads) train at 8x the LoRA rate: at
# 5e-4 the stream embeddings move ~0.05 per step against hidden states of median |h| ~12, and
# after 70 steps the streams were still at ~5% top-1 (measured, first E2E attempt).
EXTRA_LR = "4e-3"
DRAFT_LAYERS = 6


def _ss_mlx(*args: str) -> list[str]:
    return [sys.executable, "-m", "ss_mlx", *args]


def _record(work: Path, key: str, seconds: float) -> None:
    path = work / "runs.json"
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[key] = {"wall_s": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=1) + "\n")
    tmp.replace(path)


def _step(work: Path, key: str, out: Path, cmd: list[str], resumable: bool = False) -> None:
    done = out / ".done" if out.suffix == "" else out.with_name(out.name + ".done")
    if done.exists():
        print(f"[{key}] done already", flush=True)
        return
    if resumable and (out / "checkpoints").is_dir():
        cmd = [*cmd, "--resume"]
    print(f"[{key}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"[{key}] failed with exit code {rc}")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text("ok\n")
    _record(work, key, time.perf_counter() - t0)


def _read_prompts(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def distill_prompts(
    name: str, rows: list[dict[str, str]], synth: int
) -> tuple[list[str], dict[str, Any] | None]:
    """The prompts the baseline answers for the lossless-mode methods: every training prompt
    once (first come first served, up to the plan's cap), then ``synth`` synthesized E2E MRs;
    with the synthesis counts when there are any."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))[: PLANS[name]["distill_prompts"]]
    if not synth:
        return prompts, None
    if name != "e2e":
        sys.exit(f"[{name}] synthesized prompts exist only for e2e, got synth_mrs={synth}")
    syn = synthesize_e2e(synth, seed=SYNTH_SEED)
    report = {**syn.to_dict(), "real_prompts": len(prompts)}
    prompts += mr_prompts(syn.mrs)
    report["distill_prompts"] = len(prompts)
    print(f"[{name}] {len(prompts)} distillation prompts: {report['real_prompts']} dev MRs + "
          f"{len(syn.mrs)} synthesized (of {report['new_possible']} new MRs dev's values allow)",
          flush=True)
    return prompts, report


def _prepare_distill(name: str, t: Path, prompts: list[str], report: dict[str, Any] | None) -> Path:
    """Write the prompt file and the synthesis counts; refuse a finished distillation of other
    prompts; trim a partial one to rows of these prompts (distill skips prompts it has answered
    and drops a torn last line, so it continues there)."""
    distilled, prompt_file = t / "distilled.jsonl", t / "distill_prompts.jsonl"
    if distilled.with_name(distilled.name + ".done").exists():
        if _read_prompts(prompt_file) != prompts:
            sys.exit(f"[{name}] {distilled} answers other prompts than this plan's (changed "
                     "distill_prompts, synth_mrs or data?): remove it and what trained on it")
        return distilled
    write_jsonl(prompt_file, [{"prompt": p} for p in prompts])
    if report is None:
        (t / "synth_mrs.json").unlink(missing_ok=True)
    else:
        write_text(t / "synth_mrs.json", dump_json(report))
    if distilled.is_file():
        wanted, kept = set(prompts), []
        for line in distilled.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("prompt"), str) \
                    and row["prompt"] in wanted:
                kept.append(row)
        write_jsonl(distilled, kept)
    return distilled


def run_task(name: str, work: Path, base: Path, synth: int | None = None) -> None:
    task, plan = get_task(name), PLANS[name]
    t = work / name
    t.mkdir(parents=True, exist_ok=True)
    rows = train_rows(task)
    write_jsonl(t / "train.jsonl", rows)
    prompts, report = distill_prompts(name, rows, plan["synth_mrs"] if synth is None else synth)
    distilled = _prepare_distill(name, t, prompts, report)
    chat = [] if task.chat else ["--no-chat-template"]
    budget = ["--max-steps", str(plan["steps"]), "--batch-size", str(plan["batch"]), *COMMON]

    _step(work, f"{name}/baseline", t / "baseline_t", _ss_mlx(
        "train", "--model", str(base), "--data", str(t / "train.jsonl"), "--mode", "shared",
        "--streams", "1", "--stream-layers", "1", "--alpha-streams", "0", "--lora-rank", "32",
        "--out", str(t / "baseline_t"), *budget, *chat), resumable=True)
    _step(work, f"{name}/baseline-merge", t / "baseline", _ss_mlx(
        "export-hf", "--torch", str(t / "baseline_t"), "--out", str(t / "baseline"), "--force"))
    _step(work, f"{name}/ss", t / "ss_t", _ss_mlx(
        "train", "--model", str(base), "--data", str(t / "train.jsonl"), "--mode", "shared",
        "--streams", str(STREAMS), "--stream-layers", str(plan["stream_layers"]),
        "--lora-rank", "32", "--stream-lr", EXTRA_LR, "--out", str(t / "ss_t"), *budget, *chat),
        resumable=True)
    _step(work, f"{name}/ss-convert", t / "ss", _ss_mlx(
        "convert", "--torch", str(t / "ss_t"), "--out", str(t / "ss"), "--check", "--force"))
    # One distillation feeds all three methods that predict the baseline's own output.
    _step(work, f"{name}/distill", distilled, _ss_mlx(
        "distill", "--model", str(t / "baseline"), "--prompts", str(t / "distill_prompts.jsonl"),
        "--out", str(distilled), "--max-new-tokens", str(plan["draft_tokens"]),
        "--batch-size", "16", *chat))
    _step(work, f"{name}/medusa", t / "medusa_t", _ss_mlx(
        "train", "--model", str(t / "baseline"), "--data", str(distilled),
        "--mode", "medusa", "--streams", str(STREAMS), "--cache-hidden", "on",
        "--stream-lr", EXTRA_LR,
        "--out", str(t / "medusa_t"), *budget, *chat), resumable=True)
    _step(work, f"{name}/medusa-convert", t / "medusa", _ss_mlx(
        "convert", "--torch", str(t / "medusa_t"), "--out", str(t / "medusa"), "--force"))
    # SS in lossless mode on the frozen merged baseline: the same footing as Medusa-1 (output
    # exactly the baseline's), with stream-only adapters sized to Medusa's parameter budget.
    _step(work, f"{name}/ss-lossless", t / "ss_lossless_t", _ss_mlx(
        "train", "--model", str(t / "baseline"), "--data", str(distilled),
        "--mode", "lossless", "--streams", str(STREAMS), "--stream-layers", "4",
        "--adapter-rank", "8", "--cache-hidden", "on", "--stream-lr", EXTRA_LR,
        "--out", str(t / "ss_lossless_t"), *budget, *chat), resumable=True)
    _step(work, f"{name}/ss-lossless-convert", t / "ss_lossless", _ss_mlx(
        "convert", "--torch", str(t / "ss_lossless_t"), "--out", str(t / "ss_lossless"),
        "--check", "--force"))
    _step(work, f"{name}/draft-init", t / "draft_init", _ss_mlx(
        "export-hf", "--torch", str(t / "baseline"), "--out", str(t / "draft_init"),
        "--layers", str(DRAFT_LAYERS), "--force"))
    _step(work, f"{name}/draft", t / "draft_t", _ss_mlx(
        "train", "--model", str(t / "draft_init"), "--data", str(distilled), "--mode", "shared",
        "--streams", "1", "--stream-layers", "1", "--alpha-streams", "0", "--lora-rank", "32",
        "--out", str(t / "draft_t"), "--max-steps", str(plan["draft_steps"]), "--batch-size", "8",
        *COMMON, *chat), resumable=True)
    _step(work, f"{name}/draft-merge", t / "draft", _ss_mlx(
        "export-hf", "--torch", str(t / "draft_t"), "--out", str(t / "draft"), "--force"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="work/paper", help="folder for data, checkpoints and models")
    p.add_argument("--tasks", default="e2e,wikisql")
    p.add_argument("--base", default=None, help="base HF model dir (default: the default model)")
    p.add_argument("--synth-mrs", type=int, default=None, metavar="N",
                   help="synthesized E2E MRs in the distillation prompts (default: the plan's, "
                        f"{PLANS['e2e']['synth_mrs']}); 0 distils the dev MRs only")
    args = p.parse_args(argv)
    if args.synth_mrs is not None and args.synth_mrs < 0:
        p.error(f"--synth-mrs must be >= 0, got {args.synth_mrs}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else ensure_default_model()
    for name in [s for s in args.tasks.split(",") if s]:
        try:
            run_task(name, work, base, args.synth_mrs if name == "e2e" else None)
        except DatasetError as e:
            sys.exit(f"[{name}] {e}")


if __name__ == "__main__":
    main()
