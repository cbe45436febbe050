"""Acceptance rules for a draft tree (pure array code, no host syncs).

Every rule returns a `Verdict`: the deepest accepted node, its root path, and the next token.

Exact rules (the emitted sequence has exactly the distribution of autoregressive decoding with
the same sampler):

* `greedy_verify` (temp 0): node c is accepted iff its token is the argmax at its parent.
* `match_verify` (temp > 0, "simple"): draw one token x_i ~ p_i at every node independently;
  node c is accepted iff its token equals the draw at its parent. Proof: the emitted tokens are
  the draws along the followed path plus the draw at its last node; each draw is a fresh sample
  of p at its own prefix, independent of how that prefix was reached.
* `rrs_verify` (temp > 0, "rrs"): recursive rejection sampling without replacement, using the
  streams' distribution q as the draft distribution (proof sketch at the function).

Relaxed rules (NOT exact; opt-in, labelled as such in responses):

* `typical_verify`: Medusa's typical acceptance (posterior threshold / alpha).
* `coarse_verify`: PCG-style acceptance over embedding-cosine token groups.

`AcceptRule` picks one of them for a generation and drafts to match it: an exact rule at
temperature > 0 constrains how a draft is made (`rrs` needs children drawn from the draft
distribution without replacement; the other rules take the draft's top-k).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx

from .coarse import CoarseGroups
from .sampling import SamplerConfig, gumbel_top_k, target_logprobs
from .tree import TreeSpec

EXACT_RULES = ("greedy", "simple", "rrs")
RELAXED_RULES = ("typical", "coarse")
ACCEPT_RULES = ("auto",) + EXACT_RULES + RELAXED_RULES


class Verdict(NamedTuple):
    """Outcome of verifying one tree (all lazily evaluated arrays).

    best: () index of the deepest accepted node; accepted: () number of accepted draft tokens;
    path: (D + 1,) node indices root -> best (padded); next_token: () the token that follows
    `best` (the correction, or the bonus token when the whole path is accepted).
    """

    best: mx.array
    accepted: mx.array
    path: mx.array
    next_token: mx.array


def _deepest(tree: TreeSpec, node_ok: mx.array) -> mx.array:
    """Deepest node whose whole root path is ok. node_ok: (T,) bool (root is taken as ok)."""
    bad = (~node_ok).astype(mx.float32)
    bad = mx.concatenate([mx.zeros((1,)), bad[1:]])
    accepted = (tree.ancestor_mask.astype(mx.float32) @ bad) == 0  # (T,)
    # Ties (two accepted nodes at the same depth) go to the lower index = lower rank.
    return mx.argmax(mx.where(accepted, tree.depths, -1))


def _verdict(tree: TreeSpec, best: mx.array, next_tokens: mx.array) -> Verdict:
    return Verdict(best, tree.depths[best], tree.path_table[best], next_tokens[best])


def _follow(tree: TreeSpec, tokens: mx.array, pred: mx.array) -> Verdict:
    """Accept children that equal their parent's prediction; pred: (T,) one token per node."""
    if tree.num_nodes == 1:
        return _verdict(tree, mx.array(0), pred)
    match = mx.concatenate([mx.array([True]), tokens[1:] == pred[tree.parents[1:]]])
    # Siblings hold distinct tokens, so at most one child per node matches: the path is unique.
    return _verdict(tree, _deepest(tree, match), pred)


def greedy_verify(tree: TreeSpec, tokens: mx.array, main_logits: mx.array) -> Verdict:
    """Longest path whose every node is the argmax of its parent. main_logits: (T, V)."""
    return _follow(tree, tokens, mx.argmax(main_logits, axis=-1))


def match_verify(tree: TreeSpec, tokens: mx.array, logp: mx.array) -> Verdict:
    """Exact sampling by matching independent per-node draws. logp: (T, V) target log-probs."""
    return _follow(tree, tokens, mx.random.categorical(logp))


