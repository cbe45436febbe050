"""Prompt-lookup decoding, and the tree-verification loop it shares with other draft sources.

Prompt lookup (Saxena 2023, "prompt lookup decoding") drafts without any model: it matches the
last n tokens against the prompt and everything generated so far and proposes the tokens that
followed the match. Several matches with different continuations form a tree (shared prefixes
merged). The draft is verified by one tree pass of the plain base model (`plain_tree_forward`)
with the same greedy verification and cache compaction as Speculative Streaming, so the output
is exactly greedy autoregressive decoding.
"""

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .cache import check_cache, commit_path, make_cache, trim
from .model import plain_tree_forward
from .tree import TreeSpec
from .verify import greedy_verify

DEFAULT_MAX_TOKENS = 256


class DraftStepToken(NamedTuple):
    """One emitted token of :func:`tree_generate_step`."""

    token: int
    from_draft: bool  # True when it was a verified draft token
    accepted: int  # draft tokens accepted in the forward pass that emitted it
    step: int  # index of that forward pass (0 = the first pass after prefill)
    draft_depth: int  # depth of the draft tree that pass verified (0 = no draft)


# history (prompt + emitted tokens, the pending root last) and the final hidden state (D,) of the
# node the last pass accepted (None before the first pass) -> (tree, (T - 1,) draft tokens).
Drafter = Callable[[list[int], mx.array | None], tuple[TreeSpec, mx.array]]


def tree_generate_step(
    prompt: mx.array,
    base: nn.Module,
    drafter: Drafter,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 2048,
) -> Generator[DraftStepToken, None, None]:
    """Greedy decoding of a plain mlx-lm model with drafts from `drafter`, verified as a tree.

    Each pass runs [root] + draft through the base model with the tree mask, accepts the
    longest draft path that greedy decoding would have produced, and keeps only its K/V.
    The drafter may change the tree shape every step.

    Args:
        prompt: (L,) token ids.
        base: an mlx-lm model of a supported type.
        drafter: the draft source (see ``Drafter``); called once before the first pass with
            ``hidden=None`` and after every pass.
        max_tokens: how many tokens to generate (>= 1).
        prompt_cache: a cache to continue from (updated in place; on return it holds the
            prompt and every emitted token except the last, as mlx-lm's).
        prefill_step_size: prompt chunk size for prefill.
    """
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cache = make_cache(base) if prompt_cache is None else prompt_cache
    check_cache(cache)
    body = prompt[:-1]
    while body.size > 0:
        n = min(prefill_step_size, body.size)
        base(body[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        body = body[n:]

    history = prompt.tolist()
    root = prompt[-1:].astype(mx.int32)  # (1,)
    tree, draft = drafter(history, None)
    emitted = 0
    pending_trim = 0
    try:
        for step in range(max_tokens):
            start = cache[0].offset
            tokens = mx.concatenate([root, draft.astype(mx.int32)])  # (T,)
            logits, hidden = plain_tree_forward(
                base, tokens, start + tree.depths, tree.ancestor_mask, cache
            )  # (T, V), (T, D)
            verdict = greedy_verify(tree, tokens, logits)
            path_tokens = tokens[verdict.path]
            mx.eval(verdict.best, verdict.accepted, verdict.path, path_tokens,
                    verdict.next_token)
            n = verdict.accepted.item()
            commit_path(cache, start, verdict.path, n + 1)
            out = path_tokens[1 : n + 1].tolist() + [verdict.next_token.item()]
            history.extend(out)
            if emitted + len(out) < max_tokens:
                # Lazy for device drafters: evaluated with the next pass, no extra sync.
                next_tree, next_draft = drafter(history, hidden[verdict.best.item()])
            for i, token in enumerate(out):
                pending_trim = n - i
                yield DraftStepToken(token, i < n, n, step, tree.depth)
                emitted += 1
                if emitted == max_tokens:
                    return
            pending_trim = 0
            root = verdict.next_token[None].astype(mx.int32)
            tree, draft = next_tree, next_draft
    finally:
        trim(cache, pending_trim)


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
        L = len(self.tokens)
        found: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            for end in reversed(self._ends.get(tuple(self.tokens[L - n :]), ())):
                if end >= L:  # the suffix itself
                    continue
                cont = tuple(self.tokens[end : end + depth])
                if cont and cont not in seen:
                    seen.add(cont)
                    found.append(list(cont))
                    if len(found) == limit:
                        return found
        return found


def make_lookup_drafter(config: LookupConfig | None = None) -> Drafter:
    """A fresh prompt-lookup drafter (it keeps the n-gram index of one generation)."""
    config = config or LookupConfig()
    index = NgramIndex(config.min_ngram, config.max_ngram)
    trees = TreeCache()

    def draft(history: list[int], hidden: mx.array | None) -> tuple[TreeSpec, mx.array]:
        index.extend(history[len(index.tokens) :])
        cands = index.continuations(config.max_depth, config.num_candidates)
        if not cands:
            return trees.get(()), mx.zeros((0,), dtype=mx.int32)
        return trie_tree(cands, trees)

    return draft


def lookup_generate_step(
    prompt: mx.array,
    base: nn.Module,
    *,
    config: LookupConfig | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    **kwargs: Any,
) -> Generator[DraftStepToken, None, None]:
    """Greedy prompt-lookup decoding of a plain mlx-lm model (lossless).

    Args:
        prompt: (L,) token ids.
        base: an mlx-lm model of a supported type (``SSModel.base`` works too).
        config: n-gram sizes, draft depth and number of candidate continuations.
        max_tokens: how many tokens to generate.
        kwargs: passed to :func:`tree_generate_step` (``prompt_cache``, ``prefill_step_size``).
    """
    yield from tree_generate_step(
        prompt, base, make_lookup_drafter(config), max_tokens=max_tokens, **kwargs
    )
