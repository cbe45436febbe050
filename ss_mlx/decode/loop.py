"""Prefill, and THE tree-decoding loop that every draft source plugs into.

One step, as in the paper's algorithm: one forward pass over [root] + draft (verifying the
previous draft, and, for Speculative Streaming, computing the streams that draft the next one)
-> verify -> one host sync -> commit the accepted branch's K/V -> draft from the accepted node
-> emit. A draft source (`Drafter`) supplies the forward pass and the drafting; the loop owns
verification, the cache and the token bookkeeping, so every source is exactly as lossless as
the verification rule.
"""

from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import LogitsProcessor

from .cache import check_cache, commit_path, make_cache, rewind
from .tree import TreeSpec
from .verify import AcceptRule, Draft


class StepToken(NamedTuple):
    """One emitted token."""

    token: int
    from_draft: bool  # True when it was a verified draft token
    accepted: int  # draft tokens accepted in the forward pass that emitted it
    step: int  # index of that forward pass (0 = the pass right after prefill)
    draft_depth: int  # depth of the tree that pass verified (0 = no draft)
    rule: str = "greedy"  # the acceptance rule that produced it
    logprobs: mx.array | None = None  # (V,) log-softmax of the logits it was verified against
    source: str = ""  # the draft source of a verified draft token ("" for the others)
    tree_size: int = 1  # nodes of the tree that pass verified, the root included


class Drafter(Protocol):
    """A draft source for `decode`.

    `base` is the mlx-lm model whose distribution is decoded (prefill runs through it).
    `has_distribution` says whether drafts carry their distribution q (so "rrs" can test them).
    """

    base: nn.Module
    has_distribution: bool

    def first_draft(self, history: list[int]) -> Draft:
        """The draft verified by the first pass (history: the prompt)."""
        ...

    def forward(
        self, tokens: mx.array, positions: mx.array, ancestor_mask: mx.array, cache: list[Any]
    ) -> tuple[mx.array, Any]:
        """One tree pass. tokens, positions: (T,); ancestor_mask: (T, T) bool. Appends the T
        main K/V rows to `cache` and returns main logits (T, V) plus whatever `draft` reads."""
        ...

    def to_sync(self, out: Any, best: mx.array) -> list[mx.array]:
        """Arrays the drafter will read on the host in `draft`: evaluated in the step's one
        host sync, together with the verdict (usually none)."""
        ...

    def draft(self, history: list[int], out: Any, best: mx.array, rule: AcceptRule) -> Draft:
        """The next draft, from node `best` (a () index, evaluated) of the pass that returned
        `out`. history: every token so far, the next root last. Device work should stay lazy:
        it is evaluated with the next pass, so a step keeps one host sync."""
        ...


