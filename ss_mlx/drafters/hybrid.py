"""One draft tree from every source, sized every step by confidence and the measured cost.

Each step the candidates are: the streams' top-k continuations from the accepted node (when the
pass computed streams), n-gram continuations of the context (prompt + generated text, via
prompt lookup) and of the model's earlier outputs in this process (a bounded `OutputMemory`:
formulaic tasks repeat across prompts what no one context holds). They are merged into one trie
(shared prefixes once, each node remembering its sources) and every node gets an estimated
probability of being accepted:

* a stream node at depth d with stream probability q: ``q * cal_d`` per level along its path,
  where ``cal_d`` is stream d's calibration (hits / predicted probability mass of the stream
  nodes verified so far in this generation, from a prior);
* a lookup node: along its path, at depth 1 the rate at which first lookup tokens were
  accepted after a context match of that length (1, 2, 3, 4-7, 8-15, 16+ tokens agreeing: a
  long match means a span is being copied), at depth d > 1 the rate at which lookup drafts at
  depth d were accepted given their parent was (both counted as the model generates, from a
  prior); a memory node likewise, with rates of its own.

Then the nodes of the next pass and the number of streams it computes are chosen to maximise
expected tokens per unit of cost, ``(1 + sum of the chosen nodes' probabilities + expected stream
gain) / (cost(rows) + cost of verifying that gain next pass)``, with the pass cost by row count from
``ss-mlx tune``'s measurement of this machine (or a default curve), corrected as the generation
runs by the passes' own wall time: what a pass costs beyond a root-only pass, measured against
what the curve predicted (a busy machine, a long context or a curve measured elsewhere move it).
A node is kept only when it pays
for itself, down to a root-only pass without streams, which runs mlx-lm's own one-token forward (the
cost of plain autoregressive decoding). Verification is the loop's, so output is exactly as lossless
as the rule; the drafts carry no distribution, so at temperature > 0 the exact "simple" rule is
used.
"""

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..decode.tree import MAX_NODES, TreeSpec
from ..decode.verify import AcceptRule, Draft
from ..model.ss_model import SSModel, TreeOutput
from ..tuned import DEFAULT_ROW_COST, CostCurve, cost_at
from .lookup import MATCH_CAP, NgramIndex, OutputMemory

STREAMS, LOOKUP, MEMORY = "streams", "lookup", "memory"
MIN_GAIN = 1.05  # expected tokens per unit cost a tree must reach to beat a root-only pass
# Lookup match lengths are pooled into buckets 1, 2, 3, 4-7, 8-15, 16+ (each its own rate).
MATCH_BUCKETS = (1, 2, 3, 4, 8, 16)
# Priors when `ss-mlx tune` has not measured them for the model (tuned records carry
# acceptance.lookup and acceptance.top1_chain). P(first lookup token right) per match bucket and
# P(depth d right | depth d - 1 right), d = 2..8: `tune.lookup_acceptance` over SmolLM2-135M's
# greedy answers to 1,024 chat-like training prompts (roleplay, awesome-chatgpt-prompts,
# chatterbot, self-instruct, wwdc25 train in data/distilled/smollm2_permissive_t128; 114K
# positions, 3 candidates each). Held-out Vicuna-bench answers give nearly the same first-token
# rates (0.18 / 0.50 / 0.56 / 0.72 / 0.82 over 1,954 positions). P(stream d's top-1 right |
# streams < d right): `ss-mlx tune --prompts sharegpt_first_turns.jsonl wwdc25_train.jsonl --n 6`
# with the shipped streams (2M self-distilled tokens; 758 positions; ShareGPT is not in their
# training data): 0.54 / 0.37 / 0.20 / 0.15 (held-out Vicuna-bench: 0.36 / 0.16 / 0.12 / 0.09; the
# online calibration moves from the prior within a few passes).
LOOKUP_FIRST_PRIOR = (0.17, 0.48, 0.56, 0.71, 0.86, 0.98)
LOOKUP_CONTINUE_PRIOR = (0.72, 0.8, 0.85, 0.88, 0.9, 0.91, 0.92)  # the last for any deeper
STREAM_TOP1_PRIOR = (0.54, 0.37, 0.2, 0.15)  # streams 1, 2, 3, then every later one
MAX_PRIOR = 0.98  # no measured rate is taken as certainty
MEMORY_LEAD = 4  # prompt tokens remembered before each output (OutputMemory)
# Online cost correction: a root-only pass's seconds are a running mean with this weight on the
# newest; the ratio measured / predicted extra cost forgets old passes at EXCESS_DECAY per pass
# (a machine gets busy or idle), and one pass counts at most EXCESS_CLIP times its prediction,
# so a single stall (a page fault, another process) weighs little.
ROOT_EWMA = 0.2
EXCESS_DECAY = 0.05
EXCESS_CLIP = (0.05, 50.0)
# Each root-only pass moves the ratio this share back to 1 (the curve): drafting that was priced
# out is tried again now and then, and measured again, so a machine that got idle is noticed.
EXCESS_RELAX = 0.02


