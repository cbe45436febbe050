"""`ss-mlx train`: fine-tune Speculative Streaming (shared / lossless) or Medusa heads.

Runs as one process or under `torchrun --nproc_per_node K` (DDP; gloo on CPU, nccl on CUDA;
rank 0 writes). Output layout: see save_model.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ss_mlx import cliargs
from ss_mlx.config import (
    ADAPTER_MODULES,
    CONFIG_KEY,
    MEDUSA_FILE,
    MEDUSA_KEY,
    STREAMS_FILE,
    SSConfig,
)
from ss_mlx.files import write_json

from . import train_state
from .data import Example, collate, epoch_batches, pad_id_of
from .dist import (
    DistEnv,
    all_reduce_sums,
    all_reduce_tensor,
    barrier,
    init_distributed,
    shutdown,
)
from .draft_vocab import coverage, frequent_tokens
from .hidden_cache import FrozenBaseCache, main_stats, one_hot_soft
from .learning_curve import CURVE_FILE, LearningCurve, curve_record, format_point
from .loss import (
    accumulate,
    aggregate_metrics,
    best_tree_tokens,
    chain_acceptance,
    empty_rank_hist,
    sample_anchors,
    ss_loss,
    stream_counts,
)
from .medusa import MedusaLM
from .modeling import StreamingLM, hf_causal_lm
from .save_model import (
    PEFT_FILES,
    TRAINING_CONFIG_KEY,
    copy_base_files,
    remove_stale,
    save_peft_adapter,
    save_tensors,
    write_config,
)
from .shards import data_paths, read_training_data

MODES = ("shared", "lossless", "medusa")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cache a frozen base's hidden states automatically when they fit in this much memory.
AUTO_CACHE_BYTES = 4 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx train",
        description="Fine-tune Speculative Streaming (shared/lossless) or Medusa heads on JSONL.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (the base)")
    p.add_argument(
        "--data",
        required=True,
        help="training JSONL (prompt/completion, messages, text) or a distilled-shards folder "
        "(data/distilled/<run>: the generated ids, exactly); several, joined by commas, are read "
        "in that order",
    )
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--streams", type=int, default=4, help="gamma: streams (medusa: heads)")
    p.add_argument("--stream-layers", type=int, default=4, help="Ns: top layers carrying streams")
    p.add_argument("--position-mode", choices=("shifted", "anchor"), default="shifted")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--stream-lr", type=float, default=None, help="lr of P_j/adapters (default --lr)"
    )
    p.add_argument(
        "--embed-lr",
        default="auto",
        help="lr of the stream embeddings P_j; auto: stream lr x the median |element| of the "
        "hidden states entering the first stream layer (P_j is added to them)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--lora-rank", type=int, default=32, help="shared mode: LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="default 2 * rank")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--adapter-rank",
        type=int,
        default=None,
        help="stream-only adapters rank (default: 8 in lossless mode, 0 in shared mode)",
    )
    p.add_argument("--adapter-alpha", type=float, default=None, help="default 2 * rank")
    p.add_argument(
        "--adapter-modules",
        default=None,
        help="comma-separated block modules for stream adapters (default: all linear modules)",
    )
    p.add_argument("--prune-rank", type=int, default=0, help="early-exit adapter rank (0: none)")
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="the streams' LM head covers the N most frequent scored tokens of the training data "
        "(EAGLE-3's draft vocabulary; a fraction of the head's cost); 0: the whole vocabulary",
    )
    p.add_argument("--alpha0", type=float, default=1.0, help="main-stream loss weight")
    p.add_argument("--alpha-streams", type=float, default=0.1, help="per-stream loss weight")
    p.add_argument("--exit-weight", type=float, default=0.1, help="early-exit loss weight")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process per step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--no-chat-template", action="store_true", help="plain prompt + completion")
    p.add_argument(
        "--eval", default=None, help="held-out JSONL or shards folder for per-stream accuracy"
    )
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="also evaluate --eval every N optimizer steps (and at the last), appending to "
        "OUT/eval_curve.jsonl: the held-out learning curve (0: only at the end)",
    )
    p.add_argument("--save-every", type=int, default=200, help="checkpoint period (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from OUT/checkpoints (latest) or the given checkpoint",
    )
    p.add_argument("--seed", type=cliargs.seed, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--autocast",
        choices=("off", "bfloat16"),
        default="off",
        help="bf16 mixed precision for the training forward (fast on CPUs with AMX/AVX-512 "
        "BF16; the frozen base's labels can then differ at near-ties)",
    )
    p.add_argument(
        "--cache-hidden",
        choices=("auto", "on", "off"),
        default="auto",
        help="frozen base (lossless/medusa): compute its hidden states once per example",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="train on the first N rows of --data only (a data-size ablation that shares one "
        "--cache-dir trunk cache with the full file)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="frozen base: keep its per-example trunk states in this folder (GBs; outside git) "
        "once computed, so later runs on the same base, data and settings skip the trunk pass",
    )
    p.add_argument(
        "--targets",
        choices=("text", "base", "soft"),
        default="text",
        help="stream labels: the data's tokens; or (frozen base) the base's own prediction at "
        "each position, teacher-forced on the data: fixed text then trains the streams to "
        "predict the base, as its own generations would; or soft: the base's top-8 "
        "distribution there, renormalised (HASS's top-K distillation)",
    )
    p.add_argument(
        "--stream-positions",
        type=int,
        default=0,
        help="per sequence and step, train the streams of this many random scored positions "
        "(0: all); their cost is quadratic in the sequence length, the frozen base's is not",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


@dataclass
class TrainResult:
    model: nn.Module  # StreamingLM or MedusaLM (not the DDP wrapper)
    out_dir: Path
    steps: int
    last_metrics: dict[str, float]
    eval_metrics: dict[str, Any] | None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    train(args)


def train(args: argparse.Namespace) -> TrainResult:
    env = init_distributed(args.device)
    try:
        return _train(args, env)
    finally:
        shutdown(env)


# ---- building the model ---------------------------------------------------------------------


def resolve_defaults(args: argparse.Namespace, model_type: str) -> None:
    """Fill mode-dependent defaults in place (recorded in ss_training)."""
    if args.adapter_rank is None:
        args.adapter_rank = 8 if args.mode == "lossless" else 0
    if args.adapter_modules is None:
        args.adapter_modules = ",".join(ADAPTER_MODULES.get(model_type, ()))
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    if args.adapter_alpha is None:
        args.adapter_alpha = 2.0 * max(args.adapter_rank, 1)
    if args.stream_lr is None:
        args.stream_lr = args.lr


def build_model(args: argparse.Namespace, base: nn.Module) -> tuple[nn.Module, Any]:
    """-> (StreamingLM or MedusaLM, the peft model or None). Base weights frozen unless LoRA."""
    model_type = base.config.model_type
    base.requires_grad_(False)
    if args.mode == "medusa":
        return MedusaLM(base, args.streams), None
    peft_model = None
    if args.mode == "shared":
        import peft

        targets = sorted({m.split(".")[-1] for m in ADAPTER_MODULES.get(model_type, ())})
        lora = peft.LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        base = peft_model = peft.get_peft_model(base, lora)
    modules = [m for m in args.adapter_modules.split(",") if m] if args.adapter_rank > 0 else []
    ss = SSConfig(
        num_streams=args.streams,
        stream_layers=args.stream_layers,
        stream_position_mode=args.position_mode,
        adapter_rank=args.adapter_rank,
        adapter_scale=args.adapter_alpha / max(args.adapter_rank, 1),
        adapter_modules=tuple(modules),
        prune_rank=args.prune_rank,
        draft_vocab_size=args.draft_vocab,
    ).to_dict()
    return StreamingLM(base, ss), peft_model


def make_optimizer(
    args: argparse.Namespace, core: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    base_ids = {id(p) for p in core.base.parameters()}
    embed = getattr(core, "stream_embeddings", None)
    special = base_ids | {id(embed)}
    lora = [p for p in core.base.parameters() if p.requires_grad]
    own = [p for p in core.parameters() if p.requires_grad and id(p) not in special]
    groups = [{"params": own, "lr": args.stream_lr}] if own else []
    if embed is not None:
        groups.append({"params": [embed], "lr": float(args.embed_lr)})
    if lora:
        groups.append({"params": lora, "lr": args.lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

    def schedule(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        span = max(1, total_steps - args.warmup_steps)
        return max(0.0, 1.0 - (step - args.warmup_steps) / span)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def trainable_state(core: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in core.named_parameters() if p.requires_grad}


# ---- the loop --------------------------------------------------------------------------------


def _train(args: argparse.Namespace, env: DistEnv) -> TrainResult:
    from .pretrained import load_hf_model, load_hf_tokenizer

    t_start = time.perf_counter()
    if args.eval_every < 0:
        raise SystemExit(
            f"ss-mlx train: error: --eval-every must be 0 or more, got {args.eval_every}"
        )
    if args.eval_every > 0 and not args.eval:
        raise SystemExit("ss-mlx train: error: --eval-every needs --eval (the held-out JSONL)")
    out_dir = Path(args.out)
    ckpt_root = out_dir / "checkpoints"
    # Read (and validate) the resume state before the slow part, so a bad file fails at once.
    resume_from = _resume_path(args.resume, ckpt_root)
    resume_state = _load_resume(resume_from) if resume_from is not None else None
    torch.manual_seed(args.seed)
    tokenizer = load_hf_tokenizer(args.model, "train")
    chat = not args.no_chat_template
    examples = _scored_only(read_training_data(args.data, tokenizer, args.max_seq_len, chat), env)
    if args.max_examples is not None:
        if args.max_examples < 1:
            raise SystemExit(f"--max-examples must be at least 1, got {args.max_examples}")
        examples = examples[: args.max_examples]
    eval_examples = (
        read_training_data(args.eval, tokenizer, args.max_seq_len, chat) if args.eval else None
    )
    pad_id = pad_id_of(tokenizer)

    base = load_hf_model(args.model, DTYPES[args.dtype], "train")
    resolve_defaults(args, base.config.model_type)
    if args.draft_vocab < 0 or (args.draft_vocab and args.mode == "medusa"):
        raise SystemExit("--draft-vocab must be 0 or more, and is for speculative streams only")
    core, peft_model = build_model(args, base)
    if args.draft_vocab:
        # From the data, hence the same on every rank and on resume.
        vocab_size = base.get_output_embeddings().weight.shape[0]
        try:
            ids = frequent_tokens(examples, args.draft_vocab, vocab_size)
        except ValueError as e:
            raise SystemExit(f"ss-mlx train: error: {e}") from None
        core.set_draft_vocab(ids)
        if env.is_main:
            held = f", held-out {coverage(eval_examples, ids):.1%}" if eval_examples else ""
            cover = f"{coverage(examples, ids):.1%} of the training targets{held}"
            print(f"draft vocabulary: {args.draft_vocab} tokens cover {cover}", file=sys.stderr)
    core.to(env.device)
    base_trainable = any(p.requires_grad for p in core.base.parameters())
    if args.stream_positions < 0:
        raise SystemExit(f"--stream-positions must be 0 (all) or more, got {args.stream_positions}")
    if args.targets != "text" and base_trainable:
        raise SystemExit(f"--targets {args.targets} needs a frozen base (--mode lossless, medusa)")
    # Dropout only matters for LoRA; a frozen base must compute exactly what it does at inference.
    core.train(base_trainable)

    micro_per_epoch = len(epoch_batches(len(examples), args.batch_size, args.seed, 0, 0, env.world))
    if args.max_steps is not None:
        total_steps = args.max_steps
    else:
        total_steps = math.ceil(args.epochs * micro_per_epoch / args.grad_accum)
    if isinstance(core, StreamingLM):
        args.embed_lr = _resolve_embed_lr(args, core, examples, pad_id, env)
    optimizer, scheduler = make_optimizer(args, core, total_steps)

    start_step = 0
    if resume_from is not None:
        start_step = _restore(resume_from, resume_state, args, core, optimizer, scheduler)
        if env.is_main:
            print(f"resumed from {resume_from} at step {start_step}", file=sys.stderr)

    model: nn.Module = core
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(core, device_ids=ids)

    cache = _make_cache(args, examples, core, base_trainable, total_steps, micro_per_epoch, env)
    loss_kw = dict(
        alpha0=args.alpha0, alpha_streams=args.alpha_streams, exit_weight=args.exit_weight
    )
    targets = args.targets
    # Mixed precision for the training passes only (parameters, optimizer and eval stay fp32):
    # on a CPU with AMX or AVX-512 BF16 the frozen trunk runs ~3x faster; elsewhere slower.
    autocast = (
        torch.autocast(env.device.type, dtype=torch.bfloat16)
        if args.autocast == "bfloat16"
        else nullcontext()
    )

    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(m: int) -> list[int]:
        epoch, offset = divmod(m, micro_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(
                len(examples), args.batch_size, args.seed, epoch, env.rank, env.world
            )
        return epoch_cache[epoch][offset]

    progress = _progress(env, args, start_step, total_steps)
    window: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens, t0 = 0, time.perf_counter()
    log_path = out_dir / "train_log.jsonl"
    curve: LearningCurve | None = None
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:  # a fresh run into an old OUT: do not mix logs or keep old results
            log_path.unlink(missing_ok=True)
            (out_dir / "eval.json").unlink(missing_ok=True)
            (out_dir / CURVE_FILE).unlink(missing_ok=True)
        if args.eval_every > 0:
            curve = _start_curve(out_dir, start_step)
    eval_batch = args.eval_batch_size or args.batch_size
    final_eval: dict[str, float] | None = None
    for step in range(start_step, total_steps):
        for k in range(args.grad_accum):
            m = step * args.grad_accum + k
            idx = micro_batch(m)
            batch = _to(collate([examples[i] for i in idx], pad_id), env.device)
            anchors = None
            if args.stream_positions > 0:
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + m * env.world + env.rank)
                anchors = sample_anchors(batch["loss_mask"], args.stream_positions, g)
            sync = k == args.grad_accum - 1 or not env.distributed
            with nullcontext() if sync else model.no_sync():
                with autocast:
                    loss, metrics = _batch_loss(
                        model, core, batch, idx, cache, loss_kw, targets, anchors
                    )
                (loss / args.grad_accum).backward()
            accumulate(window, metrics)
            window["loss_sum"] = window.get("loss_sum", 0.0) + metrics["loss"]
            window["batches"] = window.get("batches", 0.0) + 1
            tokens += int(batch["lengths"].sum())
        # Every example's trunk is in (an epoch is done): written at once, not at the next
        # checkpoint. (One process only: ranks fill different examples.)
        done_epoch = cache is not None and cache.holds_all(len(examples))
        if done_epoch and env.world == 1 and cache.flush():
            _say(progress, f"trunk states of all {len(examples)} examples saved in "
                           f"{cache.path.parent}")  # fmt: skip
        if args.max_grad_norm > 0:
            params = [p for p in core.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            last = _log(env, window, done, tokens, time.perf_counter() - t0, scheduler, log_path)
            if progress is not None:
                progress.set_postfix(_postfix(last), refresh=False)
            window, tokens, t0 = {}, 0, time.perf_counter()
        if progress is not None:
            progress.update(1)
        # Before the checkpoint: a run killed between the two recomputes this step on resume
        # (the record is dropped); the other order would leave the step out of the curve.
        if args.eval_every > 0 and (done % args.eval_every == 0 or done == total_steps):
            metrics = evaluate(core, eval_examples, eval_batch, pad_id, env, loss_kw)
            if done == total_steps:
                final_eval = metrics
            if curve is not None:
                record = curve_record(done, metrics, time.perf_counter() - t_start)
                curve.add(record)
                _say(progress, format_point(record))
        if args.save_every > 0 and (done % args.save_every == 0 or done == total_steps):
            _checkpoint(env, ckpt_root, done, args, core, optimizer, scheduler)
            if cache is not None and env.world == 1:
                cache.flush()  # a run cut short resumes with the trunk states it had
    if progress is not None:
        progress.close()

    if env.is_main:
        write_output(args, core, peft_model, tokenizer, total_steps)
    barrier(env)

    eval_metrics = None
    if eval_examples is not None:
        eval_metrics = final_eval
        if eval_metrics is None:
            eval_metrics = evaluate(core, eval_examples, eval_batch, pad_id, env, loss_kw)
            # Resumed at the last step (no step ran): the curve may still lack its end.
            if curve is not None and curve.last_step < total_steps:
                curve.add(curve_record(total_steps, eval_metrics, time.perf_counter() - t_start))
        eval_metrics = {
            "file": str(args.eval),
            "examples": len(eval_examples),
            "step": total_steps,
            **eval_metrics,
        }
        if env.is_main:
            write_json(out_dir / "eval.json", eval_metrics)
            print(format_eval(eval_metrics))
    barrier(env)
    return TrainResult(core, out_dir, total_steps, last, eval_metrics)


def _batch_loss(
    model: nn.Module,
    core: nn.Module,
    batch: dict[str, torch.Tensor],
    idx: list[int],
    cache: FrozenBaseCache | None,
    loss_kw: dict[str, Any],
    targets: str = "text",
    anchors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss and metrics; `targets` as --targets: text, base (the base's argmax) or
    soft (its top-K distribution; accuracy still against its argmax)."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    kw = dict(exit_logits=None, head=core.lm_head, anchors=anchors, **loss_kw)
    kw.update(_stream_heads(core))
    # LM-head inputs out of the (DDP) forward; the frozen LM head runs on scored rows only.
    if cache is None:
        main, streams, kw["exit_logits"] = model(ids, attn, return_hidden=True, anchors=anchors)
        if targets == "text":
            return ss_loss(main, streams, ids, mask, **kw)
        own, soft = _own_targets(core, main, ids)
        return ss_loss(main, streams, own, mask, soft=soft if targets == "soft" else None, **kw)
    base_out, main_metrics, own, soft = cache.lookup(core, batch, idx)
    _, streams, kw["exit_logits"] = model(
        ids, attn, base_output=base_out, return_hidden=True, anchors=anchors
    )
    labels = ids if targets == "text" else own
    loss, metrics = ss_loss(
        None, streams, labels, mask, soft=soft if targets == "soft" else None, **kw
    )
    metrics.update(main_metrics)
    # Report the same total as without the cache (the main term has no gradient here).
    metrics["loss"] += loss_kw["alpha0"] * main_metrics["main_loss"]
    return loss, metrics


def _stream_heads(core: nn.Module) -> dict[str, Any]:
    """ss_loss's stream_head / stream_vocab: the streams' head over their draft vocabulary."""
    if getattr(core, "draft_vocab", None) is None:
        return {}
    return {"stream_head": core.stream_head, "stream_vocab": core.to_draft}


def _trunk_key(args: argparse.Namespace, core: nn.Module) -> str:
    """What fixes the cached trunk states: base weights, data file, tokenization, layers."""
    h = hashlib.sha256()
    model_dir = Path(args.model).expanduser()
    # The base's weights and tokenizer; not the streams or Medusa heads an SS directory also
    # holds (shipping new streams must not orphan the trunk states of the frozen base).
    weights = [f for f in model_dir.glob("*.safetensors") if f.name not in (STREAMS_FILE,
                                                                             MEDUSA_FILE)]
    files = sorted(weights) + sorted(model_dir.glob("tokenizer*.json"))
    # A shards folder is fixed by its manifest, which lists every shard's sha256.
    files += [d / "manifest.json" if d.is_dir() else d for d in data_paths(args.data)]
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    layers = args.stream_layers if isinstance(core, StreamingLM) else "final"
    h.update(json.dumps([args.mode == "medusa", layers, args.max_seq_len, args.dtype,
                         args.no_chat_template]).encode())  # fmt: skip
    if args.autocast != "off":  # (keys of fp32 runs stay what they were)
        h.update(args.autocast.encode())
    return h.hexdigest()


@torch.no_grad()
def _own_targets(
    core: nn.Module, main: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen base's own labels, as FrozenBaseCache.lookup returns them: (B, L) ids whose
    position k+1 holds the base's prediction at k (main (B, L, D) = LM-head inputs), position 0
    the input id; and (B, L, K) top-K ids and probabilities aligned alike."""
    B, L, D = main.shape
    # The cache's own computation, in its row chunks ((B, L, V) logits are 0.8 GB at 4 x 1024
    # positions and a 49K vocabulary); the targets argument only feeds its nll and hit.
    flat, nxt = main[:, :-1].reshape(-1, D), ids[:, 1:].reshape(-1)  # (B * (L-1), D), (B * (L-1),)
    _, _, pred, top_ids, top_p = main_stats(core, flat, nxt)
    own = ids.clone()
    own[:, 1:] = pred.long().view(B, L - 1)
    soft_ids, soft_p = one_hot_soft(ids, top_ids.shape[-1])
    soft_ids[:, 1:] = top_ids.long().view(B, L - 1, -1)
    soft_p[:, 1:] = top_p.float().view(B, L - 1, -1)
    return own, (soft_ids, soft_p)


