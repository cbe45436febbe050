"""Train the task models of the paper comparison (issues 7, 14), resumably, one step after another.

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

Budget (issue 14): 10x the first attempt's steps (E2E 1200 x 4, WikiSQL 600 x 4; the draft
2000 / 800 x 8), bf16 autocast, and a held-out evaluation every EVAL_EVERY steps that writes
each run's learning curve (OUT/eval_curve.jsonl: next-token loss, per-stream top-1, tokens per
pass). Baseline and SS shared are evaluated on real references of held-out prompts (E2E:
VALID_MRS dev MRs drawn with VALID_SEED, all their reference rows, removed from the training
rows and from the MR synthesis; WikiSQL: valid.jsonl); medusa, ss-lossless and the draft on the
baseline's own greedy answers to the same prompts (a second, small distillation). At the end
benchmarks/learning_curve.py plots them all: RESULTS/paper_TASK_curves.{png,md,json}.

Baseline and SS shared learn the task from the real references (E2E dev, WikiSQL train). The
three methods that only predict the baseline's output (medusa, ss-lossless, draft) train on one
distillation: the baseline's greedy answers (`ss-mlx distill`, WORK/TASK/distilled.jsonl) to
the task's training prompts plus, for E2E, `synth_mrs` new MRs recombined from the training MRs'
attribute values (ss_mlx.bench.e2e_mr; dev has only 547 distinct MRs; the held-out test and
validation MRs are never synthesized). WORK/TASK/synth_mrs.json records the counts.

Every step writes OUT/.done when it succeeded and is skipped afterwards; training steps pass
--resume when a checkpoint exists, so killing and rerunning this script continues where it
stopped. Wall time per step goes to WORK/runs.json (copied to data/paper/runs.json).

Across jobs (a session here ends after three hours and takes work/ with it), data/paper/TASK/
carries what later runs need (see data/paper/README.md): `--stash` writes every unfinished
training step's newest checkpoint compactly (ss_mlx_convert.stash) to STEP/resume/; a training
step that finishes keeps its final parameters in STEP/final/ (no optimizer moments) and drops
resume/; a finished distillation keeps its completions as token ids (never text) in distill/ and
distill-valid/. Before each step the recipe restores from there: resume/ continues training,
final/ rebuilds the step's output without training (--resume at its last step), the token ids
rebuild the distilled JSONL. Use the same --work in every job (the trainer checks the data path).

    python benchmarks/paper_recipe.py --work work/paper            # all tasks
    python benchmarks/paper_recipe.py --work work/paper --tasks e2e
    python benchmarks/paper_recipe.py --work work/paper --stash    # before the job ends; commit
    python benchmarks/paper_table.py  --work work/paper            # then the table
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ss_mlx  # noqa: F401  (OpenBLAS preload before anything imports mlx)
from ss_mlx.bench.datasets import DatasetError, data_root
from ss_mlx.bench.e2e_mr import MR, mr_prompts, read_mrs, synthesize_e2e
from ss_mlx.bench.tasks import file_rows, get_task, train_rows, write_jsonl
from ss_mlx.files import dump_json, make_temp_dir, publish_dir, write_json, write_text
from ss_mlx.prepare.default_model import ensure_default_model

ROOT = Path(__file__).resolve().parents[1]
STASH = ROOT / "data" / "paper"

# Per task: the trainer budget shared by baseline, SS and Medusa, and the SS / draft shapes.
# Ns: the paper uses N/6 for SQL and N/2 for E2E; N/2 = 15 of SmolLM2's 30 layers would triple
# the training cost on this CPU, so E2E gets 6.
# Distillation (the lossless-mode data): the first `distill_prompts` distinct training prompts
# (None: all; E2E 507 training MRs, WikiSQL 999 questions, which 600 x 4 steps see ~2.4 times
# each) plus `synth_mrs` synthesized E2E MRs, each answered in up to `draft_tokens` tokens.
PLANS = {
    "e2e": {"steps": 1200, "batch": 4, "stream_layers": 6, "distill_prompts": None,
            "synth_mrs": 4000, "draft_tokens": 64, "draft_steps": 2000},
    "wikisql": {"steps": 600, "batch": 4, "stream_layers": 5, "distill_prompts": None,
                "synth_mrs": 0, "draft_tokens": 48, "draft_steps": 800},
}  # fmt: skip
SYNTH_SEED = 0
# Held-out validation: E2E has no split besides the untouched test file, so VALID_MRS dev MRs
# (drawn with VALID_SEED) leave training with every reference row; WikiSQL has its own file.
VALID_MRS = 40
VALID_SEED = 0
VALID_FILES = {"wikisql": "wikisql/valid.jsonl"}
EVAL_EVERY = 100
COMMON = ["--lr", "5e-4", "--warmup-steps", "10", "--max-seq-len", "256", "--seed", "0",
          "--save-every", "25", "--keep-checkpoints", "1", "--log-every", "10",
          "--autocast", "bfloat16", "--eval-every", str(EVAL_EVERY)]  # fmt: skip
STREAMS = 4
# The parameters each method adds (SS: P_j; Medusa: the heads) train at 8x the LoRA rate: at
# 5e-4 the stream embeddings move ~0.05 per step against hidden states of median |h| ~12, and
# after 70 steps the streams were still at ~5% top-1 (measured, first E2E attempt).
EXTRA_LR = "4e-3"
DRAFT_LAYERS = 6
# Training steps: name -> run folder under WORK/TASK, and the label of its learning curve.
TRAIN_STEPS = {"baseline": "baseline_t", "ss": "ss_t", "medusa": "medusa_t",
               "ss-lossless": "ss_lossless_t", "draft": "draft_t"}  # fmt: skip
CURVE_LABELS = {"baseline": "baseline (references)", "ss": "SS shared (references)",
                "medusa": "Medusa-1 (baseline answers)",
                "ss-lossless": "SS lossless (baseline answers)",
                "draft": "draft (baseline answers)"}  # fmt: skip
# Distillations: name -> (prompt file, output file) under WORK/TASK.
DISTILLS = {"distill": ("distill_prompts.jsonl", "distilled.jsonl"),
            "distill-valid": ("valid_prompts.jsonl", "distilled_valid.jsonl")}  # fmt: skip
RUNS_FILE = "runs.json"


@dataclass(frozen=True)
class Step:
    """One step of a task's plan: `name` (e.g. "ss", "ss-convert") writes `out`."""

    name: str
    out: Path
    cmd: list[str]

    @property
    def done(self) -> Path:
        """The marker of a finished step: OUT/.done, or FILE.done beside an output file."""
        if self.out.suffix == "":
            return self.out / ".done"
        return self.out.with_name(self.out.name + ".done")