def match_bucket(length: int) -> int:
    """The index of the bucket a context match of this many tokens falls in."""
    return max(i for i, lo in enumerate(MATCH_BUCKETS) if length >= lo or i == 0)


@dataclass(frozen=True)
class HybridConfig:
    """Search limits of the dynamic tree (the cost model decides within them).

    Args:
        max_nodes: most tree nodes per pass, the root included.
        stream_width: top-k tokens per stream considered.
        max_stream_depth: most streams computed per pass (default: all; 0: none).
        lookup_depth: tokens proposed per n-gram match; lookup_candidates: distinct matches.
        min_ngram, max_ngram: n-gram sizes matched, longest first.
        explore_every: compute one stream every this many passes even when the streams look
            hopeless, so their calibration can recover (0: never).
        memory_tokens: earlier outputs kept for matching (`OutputMemory`; 0: none);
            memory_candidates: distinct continuations taken from them per step.
        probe_every: run a root-only pass when none ran for this many passes: the reference
            the other passes' measured cost is taken against (0: never). A drafter without a
            clock uses the cost curves as they are.
    """

    max_nodes: int = 16
    stream_width: int = 4
    max_stream_depth: int | None = None
    lookup_depth: int = 8
    lookup_candidates: int = 3
    min_ngram: int = 1
    max_ngram: int = 4
    explore_every: int = 32
    probe_every: int = 64
    memory_tokens: int = 16384
    memory_candidates: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.max_nodes <= MAX_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_NODES}], got {self.max_nodes!r}")
        if self.stream_width < 1 or self.lookup_depth < 1 or self.lookup_candidates < 0:
            raise ValueError("stream_width and lookup_depth must be >= 1, lookup_candidates >= 0")
        if self.max_stream_depth is not None and self.max_stream_depth < 0:
            raise ValueError(f"max_stream_depth must be >= 0, got {self.max_stream_depth!r}")
        if self.memory_tokens < 0 or self.memory_candidates < 0:
            raise ValueError("memory_tokens and memory_candidates must be >= 0")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("n-gram sizes need 1 <= min_ngram <= max_ngram")


class Rate:
    """A running ratio hits / trials with a prior worth `weight` trials; with `decay`, each new
    observation first scales the old ones (and the prior) by 1 - decay."""

    def __init__(self, prior: float, weight: float = 4.0, decay: float = 0.0):
        self.hits, self.trials, self.keep = prior * weight, weight, 1.0 - decay

    def add(self, hit: float, trial: float = 1.0) -> None:
        self.hits = self.hits * self.keep + hit
        self.trials = self.trials * self.keep + trial

    def toward(self, value: float, share: float) -> None:
        """Move the ratio a share of the way to `value`, its weight unchanged."""
        self.hits += share * (value * self.trials - self.hits)

    @property
    def value(self) -> float:
        return self.hits / self.trials