def _make_cache(
    args: argparse.Namespace,
    examples: list[Example],
    core: nn.Module,
    base_trainable: bool,
    total_steps: int,
    micro_per_epoch: int,
    env: DistEnv,
) -> FrozenBaseCache | None:
    if base_trainable or args.cache_hidden == "off":
        return None
    if args.cache_dir is not None:
        key = _trunk_key(args, core)
        path = Path(args.cache_dir) / f"trunk-{key[:20]}.safetensors"
        cache = FrozenBaseCache(path, key)
        if cache.saved and env.is_main:
            print(f"trunk states of {len(cache)} examples from {path}", file=sys.stderr)
        return cache
    if args.cache_hidden == "auto":
        if total_steps * args.grad_accum <= micro_per_epoch:  # each example seen once at most
            return None
        hf = hf_causal_lm(core.base)
        per_token = hf.config.hidden_size * DTYPES[args.dtype].itemsize  # one layer's input
        need = sum(len(e.input_ids) for e in examples) * per_token
        if need > AUTO_CACHE_BYTES:
            if env.is_main:
                print(
                    f"not caching base hidden states ({need / 2**30:.1f} GiB); "
                    "--cache-hidden on forces it",
                    file=sys.stderr,
                )
            return None
    return FrozenBaseCache()


