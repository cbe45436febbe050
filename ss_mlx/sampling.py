"""Sampler settings and the target distribution they define (pure array code).

The distribution is exactly mlx-lm's `make_sampler`: filters (top-p, min-p, top-k) applied to the
log-probabilities at temperature 1, in that order, then softmax(logprobs / temp). The filter
functions are mlx-lm's own, so autoregressive mlx-lm sampling and Speculative Streaming sample
from the same distribution.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplerConfig:
    """mlx-lm sampler settings. temp == 0 means greedy; top_p == 1, top_k == 0 and min_p == 0
    turn those filters off."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.temp, (int, float)) or self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep!r}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def mlx_lm_sampler(self):
        """The equivalent mlx-lm sampler (the autoregressive reference)."""
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(
            temp=self.temp,
            top_p=self.top_p if self.top_p < 1 else 0.0,
            min_p=self.min_p,
            min_tokens_to_keep=self.min_tokens_to_keep,
            top_k=self.top_k,
        )


def target_logprobs(logits: mx.array, cfg: SamplerConfig) -> mx.array:
    """Log-probabilities of the sampling distribution. logits: (N, V) -> (N, V) (-inf = never).

    Only for temp > 0; greedy decoding uses the argmax of the logits directly.
    """
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        logprobs = apply_top_p(logprobs, cfg.top_p)
    if cfg.min_p != 0.0:
        logprobs = apply_min_p(logprobs, cfg.min_p, cfg.min_tokens_to_keep)
    if 0 < cfg.top_k < logits.shape[-1]:
        logprobs = apply_top_k(logprobs, cfg.top_k)
    scaled = logprobs * (1.0 / cfg.temp)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def gumbel_top_k(logprobs: mx.array, k: int) -> mx.array:
    """k draws without replacement, in draw order, from each row of exp(logprobs).

    logprobs: (N, V) -> (N, k) token ids. The Gumbel-top-k trick: sorting perturbed log-probs
    is equivalent to sequential sampling without replacement.
    """
    g = logprobs + mx.random.gumbel(logprobs.shape)
    top = mx.argpartition(-g, kth=k - 1, axis=-1)[:, :k]
    order = mx.argsort(-mx.take_along_axis(g, top, axis=-1), axis=-1)
    return mx.take_along_axis(top, order, axis=-1)
