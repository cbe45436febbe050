"""`ss-mlx compare`: the paper's comparison on one task (Table 1 and Table 2 form).

Given a task's fine-tuned models (a LoRA baseline, a Speculative Streaming model, and optionally
Medusa heads on the baseline and a draft model for the baseline), decode the task's evaluation
prompts with every method in one process (each SS model twice: its static tree, and the dynamic
hybrid tree of streams plus prompt/output lookup as ``<name>-dynamic``), interleaved
(``bench.run_benchmark``), then report per method: decode speed relative to the baseline's
autoregressive decoding, tokens per target pass, the call-reduction ratio, the task metric of its
outputs, its extra parameters, and per-sample latency with target and draft calls.

Two greedy references are checked token for token: Medusa and draft-model decoding must equal the
baseline's AR output, and SS must equal the AR output of its own model (``ss:ar``; shared-mode
training changes the model, so SS is lossless with respect to itself, as in the paper).

Definitions (over all evaluation prompts):
- speedup = decode tok/s / the baseline AR's decode tok/s (first pass, with prefill, excluded);
- tokens/pass = generated tokens / target forward passes;
- CR ratio = the baseline's target calls (one per token it generated) / the method's target
  calls, the paper's "call reduction ratio" (Table 1);
- latency = mean wall time per sample, prefill included (Table 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..files import dump_json, savefig, write_text
from .bench import (
    Method,
    Run,
    ar_method,
    check_parity,
    draft_method,
    medusa_method,
    run_benchmark,
    ss_method,
    summarize_method,
)
from .tasks import EvalItem, Task, eval_items, get_task

SCHEMA = "ss-mlx-compare/1"
BASELINE = "ar"
SS_REFERENCE = "ss:ar"


@dataclass
class TaskModels:
    """Model directories of one task's comparison (``medusa``/``draft`` optional)."""

    baseline: Path
    ss: Path
    medusa: Path | None = None
    draft: Path | None = None
    ss_lossless: Path | None = None  # SS streams trained on the frozen baseline


def _param_count(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(module.parameters()))


def _renamed(method: Method, name: str) -> Method:
    return dataclasses.replace(method, name=name)


def build_methods(
    models: TaskModels,
    *,
    tree: Any = None,
    medusa_tree: Any = None,
    num_draft: int = 3,
    dynamic: bool = True,
) -> tuple[list[Method], dict[str, dict[str, Any]], Any]:
    """The methods, per method its model and reference (``info``), and the baseline tokenizer.

    dynamic: each SS model also decodes with the dynamic hybrid tree (streams + prompt and
    output lookup, sized every step), as ``<name>-dynamic`` beside its static-tree row."""
    import mlx_lm

    from ..drafters.medusa import load_medusa
    from ..generation import DYNAMIC
    from ..loader import load

    base, tokenizer = mlx_lm.load(str(models.baseline))
    ss_model, ss_tokenizer = load(models.ss)
    methods = [ar_method(base), _renamed(ar_method(ss_model.base), SS_REFERENCE),
               ss_method(ss_model, tree, name="ss")]
    n_streams = ss_model.streams.num_parameters()
    info: dict[str, dict[str, Any]] = {
        BASELINE: {"model": str(models.baseline), "reference": BASELINE, "extra_params": 0},
        SS_REFERENCE: {"model": str(models.ss), "reference": SS_REFERENCE, "extra_params": 0},
        "ss": {"model": str(models.ss), "reference": SS_REFERENCE, "extra_params": n_streams},
    }
    if dynamic:
        methods.append(ss_method(ss_model, DYNAMIC, name="ss-dynamic"))
        info["ss-dynamic"] = info["ss"]
    if models.ss_lossless is not None:
        lossless, _ = load(models.ss_lossless)
        methods.append(ss_method(lossless, tree, name="ss-lossless"))
        info["ss-lossless"] = {
            "model": str(models.ss_lossless), "reference": BASELINE,
            "extra_params": lossless.streams.num_parameters()}
        if dynamic:
            methods.append(ss_method(lossless, DYNAMIC, name="ss-lossless-dynamic"))
            info["ss-lossless-dynamic"] = info["ss-lossless"]
    if models.medusa is not None:
        medusa_base, _ = mlx_lm.load(str(models.medusa))
        heads = load_medusa(models.medusa, medusa_base)
        if heads is None:
            raise ValueError(f"{models.medusa} has no Medusa heads (medusa_heads.safetensors)")
        methods.append(_renamed(medusa_method(medusa_base, heads, medusa_tree), "medusa"))
        n_heads = sum(a.size for a in [*heads.weights, *heads.biases]) + (
            heads.lm_heads.size if heads.lm_heads is not None else 0)
        info["medusa"] = {"model": str(models.medusa), "reference": BASELINE,
                          "extra_params": n_heads}
    if models.draft is not None:
        draft, _ = mlx_lm.load(str(models.draft))
        v_t, v_d = (m.model.embed_tokens.weight.shape[0] for m in (base, draft))
        if v_t != v_d:
            raise ValueError(f"draft vocabulary ({v_d}) differs from the baseline's ({v_t})")
        methods.append(draft_method(base, draft, num_draft, name="draft",
                                    config={"draft_model": str(models.draft),
                                            "draft_layers": len(draft.model.layers)}))
        info["draft"] = {"model": str(models.draft), "reference": BASELINE,
                         "extra_params": _param_count(draft)}
    _check_same_tokenizer(tokenizer, ss_tokenizer, models)
    return methods, info, tokenizer


