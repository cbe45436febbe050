"""`ss-mlx bench`: Speculative Streaming against the alternatives, same prompts, one process.

Methods (each a generator of emitted tokens over the same prompts, the same loaded weights):
- ``ar``: mlx-lm's own ``generate_step`` (greedy), the baseline of every ratio;
- ``ss``: ``ss_generate_step``, one row per draft tree;
- ``draft``: mlx-lm's ``speculative_generate_step`` with a draft model, or a layer-truncated
  self-draft (the target's first K layers, final norm and head; shares the target's arrays);
- ``lookup``: prompt-lookup decoding (``ss_mlx.lookup``);
- ``medusa``: Medusa heads from the model directory (``ss_mlx.medusa``), when it has them.

Runs are interleaved (prompt by prompt, repeat by repeat, method order rotated) so that a change
in machine load hits every method alike; each (method, prompt) reports the median of its
repeats. Every run's tokens are compared with ``ar``'s: a method that differs anywhere is
FAILING and gets no summary numbers.

Definitions (per method, over all prompts):
- decode tok/s = tokens after the first pass / time after the first pass (sum of per-prompt
  medians); the first pass (which includes prefill) is reported as time to first token;
- speedup = decode tok/s / decode tok/s of ``ar``;
- tokens per pass = tokens / target-model forward passes;
- call reduction = AR forward calls (one per token) / all forward calls of the method (target
  passes plus draft-model calls);
- acceptance at depth d = among passes that verified a draft at least d deep, the fraction
  that accepted at least d draft tokens;
- peak memory = peak allocation during the method's runs (everything loaded is resident,
  so compare differences; ``extra_param_bytes`` is what each method adds to the target).
"""

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import cliargs
from ..decode.loop import StepToken
from ..decode.tree import MAX_NODES
from ..files import check_output_file, dump_json, savefig, write_text

SCHEMA = "ss-mlx-bench/1"
BASELINE = "ar"
METHODS = ("ar", "ss", "draft", "lookup", "medusa")
DEFAULT_METHODS = "ar,ss,draft,lookup,medusa"
DEFAULT_NUM_DRAFT = 3  # mlx_lm.generate's CLI default


GenerateFn = Callable[[mx.array, int], Iterator[StepToken]]


@dataclass
class Method:
    """A decoding method under test.

    Args:
        name: its row label (unique).
        kind: one of ``METHODS``.
        generate: ``(prompt (L,), max_tokens) -> StepToken`` generator, greedy.
        depth: deepest draft it verifies (acceptance columns).
        extra_param_bytes: parameter memory it adds to the target model.
        config: its settings, for the report.
    """

    name: str
    kind: str
    generate: GenerateFn
    depth: int = 0
    extra_param_bytes: int = 0
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """The raw measurement of one generation."""

    method: str
    prompt: int
    repeat: int  # -1 for warm-up runs
    tokens: list[int]
    accepted: list[int]  # per target pass
    drafted: list[int]  # per target pass
    first_pass_tokens: int
    ttft_s: float
    decode_s: float
    total_s: float
    peak_memory: int
    active_memory: int
    tree_sizes: list[int] = field(default_factory=list)  # nodes per target pass
    by_source: dict[str, int] = field(default_factory=dict)  # accepted draft tokens per source


# ------------------------------------------------------------------ methods