def _ss_mlx(*args: str) -> list[str]:
    return [sys.executable, "-m", "ss_mlx", *args]


def plan_steps(name: str, t: Path, base: Path, chat: list[str]) -> list[Step]:
    """The task's steps in order (commands only: nothing is read or written here)."""
    plan = PLANS[name]
    budget = ["--max-steps", str(plan["steps"]), "--batch-size", str(plan["batch"]), *COMMON]
    refs = ["--eval", str(t / "valid.jsonl")]
    own = ["--eval", str(t / DISTILLS["distill-valid"][1])]
    distilled = t / DISTILLS["distill"][1]
    lora_only = ["--streams", "1", "--stream-layers", "1", "--alpha-streams", "0",
                 "--lora-rank", "32"]  # fmt: skip

    def distill(step: str, tokens: int) -> Step:
        prompts, out = DISTILLS[step]
        return Step(step, t / out, _ss_mlx(
            "distill", "--model", str(t / "baseline"), "--prompts", str(t / prompts),
            "--out", str(t / out), "--max-new-tokens", str(tokens), "--batch-size", "16",
            *chat))  # fmt: skip

    return [
        Step("baseline", t / "baseline_t", _ss_mlx(
            "train", "--model", str(base), "--data", str(t / "train.jsonl"), "--mode", "shared",
            *lora_only, "--out", str(t / "baseline_t"), *budget, *refs, *chat)),
        Step("baseline-merge", t / "baseline", _ss_mlx(
            "export-hf", "--torch", str(t / "baseline_t"), "--out", str(t / "baseline"),
            "--force")),
        Step("ss", t / "ss_t", _ss_mlx(
            "train", "--model", str(base), "--data", str(t / "train.jsonl"), "--mode", "shared",
            "--streams", str(STREAMS), "--stream-layers", str(plan["stream_layers"]),
            "--lora-rank", "32", "--stream-lr", EXTRA_LR, "--out", str(t / "ss_t"), *budget,
            *refs, *chat)),
        Step("ss-convert", t / "ss", _ss_mlx(
            "convert", "--torch", str(t / "ss_t"), "--out", str(t / "ss"), "--check", "--force")),
        # One distillation feeds all three methods that predict the baseline's own output.
        distill("distill", plan["draft_tokens"]),
        distill("distill-valid", plan["draft_tokens"]),
        Step("medusa", t / "medusa_t", _ss_mlx(
            "train", "--model", str(t / "baseline"), "--data", str(distilled),
            "--mode", "medusa", "--streams", str(STREAMS), "--cache-hidden", "on",
            "--stream-lr", EXTRA_LR, "--out", str(t / "medusa_t"), *budget, *own, *chat)),
        Step("medusa-convert", t / "medusa", _ss_mlx(
            "convert", "--torch", str(t / "medusa_t"), "--out", str(t / "medusa"), "--force")),
        # SS in lossless mode on the frozen merged baseline: the same footing as Medusa-1 (output
        # exactly the baseline's), with stream-only adapters sized to Medusa's parameter budget.
        Step("ss-lossless", t / "ss_lossless_t", _ss_mlx(
            "train", "--model", str(t / "baseline"), "--data", str(distilled),
            "--mode", "lossless", "--streams", str(STREAMS), "--stream-layers", "4",
            "--adapter-rank", "8", "--cache-hidden", "on", "--stream-lr", EXTRA_LR,
            "--out", str(t / "ss_lossless_t"), *budget, *own, *chat)),
        Step("ss-lossless-convert", t / "ss_lossless", _ss_mlx(
            "convert", "--torch", str(t / "ss_lossless_t"), "--out", str(t / "ss_lossless"),
            "--check", "--force")),
        Step("draft-init", t / "draft_init", _ss_mlx(
            "export-hf", "--torch", str(t / "baseline"), "--out", str(t / "draft_init"),
            "--layers", str(DRAFT_LAYERS), "--force")),
        Step("draft", t / "draft_t", _ss_mlx(
            "train", "--model", str(t / "draft_init"), "--data", str(distilled),
            "--mode", "shared", *lora_only, "--out", str(t / "draft_t"),
            "--max-steps", str(plan["draft_steps"]), "--batch-size", "8", *COMMON, *own, *chat)),
        Step("draft-merge", t / "draft", _ss_mlx(
            "export-hf", "--torch", str(t / "draft_t"), "--out", str(t / "draft"), "--force")),
    ]  # fmt: skip