def _check_same_tokenizer(a: Any, b: Any, models: TaskModels) -> None:
    probe = "Tokenizer probe: name[The Eagle], SELECT Notes FROM 1-1000181-1 WHERE x = 'y'"
    if a.encode(probe) != b.encode(probe) or set(a.eos_token_ids) != set(b.eos_token_ids):
        raise ValueError(f"{models.baseline} and {models.ss} have different tokenizers")


def _outputs(runs: list[Run], method: str, n: int, tokenizer: Any, eos: set[int]) -> list[str]:
    by_prompt = {r.prompt: r.tokens for r in runs if r.method == method and r.repeat == 0}
    return [tokenizer.decode([t for t in by_prompt[i] if t not in eos]) for i in range(n)]


def compare_task(
    task: Task | str,
    models: TaskModels,
    *,
    n: int | None = None,
    max_tokens: int = 128,
    tree: Any = None,
    medusa_tree: Any = None,
    num_draft: int = 3,
    dynamic: bool = True,
    warmup: int = 1,
    repeats: int = 1,
    root: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method on the task's evaluation prompts; return the report (see module doc)."""
    from .datasets import encode_prompt
    from .machine import describe_machine

    task = get_task(task) if isinstance(task, str) else task
    items: list[EvalItem] = eval_items(task, root, n)
    methods, info, tokenizer = build_methods(
        models, tree=tree, medusa_tree=medusa_tree, num_draft=num_draft, dynamic=dynamic)
    prompts = [encode_prompt(tokenizer, it.prompt, task.chat) for it in items]
    eos = set(tokenizer.eos_token_ids)
    runs = run_benchmark(methods, prompts, max_tokens=max_tokens, eos=eos, warmup=warmup,
                         repeats=repeats, progress=progress)

    parity: dict[str, dict[str, Any]] = {}
    for ref in (BASELINE, SS_REFERENCE):
        group = {m.name for m in methods if info[m.name]["reference"] == ref}
        parity.update({k: v for k, v in check_parity(
            [r for r in runs if r.method in group], ref).items()})
    base_summary = summarize_method(methods[0], runs)
    rows = []
    for m in methods:
        s = summarize_method(m, runs) if parity[m.name]["ok"] else None
        outputs = _outputs(runs, m.name, len(items), tokenizer, eos)
        row = {
            "name": m.name,
            "kind": m.kind,
            **info[m.name],
            "config": m.config,
            "parity": parity[m.name],
            "status": "ok" if s is not None else "FAILING",
            "quality": task.score(outputs, items),
        }
        if s is not None:
            row.update({
                "decode_tps": s["decode_tps"],
                "speedup": s["decode_tps"] / base_summary["decode_tps"],
                "tokens_per_pass": s["tokens_per_pass"],
                "cr_ratio": base_summary["passes"] / s["passes"],
                "mean_accepted": s["mean_accepted"],
                "acceptance_by_depth": s["acceptance_by_depth"],
                "latency_ms": 1e3 * s["total_s"] / len(items),
                "target_calls": s["passes"] / len(items),
                "draft_calls": s["draft_calls"] / len(items),
                "tokens": s["tokens"],
                "peak_memory_bytes": s["peak_memory_bytes"],
            })
        row["outputs"] = outputs
        rows.append(row)
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": {"name": task.name, "metric": task.metric, "train_file": task.train_file,
                 "eval_file": task.eval_file, "chat_template": task.chat,
                 "n": len(items), "available": len(eval_items(task, root))},
        "settings": {"max_tokens": max_tokens, "warmup": warmup, "repeats": repeats,
                     "num_draft_tokens": num_draft, "tree": tree, "medusa_tree": medusa_tree,
                     "dynamic": dynamic},
        "machine": describe_machine(str(mx.float32).removeprefix("mlx.core.")),
        "methods": rows,
    }


