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
        if not isinstance(self.temp, (int, float)) or not 0 <= self.temp < float("inf"):
            raise ValueError(f"temp must be a finite number >= 0, got {self.temp!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens_to_keep, int) or self.min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep!r}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0


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


def sampler_settings(sampler: object) -> SamplerConfig:
    """The settings of a sampler built by mlx-lm's `make_sampler`, so the tree rules can use
    them: exact rules need the sampling distribution itself, not just a function that draws.

    Reads the closure mlx-lm builds (temperature and the top-p / min-p / top-k filters). Any
    other callable (or XTC, a random filter) cannot be verified exactly and is refused.
    """
    if isinstance(sampler, SamplerConfig):
        return sampler
    from mlx_lm import sample_utils

    if sampler is sample_utils.greedy_sampler:
        return SamplerConfig()
    code = getattr(sampler, "__code__", None)
    if code is None or getattr(sampler, "__module__", None) != sample_utils.__name__ or set(
        code.co_freevars
    ) != {"sampling_methods", "temp"}:
        raise ValueError(
            "this sampler is not one mlx-lm's make_sampler built, so its distribution cannot "
            "be verified exactly; pass temp/top_p/top_k/min_p (or ss_mlx's SamplerConfig) "
            "instead of a custom sampler callable"
        )
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in sampler.__closure__), strict=True))
    kw: dict[str, float | int] = {"temp": float(cells["temp"])}
    for method in cells["sampling_methods"]:
        inner = dict(
            zip(method.__code__.co_freevars, (c.cell_contents for c in method.__closure__),
                strict=True)
        )
        names = method.__code__.co_names
        if "apply_top_p" in names:
            kw["top_p"] = float(inner["top_p"])
        elif "apply_min_p" in names:
            kw["min_p"] = float(inner["min_p"])
            kw["min_tokens_to_keep"] = int(inner["min_tokens_to_keep"])
        elif "apply_top_k" in names:
            kw["top_k"] = int(inner["top_k"])
        else:
            raise ValueError(
                f"the sampler uses {', '.join(n for n in names if n.startswith('apply_'))}, "
                "which is random or unknown and cannot be verified exactly over a draft tree"
            )
    return SamplerConfig(**kw)