# ---- data -------------------------------------------------------------------------------------


def validation_split(
    name: str, rows: list[dict[str, str]], root: str | Path | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[MR]]:
    """(training rows, validation rows, held-out E2E MRs). E2E: VALID_MRS dev MRs drawn with
    VALID_SEED leave `rows` with all their references; WikiSQL: its valid.jsonl."""
    if name != "e2e":
        return rows, file_rows(get_task(name), VALID_FILES[name], root), []
    mrs = read_mrs(data_root(root) / get_task("e2e").train_file)
    held = random.Random(VALID_SEED).sample(mrs, VALID_MRS)
    # Dev's MR text is already canonical (the order and format render_mr writes), so a held-out
    # MR's prompt is exactly its rows' prompt.
    held_prompts = set(mr_prompts(held))
    valid = [r for r in rows if r["prompt"] in held_prompts]
    missing = len(held_prompts) - len({r["prompt"] for r in valid})
    if missing:
        sys.exit(f"[e2e] {missing} held-out MRs match no training row (dev's MR text is not in "
                 "canonical form?)")  # fmt: skip
    return [r for r in rows if r["prompt"] not in held_prompts], valid, held


def _read_prompts(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def distill_prompts(
    name: str, rows: list[dict[str, str]], synth: int, exclude: list[MR] | None = None
) -> tuple[list[str], dict[str, Any] | None]:
    """The prompts the baseline answers for the lossless-mode methods: every training prompt
    once (first come first served, up to the plan's cap), then ``synth`` synthesized E2E MRs
    (none in ``exclude``, the held-out validation MRs, nor drawn from them); with the synthesis
    counts when there are any."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))[: PLANS[name]["distill_prompts"]]
    if not synth:
        return prompts, None
    if name != "e2e":
        sys.exit(f"[{name}] synthesized prompts exist only for e2e, got synth_mrs={synth}")
    syn = synthesize_e2e(synth, seed=SYNTH_SEED, exclude=exclude or ())
    report = {**syn.to_dict(), "real_prompts": len(prompts)}
    prompts += mr_prompts(syn.mrs)
    report["distill_prompts"] = len(prompts)
    print(f"[{name}] {len(prompts)} distillation prompts: {report['real_prompts']} dev MRs + "
          f"{len(syn.mrs)} synthesized (of {report['new_possible']} new MRs dev's values allow)",
          flush=True)  # fmt: skip
    return prompts, report


def _prepare_distill(name: str, distilled: Path, prompt_file: Path, prompts: list[str]) -> Path:
    """Write the prompt file; refuse a finished distillation of other prompts; trim a partial
    one to rows of these prompts (distill skips prompts it has answered and drops a torn last
    line, so it continues there)."""
    if distilled.with_name(distilled.name + ".done").exists():
        if _read_prompts(prompt_file) != prompts:
            sys.exit(
                f"[{name}] {distilled} answers other prompts than this plan's (changed "
                "distill_prompts, synth_mrs or data?): remove it and what trained on it"
            )
        return distilled
    write_jsonl(prompt_file, [{"prompt": p} for p in prompts])
    if distilled.is_file():
        wanted, kept = set(prompts), []
        for line in distilled.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (
                isinstance(row, dict)
                and isinstance(row.get("prompt"), str)
                and row["prompt"] in wanted
            ):
                kept.append(row)
        write_jsonl(distilled, kept)
    return distilled


# ---- steps, and their carry between jobs ------------------------------------------------------


def _record(work: Path, stash_root: Path, key: str, seconds: float, start: int) -> None:
    """Wall time of the attempt that finished `key` (`start`: the step it resumed from)."""
    path = work / RUNS_FILE
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[key] = {"wall_s": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if start:
        runs[key]["resumed_from_step"] = start
    write_json(path, runs)
    write_json(stash_root / RUNS_FILE, runs)


def _sync_runs(work: Path, stash_root: Path) -> None:
    """Bring back the records of steps a previous job finished (work/ is gone with it)."""
    carried = stash_root / RUNS_FILE
    if not carried.is_file():
        return
    path = work / RUNS_FILE
    runs = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**json.loads(carried.read_text()), **runs})


def _checkpoint_step(run: Path) -> int:
    from ss_mlx_convert.train_state import list_checkpoints

    found = list_checkpoints(run / "checkpoints")
    return int(found[-1].name.removeprefix("step-")) if found else 0


def _max_steps(cmd: list[str]) -> int:
    return int(cmd[cmd.index("--max-steps") + 1])


def _restore_training(key: str, run: Path, stash_dir: Path) -> None:
    """Rebuild the stashed checkpoint (final/, else resume/) when the run has none as new."""
    from ss_mlx_convert import stash as compact

    try:
        for kind in ("final", "resume"):
            step = compact.stashed_step(stash_dir / kind)
            if step is None:
                continue
            if step > _checkpoint_step(run):
                compact.restore(stash_dir / kind, run / "checkpoints")
                print(f"[{key}] restored step {step} from {stash_dir / kind}", flush=True)
            return
    except compact.StashError as e:
        sys.exit(f"[{key}] {e}")


def _stash_final(key: str, run: Path, stash_dir: Path) -> bool:
    """Keep a finished run's final parameters (no optimizer moments) and drop its resume/;
    False when the run left no checkpoint to keep."""
    from ss_mlx_convert import stash as compact
    from ss_mlx_convert.train_state import list_checkpoints

    found = list_checkpoints(run / "checkpoints")
    if not found:
        print(f"[{key}] no checkpoint to keep: a later job will train it again", flush=True)
        return False
    try:
        compact.stash(found[-1], stash_dir / "final", moments=False)
    except compact.StashError as e:
        sys.exit(f"[{key}] {e}")
    shutil.rmtree(stash_dir / "resume", ignore_errors=True)
    print(f"[{key}] final parameters kept in {stash_dir / 'final'}", flush=True)
    return True


def _rebuild_from_final(key: str, step: Step, stash_dir: Path) -> None:
    """Rewrite a just-trained step's output from its kept (fp16) final parameters, so the
    models later steps build on are the same in this job as in any later one that rebuilds
    them from the stash (the baseline above all: every lossless method copies its output)."""
    shutil.rmtree(step.out / "checkpoints", ignore_errors=True)
    _restore_training(key, step.out, stash_dir)
    rc = subprocess.call([*step.cmd, "--resume"])
    if rc != 0:
        sys.exit(f"[{key}] rebuilding the output from {stash_dir / 'final'} failed ({rc})")


def _stash_resume(key: str, run: Path, stash_dir: Path) -> None:
    """Stash an unfinished run's newest checkpoint in resume/ (unless it holds that step)."""
    from ss_mlx_convert import stash as compact
    from ss_mlx_convert.train_state import list_checkpoints

    found = list_checkpoints(run / "checkpoints")
    if not found:
        return
    step = _checkpoint_step(run)
    try:
        if compact.stashed_step(stash_dir / "final") is not None:
            return  # finished in an earlier job; this run only rebuilds its output
        if compact.stashed_step(stash_dir / "resume") == step:
            print(f"[{key}] step {step} stashed already", flush=True)
            return
    except compact.StashError:
        pass  # a damaged stash is replaced
    try:
        compact.stash(found[-1], stash_dir / "resume")
    except compact.StashError as e:
        sys.exit(f"[{key}] {e}")
    print(f"[{key}] stashed step {step} in {stash_dir / 'resume'}", flush=True)


def _baseline_id(task_root: Path) -> str | None:
    """What identifies the baseline a distillation came from: its final stash's index file."""
    from ss_mlx_convert.shards import sha256_file
    from ss_mlx_convert.stash import STASH_FILE

    index = task_root / "baseline" / "final" / STASH_FILE
    return sha256_file(index) if index.is_file() else None


def _tokenizer(t: Path) -> Any:
    from ss_mlx_convert.pretrained import load_hf_tokenizer

    return load_hf_tokenizer(t / "baseline", "paper recipe")


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def keep_distilled(key: str, t: Path, step: str, task_root: Path) -> None:
    """Store a finished distillation as token ids (convert/shards.py's format, no text) in
    task_root/<step>: one record per output row, in the output's order, keyed by its prompt's
    row in the prompt file (rebuilt from the data and the seed, checked by sha256)."""
    from ss_mlx_convert.shards import (
        MANIFEST,
        Record,
        sha256_file,
        shard_name,
        write_json_atomic,
        write_shard,
    )

    prompt_file, distilled = (t / name for name in DISTILLS[step])
    index = {p: i for i, p in enumerate(_read_prompts(prompt_file))}
    tokenizer = _tokenizer(t)
    limit = PLANS[key.split("/")[0]]["draft_tokens"]
    records = []
    for line in distilled.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        ids = tokenizer.encode(row["completion"], add_special_tokens=False)
        if _text(tokenizer, ids) != row["completion"] or row["prompt"] not in index:
            print(f"[{key}] a row of {distilled} does not survive encoding to ids: not stored "
                  "(a later job distils again)", flush=True)  # fmt: skip
            return
        # finish is inferred from the re-encoded length (the JSONL does not say).
        finish = "length" if len(ids) >= limit else "eos"
        records.append(Record(prompt_file.name, index[row["prompt"]], [], ids, finish))
    if not records:
        return
    dest = task_root / step
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest)
    try:
        entry = write_shard(tmp / shard_name(0), records, len(tokenizer))
        write_json_atomic(tmp / MANIFEST, {
            "format": "ss-mlx-distilled-shards", "shards": [entry], "records": len(records),
            "prompts_file": prompt_file.name, "prompts_sha256": sha256_file(prompt_file),
            "baseline": _baseline_id(task_root),
            "note": "completion ids re-encoded from the distilled text (round trip checked); "
                    "prompt ids not stored; finish inferred from the length",
        })  # fmt: skip
        publish_dir(tmp, dest, overwrite=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[{key}] {len(records)} distilled rows kept as token ids in {dest}", flush=True)


def rebuild_distilled(key: str, t: Path, step: str, task_root: Path) -> bool:
    """Write the distilled JSONL back from stored ids (the same bytes distill wrote) when they
    answer this plan's prompts with this baseline; whether it did."""
    from ss_mlx_convert.shards import MANIFEST, ShardError, load_shards, read_manifest, sha256_file

    src = task_root / step
    if not (src / MANIFEST).is_file():
        return False
    prompt_file, distilled = (t / name for name in DISTILLS[step])
    try:
        manifest = read_manifest(src)
        if manifest.get("prompts_sha256") != sha256_file(prompt_file) or manifest.get(
            "baseline"
        ) != _baseline_id(task_root):
            print(f"[{key}] {src} answers other prompts or another baseline: distilling again",
                  flush=True)  # fmt: skip
            return False
        records = list(load_shards(src))
    except ShardError as e:
        sys.exit(f"[{key}] {e}")
    prompts, tokenizer = _read_prompts(prompt_file), _tokenizer(t)
    if any(r.row >= len(prompts) for r in records):
        sys.exit(f"[{key}] {src}: a record's prompt row is past the end of {prompt_file}")
    write_jsonl(distilled, [{"prompt": prompts[r.row],
                             "completion": _text(tokenizer, r.completion_ids)}
                            for r in records])  # fmt: skip
    print(f"[{key}] {distilled} rebuilt from the token ids in {src}", flush=True)
    return True


def run_step(work: Path, task: str, step: Step, stash_root: Path = STASH) -> None:
    """Run one step unless done; a training step restores from, and keeps its result in,
    stash_root/<task>/<step>; a distillation is rebuilt from, or kept as, token ids there."""
    key, task_root = f"{task}/{step.name}", stash_root / task
    if step.done.exists():
        print(f"[{key}] done already", flush=True)
        return
    cmd, start = step.cmd, 0
    if step.name in TRAIN_STEPS:
        _restore_training(key, step.out, task_root / step.name)
        if (step.out / "checkpoints").is_dir():
            cmd, start = [*cmd, "--resume"], _checkpoint_step(step.out)
    elif step.name in DISTILLS and rebuild_distilled(key, step.out.parent, step.name, task_root):
        step.done.write_text("ok\n")
        return
    print(f"[{key}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"[{key}] failed with exit code {rc}")
    step.done.parent.mkdir(parents=True, exist_ok=True)
    step.done.write_text("ok\n")
    if step.name in TRAIN_STEPS:
        # A run resumed at its last step only rebuilt its output from what is kept already:
        # its record and final stash stay those of the job that trained it.
        if start < _max_steps(cmd) or not (task_root / step.name / "final").is_dir():
            _record(work, stash_root, key, time.perf_counter() - t0, start)
            if _stash_final(key, step.out, task_root / step.name):
                _rebuild_from_final(key, step, task_root / step.name)
        return
    _record(work, stash_root, key, time.perf_counter() - t0, start)
    if step.name in DISTILLS:
        keep_distilled(key, step.out.parent, step.name, task_root)


def stash_task(name: str, work: Path, stash_root: Path) -> None:
    """--stash: each unfinished training step's newest checkpoint to <step>/resume/; what a
    finished step or distillation should have kept and has not, kept now."""
    from ss_mlx_convert.shards import MANIFEST

    t, root = work / name, stash_root / name
    for step, folder in TRAIN_STEPS.items():
        run, key = t / folder, f"{name}/{step}"
        if (run / ".done").exists():
            if not (root / step / "final").is_dir():
                _stash_final(key, run, root / step)
        else:
            _stash_resume(key, run, root / step)
    for step, (_, out) in DISTILLS.items():
        done = (t / out).with_name(out + ".done").exists()
        if done and not (root / step / MANIFEST).is_file() and (t / "baseline").is_dir():
            keep_distilled(f"{name}/{step}", t, step, root)


def write_curves(name: str, t: Path, results: Path) -> None:
    """Every training step's learning curve, side by side: results/paper_<task>_curves.*"""
    runs = [(CURVE_LABELS[s], t / folder) for s, folder in TRAIN_STEPS.items()
            if (t / folder / "eval_curve.jsonl").is_file()]  # fmt: skip
    if not runs:
        return
    import learning_curve  # benchmarks/, beside this script

    learning_curve.main([*(str(folder) for _, folder in runs),
                         "--labels", ",".join(label for label, _ in runs),
                         "--out", str(results / f"paper_{name}_curves")])  # fmt: skip


def run_task(
    name: str, work: Path, base: Path, results: Path, synth: int | None = None,
    stash_root: Path = STASH,
) -> None:  # fmt: skip
    task, plan = get_task(name), PLANS[name]
    t = work / name
    t.mkdir(parents=True, exist_ok=True)
    rows, valid, held = validation_split(name, train_rows(task))
    write_jsonl(t / "train.jsonl", rows)
    write_jsonl(t / "valid.jsonl", valid)
    prompts, report = distill_prompts(
        name, rows, plan["synth_mrs"] if synth is None else synth, held
    )
    if report is None:
        (t / "synth_mrs.json").unlink(missing_ok=True)
    else:
        write_text(t / "synth_mrs.json", dump_json(report))
    for step, prompt_list in (
        ("distill", prompts),
        ("distill-valid", list(dict.fromkeys(r["prompt"] for r in valid))),
    ):
        prompt_file, out = DISTILLS[step]
        _prepare_distill(name, t / out, t / prompt_file, prompt_list)
    chat = [] if task.chat else ["--no-chat-template"]
    for step in plan_steps(name, t, base, chat):
        run_step(work, name, step, stash_root)
    write_curves(name, t, results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="work/paper", help="folder for data, checkpoints and models")
    p.add_argument("--tasks", default="e2e,wikisql")
    p.add_argument("--base", default=None, help="base HF model dir (default: the default model)")
    p.add_argument(
        "--synth-mrs",
        type=int,
        default=None,
        metavar="N",
        help="synthesized E2E MRs in the distillation prompts (default: the plan's, "
        f"{PLANS['e2e']['synth_mrs']}); 0 distils the training MRs only",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="folder of the learning-curve plots (default: paper_table's, "
        "benchmarks/results/<machine>)",
    )
    p.add_argument(
        "--stash",
        action="store_true",
        help="keep unfinished training steps' newest checkpoints (and anything a "
        "finished step has not kept) in data/paper for the next job, and exit",
    )
    args = p.parse_args(argv)
    if args.synth_mrs is not None and args.synth_mrs < 0:
        p.error(f"--synth-mrs must be >= 0, got {args.synth_mrs}")
    work = Path(args.work)
    names = [s for s in args.tasks.split(",") if s]
    bad = [n for n in names if n not in PLANS]
    if bad:
        p.error(f"unknown tasks {bad}; known: {', '.join(PLANS)}")
    if args.stash:
        for name in names:
            stash_task(name, work, STASH)
        return
    work.mkdir(parents=True, exist_ok=True)
    _sync_runs(work, STASH)
    base = Path(args.base) if args.base else ensure_default_model()
    results = args.results
    if results is None:
        from example_report import RESULTS, machine_slug

        results = RESULTS / machine_slug()
    for name in names:
        try:
            run_task(name, work, base, results, args.synth_mrs if name == "e2e" else None)
        except DatasetError as e:
            sys.exit(f"[{name}] {e}")


if __name__ == "__main__":
    main()