class HybridStats:
    """What the drafter has measured of its sources: kept per loaded model, so each generation
    starts from what the earlier ones learned (the priors only start the first).

    stream_cal[d]: stream d's calibration, accepted / predicted probability mass (1 =
    calibrated); stream_top1[d]: how often its top token is right when streams < d were (what
    computing d streams adds to the next tree); lookup_first[k]: P(a lookup draft's first token
    is right) after a match of length bucket k (`match_bucket`); lookup_rate[d]: P(depth d + 1
    right | depth d right). The priors are `ss-mlx tune`'s measurements where given (a None or
    out-of-range entry keeps the default prior), else the module's defaults. memory_first /
    memory_rate: the same for matches in earlier outputs; memory: those outputs' index;
    cost_excess / root_seconds: the online correction of the cost curve (`_time_pass`).
    """

    def __init__(
        self,
        num_streams: int,
        lookup_depth: int,
        stream_prior: Sequence[float] | None = None,
        lookup_first: Sequence[float | None] | None = None,
        lookup_continue: Sequence[float | None] | None = None,
    ):
        top1 = _priors(stream_prior, STREAM_TOP1_PRIOR, num_streams)
        first = _priors(lookup_first, LOOKUP_FIRST_PRIOR, len(MATCH_BUCKETS))
        # lookup_rate[0] is never read (depth 1 is lookup_first's); index d is depth d + 1.
        cont = _priors(lookup_continue, LOOKUP_CONTINUE_PRIOR, max(lookup_depth - 1, 0))
        self.stream_cal = [Rate(1.0) for _ in range(num_streams)]
        self.stream_top1 = [Rate(p) for p in top1]
        self.lookup_first = [Rate(p) for p in first]
        self.lookup_rate = [Rate(first[0])] + [Rate(p) for p in cont]
        # The same for matches in earlier outputs (started from the lookup priors), the index of
        # those outputs, and the generation in progress: (its history list, prompt length),
        # remembered when the next generation starts.
        self.memory_first = [Rate(p) for p in first]
        self.memory_rate = [Rate(first[0])] + [Rate(p) for p in cont]
        self.memory: OutputMemory | None = None
        self.last_output: tuple[list[int], int] | None = None
        # A drafting pass's measured extra cost / the cost curve's prediction of it (1: the
        # curve is right), averaged over the recent passes; the prior is worth two passes.
        self.cost_excess = Rate(1.0, weight=2.0, decay=EXCESS_DECAY)
        self.root_seconds: float | None = None  # running mean of a root-only pass's seconds

    def remember_last_output(self) -> None:
        """Put the finished generation's output into the memory (a new one is starting)."""
        if self.last_output is not None and self.memory is not None:
            previous, start = self.last_output
            # With the prompt's last tokens (a chat template's assistant header): an output's
            # first tokens are matchable too.
            self.memory.add(previous[max(start - MEMORY_LEAD, 0) :])
        self.last_output = None


def _priors(
    measured: Sequence[float | None] | None, default: Sequence[float], n: int
) -> list[float]:
    """n priors: the measured ones where usable (a number in [0, 1]; None where nothing was
    measured), else the default's, whose last entry stands for every later one."""
    out = []
    for i in range(n):
        v = measured[i] if measured is not None and i < len(measured) else None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
        out.append(min(MAX_PRIOR, float(v)) if ok else default[min(i, len(default) - 1)])
    return out


class _Node:
    __slots__ = ("token", "depth", "parent", "prob", "sources", "stream_q", "stream_rank",
                 "ngram", "memory_ngram", "children")

    def __init__(self, token: int, depth: int, parent: "_Node | None"):
        self.token, self.depth, self.parent = token, depth, parent
        self.prob = 0.0
        self.sources: set[str] = set()
        self.stream_q = 0.0  # the stream's own probability of this token (stream nodes)
        self.stream_rank = -1  # its rank in that stream (0 = the stream's top token)
        self.ngram = 0  # the longest context match that proposed it (lookup nodes)
        self.memory_ngram = 0  # the same in earlier outputs (memory nodes)
        self.children: dict[int, _Node] = {}