# ---- formatting ------------------------------------------------------------------------------


def _q(row: dict[str, Any]) -> str:
    return "/".join(f"{v:.2f}" for v in row["quality"].values())


def _f(row: dict[str, Any], key: str, spec: str, suffix: str = "") -> str:
    v = row.get(key)
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def format_task(report: dict[str, Any]) -> str:
    """Markdown: Table 1 form (all methods) and Table 2 form (SS vs two-model SD)."""
    t = report["task"]
    metric = "/".join(report["methods"][0]["quality"])
    lines = [
        f"### {t['name']} ({t['n']} of {t['available']} evaluation prompts, metric {metric})",
        "",
        f"| method | status | speedup vs baseline AR | tokens/pass | CR ratio | {metric} | "
        "extra params | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["methods"]:
        lines.append(
            f"| {r['name']} | {r['status']} | {_f(r, 'speedup', '.2f', 'x')} | "
            f"{_f(r, 'tokens_per_pass', '.2f')} | {_f(r, 'cr_ratio', '.2f')} | {_q(r)} | "
            f"{r['extra_params']:.3g} | {_f(r, 'decode_tps', '.2f')} |"
        )
    pair = [r for r in report["methods"]
            if r["name"] == "draft" or (r["name"].startswith("ss") and r["name"] != SS_REFERENCE)]
    if any(r["name"] == "draft" for r in pair) and len(pair) > 1:
        lines += ["", "| method | target calls / sample | draft calls / sample | "
                  "latency ms / sample | " + metric + " |", "|---|---:|---:|---:|---:|"]
        for r in pair:
            label = "two-model SD" if r["name"] == "draft" else r["name"]
            lines.append(f"| {label} | {_f(r, 'target_calls', '.2f')} | "
                         f"{_f(r, 'draft_calls', '.2f')} | {_f(r, 'latency_ms', '.0f')} | "
                         f"{_q(r)} |")
    failing = [r for r in report["methods"] if r["status"] != "ok"]
    for r in failing:
        fd = r["parity"]["first_divergence"]
        lines.append(f"\n- `{r['name']}` differs from `{r['reference']}` (greedy) at prompt "
                     f"{fd['prompt']}, token {fd['index']}: its speed numbers are left out.")
    return "\n".join(lines) + "\n"


def plot_reports(reports: list[dict[str, Any]], path: str | Path) -> None:
    """PNG: per task, speedup vs the baseline's AR and tokens per pass of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .machine import model_label, plot_subtitle

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4.6), squeeze=False)
    for ax, rep in zip(axes[0], reports, strict=True):
        rows = [r for r in rep["methods"] if r["name"] != SS_REFERENCE]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r.get("speedup") or 0 for r in rows], 0.4,
               label="speedup vs baseline AR")
        ax.bar([x + 0.2 for x in xs], [r.get("tokens_per_pass") or 0 for r in rows], 0.4,
               label="tokens / target pass", hatch="//")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs), [f"{r['name']}\n{_q(r)}" for r in rows], fontsize=8)
        metric = "/".join(rep["methods"][0]["quality"])
        ax.set_ylabel("speedup (x) | tokens per target pass")
        models = ", ".join(dict.fromkeys(model_label(r.get("model")) for r in rows))
        ax.set_title(f"{rep['task']['name']} (under each method: {metric})\nmodels: {models}",
                     fontsize=8)
        ax.margins(y=0.3)
        ax.legend(fontsize=7, loc="upper left")
    machines = dict.fromkeys(plot_subtitle(rep.get("machine")) for rep in reports)
    fig.suptitle("ss-mlx compare\n" + "\n".join(m.replace(" | ", ", ", 1) for m in machines),
                 fontsize=8)
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


# ---- CLI -------------------------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx compare",
        description="Speculative Streaming vs Medusa vs draft-model decoding vs the LoRA "
        "baseline on a task's test prompts: speed, calls and task quality.",
    )
    p.add_argument("--task", required=True, help="e2e or wikisql")
    p.add_argument("--baseline", required=True, type=Path, help="baseline model dir (AR)")
    p.add_argument("--ss", required=True, type=Path, help="Speculative Streaming model dir")
    p.add_argument("--medusa", type=Path, help="model dir with Medusa heads on the baseline")
    p.add_argument("--draft", type=Path, help="draft model dir for the baseline")
    p.add_argument("--ss-lossless", type=Path,
                   help="SS model dir whose trunk is the baseline (lossless-mode streams)")
    p.add_argument("--n", type=int, default=None, help="first N evaluation prompts (default all)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tree", default=None, help="SS draft tree (default: the model's)")
    p.add_argument("--medusa-tree", default=None, help="Medusa tree (default: 3,2,1,...)")
    p.add_argument("--num-draft", type=int, default=3, help="draft chain length (mlx-lm's)")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="also decode each SS model with the dynamic hybrid tree")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", help="write the report (with every output) as JSON here")
    p.add_argument("--markdown", help="write the markdown tables here")
    p.add_argument("--plot", help="write a PNG here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    from .datasets import DatasetError
    from .machine import require_matplotlib

    if args.plot:
        require_matplotlib("compare")

    for name in ("baseline", "ss", "medusa", "draft", "ss_lossless"):
        d = getattr(args, name)
        if d is not None and not (d / "config.json").is_file():
            flag = name.replace("_", "-")
            sys.exit(f"ss-mlx compare: error: --{flag} {d} is not a model directory")
    models = TaskModels(args.baseline, args.ss, args.medusa, args.draft, args.ss_lossless)
    try:
        report = compare_task(
            args.task, models, n=args.n, max_tokens=args.max_tokens, tree=args.tree,
            medusa_tree=args.medusa_tree, num_draft=args.num_draft, dynamic=args.dynamic,
            warmup=args.warmup, repeats=args.repeats, root=args.data_root,
            progress=not args.no_progress)
    except (ValueError, DatasetError) as e:
        sys.exit(f"ss-mlx compare: error: {e}")
    text = format_task(report)
    print(text, end="")
    if args.markdown:
        write_text(args.markdown, text)
    if args.json:
        write_text(args.json, dump_json(report))
    if args.plot:
        plot_reports([report], args.plot)


if __name__ == "__main__":
    main()