def _nbytes(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def ar_method(base: nn.Module) -> Method:
    """mlx-lm's own greedy autoregressive decoding."""
    from mlx_lm.generate import generate_step

    def gen(prompt: mx.array, max_tokens: int) -> Iterator[StepToken]:
        for i, (token, _) in enumerate(generate_step(prompt, base, max_tokens=max_tokens)):
            yield StepToken(int(token), False, 0, i, 0)

    return Method("ar", "ar", gen, config={"impl": "mlx_lm.generate.generate_step"})


def tree_label(tree: Any) -> str:
    """A short row label for a tree argument (None: the model's own tree)."""
    if isinstance(tree, str) and tree.endswith(".json"):
        try:
            return tree_label(json.loads(Path(tree).read_text()))
        except (OSError, json.JSONDecodeError):
            return Path(tree).name
    if isinstance(tree, str):
        return tree
    if isinstance(tree, dict) and "widths" in tree:
        w = ",".join(map(str, tree["widths"]))
        return f"{w}:{tree['node_budget']}" if tree.get("node_budget") else w
    if isinstance(tree, dict) and "paths" in tree:
        return f"{len(tree['paths'])} paths"
    return "default"


def ss_method(model: Any, tree: Any = None, name: str | None = None) -> Method:
    """Speculative Streaming with one static draft tree (default: the model's), or with
    ``tree="dynamic"`` the default hybrid tree chosen every step."""
    from ..generation import DYNAMIC, dynamic_stats, resolve_tree, ss_generate_step

    extra = sum(v.nbytes for v in model.streams.tensors().values())
    if tree == DYNAMIC:
        # The model's earlier outputs are a draft source (OutputMemory): every run of a prompt
        # starts from the memory of the prompts before it, never from an earlier run of the
        # same prompt (a warm-up or repeat would draft its own answer from memory).
        before: dict[tuple[int, ...], Any] = {}

        def gen_dynamic(prompt: mx.array, max_tokens: int) -> Iterator[StepToken]:
            stats = dynamic_stats(model)
            stats.remember_last_output()
            key = tuple(prompt.tolist())
            if key not in before:
                before[key] = copy.deepcopy(stats.memory)
            else:
                stats.memory = copy.deepcopy(before[key])
            yield from ss_generate_step(prompt, model, tree=DYNAMIC, max_tokens=max_tokens)

        return Method(name or "ss[dynamic]", "ss", gen_dynamic, depth=model.num_streams,
                      extra_param_bytes=extra, config={"tree": DYNAMIC})
    spec = resolve_tree(model, tree)

    def gen(prompt: mx.array, max_tokens: int) -> Iterator[StepToken]:
        yield from ss_generate_step(prompt, model, tree=spec, max_tokens=max_tokens)

    return Method(
        name or f"ss[{tree_label(tree)}]", "ss", gen, depth=spec.depth, extra_param_bytes=extra,
        config={"tree": tree if isinstance(tree, (str, dict)) else None,
                "paths": [list(p) for p in spec.paths[1:]], "num_nodes": spec.num_nodes,
                "widths": list(spec.widths)},
    )


def draft_method(base: nn.Module, draft: nn.Module, num_draft: int = DEFAULT_NUM_DRAFT,
                 name: str = "draft", extra_param_bytes: int = 0,
                 config: dict[str, Any] | None = None) -> Method:
    """mlx-lm's speculative decoding (a chain of `num_draft` tokens from `draft`)."""
    from mlx_lm.generate import speculative_generate_step

    def gen(prompt: mx.array, max_tokens: int) -> Iterator[StepToken]:
        step = emitted = 0
        pending: list[int] = []
        for token, _, from_draft in speculative_generate_step(
            prompt, base, draft, num_draft_tokens=num_draft, max_tokens=max_tokens
        ):
            pending.append(int(token))
            if from_draft:
                continue
            # mlx-lm evaluates a whole pass before yielding it, so holding its tokens until
            # the pass ends costs no time and gives each token its pass's accepted count.
            drafted = min(num_draft, max_tokens - emitted)
            for i, t in enumerate(pending):
                yield StepToken(t, i < len(pending) - 1, len(pending) - 1, step, drafted)
            emitted += len(pending)
            pending = []
            step += 1
        for t in pending:  # stopped at max_tokens inside an accepted run
            yield StepToken(t, True, len(pending), step, min(num_draft, max_tokens - emitted))

    return Method(name, "draft", gen, depth=num_draft, extra_param_bytes=extra_param_bytes,
                  config={"impl": "mlx_lm.generate.speculative_generate_step",
                          "num_draft_tokens": num_draft, **(config or {})})


def truncated_draft(model_dir: str | Path, base: nn.Module, layers: int) -> nn.Module:
    """A self-draft: the model's first `layers` layers, its final norm and LM head.

    The model is loaded again lazily (a new module tree, no file copies, no weights read) and
    its layer list sliced; then every kept parameter is pointed at the target's array, so the
    draft costs no weight memory (it is literally the bottom of the target).
    """
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load_model

    draft, _ = load_model(Path(model_dir), lazy=True)
    n = len(draft.model.layers)
    if not 1 <= layers < n:
        raise ValueError(f"--draft-layers must be in [1, {n - 1}] for this {n}-layer model")
    draft.model.layers = draft.model.layers[:layers]
    shared = dict(tree_flatten(base.parameters()))
    names = [k for k, _ in tree_flatten(draft.parameters())]
    missing = [k for k in names if k not in shared]
    if missing:
        raise ValueError(f"the target has no parameters {missing[:3]}... for the self-draft")
    draft.update(tree_unflatten([(k, shared[k]) for k in names]))
    return draft


def lookup_method(base: nn.Module, config: Any = None) -> Method:
    """Prompt-lookup decoding verified by plain tree passes."""
    from ..drafters.lookup import LookupConfig, lookup_generate_step

    config = config or LookupConfig()

    def gen(prompt: mx.array, max_tokens: int) -> Iterator[StepToken]:
        yield from lookup_generate_step(prompt, base, config=config, max_tokens=max_tokens)

    label = f"lookup[{config.max_depth}x{config.num_candidates}]"
    return Method(label, "lookup", gen, depth=config.max_depth, config=asdict(config))


def medusa_method(base: nn.Module, heads: Any, tree: Any = None) -> Method:
    """Medusa heads drafting a static tree, verified by plain tree passes."""
    from ..drafters.medusa import medusa_generate_step, resolve_medusa_tree

    spec = resolve_medusa_tree(heads, tree)

    def gen(prompt: mx.array, max_tokens: int) -> Iterator[StepToken]:
        yield from medusa_generate_step(prompt, base, heads, tree=spec, max_tokens=max_tokens)

    return Method(
        f"medusa[{tree_label(tree) if tree else ','.join(map(str, spec.widths))}]", "medusa",
        gen, depth=spec.depth, extra_param_bytes=heads.nbytes,
        config={"heads": heads.config, "paths": [list(p) for p in spec.paths[1:]],
                "num_nodes": spec.num_nodes},
    )


# ------------------------------------------------------------------ measuring


def _synchronize() -> None:
    from mlx_lm.generate import generation_stream

    # mlx-lm decodes on its own stream and queues the next step before yielding a token.
    mx.synchronize(generation_stream)
    mx.synchronize()


def run_once(method: Method, prompt: mx.array, max_tokens: int, eos: set[int],
             prompt_index: int = 0, repeat: int = 0) -> Run:
    """Generate once, timing the first token and the rest; stop at EOS or max_tokens."""
    _synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    tokens: list[int] = []
    passes: dict[int, tuple[int, int, int]] = {}
    by_source: dict[str, int] = {}
    first_step = None
    first_pass_tokens = 0
    t_first = t_last = None
    t0 = time.perf_counter()
    gen = method.generate(prompt, max_tokens)
    try:
        for e in gen:
            now = time.perf_counter()
            if t_first is None:
                t_first, first_step = now, e.step
            if e.step == first_step:
                first_pass_tokens += 1
            t_last = now
            tokens.append(e.token)
            passes[e.step] = (e.accepted, e.draft_depth, e.tree_size)
            if e.from_draft:
                by_source[e.source] = by_source.get(e.source, 0) + 1
            if e.token in eos or len(tokens) == max_tokens:
                break
    finally:
        gen.close()
    _synchronize()  # a pipelined step still in flight belongs to this run, not the next
    if t_first is None:
        raise RuntimeError(f"method {method.name} produced no tokens")
    steps = sorted(passes)
    return Run(
        method=method.name,
        prompt=prompt_index,
        repeat=repeat,
        tokens=tokens,
        accepted=[passes[s][0] for s in steps],
        drafted=[passes[s][1] for s in steps],
        first_pass_tokens=first_pass_tokens,
        ttft_s=t_first - t0,
        decode_s=t_last - t_first,
        total_s=t_last - t0,
        peak_memory=mx.get_peak_memory(),
        active_memory=active,
        tree_sizes=[passes[s][2] for s in steps],
        by_source=by_source,
    )


def run_benchmark(
    methods: Sequence[Method],
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    eos: set[int],
    warmup: int = 1,
    repeats: int = 3,
    progress: bool = True,
) -> list[Run]:
    """Every method on every prompt, `repeats` times, interleaved; warm-up runs first
    (on the first prompt, recorded with ``repeat = -1``)."""
    from tqdm import tqdm

    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    if not prompts:
        raise ValueError("no prompts")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    arrays = [mx.array(list(p), dtype=mx.int32) for p in prompts]
    runs: list[Run] = []
    bar = tqdm(total=len(methods) * (warmup + repeats * len(prompts)), desc="bench",
               unit="run", disable=not progress, file=sys.stderr)
    for _ in range(warmup):
        for m in methods:
            runs.append(run_once(m, arrays[0], max_tokens, eos, 0, -1))
            bar.update()
    k = 0
    for i, prompt in enumerate(arrays):
        for r in range(repeats):
            # Rotate the order so no method always runs right after the same other one.
            for j in range(len(methods)):
                m = methods[(j + k) % len(methods)]
                bar.set_postfix_str(m.name, refresh=False)
                runs.append(run_once(m, prompt, max_tokens, eos, i, r))
                bar.update()
            k += 1
    bar.close()
    return runs


def first_divergence(expected: Sequence[int], got: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None."""
    for i, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            return i
    return None if len(expected) == len(got) else min(len(expected), len(got))


def check_parity(runs: Sequence[Run], baseline: str = BASELINE) -> dict[str, dict[str, Any]]:
    """Compare every measured run's tokens with the baseline's first repeat on that prompt.

    Returns per method: ``ok``, ``runs`` checked, ``mismatched`` runs and the
    ``first_divergence`` (prompt, repeat, token index, expected and produced token).
    """
    measured = [r for r in runs if r.repeat >= 0]
    reference = {r.prompt: r.tokens for r in measured if r.method == baseline and r.repeat == 0}
    out: dict[str, dict[str, Any]] = {}
    for r in measured:
        entry = out.setdefault(r.method, {"ok": True, "runs": 0, "mismatched": 0,
                                          "first_divergence": None})
        entry["runs"] += 1
        if r.prompt not in reference:
            raise ValueError(f"no {baseline!r} run on prompt {r.prompt} to check parity against")
        exp = reference[r.prompt]
        i = first_divergence(exp, r.tokens)
        if i is None:
            continue
        entry["ok"] = False
        entry["mismatched"] += 1
        if entry["first_divergence"] is None:
            entry["first_divergence"] = {
                "prompt": r.prompt, "repeat": r.repeat, "index": i,
                "expected": exp[i] if i < len(exp) else None,
                "got": r.tokens[i] if i < len(r.tokens) else None,
            }
    return out


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def summarize_method(method: Method, runs: Sequence[Run]) -> dict[str, Any]:
    """Aggregate one method's measured runs (all repeats of all prompts)."""
    by_prompt: dict[int, list[Run]] = {}
    for r in runs:
        if r.method == method.name and r.repeat >= 0:
            by_prompt.setdefault(r.prompt, []).append(r)
    if not by_prompt:
        raise ValueError(f"no measured runs of {method.name}")
    tokens = decode_tokens = 0
    decode_s = total_s = 0.0
    passes = draft_calls = 0
    accepted: list[int] = []
    drafted: list[int] = []
    ttft, per_prompt_tps = [], {}
    tree_nodes, by_source = 0, {}
    for p, rs in sorted(by_prompt.items()):
        ref = rs[0]  # greedy: every repeat emits the same tokens in the same passes
        n_dec = len(ref.tokens) - ref.first_pass_tokens
        d_s = _median([r.decode_s for r in rs])
        tokens += len(ref.tokens)
        decode_tokens += n_dec
        decode_s += d_s
        total_s += _median([r.total_s for r in rs])
        ttft.append(_median([r.ttft_s for r in rs]))
        passes += len(ref.accepted)
        if method.kind == "draft":
            draft_calls += sum(ref.drafted)
        accepted += ref.accepted
        drafted += ref.drafted
        tree_nodes += sum(ref.tree_sizes)
        for src, k in ref.by_source.items():
            by_source[src] = by_source.get(src, 0) + k
        if n_dec > 0 and d_s > 0:
            per_prompt_tps[p] = n_dec / d_s
    depth = max([method.depth, *drafted]) if drafted else method.depth
    acceptance = []
    for d in range(1, depth + 1):
        eligible = [a for a, k in zip(accepted, drafted, strict=True) if k >= d]
        acceptance.append(sum(a >= d for a in eligible) / len(eligible) if eligible else None)
    with_draft = [a for a, k in zip(accepted, drafted, strict=True) if k > 0]
    all_runs = [r for rs in by_prompt.values() for r in rs]
    return {
        "prompts": len(by_prompt),
        "tokens": tokens,
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "total_s": total_s,
        "decode_tps": decode_tokens / decode_s if decode_s > 0 else None,
        "e2e_tps": tokens / total_s if total_s > 0 else None,
        "passes": passes,
        "draft_calls": draft_calls,
        "tokens_per_pass": tokens / passes,
        "call_reduction": tokens / (passes + draft_calls),
        "mean_accepted": sum(with_draft) / len(with_draft) if with_draft else 0.0,
        "acceptance_by_depth": acceptance,
        "mean_tree_size": tree_nodes / passes if tree_nodes else None,
        "accepted_by_source": by_source,
        "ttft_s": _median(ttft),
        "peak_memory_bytes": max(r.peak_memory for r in all_runs),
        "peak_over_resident_bytes": max(r.peak_memory - r.active_memory for r in all_runs),
        "per_prompt_decode_tps": per_prompt_tps,
    }


def summarize(methods: Sequence[Method], runs: Sequence[Run],
              parity: dict[str, dict[str, Any]], baseline: str = BASELINE
              ) -> dict[str, dict[str, Any] | None]:
    """Per-method summaries with speedups; None for a method that failed the parity check."""
    out: dict[str, dict[str, Any] | None] = {}
    for m in methods:
        out[m.name] = summarize_method(m, runs) if parity[m.name]["ok"] else None
    base = out.get(baseline)
    for s in out.values():
        if s is None:
            continue
        if base is None or not base["decode_tps"] or s["decode_tps"] is None:
            s["speedup"] = s["speedup_median_per_prompt"] = None
            continue
        s["speedup"] = s["decode_tps"] / base["decode_tps"]
        ratios = [tps / base["per_prompt_decode_tps"][p]
                  for p, tps in s["per_prompt_decode_tps"].items()
                  if p in base["per_prompt_decode_tps"]]
        s["speedup_median_per_prompt"] = _median(ratios) if ratios else None
    return out


# ------------------------------------------------------------------ report


def build_report(
    methods: Sequence[Method],
    runs: Sequence[Run],
    *,
    skipped: Sequence[dict[str, str]] = (),
    machine: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    prompt_texts: Sequence[str] = (),
    verify_cost: dict[str, Any] | None = None,
    command: str | None = None,
    baseline: str = BASELINE,
) -> dict[str, Any]:
    """The JSON report: settings, machine, every raw run, parity and summaries.

    The baseline's output per prompt is stored once (``prompts[].ar_tokens``); a run's
    ``tokens`` is null when it equals that, and the full list when it does not.
    """
    parity = check_parity(runs, baseline)
    summaries = summarize(methods, runs, parity, baseline)
    reference = {r.prompt: r.tokens for r in runs if r.method == baseline and r.repeat == 0}
    prompts = [
        {"text": prompt_texts[i] if i < len(prompt_texts) else None, "ar_tokens": reference[i]}
        for i in sorted(reference)
    ]

    def raw(r: Run) -> dict[str, Any]:
        d = asdict(r)
        d["n_tokens"] = len(r.tokens)
        d["tokens"] = None if reference.get(r.prompt) == r.tokens else r.tokens
        return d
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "baseline": baseline,
        "machine": machine or {},
        "model": model or {},
        "dataset": dataset or {},
        "settings": settings or {},
        "methods": [
            {
                "name": m.name,
                "kind": m.kind,
                "status": "ok" if parity[m.name]["ok"] else "FAILING",
                "depth": m.depth,
                "extra_param_bytes": m.extra_param_bytes,
                "config": m.config,
                "parity": parity[m.name],
                "summary": summaries[m.name],
            }
            for m in methods
        ],
        "skipped": list(skipped),
        "prompts": prompts,
        "verify_cost": verify_cost,
        "runs": [raw(r) for r in runs],
    }


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def format_table(report: dict[str, Any]) -> str:
    """The markdown table of a report (FAILING methods show where they diverged)."""
    depth = max([m["depth"] for m in report["methods"]] + [1])
    depth = min(depth, 8)
    head = ("| method | status | decode tok/s | speedup | tokens/pass | call reduction | "
            "TTFT ms | peak GB | extra MB | mean tree | accepted by source | "
            + " | ".join(f"acc@{d}" for d in range(1, depth + 1)) + " |")
    sep = "|" + "---|" * 2 + "---:|" * 8 + "---|" + "---:|" * depth
    rows = [head, sep]
    for m in report["methods"]:
        s = m["summary"]
        if s is None:
            fd = m["parity"]["first_divergence"]
            cells = [f"FAILING: prompt {fd['prompt']} token {fd['index']}"] + [""] * (9 + depth)
            rows.append(f"| {m['name']} | " + " | ".join(cells) + " |")
            continue
        acc = [_fmt(a, ".2f") if a is not None else "" for a in s["acceptance_by_depth"][:depth]]
        acc += [""] * (depth - len(acc))
        cells = [
            m["status"],
            _fmt(s["decode_tps"], ".1f"),
            _fmt(s.get("speedup"), ".2f", "x"),
            _fmt(s["tokens_per_pass"], ".2f"),
            _fmt(s["call_reduction"], ".2f"),
            _fmt(s["ttft_s"] * 1e3, ".0f"),
            _fmt(s["peak_memory_bytes"] / 1e9, ".3f"),
            _fmt(m["extra_param_bytes"] / 1e6, ".1f"),
            _fmt(s.get("mean_tree_size"), ".2f"),
            ", ".join(f"{k} {v}" for k, v in sorted((s.get("accepted_by_source") or {}).items())),
            *acc,
        ]
        rows.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_report(report: dict[str, Any]) -> str:
    """Markdown: what was run, where, then the table and notes."""
    from .machine import summary_line

    lines = []
    ds, st, mo = report["dataset"], report["settings"], report["model"]
    if report.get("command"):
        lines.append(f"Command: `{report['command']}`\n")
    if report["machine"]:
        lines.append(f"Machine: {summary_line(report['machine'])}\n")
    if mo:
        quant = f", {mo['quantization']}" if mo.get("quantization") else ""
        lines.append(f"Model: `{mo.get('path')}` ({mo.get('model_type')}, {mo.get('layers')} "
                     f"layers, {mo.get('dtype')}{quant})\n")
    if ds:
        lines.append(
            f"Prompts: {ds.get('name')} ({ds.get('n')} of {ds.get('available')}, "
            f"`{ds.get('source')}`), "
            f"template `{json.dumps(ds.get('template'))}`, chat template "
            f"{'applied' if ds.get('chat_template_applied') else 'not applied'}\n"
        )
    if st:
        lines.append(
            f"Greedy, max {st.get('max_tokens')} new tokens (stop at EOS), {st.get('warmup')} "
            f"warm-up run(s), median of {st.get('repeats')} interleaved repeats per prompt; "
            f"ratios against `{report['baseline']}` from this one run.\n"
        )
    lines.append(format_table(report))
    notes = [f"- `{s['name']}` skipped: {s['reason']}" for s in report["skipped"]]
    for m in report["methods"]:
        if m["status"] != "ok":
            fd = m["parity"]["first_divergence"]
            par = m["parity"]
            notes.append(
                f"- `{m['name']}` is FAILING the greedy parity check: {par['mismatched']} of "
                f"{par['runs']} runs differ from `{report['baseline']}`; first at prompt "
                f"{fd['prompt']}, token {fd['index']} (expected {fd['expected']}, got "
                f"{fd['got']}). Its numbers are left out."
            )
    if notes:
        lines.append("\n" + "\n".join(notes))
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """PNG: decode tok/s per method, acceptance by depth, and the verify-cost curve if known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .machine import MARKERS, model_label, plot_subtitle

    curve = report.get("verify_cost")
    panels = 3 if curve else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    ax = axes[0]
    names, tps, colors = [], [], []
    for m in report["methods"]:
        s = m["summary"]
        names.append(m["name"] if s else f"{m['name']}\n(FAILING)")
        tps.append(s["decode_tps"] or 0.0 if s else 0.0)
        colors.append("tab:gray" if m["kind"] == BASELINE else
                      "tab:red" if s is None else "tab:blue")
    bars = ax.bar(range(len(names)), tps, color=colors)
    for b, m in zip(bars, report["methods"], strict=True):
        s = m["summary"]
        if s and s.get("speedup"):
            ax.annotate(f"{s['speedup']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("speed (label: vs ar)")
    ax = axes[1]
    for m in report["methods"]:
        s = m["summary"]
        if not s or not s["acceptance_by_depth"]:
            continue
        acc = s["acceptance_by_depth"]
        xs = [d + 1 for d, a in enumerate(acc) if a is not None]
        marker = MARKERS[len(ax.get_lines()) % len(MARKERS)]
        ax.plot(xs, [a for a in acc if a is not None], marker=marker, label=m["name"])
    ax.set_xlabel("draft depth d")
    ax.set_ylabel("P(accepted >= d)")
    ax.set_ylim(0, 1)
    ax.set_title("acceptance by depth")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if curve:
        ax = axes[2]
        ax.plot(curve["T"], curve["relative"], marker=".")
        ax.set_xlabel("tree nodes T (rows verified per pass)")
        ax.set_ylabel("pass time / time at T = 1")
        ax.set_title(f"verify cost ({curve.get('pass', '')})")
    ds = report.get("dataset", {}).get("name", "")
    model = report.get("model", {})
    fig.suptitle(f"ss-mlx bench: {model_label(model.get('path'))} on {ds}\n"
                 + plot_subtitle(report.get("machine"), model.get("path"), model.get("dtype")),
                 fontsize=9)
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------ CLI


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx bench",
        description="Benchmark Speculative Streaming against mlx-lm AR decoding, draft-model "
        "speculative decoding, prompt lookup and Medusa heads: same prompts, same process.",
    )
    p.add_argument("--model", help="model directory (default: the embedded default model)")
    p.add_argument("--dataset", default="chat",
                   help="a data set name (e2e, e2e-dev, dialogsum, dialogsum-dev, wikisql, "
                   "wikisql-valid, vicuna (alias chat), wwdc25) or a JSONL file of "
                   "{\"prompt\": ...} rows (default: %(default)s)")
    p.add_argument("--data-root", help="folder of the data sets (default: $SS_MLX_DATA or "
                   "../shared/data)")
    p.add_argument("--n", type=cliargs.int_at_least(1), default=30,
                   help="number of prompts (default: %(default)s)")
    p.add_argument("--seed", type=cliargs.seed, default=None,
                   help="sample the prompts at random with this seed (default: the first n)")
    p.add_argument("--template", help="override the data set's prompt template "
                   "(str.format over the row's fields, e.g. '{mr}')")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text, without the tokenizer's chat template")
    p.add_argument("--max-tokens", type=cliargs.int_at_least(1), default=128,
                   help="default: %(default)s")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated subset of " + ",".join(METHODS) + " (default: all; "
                   "ar always runs, as the baseline)")
    p.add_argument("--tree", action="append", default=None,
                   help="SS draft tree (repeatable: one row each): widths '3,2,1', "
                   "'4,2,1:8' (with a node budget), JSON paths, a .json file, 'default' (the "
                   "model's own) or 'dynamic' (streams + lookup, chosen per step); default: "
                   "dynamic and the model's, plus the tuned tree when `ss-mlx tune` saved one")
    p.add_argument("--draft-model", help="draft model directory for the draft method")
    p.add_argument("--draft-layers", type=cliargs.int_at_least(1), default=None,
                   help="layers of the self-draft when no --draft-model (default: a quarter)")
    p.add_argument("--num-draft-tokens", type=cliargs.int_at_least(1), default=DEFAULT_NUM_DRAFT,
                   help="draft chain length (default: %(default)s, as mlx_lm.generate)")
    p.add_argument("--lookup-depth", type=cliargs.int_at_least(1), default=7,
                   help="default: %(default)s")
    p.add_argument("--lookup-candidates", type=cliargs.int_at_least(1), default=1,
                   help="continuations per lookup draft, merged as a tree (default: "
                   "%(default)s, a chain)")
    p.add_argument("--lookup-ngram", type=cliargs.int_at_least(1), default=3,
                   help="longest n-gram matched (default: %(default)s)")
    p.add_argument("--medusa-tree", default=None, help="Medusa draft tree (default: 3,2,1,...)")
    p.add_argument("--warmup", type=cliargs.int_at_least(0), default=1,
                   help="warm-up runs per method (default: 1)")
    p.add_argument("--repeats", type=cliargs.int_at_least(1), default=3,
                   help="timed repeats per prompt and method (default: %(default)s)")
    p.add_argument("--verify-curve", type=cliargs.int_in(0, MAX_NODES), default=0, metavar="MAX_T",
                   help="also time one pass over T = 1..MAX_T tree nodes (default: off; the "
                   "tuned curve is shown when there is one)")
    p.add_argument("--json", help="write the full report (every run) as JSON here")
    p.add_argument("--markdown", help="write the markdown report here too")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load_target(model_dir: Path) -> tuple[Any, nn.Module, Any, dict[str, Any]]:
    """(SSModel or None, the mlx-lm base model, tokenizer, config) from one load."""
    from ..config import CONFIG_KEY
    from ..loader import load, load_mlx_lm, read_config

    config = read_config(model_dir)
    if CONFIG_KEY in config:
        model, tokenizer = load(model_dir)
        return model, model.base, tokenizer, config
    base, tokenizer = load_mlx_lm(model_dir)
    return None, base, tokenizer, config


def _parse_methods(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {','.join(METHODS)}")
    # The baseline always runs first: every ratio and the parity check need it.
    return [BASELINE] + [k for k in dict.fromkeys(kinds) if k != BASELINE]


def build_methods(args: argparse.Namespace, model_dir: Path, ss_model: Any, base: nn.Module,
                  config: dict[str, Any]) -> tuple[list[Method], list[dict[str, str]]]:
    """The methods the arguments ask for, and the ones skipped with the reason."""
    from ..decode.tree import default_tree
    from ..drafters.lookup import LookupConfig
    from ..drafters.medusa import load_medusa
    from ..generation import tuned_record

    methods, skipped = [], []
    for kind in _parse_methods(args.methods):
        if kind == "ar":
            methods.append(ar_method(base))
        elif kind == "ss":
            if ss_model is None:
                skipped.append({"name": "ss", "reason": f"{model_dir} has no speculative streams"})
                continue
            # "default" is the model's own tree (its config's, else the built-in default), not
            # the tuned one that generation would pick: the tuned tree gets its own row.
            own = ss_model.cfg.tree or default_tree(ss_model.num_streams)
            # The dynamic hybrid tree (generation's default) and the model's static tree.
            trees: list[Any] = [own if t == "default" else t
                                for t in args.tree or ["dynamic", "default"]]
            names: list[str | None] = [None] * len(trees)
            if not args.tree:
                tuned = tuned_record(ss_model)
                if tuned is not None:
                    trees.append(tuned["tree"])
                    names.append(f"ss[tuned {tree_label(tuned['tree'])}]")
            seen = set()
            for tree, name in zip(trees, names, strict=True):
                m = ss_method(ss_model, tree, name)
                key = tuple(map(tuple, m.config.get("paths", [["dynamic"]])))
                if key in seen:  # e.g. the tuned tree is already the model's default
                    skipped.append({"name": m.name, "reason": "same tree as an earlier row"})
                    continue
                seen.add(key)
                methods.append(m)
        elif kind == "draft":
            if args.draft_model:
                import mlx_lm

                draft, _ = mlx_lm.load(args.draft_model)
                v_t = base.model.embed_tokens.weight.shape[0]
                v_d = draft.model.embed_tokens.weight.shape[0]
                if v_t != v_d:
                    raise ValueError(f"draft vocabulary ({v_d}) differs from the target's ({v_t})")
                methods.append(draft_method(
                    base, draft, args.num_draft_tokens,
                    name=f"draft[{Path(args.draft_model).name}]",
                    extra_param_bytes=_nbytes(draft), config={"draft_model": args.draft_model}))
            else:
                n = len(base.model.layers)
                k = args.draft_layers or max(1, n // 4)
                draft = truncated_draft(model_dir, base, k)
                methods.append(draft_method(
                    base, draft, args.num_draft_tokens, name=f"draft[self {k}/{n}L]",
                    config={"self_draft_layers": k, "shares_target_weights": True}))
        elif kind == "lookup":
            methods.append(lookup_method(base, LookupConfig(
                max_ngram=args.lookup_ngram, max_depth=args.lookup_depth,
                num_candidates=args.lookup_candidates)))
        elif kind == "medusa":
            heads = load_medusa(model_dir, base)
            if heads is None:
                skipped.append({"name": "medusa",
                                "reason": f"{model_dir} has no medusa_heads.safetensors"})
                continue
            methods.append(medusa_method(base, heads, args.medusa_tree))
    return methods, skipped


def _model_info(model_dir: Path, base: nn.Module, config: dict[str, Any], ss_model: Any
                ) -> dict[str, Any]:
    from ..config import CONFIG_KEY
    from ..tuned import model_hash

    q = config.get("quantization")
    return {
        "path": str(model_dir),
        "hash": model_hash(model_dir),
        "model_type": config.get("model_type"),
        "layers": len(base.model.layers),
        "dtype": str(base.model.norm.weight.dtype).removeprefix("mlx.core."),
        "quantization": f"{q.get('bits')}-bit, group {q.get('group_size')}" if q else None,
        "params_bytes": _nbytes(base),
        "speculative_streaming": config.get(CONFIG_KEY) if ss_model is not None else None,
    }


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = setup_arg_parser().parse_args(argv)
    from ..loader import resolve_model_path
    from .datasets import DatasetError, encode_prompt, load_prompts
    from .machine import describe_machine, require_matplotlib

    if args.plot:
        require_matplotlib("bench")

    try:
        for flag in ("json", "markdown", "plot"):  # before the run, not after it
            if getattr(args, flag):
                check_output_file(getattr(args, flag), f"--{flag}")
        if args.model is None:
            from ..prepare.default_model import ensure_default_model

            args.model = ensure_default_model()
        model_dir = resolve_model_path(args.model)
        prompt_set = load_prompts(args.dataset, n=args.n, seed=args.seed, root=args.data_root,
                                  template=args.template,
                                  chat=False if args.no_chat_template else None)
        ss_model, base, tokenizer, config = _load_target(model_dir)
        methods, skipped = build_methods(args, model_dir, ss_model, base, config)
    except (ValueError, FileNotFoundError, DatasetError) as e:
        sys.exit(f"ss-mlx bench: error: {e}")
    if args.seed is not None:
        mx.random.seed(args.seed)
    chat_applied = prompt_set.chat and bool(getattr(tokenizer, "chat_template", None))
    prompts = [encode_prompt(tokenizer, t, prompt_set.chat) for t in prompt_set.prompts]
    eos = set(tokenizer.eos_token_ids)
    progress = not args.no_progress

    verify_cost = None
    if args.verify_curve:
        from .tune import measure_verify_cost

        verify_cost = measure_verify_cost(ss_model or base, max_t=args.verify_curve,
                                          progress=progress)
        verify_cost["source"] = "measured in this run"
    else:
        from ..generation import tuned_record
        from ..tuned import load_tuned, tuned_path

        if ss_model is not None:
            tuned = tuned_record(ss_model)  # read (and warned about) once per model
        else:
            tuned = load_tuned(model_dir, vocab_size=base.model.embed_tokens.weight.shape[0])
        if tuned is not None and tuned.get("verify_cost"):
            verify_cost = dict(tuned["verify_cost"], source=str(tuned_path(model_dir)))

    runs = run_benchmark(methods, prompts, max_tokens=args.max_tokens, eos=eos,
                         warmup=args.warmup, repeats=args.repeats, progress=progress)
    model_info = _model_info(model_dir, base, config, ss_model)
    report = build_report(
        methods, runs,
        skipped=skipped,
        machine=describe_machine(model_info["dtype"]),
        model=model_info,
        dataset={**prompt_set.to_dict(), "chat_template_applied": chat_applied,
                 "prompt_tokens": [len(p) for p in prompts]},
        settings={"max_tokens": args.max_tokens, "warmup": args.warmup,
                  "repeats": args.repeats, "seed": args.seed,
                  "methods": [m.name for m in methods]},
        prompt_texts=prompt_set.prompts,
        verify_cost=verify_cost,
        command="ss-mlx bench " + " ".join(argv),
    )
    text = format_report(report)
    print(text, end="")
    if args.markdown:
        write_text(args.markdown, text)
    if args.json:
        write_text(args.json, dump_json(report))
    if args.plot:
        plot_report(report, args.plot)


if __name__ == "__main__":
    main()