def rrs_verify(
    tree: TreeSpec, tokens: mx.array, logp: mx.array, candidates: mx.array, logq: mx.array
) -> Verdict:
    """Exact sampling with recursive rejection sampling over the tree.

    tokens: (T,); logp: (T, V) target log-probs at each node; candidates: (D, K) the draws
    (without replacement, in draw order) from q_d = exp(logq[d]) that filled depth d + 1;
    logq: (D, V).

    Proof sketch. At a node a with target p and children c_1..c_k (= draws x_1..x_k of q_d in
    order, shared by all nodes of that depth), let p^(1) = p and q^(i) = q with x_1..x_{i-1}
    removed, renormalised (so x_i ~ q^(i) given the earlier draws). Candidate i is accepted with
    probability min(1, p^(i)(x_i) / q^(i)(x_i)); on rejection p^(i+1) = norm(max(0, p^(i) - q^(i))).
    One step is ordinary speculative sampling: accept-or-residual yields an exact sample of
    p^(i) provided the residual branch yields an exact sample of p^(i+1). The residual branch is
    the same procedure on the next draw, exact for any draft distribution, hence also
    conditioned on the value of x_i; when the candidates run out we sample p^(k+1) directly.
    By induction the emitted token at a is an exact sample of p. If it is a child, we descend:
    the draws of the next depth are independent of everything that decided the descent, so the
    argument repeats at the child with its own target. Ranks that are not children of a node
    are skipped (not tested, residual unchanged) but still removed from q, which the argument
    allows. Sharing draws across nodes of one depth is fine because only one node per depth is
    ever visited.
    """
    T = tree.num_nodes
    p = mx.exp(logp.astype(mx.float32))  # (T, V)
    next_child = mx.full((T,), -1, dtype=mx.int32)
    for d in range(tree.depth):
        level = tree.levels[d]  # (n,) nodes at depth d: the parents of depth d + 1
        n = level.shape[0]
        q = mx.exp(logq[d].astype(mx.float32))  # (V,)
        pd = p[level]  # (n, V)
        chosen = mx.full((n,), -1, dtype=mx.int32)
        done = mx.zeros((n,), dtype=mx.bool_)
        removed = mx.zeros_like(q)  # mass of q already drawn
        for r in range(tree.widths[d]):
            c = candidates[d, r]
            qr = q / mx.maximum(1.0 - removed.sum(), 1e-30)
            qr = mx.where(removed > 0, 0.0, qr)  # (V,) q^(r)
            qc = qr[c]
            child = tree.child_table[level, r]  # (n,)
            live = (child >= 0) & (qc > 0) & ~done
            accept = live & (mx.random.uniform(shape=(n,)) * qc < pd[:, c])
            chosen = mx.where(accept, child, chosen)
            done = done | accept
            resid = mx.maximum(pd - qr[None], 0.0)
            mass = resid.sum(axis=-1, keepdims=True)
            resid = mx.where(mass > 0, resid / mx.maximum(mass, 1e-30), pd)
            pd = mx.where((live & ~accept)[:, None], resid, pd)
            removed = removed + mx.where(mx.arange(q.shape[0]) == c, q, 0.0)
        p[level] = pd
        next_child[level] = chosen
    if T == 1:
        best = mx.array(0)
    else:
        match = mx.concatenate([mx.array([True]), next_child[tree.parents[1:]] == mx.arange(1, T)])
        best = _deepest(tree, match)
    # The last accepted node rejected all its children: its residual gives the next token.
    next_token = mx.random.categorical(mx.log(p[best]))
    return Verdict(best, tree.depths[best], tree.path_table[best], next_token)


def typical_verify(
    tree: TreeSpec,
    tokens: mx.array,
    logp: mx.array,
    threshold: float,
    alpha: float,
    greedy_next: bool,
) -> Verdict:
    """Medusa's typical acceptance (NOT exact): a node is accepted when its probability under
    its parent exceeds min(threshold, alpha * exp(-entropy(parent))). logp: (T, V)."""
    p = mx.exp(logp)
    entropy = -(p * mx.where(p > 0, logp, 0.0)).sum(axis=-1)  # (T,)
    limit = mx.minimum(threshold, alpha * mx.exp(-entropy))  # (T,)
    if tree.num_nodes == 1:
        best = mx.array(0)
    else:
        par = tree.parents[1:]
        prob = p[par, tokens[1:]]
        ok = mx.concatenate([mx.array([True]), prob > limit[par]])
        best = _deepest(tree, ok)
    nxt = mx.argmax(logp[best]) if greedy_next else mx.random.categorical(logp[best])
    return Verdict(best, tree.depths[best], tree.path_table[best], nxt)


def coarse_verify(
    tree: TreeSpec,
    tokens: mx.array,
    logp: mx.array,
    candidates: mx.array,
    logq: mx.array,
    groups: CoarseGroups,
) -> Verdict:
    """PCG-style coarse-grained acceptance (NOT exact; see coarse.py).

    Each child is tested on a random group of its token, min(1, P_c(g) / Q_c(g)), against its
    parent's coarse target; a parent descends to its first passing child in rank order. The
    token after the last accepted node comes from the coarse residual when that node had
    children, else from its own target. logp: (T, V); candidates: (D, K); logq: (D, V).
    """
    T = tree.num_nodes
    p = mx.exp(logp.astype(mx.float32))  # (T, V)
    pc = groups.coarse(p)  # (T, V)
    qc = groups.coarse(mx.exp(logq.astype(mx.float32)))  # (D, V)
    if T > 1:
        par, dep = tree.parents[1:], tree.depths[1:] - 1
        g = groups.random_group(tokens[1:])  # (T - 1,)
        ratio = pc[par, g] / mx.maximum(qc[dep, g], 1e-30)
        passed = mx.concatenate([mx.array([False]), mx.random.uniform(shape=g.shape) < ratio])
        table = tree.child_table  # (T, K)
        ok = (table >= 0) & passed[mx.maximum(table, 0)]  # (T, K)
        first = mx.argmax(ok, axis=-1)  # first passing rank (0 when none)
        chosen = mx.where(ok.any(axis=-1), mx.take_along_axis(table, first[:, None], 1)[:, 0], -1)
        match = mx.concatenate([mx.array([True]), chosen[tree.parents[1:]] == mx.arange(1, T)])
        best = _deepest(tree, match)
    else:
        best = mx.array(0)
    has_children = (tree.child_table[best] >= 0).any()
    d = mx.minimum(tree.depths[best], max(tree.depth - 1, 0))
    resid = mx.maximum(pc[best] - qc[d], 0.0)
    from_groups = groups.token_from_group_residual(p[best], resid)
    plain = mx.random.categorical(mx.log(p[best]))
    use_groups = has_children & (resid.sum() > 0)
    return Verdict(
        best, tree.depths[best], tree.path_table[best], mx.where(use_groups, from_groups, plain)
    )