@torch.no_grad()
def _resolve_embed_lr(
    args: argparse.Namespace, core: StreamingLM, examples: list[Example], pad_id: int, env: DistEnv
) -> float:
    """--embed-lr, with "auto" = stream lr x median |h| (h entering layer s, first batch).

    Adam moves every element by about lr per step whatever its scale, while elements of h at a
    deep layer are typically ~5-10 (SmolLM2-135M, layer 26): at a LoRA lr P_j would need
    thousands of steps to matter. The median ignores the few massive-activation channels that
    dominate an RMS (100+ there).
    """
    if args.embed_lr != "auto":
        return float(args.embed_lr)
    idx = epoch_batches(len(examples), args.batch_size, args.seed, 0, env.rank, env.world)[0]
    batch = _to(collate([examples[i] for i in idx], pad_id), env.device)
    h = core.base_forward(batch["input_ids"], batch["attention_mask"]).stream_inputs[0]
    valid = batch["attention_mask"].bool()
    median = float(h[valid].float().abs().median())
    median = all_reduce_sums(env, {"m": median})["m"] / env.world
    lr = args.stream_lr * max(median, 1.0)
    if env.is_main:
        print(f"stream embeddings: median |h| {median:.3g} at layer {core.first_stream_layer}, "
              f"embed lr {lr:.3g}", file=sys.stderr)  # fmt: skip
    return lr