class HybridDrafter:
    """Streams + prompt lookup in one tree, chosen per step (see the module docstring)."""

    has_distribution = False

    def __init__(
        self,
        model: SSModel,
        config: HybridConfig | None = None,
        cost_curve: CostCurve = DEFAULT_ROW_COST,
        stats: "HybridStats | None" = None,
        plain_curve: CostCurve | None = None,
        clock: Callable[[], float] | None = time.perf_counter,
    ):
        self.model, self.base = model, model.base
        self.config = config or HybridConfig()
        self.curve = cost_curve
        # Passes without streams (lookup drafts only) by node count, when measured: a row of
        # the stream layers costs less than a node that runs every layer.
        self.plain_curve = plain_curve or cost_curve
        G = model.num_streams
        cap = self.config.max_stream_depth
        self.max_depth = G if cap is None else min(G, cap)  # 0: lookup and memory only
        stats = stats or HybridStats(G, self.config.lookup_depth)
        self.stats, self.clock = stats, clock
        self._pass: tuple[int, int, float] | None = None  # (T, streams, start) of the last pass
        self._since_root = 0  # passes since the last timed root-only pass
        # The rates are the stats' own lists: what this generation learns, later ones start from.
        self.stream_cal, self.stream_top1 = stats.stream_cal, stats.stream_top1
        self.lookup_first, self.lookup_rate = stats.lookup_first, stats.lookup_rate
        if self.config.memory_tokens and stats.memory is None:
            stats.memory = OutputMemory(max_tokens=self.config.memory_tokens)
        self._prompt_len = 0
        self.index = NgramIndex(self.config.min_ngram, self.config.max_ngram)
        self.trees: OrderedDict[tuple, TreeSpec] = OrderedDict()
        self.stream_depth = 0  # streams the coming pass computes
        self.steps = 0
        self._nodes: list[_Node] = []  # the draft nodes of the tree being verified, node order
        self._guesses: list[tuple[int, list[int]]] = []  # streams' top-1 guesses to score

    # -- the loop's protocol

    def first_draft(self, history: list[int]) -> Draft:
        self.stats.remember_last_output()
        self._prompt_len = len(history)
        return self._choose(history, None)

    def forward(
        self, tokens: mx.array, positions: mx.array, ancestor_mask: mx.array, cache: list[Any]
    ) -> tuple[mx.array, TreeOutput | None]:
        # Timed from here to `draft`, which runs right after the step's host sync: graph,
        # compute, verification and cache commit; not the caller's work between steps.
        if self.clock is not None:
            self._pass = (tokens.shape[0], self.stream_depth, self.clock())
        if tokens.shape[0] == 1 and self.stream_depth == 0:
            # Nothing to verify or draft: mlx-lm's own forward, the cost of an AR step.
            return self.base(tokens[None], cache=cache)[0], None
        out = self.model.tree_step(tokens, positions, ancestor_mask, cache, self.stream_depth)
        return out.main_logits, out

    def to_sync(self, out: TreeOutput | None, best: mx.array) -> list[mx.array]:
        if out is None or self.stream_depth == 0:
            return []
        logits = self.model.stream_logits_at(out, best)  # (depth, V)
        k = min(self.config.stream_width, logits.shape[-1])
        top = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]  # (depth, k)
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)
        self._top = (top, mx.take_along_axis(probs, top, axis=-1))
        return list(self._top)

    def draft(
        self, history: list[int], out: TreeOutput | None, best: mx.array, rule: AcceptRule
    ) -> Draft:
        self._time_pass()
        self.stats.last_output = (history, self._prompt_len)  # the loop's list: no copy
        self._learn(history, int(best.item()))
        self._score_guesses(history)
        streams = None
        if out is not None and self.stream_depth > 0:
            top, probs = (a.tolist() for a in self._top)
            streams = [sorted(zip(p, t, strict=True), reverse=True) for t, p in zip(top, probs,
                                                                                     strict=True)]
            # Stream j's top token is a guess for history[len(history) - 1 + j]; scored once
            # those tokens are known, whether or not the tree used it.
            self._guesses.append((len(history), [r[0][1] for r in streams]))
        return self._choose(history, streams)

    def _score_guesses(self, history: list[int]) -> None:
        """Stream d's top-1 rate given streams < d were right, from the emitted tokens."""
        keep = []
        for at, guesses in self._guesses:
            if at - 1 + len(guesses) >= len(history):
                keep.append((at, guesses))
                continue
            for d, tok in enumerate(guesses):
                hit = history[at + d] == tok
                self.stream_top1[d].add(float(hit))
                if not hit:
                    break
        self._guesses = keep

    def _time_pass(self) -> None:
        """Measure the pass that just ran: a root-only pass updates the reference time; any
        other, the ratio of its measured extra cost to the curve's prediction."""
        if self._pass is None or self.clock is None:
            return
        T, depth, start = self._pass
        self._pass = None
        seconds = self.clock() - start
        st = self.stats
        if T == 1 and depth == 0:
            st.root_seconds = seconds if st.root_seconds is None else (
                (1 - ROOT_EWMA) * st.root_seconds + ROOT_EWMA * seconds)  # fmt: skip
            st.cost_excess.toward(1.0, EXCESS_RELAX)
            self._since_root = 0
            return
        self._since_root += 1
        predicted = self._predicted(T, depth) - 1.0
        if st.root_seconds is None or predicted <= 0:
            return
        lo, hi = EXCESS_CLIP
        st.cost_excess.add(min(max((seconds / st.root_seconds - 1.0) / predicted, lo), hi))

    # -- learning from the last verification

    def _learn(self, history: list[int], best: int) -> None:
        """Score every verified node of the last tree: a node was tested when its parent was
        accepted; it hit when it is on the accepted path."""
        if not self._nodes:
            return
        accepted = set()
        node = self._nodes[best - 1] if best > 0 else None
        while node is not None:
            accepted.add(id(node))
            node = node.parent
        for node in self._nodes:
            if node.depth > 1 and id(node.parent) not in accepted:
                continue  # never tested: its parent was rejected
            hit = id(node) in accepted
            d = node.depth - 1
            if STREAMS in node.sources and d < len(self.stream_cal):
                self.stream_cal[d].add(float(hit), node.stream_q)
            if LOOKUP in node.sources:
                rate = self.lookup_rate[d] if d else self.lookup_first[match_bucket(node.ngram)]
                rate.add(float(hit))
            if MEMORY in node.sources:
                st = self.stats
                first = st.memory_first[match_bucket(node.memory_ngram)]
                (st.memory_rate[d] if d else first).add(float(hit))

    # -- choosing the next tree

    def _choose(self, history: list[int], streams: list[list[tuple[float, int]]] | None) -> Draft:
        self.steps += 1
        root = _Node(-1, 0, None)
        root.prob = 1.0
        if streams:
            self._add_streams(root, streams)
        for n, cand in self.context_matches(history):
            self._add_chain(root, cand[: self.config.lookup_depth], n)
        for n, cand in self.memory_matches(history):
            self._add_chain(root, cand[: self.config.lookup_depth], n, MEMORY)
        nodes = _by_probability(root)
        T, depth = self._size(nodes)
        chosen = nodes[: T - 1]
        self.stream_depth = depth
        return self._as_draft(chosen)

    def context_matches(self, history: list[int]) -> list[tuple[int, list[int]]]:
        """Continuations of the context, each with its match length (`NgramIndex.matches`; a
        subclass may draw them from elsewhere: an index over earlier outputs, an oracle in
        tests)."""
        self.index.extend(history[len(self.index.tokens) :])
        if not self.config.lookup_candidates:
            return []
        return self.index.matches(self.config.lookup_depth, self.config.lookup_candidates)

    def memory_matches(self, history: list[int]) -> list[tuple[int, list[int]]]:
        """Continuations of the context's suffix in earlier outputs, with match lengths."""
        memory = self.stats.memory
        if memory is None or not self.config.memory_candidates:
            return []
        suffix = history[-MATCH_CAP:]
        return memory.matches(suffix, self.config.lookup_depth, self.config.memory_candidates)

    def _add_streams(self, root: _Node, streams: list[list[tuple[float, int]]]) -> None:
        """Best-first expansion of the streams' rank combinations (like a static tree's
        budgeted product), probabilities calibrated per depth."""
        limit = self.config.max_nodes
        frontier = [root]
        for d, ranked in enumerate(streams):
            cal = self.stream_cal[d].value
            grown = []
            for parent in frontier:
                for rank, (q, tok) in enumerate(ranked):
                    p = parent.prob * min(1.0, q * cal)
                    node = parent.children.get(tok)
                    if node is None:
                        node = parent.children[tok] = _Node(tok, d + 1, parent)
                    node.prob = max(node.prob, p)
                    node.stream_q = max(node.stream_q, q)
                    node.stream_rank = rank
                    node.sources.add(STREAMS)
                    grown.append(node)
            frontier = sorted(grown, key=lambda n: -n.prob)[:limit]

    def _add_chain(self, root: _Node, tokens: list[int], ngram: int, source: str = LOOKUP) -> None:
        """A lookup (or memory) continuation after a match of `ngram` tokens."""
        st = self.stats
        first, rates = ((st.memory_first, st.memory_rate) if source == MEMORY
                        else (self.lookup_first, self.lookup_rate))  # fmt: skip
        node, p = root, 1.0
        for d, tok in enumerate(tokens):
            p *= rates[d].value if d else first[match_bucket(ngram)].value
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node(tok, d + 1, node)
            child.prob = max(child.prob, p)
            child.sources.add(source)
            if source == MEMORY:
                child.memory_ngram = max(child.memory_ngram, ngram)
            else:
                child.ngram = max(child.ngram, ngram)
            node = child

    def _stream_gain(self, depth: int) -> float:
        """Expected tokens the streams add to the next tree: the calibrated top-1 chain."""
        gain, p = 0.0, 1.0
        for d in range(depth):
            p *= self.stream_top1[d].value
            gain += p
        return gain

    def _size(self, nodes: list[_Node]) -> tuple[int, int]:
        """(tree nodes T, streams to compute) maximising expected tokens per cost."""
        probe = self.config.probe_every if self.clock is not None else 0
        if probe and self._since_root >= probe:
            return (1, 0)  # the timing reference (see HybridConfig.probe_every)
        limit = min(self.config.max_nodes, len(nodes) + 1)
        explore = bool(self.config.explore_every) and self.steps % self.config.explore_every == 0
        best, choice, gained = -1.0, (1, 0), [0.0]
        for node in nodes[: limit - 1]:
            gained.append(gained[-1] + node.prob)
        for depth in range(self.max_depth + 1):
            if explore and depth == 0 and self.max_depth > 0:
                continue
            extra = self._stream_gain(depth)
            # What the streams computed now add arrives in the next pass, which pays to verify
            # it: charge those nodes here. Counting only the gain would count a steady run of
            # stream drafts twice (as this pass's gain and as the next pass's accepted nodes)
            # and keep streams on where they lose (measured: Vicuna 0.93x with Ns-8 streams).
            later = self._cost(1 + depth, 0) - 1.0
            for T in range(1, limit + 1):
                value = (1.0 + gained[T - 1] + extra) / (self._cost(T, depth) + later)
                if value > best + 1e-9:
                    best, choice = value, (T, depth)
        # The estimates are noisy and the cost curve approximate: a draft must promise a clear
        # gain over the plain step (value 1), or the pass is mlx-lm's own one-token step.
        if best < MIN_GAIN and not explore:
            return (1, 0)
        return choice

    def _predicted(self, T: int, depth: int) -> float:
        """The cost curves' price of a pass over T nodes computing `depth` streams, in root-only
        passes: the plain pass, or with streams at least that and the rows' price."""
        cost = cost_at(self.plain_curve, T)
        return max(cost, cost_at(self.curve, T * (1 + depth))) if depth else cost

    def _cost(self, T: int, depth: int) -> float:
        """The price `_size` uses: the prediction's extra cost scaled by what was measured."""
        return 1.0 + self.stats.cost_excess.value * (self._predicted(T, depth) - 1.0)

    def _as_draft(self, chosen: list[_Node]) -> Draft:
        """The chosen nodes (prefix-closed, most probable first) as a Draft: siblings ranked by
        probability, nodes in the tree's breadth-first order."""
        path_of: dict[int, tuple[int, ...]] = {}
        siblings: dict[int, int] = {}
        for node in chosen:  # parents come first
            parent = node.parent
            rank = siblings.get(id(parent), 0)
            siblings[id(parent)] = rank + 1
            path_of[id(node)] = (path_of[id(parent)] if parent.depth else ()) + (rank,)
        key = tuple(sorted(path_of.values(), key=lambda p: (len(p), p)))
        spec = self.trees.get(key)
        if spec is None:
            spec = self.trees[key] = TreeSpec([list(p) for p in key])
            if len(self.trees) > 512:  # bounded: trees vary step to step
                self.trees.popitem(last=False)
        else:
            self.trees.move_to_end(key)
        at = {path_of[id(n)]: n for n in chosen}
        self._nodes = [at[p] for p in spec.paths[1:]]
        tokens = mx.array([n.token for n in self._nodes], dtype=mx.int32)
        sources = tuple("+".join(sorted(n.sources)) for n in self._nodes)
        return Draft(spec, tokens, None, sources)


def _by_probability(root: _Node) -> list[_Node]:
    """Every non-root node, most probable first; a child never precedes its parent."""
    out, stack = [], list(root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return sorted(out, key=lambda n: (-n.prob, n.depth))