# ---------------------------------------------------------------- choosing a rule, drafting for it


@dataclass(frozen=True)
class TypicalParams:
    """Medusa's typical acceptance: accept p(x) > min(threshold, alpha * exp(-H))."""

    threshold: float = 0.09
    alpha: float = 0.3

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"typical threshold must be in (0, 1], got {self.threshold!r}")
        if not 0 < self.alpha:
            raise ValueError(f"typical alpha must be > 0, got {self.alpha!r}")


class Draft(NamedTuple):
    """A draft tree to verify: its topology, its (T - 1,) tokens in node order, what an exact
    rule needs to test them (the (D, K) candidates and (D, V) log q for "rrs"/"coarse", else
    None), and optionally which source proposed each draft node (for statistics)."""

    tree: TreeSpec
    tokens: mx.array
    state: Any = None
    sources: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AcceptRule:
    """The acceptance rule of one generation, with what it needs."""

    name: str
    sampler: SamplerConfig
    typical: TypicalParams = TypicalParams()
    groups: CoarseGroups | None = None

    @property
    def needs_distribution(self) -> bool:
        """Whether drafts must come with their distribution q."""
        return self.name in ("rrs", "coarse")

    def verify(self, draft: Draft, tokens: mx.array, main_logits: mx.array) -> Verdict:
        """Apply the rule to one tree. tokens: (T,) root + draft; main_logits: (T, V) after
        logits processors."""
        tree, sampler = draft.tree, self.sampler
        if self.name == "greedy":
            return greedy_verify(tree, tokens, main_logits)
        if self.name == "typical":
            logp = (
                main_logits - mx.logsumexp(main_logits, axis=-1, keepdims=True)
                if sampler.greedy
                else target_logprobs(main_logits, sampler)
            )
            return typical_verify(
                tree, tokens, logp, self.typical.threshold, self.typical.alpha, sampler.greedy
            )
        logp = target_logprobs(main_logits, sampler)
        if self.name == "simple" or draft.state is None:
            # A tree without its draft distribution (the first pass, or a source that has
            # none): any exact rule reduces to matching independent draws.
            return match_verify(tree, tokens, logp)
        candidates, logq = draft.state
        if self.name == "coarse":
            return coarse_verify(tree, tokens, logp, candidates, logq, self.groups)
        return rrs_verify(tree, tokens, logp, candidates, logq)

    def draft(self, tree: TreeSpec, draft_logits: mx.array) -> Draft:
        """Fill `tree` from per-depth draft logits (D, V) of the accepted node."""
        if not self.needs_distribution:
            return Draft(tree, tree.draft_tokens(draft_logits))
        draft_logits = draft_logits[: tree.depth]
        # Any finite logits give a valid q, and the rule is exact for any q; non-finite ones
        # (stream parameters that overflow) would give NaN probabilities, so they count as 0.
        draft_logits = mx.where(mx.isfinite(draft_logits), draft_logits, 0.0)
        logq = target_logprobs(draft_logits, self.sampler)  # (D, V)
        candidates = gumbel_top_k(logq, tree.max_width)  # (D, K)
        return Draft(tree, tree.fill(candidates), (candidates, logq))


def resolve_rule(rule: str, sampler: SamplerConfig, has_distribution: bool = True) -> str:
    """'auto' is greedy at temp 0 and recursive rejection sampling (measured best) above; a
    draft source without a distribution falls back to the exact rule that needs none."""
    if rule not in ACCEPT_RULES:
        raise ValueError(f"accept_rule must be one of {ACCEPT_RULES}, got {rule!r}")
    if rule == "auto":
        rule = "greedy" if sampler.greedy else "rrs"
    if rule == "greedy" and not sampler.greedy:
        raise ValueError("accept_rule 'greedy' needs temp = 0")
    if rule == "coarse" and sampler.greedy:
        raise ValueError("accept_rule 'coarse' compares probabilities: it needs temp > 0")
    if rule in ("simple", "rrs") and sampler.greedy:
        return "greedy"  # at temp 0 every exact rule is the greedy rule
    if rule in ("rrs", "coarse") and not has_distribution:
        return "simple"
    return rule