def _scored_only(examples: list[Example], env: DistEnv) -> list[Example]:
    """Drop rows with nothing to score (e.g. a response cut off by --max-seq-len)."""
    kept = [e for e in examples if any(e.loss_mask[1:])]
    if len(kept) < len(examples) and env.is_main:
        print(f"skipping {len(examples) - len(kept)} training rows with no scored token "
              "after truncation (raise --max-seq-len?)", file=sys.stderr)  # fmt: skip
    if not kept:
        raise SystemExit("no training row has a scored token")
    return kept


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    core: nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    env: DistEnv,
    loss_kw: dict[str, Any],
) -> dict[str, float]:
    """Per-term loss/accuracy over response targets, plus the mean accepted chain length."""
    was_training = core.training
    core.eval()
    G = core.num_streams
    names = ["main"] + [f"stream{j}" for j in range(1, G + 1)]
    if getattr(core, "prune", None) is not None:
        names.append("exit")
    sums = {f"{n}_{s}": 0.0 for n in names for s in ("n", "correct", "loss_sum")}
    sums.update(chain_sum=0.0, chain_n=0.0)
    # Every rank has every key, batches or not, so all_reduce_sums lines up.
    sums.update({f"x{j}_{key}": 0.0 for j in range(1, G + 1) for key in ("top3", "echo", "n")})
    tree_hist = empty_rank_hist(G)  # joint stream ranks (loss.chain_acceptance), summed
    mine = list(range(env.rank, len(examples), env.world))
    device = next(core.parameters()).device
    for i in range(0, len(mine), batch_size):
        batch = _to(collate([examples[k] for k in mine[i : i + batch_size]], pad_id), device)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        main, streams, exits = core(ids, batch["attention_mask"], return_hidden=True)
        _, metrics = ss_loss(
            main, streams, ids, mask, exit_logits=exits, head=core.lm_head,
            **_stream_heads(core), **loss_kw,
        )  # fmt: skip
        accumulate(sums, metrics)
        full = getattr(core, "stream_logits", core.lm_head)  # (..., V), -inf outside a draft vocab
        chain, count, hist = chain_acceptance(streams, ids, mask, head=full)
        sums["chain_sum"] += chain
        sums["chain_n"] += count
        tree_hist = tree_hist + hist
        counts = stream_counts(main, streams, ids, mask, core.lm_head, stream_head=full)
        for j, (top3, echo, n) in enumerate(counts, 1):
            for key, value in (("top3", top3), ("echo", echo), ("n", n)):
                sums[f"x{j}_{key}"] += value
    sums = all_reduce_sums(env, sums)
    tree_hist = all_reduce_tensor(env, tree_hist)
    core.train(was_training)
    out = aggregate_metrics({k: v for k, v in sums.items() if not k.startswith(("chain_", "x"))})
    n = sums["chain_n"]
    out["accepted_streams_mean"] = sums["chain_sum"] / n if n else float("nan")
    # Expected tokens per pass of the best draft tree of each node budget (streams alone).
    out["tree_tokens_per_pass"] = best_tree_tokens(tree_hist)
    for j in range(1, G + 1):  # top-3 accuracy and echo share (see loss.stream_counts)
        n = sums[f"x{j}_n"]
        for key in ("top3", "echo"):
            out[f"stream{j}_{key}"] = sums[f"x{j}_{key}"] / n if n else float("nan")
    return out


