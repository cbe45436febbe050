"""Choosing an acceptance rule, and drafting to match it.

An exact rule at temperature > 0 constrains how the draft is made: `rrs` needs children drawn
from the stream distribution (without replacement), the other rules take the streams' top-k.
"""

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .sampling import SamplerConfig, gumbel_top_k, target_logprobs
from .tree import TreeSpec
from .verify import (
    Verdict,
    coarse_verify,
    greedy_verify,
    match_verify,
    rrs_verify,
    typical_verify,
)

EXACT_RULES = ("greedy", "simple", "rrs")
RELAXED_RULES = ("typical", "coarse")
ACCEPT_RULES = ("auto",) + EXACT_RULES + RELAXED_RULES


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


def resolve_rule(rule: str, sampler: SamplerConfig) -> str:
    """'auto' is greedy at temp 0 and recursive rejection sampling (measured best) above."""
    if rule not in ACCEPT_RULES:
        raise ValueError(f"accept_rule must be one of {ACCEPT_RULES}, got {rule!r}")
    if rule == "auto":
        return "greedy" if sampler.greedy else "rrs"
    if rule == "greedy" and not sampler.greedy:
        raise ValueError("accept_rule 'greedy' needs temp = 0")
    if rule == "coarse" and sampler.greedy:
        raise ValueError("accept_rule 'coarse' compares probabilities: it needs temp > 0")
    if rule in ("simple", "rrs") and sampler.greedy:
        return "greedy"  # at temp 0 every exact rule is the greedy rule
    return rule


def verify(
    rule: str,
    tree: TreeSpec,
    tokens: mx.array,
    main_logits: mx.array,
    sampler: SamplerConfig,
    draft_state: Any,
    typical: TypicalParams,
    groups: Any = None,
) -> Verdict:
    """Apply `rule` to one tree. main_logits: (T, V) after logits processors."""
    if rule == "greedy":
        return greedy_verify(tree, tokens, main_logits)
    if rule == "typical":
        logp = (
            main_logits - mx.logsumexp(main_logits, axis=-1, keepdims=True)
            if sampler.greedy
            else target_logprobs(main_logits, sampler)
        )
        return typical_verify(
            tree, tokens, logp, typical.threshold, typical.alpha, greedy_next=sampler.greedy
        )
    logp = target_logprobs(main_logits, sampler)
    if rule == "simple" or draft_state is None:
        # The first pass has no draft; any exact rule reduces to one sample at the root.
        return match_verify(tree, tokens, logp)
    candidates, logq = draft_state
    if rule == "coarse":
        return coarse_verify(tree, tokens, logp, candidates, logq, groups)
    return rrs_verify(tree, tokens, logp, candidates, logq)


def draft(
    rule: str, tree: TreeSpec, stream_logits: mx.array, sampler: SamplerConfig
) -> tuple[mx.array, Any]:
    """Draft tokens (T - 1,) for the next pass, and what `verify` will need to check them.

    stream_logits: (D, V), the streams of the last accepted node.
    """
    if rule not in ("rrs", "coarse"):
        return tree.draft_tokens(stream_logits), None
    logq = target_logprobs(stream_logits, sampler)  # (D, V) the draft distribution
    candidates = gumbel_top_k(logq, tree.max_width)  # (D, K)
    return tree.fill(candidates), (candidates, logq)
