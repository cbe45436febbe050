"""Train the task models of the paper comparison (issue 7), resumably, one step after another.

For each task (E2E, WikiSQL), on identical data and step budget:
  baseline   LoRA rank 32, next-token loss only (shared-mode trainer with alpha_j = 0 and a
             single one-layer stream that gets no gradient), merged into a plain HF directory
  ss         Speculative Streaming, shared mode (LoRA rank 32, alpha_j = 0.1, gamma = 4,
             Ns per task)
  medusa     Medusa-1: 4 heads, one residual block each, on the frozen merged baseline
  ss-lossless  SS streams on the frozen merged baseline (lossless mode: P_j plus rank-8
             stream-only adapters in 4 stream layers, about Medusa's parameter count)
  draft      the baseline's first K layers (a truncated copy), LoRA-distilled on the
             baseline's own greedy outputs for the task's training prompts: mlx-lm's
             draft-model partner

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

import ss_mlx  # noqa: F401  (OpenBLAS preload before anything imports mlx)
from ss_mlx.bench.tasks import get_task, train_rows, write_jsonl
from ss_mlx.prepare.default_model import ensure_default_model

# Per task: the trainer budget shared by baseline, SS and Medusa, and the SS / draft shapes.
# Ns: the paper uses N/6 for SQL and N/2 for E2E; N/2 = 15 of SmolLM2's 30 layers would triple
# the training cost on this CPU, so E2E gets 6.
PLANS = {
    "e2e": {"steps": 120, "batch": 4, "stream_layers": 6, "draft_prompts": 384,
            "draft_tokens": 64, "draft_steps": 200},
    "wikisql": {"steps": 60, "batch": 4, "stream_layers": 5, "draft_prompts": 128,
                "draft_tokens": 48, "draft_steps": 80},
}
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


def run_task(name: str, work: Path, base: Path) -> None:
    task, plan = get_task(name), PLANS[name]
    t = work / name
    t.mkdir(parents=True, exist_ok=True)
    rows = train_rows(task)
    write_jsonl(t / "train.jsonl", rows)
    # Draft distillation prompts: every training prompt once, first come first served.
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))[: plan["draft_prompts"]]
    write_jsonl(t / "draft_prompts.jsonl", [{"prompt": p} for p in prompts])
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
    _step(work, f"{name}/medusa", t / "medusa_t", _ss_mlx(
        "train", "--model", str(t / "baseline"), "--data", str(t / "train.jsonl"),
        "--mode", "medusa", "--streams", str(STREAMS), "--cache-hidden", "on",
        "--stream-lr", EXTRA_LR,
        "--out", str(t / "medusa_t"), *budget, *chat), resumable=True)
    _step(work, f"{name}/medusa-convert", t / "medusa", _ss_mlx(
        "convert", "--torch", str(t / "medusa_t"), "--out", str(t / "medusa"), "--force"))
    # SS in lossless mode on the frozen merged baseline: the same footing as Medusa-1 (output
    # exactly the baseline's), with stream-only adapters sized to Medusa's parameter budget.
    _step(work, f"{name}/ss-lossless", t / "ss_lossless_t", _ss_mlx(
        "train", "--model", str(t / "baseline"), "--data", str(t / "train.jsonl"),
        "--mode", "lossless", "--streams", str(STREAMS), "--stream-layers", "4",
        "--adapter-rank", "8", "--cache-hidden", "on", "--stream-lr", EXTRA_LR,
        "--out", str(t / "ss_lossless_t"), *budget, *chat), resumable=True)
    _step(work, f"{name}/ss-lossless-convert", t / "ss_lossless", _ss_mlx(
        "convert", "--torch", str(t / "ss_lossless_t"), "--out", str(t / "ss_lossless"),
        "--check", "--force"))
    distilled = t / "draft_data.jsonl"
    if not distilled.with_name(distilled.name + ".done").exists():
        distilled.unlink(missing_ok=True)  # distill appends: never continue a partial file
    _step(work, f"{name}/distill", distilled, _ss_mlx(
        "distill", "--model", str(t / "baseline"), "--prompts", str(t / "draft_prompts.jsonl"),
        "--out", str(distilled), "--max-new-tokens", str(plan["draft_tokens"]),
        "--batch-size", "16", *chat))
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
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else ensure_default_model()
    for name in [s for s in args.tasks.split(",") if s]:
        run_task(name, work, base)


if __name__ == "__main__":
    main()