def check_prompt(prompt: mx.array, base: nn.Module, max_tokens: int) -> None:
    """Refuse inputs the loop cannot decode, with a sentence naming what is wrong."""
    if not isinstance(prompt, mx.array) or prompt.ndim != 1:
        shape = getattr(prompt, "shape", None)
        raise ValueError(f"the prompt must be a 1-D array of token ids, got shape {shape}")
    if prompt.size == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if not mx.issubdtype(prompt.dtype, mx.integer):
        raise ValueError(f"prompt token ids must be integers, got {prompt.dtype}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise ValueError(f"max_tokens must be an integer (-1 for no limit), got {max_tokens!r}")
    vocab = base.model.embed_tokens.weight.shape[0]
    lo, hi = mx.min(prompt).item(), mx.max(prompt).item()
    if lo < 0 or hi >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got range [{lo}, {hi}]")
    limit = getattr(getattr(base, "args", None), "max_position_embeddings", None)
    if limit and prompt.size >= limit:
        raise ValueError(
            f"the prompt has {prompt.size} tokens but the model's context is {limit} tokens"
        )


def prefill(
    base: nn.Module,
    tokens: mx.array,
    cache: list[Any],
    step_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run (L,) tokens through the unmodified model into `cache`, `step_size` at a time;
    `progress(done, total)` after each chunk, as mlx-lm's prompt_progress_callback."""
    total, done = tokens.size, 0
    while done < total:
        n = min(step_size, total - done)
        base(tokens[done : done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        if progress is not None:
            progress(done, total)


def decode(
    prompt: mx.array,
    drafter: Drafter,
    rule: AcceptRule,
    *,
    max_tokens: int,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 2048,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
) -> Generator[StepToken, None, None]:
    """Decode after `prompt` (L,) with drafts from `drafter`, verified by `rule`.

    `max_tokens` < 0 means no limit (0: nothing). With `prompt_cache` (updated in place), when
    the generator ends or is closed the cache holds the prompt and every token emitted so far,
    as mlx-lm's.
    """
    check_prompt(prompt, drafter.base, max_tokens)
    cache = make_cache(drafter.base) if prompt_cache is None else prompt_cache
    check_cache(cache)
    first_row = cache[0].offset  # where this prompt starts in the cache
    prefill(drafter.base, prompt[:-1], cache, prefill_step_size, prompt_progress_callback)
    history = prompt.tolist()  # the prompt and every emitted token
    root = prompt[-1:].astype(mx.int32)  # (1,) the last token, not yet in the cache
    draft = drafter.first_draft(history)
    emitted = step = 0
    valid = cache[0].offset  # cache rows that hold committed K/V
    try:
        while emitted != max_tokens:
            start, tree, draft_sources = valid, draft.tree, draft.sources
            tokens = mx.concatenate([root, draft.tokens])  # (T,)
            logits, out = drafter.forward(tokens, start + tree.depths, tree.ancestor_mask, cache)
            if logits_processors:
                logits = _process_per_node(logits_processors, history, draft, logits)
            verdict = rule.verify(draft, tokens, logits)
            path_tokens = tokens[verdict.path]
            host = drafter.to_sync(out, verdict.best)
            mx.eval(verdict.best, verdict.path, path_tokens, verdict.next_token, host)  # one sync
            n = verdict.accepted.item()
            commit_path(cache, start, verdict.path.tolist(), n + 1)
            valid = start + n + 1
            new = path_tokens[1 : n + 1].tolist() + [verdict.next_token.item()]
            history.extend(new)
            node_logits = logits[verdict.path]  # (D + 1, V): node path[i] predicted new[i]
            logprobs = node_logits - mx.logsumexp(node_logits, axis=-1, keepdims=True)
            if max_tokens < 0 or emitted + len(new) < max_tokens:
                draft = drafter.draft(history, out, verdict.best, rule)
            sources = _sources(draft_sources, verdict.path, n)
            for i, token in enumerate(new):
                emitted += 1
                yield StepToken(token, i < n, n, step, tree.depth, rule.name, logprobs[i],
                                sources[i], tree.num_nodes)
                if emitted == max_tokens:
                    break
            root = verdict.next_token[None].astype(mx.int32)
            step += 1
    finally:
        end = first_row + prompt.size + emitted
        last = history[prompt.size + emitted - 1]
        _settle(cache, valid, end, last, drafter.base, keep=prompt_cache is not None)


def _settle(
    cache: list[Any], valid: int, end: int, last: int, base: nn.Module, keep: bool
) -> None:
    """Leave the cache holding exactly rows [0, end): the prompt and the emitted tokens.

    valid: rows holding committed K/V (anything past them is an unfinished pass); last: the
    token that belongs at row end - 1.
    """
    rewind(cache, min(valid, end))
    if valid < end and keep:
        # The last emitted token is a correction/bonus token that no pass has run yet; mlx-lm's
        # cache holds it (mlx-lm computes that step ahead of time), so run it.
        base(mx.array([[last]], dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])


def _sources(sources: tuple[str, ...] | None, path: mx.array, n: int) -> list[str]:
    """The source of each emitted token: the accepted draft nodes', then "" for the last."""
    if sources is None:
        return ["draft"] * n + [""]
    return [sources[i - 1] for i in path.tolist()[1 : n + 1]] + [""]


def _process_per_node(
    processors: Sequence[LogitsProcessor], history: list[int], draft: Draft, logits: mx.array
) -> mx.array:
    """Run history-dependent processors at every node with that node's own history.

    history ends with the root token; node i adds the draft tokens on its path. logits: (T, V).
    """
    tree: TreeSpec = draft.tree
    tokens = draft.tokens.tolist()  # a host sync, only when processors are used
    index = {p: i for i, p in enumerate(tree.paths)}
    rows = []
    for i, path in enumerate(tree.paths):
        on_path = [index[path[:d]] for d in range(1, len(path) + 1)]  # node i's draft ancestors
        toks = mx.array(history + [tokens[j - 1] for j in on_path], dtype=mx.int32)
        row = logits[i : i + 1]
        for proc in processors:
            row = proc(toks, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)