def format_eval(metrics: dict[str, Any]) -> str:
    lines = [f"eval on {metrics['file']} ({metrics['examples']} examples, step {metrics['step']})"]
    names = [k[: -len("_acc")] for k in metrics if k.endswith("_acc")]
    for name in names:
        extra = "".join(
            f"  {key} {metrics[f'{name}_{key}']:.4f}"
            for key in ("top3", "echo")
            if f"{name}_{key}" in metrics
        )
        lines.append(
            f"  {name:>9}: acc {metrics[name + '_acc']:.4f}  loss {metrics[name + '_loss']:.4f}"
            f"{extra}  (n={int(metrics[name + '_n'])})"
        )
    lines.append(
        f"  mean accepted streams per step (greedy chain): {metrics['accepted_streams_mean']:.3f}"
    )
    trees = metrics.get("tree_tokens_per_pass")
    if trees:
        best = ", ".join(f"{b} nodes {v:.3f}" for b, v in trees.items())
        lines.append(f"  tokens per pass of the best tree (streams alone): {best}")
    return "\n".join(lines)


# ---- output, checkpoints, logging -----------------------------------------------------------


def write_output(
    args: argparse.Namespace, core: nn.Module, peft_model: Any, tokenizer: Any, steps: int
) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_base_files(args.model, out_dir, tokenizer)
    training = {
        "mode": args.mode,
        "base_model": str(args.model),
        "data": str(args.data),
        "steps": steps,
        "lr": args.lr,
        "stream_lr": args.stream_lr,
        "embed_lr": args.embed_lr if isinstance(core, StreamingLM) else None,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_seq_len": args.max_seq_len,
        "alpha0": args.alpha0,
        "alpha_streams": args.alpha_streams,
        "seed": args.seed,
        "lora_rank": args.lora_rank if args.mode == "shared" else 0,
        "lora_alpha": args.lora_alpha if args.mode == "shared" else None,
    }
    blocks: dict[str, Any] = {TRAINING_CONFIG_KEY: training}
    if isinstance(core, MedusaLM):
        remove_stale(out_dir, {MEDUSA_FILE})
        save_tensors(out_dir / MEDUSA_FILE, core.heads_state_dict())
        blocks[MEDUSA_KEY] = core.config_block()
    else:
        remove_stale(out_dir, {STREAMS_FILE, *(PEFT_FILES if peft_model is not None else ())})
        save_tensors(out_dir / STREAMS_FILE, core.ss_state_dict())
        if peft_model is not None:
            save_peft_adapter(peft_model, out_dir)
        blocks[CONFIG_KEY] = core.ss
    write_config(args.model, out_dir, blocks)  # last: a complete config.json marks a complete dir


