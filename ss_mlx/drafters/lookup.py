"""Prompt lookup as a draft source: n-gram matches in the context, no model.

Prompt lookup (Saxena 2023, "prompt lookup decoding") matches the last n tokens against the
prompt and everything generated so far and proposes the tokens that followed the match. Several
matches with different continuations form a tree (shared prefixes merged), verified by one tree
pass of the plain base model, so the output is exactly that of autoregressive decoding.
"""

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..decode.loop import StepToken, decode
from ..decode.sampling import SamplerConfig
from ..decode.tree import TreeSpec
from ..decode.verify import AcceptRule, Draft
from ..model.ss_model import plain_tree_forward

DEFAULT_MAX_TOKENS = 256
MATCH_CAP = 32  # match lengths are counted up to this many tokens
SEP = -1  # never a token: ends one output in an OutputMemory


class TreeCache:
    """TreeSpecs by their paths, so a drafter whose tree shape varies builds each shape once."""

    def __init__(self) -> None:
        self._specs: dict[tuple[tuple[int, ...], ...], TreeSpec] = {}

    def get(self, paths: Sequence[tuple[int, ...]]) -> TreeSpec:
        key = tuple(paths)
        if key not in self._specs:
            self._specs[key] = TreeSpec(list(key))
        return self._specs[key]


def trie_tree(candidates: Sequence[Sequence[int]], cache: TreeCache) -> tuple[TreeSpec, mx.array]:
    """Merge candidate continuations into a tree (shared prefixes once).

    Children are ranked in order of first appearance, so the first candidate is the rank-0
    chain. Returns the tree and its (T - 1,) draft tokens in the tree's node order.
    """
    token_of: dict[tuple[int, ...], int] = {}
    children: dict[tuple[int, ...], dict[int, tuple[int, ...]]] = {(): {}}
    for cand in candidates:
        node: tuple[int, ...] = ()
        for tok in cand:
            kids = children[node]
            if tok not in kids:
                child = node + (len(kids),)
                kids[tok] = child
                children[child] = {}
                token_of[child] = tok
            node = kids[tok]
    spec = cache.get(sorted(token_of, key=lambda p: (len(p), p)))
    return spec, mx.array([token_of[p] for p in spec.paths[1:]], dtype=mx.int32)


@dataclass(frozen=True)
class LookupConfig:
    """Prompt-lookup settings.

    Args:
        max_ngram, min_ngram: match the last n tokens, longest n first.
        max_depth: tokens proposed per candidate (the draft depth).
        num_candidates: how many distinct continuations (1 = a chain, as in the original).
    """

    max_ngram: int = 3
    min_ngram: int = 1
    max_depth: int = 7
    num_candidates: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"lookup n-gram sizes need 1 <= min_ngram <= max_ngram, got "
                f"{self.min_ngram}..{self.max_ngram}"
            )
        if self.max_depth < 1 or self.num_candidates < 1:
            raise ValueError("lookup max_depth and num_candidates must be >= 1")


