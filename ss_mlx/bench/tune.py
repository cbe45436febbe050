"""`ss-mlx tune`: fit the draft tree to this machine and this model.

Two measurements, then a choice:
1. the verify-cost curve: seconds of one decoding pass over a tree of T nodes (T = 1..max_t),
   relative to T = 1, on a realistic context. On a GPU this is flat until some row count and
   then climbs; on a CPU it climbs early. Either way it is what a bigger tree costs.
2. acceptance: for each prompt, the model's own greedy continuation (what every lossless
   method must produce) and, at every position t, the rank of the true token t+1+d in stream
   d's ranking. A tree node (r1, .., rd) is accepted at t exactly when the true tokens have
   ranks r1, .., rd, so any tree's expected accepted length is an average over positions.
3. the choice: trees grown best-first by estimated path probability (exactly the trees
   ``TreeSpec.from_widths(widths, node_budget, rank_probs)`` builds), scored by expected
   tokens per pass / relative cost of their size; the best is saved for (model, machine).

Saved as JSON under ``$SS_MLX_HOME`` (else ``$XDG_CACHE_HOME/ss-mlx``, else ``~/.cache/ss-mlx``)
in ``tuned/<model-hash>-<machine-hash>.json``; :func:`ss_mlx.tuned.load_tuned_tree` reads it back.
"""

import argparse
import heapq
import math
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .. import cliargs
from ..decode.cache import make_cache
from ..decode.tree import MAX_NODES, TreeSpec
from ..drafters.hybrid import MATCH_BUCKETS, match_bucket
from ..drafters.lookup import NgramIndex
from ..files import check_output_file, dump_json, savefig, write_text
from ..model.ss_model import SSModel, plain_tree_forward
from ..tuned import SCHEMA, machine_key, model_hash, save_tuned, verify_cost_ok
from .machine import describe_machine, summary_line

DEFAULT_MAX_T = 64
DEFAULT_MAX_WIDTH = 4
RANK_WIDTH = 8  # ranks >= this count as "not in the top ranks"

# Used when no prompt file is given and ../shared/data is not there.
FALLBACK_PROMPTS = (
    "Explain speculative decoding in two sentences.",
    "Write a short story about a lighthouse keeper.",
    "What are the main differences between Python and JavaScript?",
    "List five tips for better sleep.",
    "Describe how a refrigerator works.",
    "Summarize the plot of Romeo and Juliet.",
    "Write a haiku about autumn.",
    "How do vaccines train the immune system?",
)


# ------------------------------------------------------------------ verify-cost curve