# Arguments that must match when resuming (the rest, e.g. --max-steps, may change).
_RESUME_KEYS = (
    "mode",
    "streams",
    "stream_layers",
    "position_mode",
    "lora_rank",
    "adapter_rank",
    "adapter_modules",
    "prune_rank",
    "batch_size",
    "grad_accum",
    "seed",
    "data",
)


def _checkpoint(
    env: DistEnv,
    root: Path,
    step: int,
    args: argparse.Namespace,
    core: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    if env.is_main:
        state = {
            "step": step,
            "trainable": trainable_state(core),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": train_state.rng_state(),
            "args": {k: getattr(args, k) for k in _RESUME_KEYS},
            "world": env.world,
        }
        train_state.save_checkpoint(root, step, state, keep=args.keep_checkpoints)
    barrier(env)


def _resume_path(resume: str | None, root: Path) -> Path | None:
    if resume is None:
        return None
    if resume != "latest":
        return Path(resume)
    found = train_state.list_checkpoints(root)
    if not found:
        print(f"--resume: no checkpoint in {root}; starting from scratch", file=sys.stderr)
        return None
    return found[-1]


def _load_resume(path: Path) -> dict[str, Any]:
    try:
        return train_state.load_checkpoint(path)
    except train_state.TrainStateError as e:
        raise SystemExit(f"ss-mlx train: error: --resume: {e}") from None


def _restore(
    path: Path,
    state: dict[str, Any],
    args: argparse.Namespace,
    core: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> int:
    unknown = sorted(set(state["args"]) - set(_RESUME_KEYS))
    if unknown:
        raise SystemExit(
            f"ss-mlx train: error: --resume: {path} records unknown settings {unknown}"
        )
    diff = {k: (v, getattr(args, k)) for k, v in state["args"].items() if getattr(args, k) != v}
    if diff:
        raise SystemExit(f"--resume: settings differ from the checkpoint (was, now): {diff}")
    params = dict(core.named_parameters())
    names = set(state["trainable"])
    want = {n for n, p in params.items() if p.requires_grad}
    if names != want:
        raise SystemExit(f"--resume: trainable parameters differ: {sorted(names ^ want)[:5]}")
    try:
        with torch.no_grad():
            for n, v in state["trainable"].items():
                params[n].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train_state.set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SystemExit(
            f"ss-mlx train: error: --resume: {path} does not fit this run: {first}"
        ) from None
    return int(state["step"])


def _start_curve(out_dir: Path, start_step: int) -> LearningCurve:
    try:
        return LearningCurve.start(out_dir, start_step)
    except (ValueError, OSError) as e:
        raise SystemExit(f"ss-mlx train: error: --eval-every: {e}") from None


def _say(progress: Any, line: str) -> None:
    # Through tqdm when its bar is drawn, so the line does not break the bar.
    if progress is not None:
        progress.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def _progress(env: DistEnv, args: argparse.Namespace, start: int, total: int) -> Any:
    if not env.is_main or args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"train {args.mode}", unit="step")


def _log(
    env: DistEnv,
    window: dict[str, float],
    step: int,
    tokens: int,
    seconds: float,
    scheduler: Any,
    path: Path,
) -> dict[str, float]:
    window = all_reduce_sums(env, {**window, "tokens": float(tokens)})
    batches = max(window.pop("batches", 1.0), 1.0)
    record = {"step": step, "loss": window.pop("loss_sum", 0.0) / batches}
    record.update(aggregate_metrics({k: v for k, v in window.items() if k != "tokens"}))
    record = {k: v for k, v in record.items() if not k.endswith("_n")}
    record["lr"] = scheduler.get_last_lr()[0]
    record["tok_per_s"] = window["tokens"] / max(seconds, 1e-9)
    if env.is_main:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _postfix(record: dict[str, float]) -> dict[str, str]:
    post = {"loss": f"{record['loss']:.3f}"}
    for k, v in record.items():
        if k.endswith("_acc"):
            post[k[: -len("_acc")].replace("stream", "s")] = f"{v:.2f}"
    post["tok/s"] = f"{record['tok_per_s']:.0f}"
    return post


if __name__ == "__main__":
    main()