class NgramIndex:
    """Where each n-gram of a growing token sequence ends, for O(1) lookups per step."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            self.tokens.append(tok)
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._ends.setdefault(tuple(self.tokens[end - n : end]), []).append(end)

    def continuations(self, depth: int, limit: int) -> list[list[int]]:
        """Up to `limit` distinct continuations of the current suffix: longest n-gram matches
        first, most recent match first within an n."""
        return [cont for _, cont in self.matches(depth, limit)]

    def matches(self, depth: int, limit: int) -> list[tuple[int, list[int]]]:
        """`continuations`, each with its match length: how many tokens before it agree with
        the current suffix (at least the n-gram's n, counted up to MATCH_CAP). A long match is
        the sign of a span being copied (a quoted passage, a repeated list, code), where the
        continuation is far more often right than after a chance 1-gram."""
        return self.matches_of(self.tokens, depth, limit, before=len(self.tokens))

    def matches_of(
        self, suffix: Sequence[int], depth: int, limit: int, before: int | None = None
    ) -> list[tuple[int, list[int]]]:
        """`matches` of another sequence's suffix in these tokens (only matches ending before
        `before`); a continuation stops at a SEP token."""
        t, S = self.tokens, len(suffix)
        found: list[tuple[int, list[int]]] = []
        seen: set[tuple[int, ...]] = set()
        for n in range(min(self.max_n, S), self.min_n - 1, -1):
            for end in reversed(self._ends.get(tuple(suffix[S - n :]), ())):
                if before is not None and end >= before:  # the suffix itself
                    continue
                cont: list[int] = []
                for tok in t[end : end + depth]:
                    if tok == SEP:
                        break
                    cont.append(tok)
                if cont and tuple(cont) not in seen:
                    seen.add(tuple(cont))
                    k = n  # the match length: a SEP never agrees with a token
                    while k < min(MATCH_CAP, end, S) and t[end - 1 - k] == suffix[S - 1 - k]:
                        k += 1
                    found.append((k, cont))
                    if len(found) == limit:
                        return found
        return found


class OutputMemory:
    """A bounded n-gram index over earlier outputs (REST's datastore, SAMD's suffix structure,
    here the process's own finished generations): where the current suffix occurred in them and
    what followed. Formulaic tasks (data-to-text, SQL, templated answers) repeat across prompts
    what no single context holds.

    Outputs are stored back to back in one `NgramIndex`, each followed by SEP, so no match or
    continuation crosses two of them; past `max_tokens` the oldest are dropped (the index is
    rebuilt from the newest half), which bounds its memory (~200 B per token and n-gram size).
    """

    def __init__(self, min_n: int = 2, max_n: int = 4, max_tokens: int = 16384) -> None:
        if not 1 <= min_n <= max_n or max_tokens < 1:
            raise ValueError("OutputMemory needs 1 <= min_n <= max_n and max_tokens >= 1")
        self.max_tokens = max_tokens
        self.index = NgramIndex(min_n, max_n)

    @property
    def tokens(self) -> list[int]:
        return self.index.tokens

    def add(self, output: Sequence[int]) -> None:
        """Remember one finished output (the newest `max_tokens` - 1 tokens of a longer one)."""
        output = list(output)[-(self.max_tokens - 1) :]
        if not output:
            return
        if len(self.tokens) + len(output) + 1 > self.max_tokens:
            self._drop_oldest(len(output) + 1)
        self.index.extend([*output, SEP])

    def _drop_oldest(self, room: int) -> None:
        """Keep the newest whole outputs that fit in half the budget less `room` tokens."""
        tokens, budget = self.tokens, max(self.max_tokens // 2 - room, 0)
        keep_from = len(tokens)
        seps = [i for i, t in enumerate(tokens) if t == SEP]
        for sep in reversed(seps[:-1]):  # output boundaries, newest first
            if len(tokens) - (sep + 1) > budget:
                break
            keep_from = sep + 1
        kept = tokens[keep_from:]
        self.index = NgramIndex(self.index.min_n, self.index.max_n)
        self.index.extend(kept)

    def matches(self, suffix: Sequence[int], depth: int, limit: int) -> list[tuple[int, list[int]]]:
        """Up to `limit` distinct continuations of `suffix` (the context's last tokens), each
        with its match length (as `NgramIndex.matches`); longest n first, newest first."""
        return self.index.matches_of(suffix, depth, limit)


class LookupDrafter:
    """Drafts continuations of the current suffix found earlier in the context (one generation:
    it keeps that generation's n-gram index)."""

    has_distribution = False

    def __init__(self, base: nn.Module, config: "LookupConfig | None" = None):
        self.base = base
        self.config = config or LookupConfig()
        self.index = NgramIndex(self.config.min_ngram, self.config.max_ngram)
        self.trees = TreeCache()

    def first_draft(self, history: list[int]) -> Draft:
        return self._draft(history)

    def forward(
        self, tokens: mx.array, positions: mx.array, ancestor_mask: mx.array, cache: list[Any]
    ) -> tuple[mx.array, None]:
        logits, _ = plain_tree_forward(self.base, tokens, positions, ancestor_mask, cache)
        return logits, None

    def to_sync(self, out: Any, best: mx.array) -> list[mx.array]:
        return []

    def draft(self, history: list[int], out: Any, best: mx.array, rule: AcceptRule) -> Draft:
        return self._draft(history)

    def _draft(self, history: list[int]) -> Draft:
        self.index.extend(history[len(self.index.tokens) :])
        cands = self.index.continuations(self.config.max_depth, self.config.num_candidates)
        if not cands:
            return Draft(self.trees.get(()), mx.zeros((0,), dtype=mx.int32))
        return Draft(*trie_tree(cands, self.trees))


def lookup_generate_step(
    prompt: mx.array,
    base: nn.Module,
    *,
    config: LookupConfig | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    **kwargs: Any,
) -> Generator[StepToken, None, None]:
    """Greedy prompt-lookup decoding of a plain mlx-lm model (lossless).

    Args:
        prompt: (L,) token ids.
        base: an mlx-lm model of a supported type (``SSModel.base`` works too).
        config: n-gram sizes, draft depth and number of candidate continuations.
        max_tokens: how many tokens to generate.
        kwargs: passed to :func:`ss_mlx.decode.loop.decode` (``prompt_cache``,
            ``prefill_step_size``).
    """
    rule = AcceptRule("greedy", SamplerConfig())
    yield from decode(prompt, LookupDrafter(base, config), rule, max_tokens=max_tokens, **kwargs)