def _time_once(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - tic


def measure_verify_cost(
    model: Any,
    *,
    max_t: int = DEFAULT_MAX_T,
    context: int = 256,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Seconds of one decoding pass over T = 1..max_t tree nodes after `context` cached tokens.

    For an SSModel the pass is ``tree_step`` (main rows plus the streams the next tree drafts
    from) followed by the main argmax and the stream head at one node, as in a real step; for a
    plain mlx-lm model it is ``plain_tree_forward`` (the pass of lookup/Medusa decoding). The
    tree is a chain of T nodes drafting a chain as deep (T - 1 streams, at least 1, at most
    gamma): the cost of a pass depends on its row count, not on its shape, and a wider tree of
    T nodes is shallower, so this is an upper bound for it. Repeats are interleaved over T so
    that load changes hit every T alike; medians are reported. Also times mlx-lm's own
    one-token forward (the AR step) for reference, and for an SSModel the plain pass over T
    nodes without streams (``plain_seconds``: what a tree of lookup drafts alone costs; the
    dynamic tree prices such passes with it).
    """
    from tqdm import tqdm

    if max_t < 1:
        raise ValueError(f"max_t must be >= 1, got {max_t}")
    is_ss = isinstance(model, SSModel)

    def chain_depth(T: int) -> int:
        return min(max(T - 1, 1), model.num_streams)

    base = model.base if is_ss else model
    vocab = base.model.embed_tokens.weight.shape[0]
    rng = np.random.default_rng(seed)
    cache = make_cache(base)
    ctx = mx.array(rng.integers(0, vocab, size=context), dtype=mx.int32)
    if context:
        base(ctx[None], cache=cache)
        mx.eval([c.state for c in cache])
    start = cache[0].offset
    masks = {}

    def tree_pass(T: int) -> list[mx.array]:
        if T not in masks:
            masks[T] = mx.tril(mx.ones((T, T), dtype=mx.bool_))
        tokens = mx.array(rng.integers(0, vocab, size=T), dtype=mx.int32)
        positions = start + mx.arange(T)
        if is_ss:
            out = model.tree_step(tokens, positions, masks[T], cache, chain_depth(T))
            last = model.stream_logits_at(out, mx.array(T - 1))
            out = [mx.argmax(out.main_logits, axis=-1), mx.argmax(last, axis=-1)]
        else:
            out = plain_pass(T, tokens)
        return out

    def plain_pass(T: int, tokens: mx.array | None = None) -> list[mx.array]:
        if tokens is None:
            tokens = mx.array(rng.integers(0, vocab, size=T), dtype=mx.int32)
        mask = masks.setdefault(T, mx.tril(mx.ones((T, T), dtype=mx.bool_)))
        logits, _ = plain_tree_forward(base, tokens, start + mx.arange(T), mask, cache)
        return [mx.argmax(logits, axis=-1)]

    def timed(fn: Callable[[], list[mx.array]]) -> float:
        t = _time_once(fn)
        for c in cache:  # drop the rows this pass appended
            c.offset = start
        return t

    def ar_step() -> list[mx.array]:
        tok = mx.array([[int(rng.integers(0, vocab))]], dtype=mx.int32)
        return [mx.argmax(base(tok, cache=cache)[:, -1], axis=-1)]

    sizes = list(range(1, max_t + 1))
    for _ in range(warmup):
        for T in (1, max_t):
            timed(lambda T=T: tree_pass(T))
        timed(ar_step)
    samples: dict[int, list[float]] = {T: [] for T in sizes}
    plain: dict[int, list[float]] = {T: [] for T in sizes}
    ar: list[float] = []
    per_round = len(sizes) * (2 if is_ss else 1) + 1
    bar = tqdm(total=repeats * per_round, desc="verify cost", unit="pass",
               disable=not progress, file=sys.stderr)
    for _ in range(repeats):
        for T in sizes:
            samples[T].append(timed(lambda T=T: tree_pass(T)))
            bar.update()
            if is_ss:
                plain[T].append(timed(lambda T=T: plain_pass(T)))
                bar.update()
        ar.append(timed(ar_step))
        bar.update()
    bar.close()
    seconds = [float(np.median(samples[T])) for T in sizes]
    extra = {}
    if is_ss:
        extra = {"plain_seconds": [float(np.median(plain[T])) for T in sizes],
                 "plain_samples": [plain[T] for T in sizes]}
    return {
        "pass": "ss tree_step" if is_ss else "plain tree forward",
        "context": context,
        "repeats": repeats,
        "T": sizes,
        "seconds": seconds,
        "relative": [s / seconds[0] for s in seconds],
        "samples": [samples[T] for T in sizes],
        "ar_seconds": float(np.median(ar)),
        "ar_samples": ar,
        **extra,
    }


def monotone_cost(relative: Sequence[float]) -> list[float]:
    """The closest non-decreasing curve (least squares; pool adjacent violators).

    More rows never cost less work, so a dip is timing noise; pooling it with its neighbours
    neither trusts a lucky low sample nor an unlucky high one.
    """
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for x in relative:
        blocks.append([float(x), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


# ------------------------------------------------------------------ acceptance


def stream_ranks(model: SSModel, sequence: Sequence[int], start: int) -> np.ndarray:
    """Rank of the true token in each stream's ranking, at positions start..L-2-G.

    sequence: prompt + greedy continuation; start: the index of the last prompt token. Stream d
    (1-based) of position t predicts token t+1+d. Returns (P, G) int ranks (0 = argmax).
    """
    G = model.num_streams
    L = len(sequence)
    last = L - 2 - G
    if last < start:
        return np.zeros((0, G), dtype=np.int32)
    seq = mx.array(list(sequence), dtype=mx.int32)
    _, streams = model.full_forward(seq[None])  # (1, L, G, V)
    logits = streams[0, start : last + 1]  # (P, G, V)
    P = last + 1 - start
    idx = mx.arange(start, last + 1)[:, None] + 1 + mx.arange(1, G + 1)[None]  # (P, G)
    true = seq[idx]  # (P, G)
    true_logit = mx.take_along_axis(logits, true[..., None], axis=-1)  # (P, G, 1)
    ranks = mx.sum(logits > true_logit, axis=-1)  # (P, G)
    out = np.array(ranks, dtype=np.int32)
    assert out.shape == (P, G)
    return out


def greedy_continuations(
    model: SSModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int = 64,
    eos: set[int] | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """Each prompt's own greedy continuation (from mlx-lm's decoding of the base: what every
    lossless method must reproduce; cheaper than any tree on a CPU), EOS included."""
    from mlx_lm.generate import generate_step
    from tqdm import tqdm

    out = []
    for ids in tqdm(prompts, desc="acceptance", unit="prompt", disable=not progress,
                    file=sys.stderr):
        cont = []
        for t, _ in generate_step(mx.array(list(ids)), model.base, max_tokens=max_tokens):
            cont.append(t)
            if eos and t in eos:  # what follows EOS is never generated in practice
                break
        out.append(cont)
    return out


def measure_ranks(
    model: SSModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int = 64,
    eos: set[int] | None = None,
    progress: bool = True,
    continuations: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Stream ranks of the true continuation over every generated position of every prompt
    (`greedy_continuations`, unless given). Returns (N, G) int ranks."""
    if continuations is None:
        continuations = greedy_continuations(model, prompts, max_tokens=max_tokens, eos=eos,
                                             progress=progress)  # fmt: skip
    rows = [stream_ranks(model, list(ids) + list(c), len(ids) - 1)
            for ids, c in zip(prompts, continuations, strict=True)]  # fmt: skip
    return np.concatenate(rows) if rows else np.zeros((0, model.num_streams), dtype=np.int32)


def chain_top1(ranks: np.ndarray) -> list[float | None]:
    """P(stream d's top-1 is right | streams < d were), d = 1..G (None where no position had
    every earlier stream right): the dynamic tree's stream priors."""
    out: list[float | None] = []
    alive = np.ones(ranks.shape[0], dtype=bool)
    for d in range(ranks.shape[1]):
        n = int(alive.sum())
        hit = alive & (ranks[:, d] == 0)
        out.append(float(hit.sum() / n) if n else None)
        alive = hit
    return out


def lookup_acceptance(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    depth: int = 8,
    candidates: int = 3,
    min_ngram: int = 1,
    max_ngram: int = 4,
) -> dict[str, Any]:
    """How often prompt lookup's drafts are right on the model's own continuations: at every
    generated position, each of the (up to `candidates`) context matches the dynamic tree would
    draft; its first token, by match-length bucket (`match_bucket`), and each deeper token given
    the one before it was right. Rates are None where nothing was tried."""
    first = np.zeros((len(MATCH_BUCKETS), 2))  # (hits, trials)
    deeper = np.zeros((depth, 2))  # row d: the token at depth d + 1
    positions = 0
    for ids, cont in zip(prompts, continuations, strict=True):
        seq = list(ids) + list(cont)
        index = NgramIndex(min_ngram, max_ngram)
        index.extend(seq[: len(ids)])
        for at in range(len(ids), len(seq)):
            positions += 1
            for n, draft in index.matches(depth, candidates):
                b = match_bucket(n)
                first[b] += (draft[0] == seq[at], 1)
                for d in range(1, min(len(draft), len(seq) - at)):
                    if draft[d - 1] != seq[at + d - 1]:
                        break
                    deeper[d] += (draft[d] == seq[at + d], 1)
            index.extend([seq[at]])

    def rates(a: np.ndarray) -> list[float | None]:
        return [float(h / t) if t else None for h, t in a]

    return {"positions": positions, "first_by_match": rates(first),
            "first_trials": [int(t) for t in first[:, 1]],
            "continue_by_depth": rates(deeper[1:])}  # fmt: skip


def rank_probs_from_ranks(ranks: np.ndarray, width: int = RANK_WIDTH,
                          prior: float = 0.5) -> list[list[float]]:
    """p[d][r]: how often stream d+1's rank-r token is the true one (additively smoothed so
    that unseen ranks still order sensibly: rank 0 first)."""
    n = ranks.shape[0]
    probs = []
    for d in range(ranks.shape[1]):
        counts = np.bincount(np.clip(ranks[:, d], 0, width), minlength=width + 1)[:width]
        # A tiny rank-decaying prior breaks ties between unseen ranks in rank order.
        probs.append([float((counts[r] + prior / (r + 1)) / (n + 2 * prior)) for r in range(width)])
    return probs


# ------------------------------------------------------------------ tree selection


def grow_tree(rank_probs: Sequence[Sequence[float]], max_width: int,
              max_nodes: int) -> list[tuple[int, ...]]:
    """Draft nodes in the order ``TreeSpec.from_widths`` ranks them: by estimated path
    probability, then depth, then path. Every prefix of the result is a valid tree, and equals
    the tree ``from_widths(widths_of(prefix), len(prefix), rank_probs)`` builds.
    """

    def score(p: tuple[int, ...]) -> float:
        # Same expression as TreeSpec.from_widths, so ties break identically.
        return math.prod(rank_probs[d][r] for d, r in enumerate(p))

    depth = len(rank_probs)
    width = min(max_width, *(len(p) for p in rank_probs))
    frontier = [(-score((r,)), 1, (r,)) for r in range(width)]
    heapq.heapify(frontier)
    order: list[tuple[int, ...]] = []
    while frontier and len(order) < max_nodes:
        _, _, p = heapq.heappop(frontier)
        order.append(p)
        if len(p) < depth:
            for r in range(width):
                c = p + (r,)
                heapq.heappush(frontier, (-score(c), len(c), c))
    return order


def widths_of(paths: Sequence[tuple[int, ...]]) -> list[int]:
    depth = max(len(p) for p in paths)
    return [max(p[d] for p in paths if len(p) > d) + 1 for d in range(depth)]


def node_acceptance(paths: Sequence[tuple[int, ...]], ranks: np.ndarray | None = None,
                    rank_probs: Sequence[Sequence[float]] | None = None) -> list[float]:
    """P(node accepted) for each path (parents listed before children).

    With measured ``ranks`` (N, G): the fraction of positions where the true tokens have
    exactly these ranks (correlations between streams included). Else the product of
    ``rank_probs`` along the path (streams independent).
    """
    if ranks is None:
        if rank_probs is None:
            raise ValueError("node_acceptance needs ranks or rank_probs")
        return [math.prod(rank_probs[d][r] for d, r in enumerate(p)) for p in paths]
    n = max(ranks.shape[0], 1)
    masks: dict[tuple[int, ...], np.ndarray] = {(): np.ones(ranks.shape[0], dtype=bool)}
    out = []
    for p in paths:
        masks[p] = masks[p[:-1]] & (ranks[:, len(p) - 1] == p[-1])
        out.append(float(masks[p].sum() / n))
    return out


def expected_tokens_per_pass(paths: Sequence[tuple[int, ...]], ranks: np.ndarray | None = None,
                             rank_probs: Sequence[Sequence[float]] | None = None) -> float:
    """1 (the main token) + the expected accepted length: accepted nodes are one per depth
    along one path, so the expected length is the sum of the nodes' acceptance probabilities."""
    return 1.0 + sum(node_acceptance(paths, ranks, rank_probs))


def select_tree(
    relative_cost: Sequence[float],
    rank_probs: Sequence[Sequence[float]],
    ranks: np.ndarray | None = None,
    *,
    max_width: int = DEFAULT_MAX_WIDTH,
    max_nodes: int | None = None,
) -> dict[str, Any]:
    """The tree maximising expected tokens per pass / relative cost of its size.

    Args:
        relative_cost: cost of a pass over T = 1, 2, ... nodes relative to T = 1 (index T-1).
        rank_probs: p[d][r], stream d+1's rank-r token is right (orders the nodes).
        ranks: measured (N, G) ranks; when given, expected acceptance is taken from them
            (joint), else from ``rank_probs`` (independent streams).
        max_width: at most this many candidates per depth.
        max_nodes: at most this many draft nodes (default: what the cost curve covers).

    Returns a dict with ``tree`` (for ``TreeSpec.from_dict``), ``num_nodes`` (with the root),
    ``expected_tokens_per_pass``, ``relative_cost``, ``score`` and ``candidates`` (every size
    considered, best first).
    """
    cost = monotone_cost(relative_cost)
    limit = len(cost) - 1 if max_nodes is None else min(max_nodes, len(cost) - 1)
    if limit < 1:
        raise ValueError("the cost curve must cover at least T = 2 (one draft node)")
    order = grow_tree(rank_probs, max_width, limit)
    accept = np.cumsum(node_acceptance(order, ranks, rank_probs))
    candidates = []
    for b in range(1, len(order) + 1):
        tokens = 1.0 + float(accept[b - 1])
        candidates.append({
            "draft_nodes": b,
            "widths": widths_of(order[:b]),
            "expected_tokens_per_pass": tokens,
            "relative_cost": cost[b],
            "score": tokens / cost[b],
        })
    candidates.sort(key=lambda c: -c["score"])
    best = candidates[0]
    b = best["draft_nodes"]
    tree = {"widths": best["widths"], "node_budget": b,
            "rank_probs": [list(map(float, p[: max(best["widths"])])) for p in rank_probs]}
    spec = TreeSpec.from_dict(tree)
    # The saved dict must rebuild exactly the tree that was scored.
    assert sorted(spec.paths[1:]) == sorted(order[:b]), (spec.paths, order[:b])
    return {
        "tree": tree,
        "paths": [list(p) for p in spec.paths[1:]],
        "num_nodes": spec.num_nodes,
        "expected_tokens_per_pass": best["expected_tokens_per_pass"],
        "relative_cost": best["relative_cost"],
        "score": best["score"],
        "root_only_score": 1.0 / cost[0],
        "candidates": candidates,
    }


# ------------------------------------------------------------------ CLI


def plot_tuning(record: dict[str, Any], path: str | Path) -> None:
    """Verify-cost curve with the chosen size marked, and acceptance by (depth, rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .machine import MARKERS, model_label, plot_subtitle

    curve = record["verify_cost"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(curve["T"], curve["relative"], marker=".", label="measured")
    ax.plot(curve["T"], monotone_cost(curve["relative"]), ls="--", marker="x",
            label="used (monotone)")
    T = record["choice"]["num_nodes"]
    ax.axvline(T, color="tab:red", ls=":", label=f"chosen tree: {T} nodes")
    ax.set_xlabel("tree nodes T (rows verified per pass)")
    ax.set_ylabel("pass time / time at T = 1")
    ax.set_title("verify cost")
    ax.legend()
    ax = axes[1]
    probs = np.array(record["acceptance"]["rank_probs"])
    for r in range(min(4, probs.shape[1])):
        ax.plot(range(1, probs.shape[0] + 1), probs[:, r], marker=MARKERS[r % len(MARKERS)],
                label=f"rank {r}")
    ax.set_xticks(range(1, probs.shape[0] + 1))
    ax.set_xlabel("stream (draft depth)")
    ax.set_ylabel("P(true token has this rank)")
    ax.set_title("stream acceptance")
    ax.set_ylim(0, 1)
    ax.legend()
    model = record["model"]["path"]
    fig.suptitle(f"ss-mlx tune: {model_label(model)}\n"
                 + plot_subtitle(record.get("machine"), model), fontsize=9)
    fig.tight_layout()
    savefig(fig, path)
    plt.close(fig)


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx tune",
        description="Measure the verify-cost curve and stream acceptance, pick the draft tree "
        "that maximises expected tokens/s, and save it for this machine and model.",
    )
    p.add_argument("--model", help="SS model directory (default: the embedded default model)")
    p.add_argument("--max-t", type=cliargs.int_in(2, MAX_NODES), default=DEFAULT_MAX_T,
                   help="largest tree (nodes incl. the root) to time (default: %(default)s)")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="data set names or JSONL files for the acceptance measurement "
                   "(default: chat, or built-in prompts when the data is not there)")
    p.add_argument("--n", type=cliargs.int_at_least(1), default=12,
                   help="prompts per set (default: %(default)s)")
    p.add_argument("--max-tokens", type=cliargs.int_at_least(1), default=96,
                   help="tokens generated per prompt (default: %(default)s)")
    p.add_argument("--max-width", type=cliargs.int_at_least(1), default=DEFAULT_MAX_WIDTH,
                   help="largest top-k per depth considered (default: %(default)s)")
    p.add_argument("--context", type=cliargs.int_at_least(0), default=256,
                   help="cached tokens before the timed passes (default: %(default)s)")
    p.add_argument("--repeats", type=cliargs.int_at_least(1), default=5,
                   help="timings per T (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="folder of the data sets")
    p.add_argument("--plot", help="write the curve and acceptance plot (PNG) here")
    p.add_argument("--json", help="also write the tuning record here")
    p.add_argument("--no-save", action="store_true", help="do not save the tuned tree")
    p.add_argument("--no-progress", action="store_true")
    return p


def _tune_prompts(args: argparse.Namespace, tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    from .datasets import DatasetError, encode_prompt, load_prompts

    names = args.prompts or ["chat"]
    ids: list[list[int]] = []
    used = []
    for name in names:
        try:
            ps = load_prompts(name, n=args.n, root=args.data_root)
        except DatasetError:
            if args.prompts:
                raise
            ids = [encode_prompt(tokenizer, t, True) for t in FALLBACK_PROMPTS]
            return ids, ["built-in prompts"]
        ids += [encode_prompt(tokenizer, t, ps.chat) for t in ps.prompts]
        used.append(f"{ps.name} ({ps.source}, {len(ps.prompts)} prompts)")
    return ids, used


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    from ..loader import load, resolve_model_path
    from .datasets import DatasetError
    from .machine import require_matplotlib

    if args.plot:
        require_matplotlib("tune")

    try:
        for flag in ("json", "plot"):  # before the run, not after it
            if getattr(args, flag):
                check_output_file(getattr(args, flag), f"--{flag}")
        if args.model is None:
            from ..prepare.default_model import ensure_default_model

            args.model = ensure_default_model()
        model_dir = resolve_model_path(args.model)
        model, tokenizer = load(model_dir)
        prompts, used = _tune_prompts(args, tokenizer)
    except (ValueError, FileNotFoundError, DatasetError) as e:
        sys.exit(f"ss-mlx tune: error: {e}")
    if args.max_t < 2:
        sys.exit("ss-mlx tune: error: --max-t must be >= 2")
    vocab = model.inner.embed_tokens.weight.shape[0]
    progress = not args.no_progress
    dtype = str(model.base.model.norm.weight.dtype).removeprefix("mlx.core.")
    machine = describe_machine(dtype)
    machine["key"] = machine_key(machine)

    curve = measure_verify_cost(model, max_t=args.max_t, context=args.context,
                                repeats=args.repeats, progress=progress)
    continuations = greedy_continuations(model, prompts, max_tokens=args.max_tokens,
                                         eos=set(tokenizer.eos_token_ids), progress=progress)
    ranks = measure_ranks(model, prompts, continuations=continuations)
    lookup = lookup_acceptance(prompts, continuations)
    if ranks.shape[0] == 0:
        sys.exit("ss-mlx tune: error: the prompts produced no positions to measure; "
                 "raise --max-tokens or give more prompts")
    if not (verify_cost_ok(curve) and curve["ar_seconds"] > 0):
        sys.exit("ss-mlx tune: error: the timings are not usable (a pass took no measurable "
                 "time); nothing was saved")
    probs = rank_probs_from_ranks(ranks)
    # A tree is never wider than the vocabulary has tokens to rank.
    choice = select_tree(curve["relative"], probs, ranks, max_width=min(args.max_width, vocab))
    T = choice["num_nodes"]
    predicted = choice["expected_tokens_per_pass"] / (curve["seconds"][T - 1] / curve["ar_seconds"])
    if not (math.isfinite(predicted) and predicted > 0):
        sys.exit(f"ss-mlx tune: error: the timings are not usable (predicted speedup "
                 f"{predicted}); nothing was saved")
    record = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "ss-mlx tune " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {"path": str(model_dir), "hash": model_hash(model_dir)},
        "machine": machine,
        "tree": choice["tree"],
        "choice": {k: v for k, v in choice.items() if k != "tree"},
        "predicted_speedup_vs_ar": predicted,
        "verify_cost": curve,
        "acceptance": {
            "prompts": used,
            "positions": int(ranks.shape[0]),
            "rank_probs": probs,
            "top1_by_depth": [float(np.mean(ranks[:, d] == 0)) for d in range(ranks.shape[1])],
            "top1_chain": chain_top1(ranks),
            "lookup": lookup,
        },
    }

    print(f"Machine: {summary_line(machine)}")
    print(f"Model:   {model_dir} ({record['model']['hash']})")
    print("\nVerify cost (one pass over T tree nodes, relative to T = 1; "
          f"AR step {curve['ar_seconds'] * 1e3:.2f} ms):")
    print("| T | ms | relative |\n|---:|---:|---:|")
    for t, s, r in zip(curve["T"], curve["seconds"], curve["relative"], strict=True):
        print(f"| {t} | {s * 1e3:.2f} | {r:.2f} |")
    top1 = ", ".join(f"{a:.2f}" for a in record["acceptance"]["top1_by_depth"])
    print(f"\nStream top-1 acceptance by depth ({ranks.shape[0]} positions): {top1}")
    first = ", ".join("-" if r is None else f"{r:.2f}" for r in lookup["first_by_match"])
    print(f"Prompt lookup, first token right by match length 1/2/3/4-7/8-15/16+: {first}")
    print(f"Chosen tree: widths {choice['tree']['widths']}, node budget "
          f"{choice['tree']['node_budget']} ({T} nodes with the root)")
    print(f"  expected tokens/pass {choice['expected_tokens_per_pass']:.2f}, relative cost "
          f"{choice['relative_cost']:.2f}, predicted speedup vs AR {predicted:.2f}x")
    if predicted < 1.0:
        print("  warning: no tree is predicted to beat autoregressive decoding on this machine")
    if not args.no_save:  # before plotting: a failing plot must not lose the tuned tree
        try:
            print(f"Saved: {save_tuned(model_dir, record)}")
        except OSError as e:
            sys.exit(f"ss-mlx tune: error: cannot save the tuned tree: {e}")
    if args.json:
        write_text(args.json, dump_json(record))
    if args.plot:
        plot_tuning(record, args.plot)
        print(f"Plot: {args.plot}")


if __name__ == "__main__":
    main()
