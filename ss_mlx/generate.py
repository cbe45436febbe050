"""The Speculative Streaming decoding loop, its mlx-lm-style API, and `ss-mlx generate`."""

import argparse
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
from mlx_lm.sample_utils import LogitsProcessor, make_logits_processors
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cache import check_cache, commit_path, make_cache, trim
from .coarse import groups_for_model
from .model import SSModel
from .rules import ACCEPT_RULES, RELAXED_RULES, TypicalParams, draft, resolve_rule, verify
from .sampling import SamplerConfig
from .tree import TreeSpec, default_tree, root_only

DEFAULT_MAX_TOKENS = 256
DEFAULT_PROMPT = "Write a haiku about speculative decoding."


class StepToken(NamedTuple):
    """One emitted token of `ss_generate_step`."""

    token: int
    from_draft: bool  # True when it was a verified draft token
    accepted: int  # draft tokens accepted in the forward pass that emitted it
    step: int  # index of that forward pass (0 = the pass right after prefill)
    rule: str = "greedy"  # the acceptance rule that produced it


@dataclass
class GenerationResponse:
    """The output of :func:`stream_generate` (mlx-lm's fields plus speculation statistics).

    Args:
        text: the next segment of decoded text (may be empty).
        token: the next token.
        from_draft: whether the token was a verified draft token.
        accepted: draft tokens accepted in the forward pass that produced this token.
        prompt_tokens, prompt_tps: prompt size and prefill speed (tokens/s).
        generation_tokens, generation_tps: tokens generated so far and their rate.
        forward_passes: decoding forward passes so far; tokens_per_pass = tokens / passes.
        peak_memory: peak memory so far in GB.
        finish_reason: "stop" (EOS), "length" (max_tokens) or None.
        accept_rule: the rule that accepted the token: "greedy", "simple", "rrs" (exact) or
            "typical", "coarse" (relaxed, not exact).
        logprobs: always None: per-token log-probabilities are not computed (mlx-lm's field is
            kept so code written for mlx-lm responses runs unchanged).
    """

    text: str
    token: int
    from_draft: bool
    accepted: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    forward_passes: int
    tokens_per_pass: float
    peak_memory: float
    finish_reason: str | None = None
    accept_rule: str = "greedy"
    logprobs: mx.array | None = None


def resolve_tree(model: SSModel, tree: TreeSpec | str | dict | None) -> TreeSpec:
    """The draft tree to use: the argument, else one `ss-mlx tune` saved for this model on this
    machine, else the model config's, else a default."""
    if tree is None and model.path is not None:
        from .tune import load_tuned_tree

        tree = load_tuned_tree(model.path)
    if tree is None:
        tree = model.cfg.tree
    if tree is None:
        spec = default_tree(model.num_streams)
    elif isinstance(tree, TreeSpec):
        spec = tree
    elif isinstance(tree, str):
        spec = TreeSpec.parse(tree)
    elif isinstance(tree, dict):
        spec = TreeSpec.from_dict(tree)
    else:
        raise ValueError(f"tree must be a TreeSpec, a spec string or a dict, got {type(tree)}")
    if spec.depth > model.num_streams:
        raise ValueError(
            f"the draft tree is {spec.depth} deep but the model has only {model.num_streams} "
            "speculative streams"
        )
    return spec


def _check_prompt(prompt: mx.array, model: SSModel, max_tokens: int) -> None:
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    vocab = model.inner.embed_tokens.weight.shape[0]
    lo, hi = mx.min(prompt).item(), mx.max(prompt).item()
    if lo < 0 or hi >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got range [{lo}, {hi}]")
    limit = getattr(model.base.args, "max_position_embeddings", None)
    if limit and prompt.size >= limit:
        raise ValueError(
            f"the prompt has {prompt.size} tokens but the model's context is {limit} tokens"
        )


def ss_generate_step(
    prompt: mx.array,
    model: SSModel,
    *,
    tree: TreeSpec | str | dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 2048,
    drafter: Callable[[list[int], TreeSpec], Sequence[int]] | None = None,
    sampler: SamplerConfig | None = None,
    accept_rule: str = "auto",
    typical: TypicalParams | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    coarse_theta: float = 0.8,
) -> Generator[StepToken, None, None]:
    """Speculative Streaming decoding, token by token.

    Each forward pass verifies the previous draft tree and drafts the next one from the
    streams of the deepest accepted node, with one host sync per pass. With the exact rules
    (greedy at temp 0; "simple" or "rrs" above) the tokens have exactly the distribution of
    mlx-lm's autoregressive decoding with the same sampler and logits processors.

    Args:
        prompt: (L,) token ids.
        model: the SS model.
        tree: draft tree (TreeSpec, CLI string like "3,2,1", or dict); default from the config.
        max_tokens: how many tokens to generate (>= 1).
        prompt_cache: a cache from an earlier call to continue from (updated in place). On
            return it holds the prompt and every emitted token except the last, as mlx-lm's.
        prefill_step_size: prompt chunk size for prefill.
        drafter: replaces the streams as the draft source: called after each pass with the
            token history (prompt + emitted tokens, the pending root last) and the tree, it
            returns the T - 1 draft tokens. Used for oracle tests and other draft sources
            (e.g. prompt lookup); verification is the same, so output stays lossless.
        sampler: sampling settings (default greedy).
        accept_rule: "auto" (greedy at temp 0, "rrs" above), "greedy", "simple", "rrs", or
            the relaxed, NOT exact "typical".
        typical: thresholds of the "typical" rule.
        logits_processors: mlx-lm style ``processor(tokens, logits) -> logits``; at each tree
            node ``tokens`` is that node's own history (prompt, emitted tokens, its path).
        coarse_theta: embedding-cosine threshold of the relaxed "coarse" rule's token groups.
    """
    spec = resolve_tree(model, tree)
    _check_prompt(prompt, model, max_tokens)
    sampler = sampler or SamplerConfig()
    rule = resolve_rule(accept_rule, sampler)
    typical = typical or TypicalParams()
    if drafter is not None and rule in ("rrs", "coarse"):
        rule = "simple"  # an external drafter has no draft distribution to test against
    groups = None
    if rule == "coarse":
        groups = groups_for_model(model.inner.embed_tokens, coarse_theta, _coarse_cache_dir())
    cache = make_cache(model.base) if prompt_cache is None else prompt_cache
    check_cache(cache)

    # Prefill all but the last prompt token through the unmodified model.
    body = prompt[:-1]
    while body.size > 0:
        n = min(prefill_step_size, body.size)
        model.base(body[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        body = body[n:]

    track = drafter is not None or bool(logits_processors)
    history = prompt.tolist() if track else []
    draft_state = None
    root = prompt[-1:].astype(mx.int32)  # (1,)
    draft_tokens = mx.zeros((0,), dtype=mx.int32)
    draft_host: list[int] = []
    step_tree = root_only()
    emitted = 0
    pending_trim = 0
    try:
        for step in range(max_tokens):
            start = cache[0].offset
            tokens = mx.concatenate([root, draft_tokens])  # (T,)
            out = model.tree_step(
                tokens, start + step_tree.depths, step_tree.ancestor_mask, cache, spec.depth
            )
            main_logits = out.main_logits
            if logits_processors:
                main_logits = _process_per_node(
                    logits_processors, history, step_tree, draft_host, main_logits
                )
            verdict = verify(
                rule, step_tree, tokens, main_logits, sampler, draft_state, typical, groups
            )
            if drafter is None:
                next_draft, next_state = draft(
                    rule, spec, model.stream_logits_at(out, verdict.best), sampler
                )
            path_tokens = tokens[verdict.path]
            mx.eval(
                verdict.accepted,
                verdict.path,
                path_tokens,
                verdict.next_token,
                next_draft if drafter is None else [],
            )
            n = verdict.accepted.item()
            commit_path(cache, start, verdict.path, n + 1)
            out = path_tokens[1 : n + 1].tolist() + [verdict.next_token.item()]
            if track:
                history.extend(out)
            if drafter is not None:
                next_draft, next_state = _external_draft(drafter, history, spec), None
            draft_host = next_draft.tolist() if logits_processors else []
            for i, token in enumerate(out):
                # If generation stops after this token, the cache keeps everything up to it
                # but not it: the n - i accepted rows after it are dropped.
                pending_trim = n - i
                yield StepToken(token, i < n, n, step, rule)
                emitted += 1
                if emitted == max_tokens:
                    return
            pending_trim = 0
            root = verdict.next_token[None].astype(mx.int32)
            draft_tokens, draft_state, step_tree = next_draft, next_state, spec
    finally:
        trim(cache, pending_trim)


def _coarse_cache_dir() -> Path:
    from .default_model import cache_root

    return cache_root() / "coarse"


def _process_per_node(
    processors: list[LogitsProcessor],
    history: list[int],
    tree: TreeSpec,
    draft_host: list[int],
    logits: mx.array,
) -> mx.array:
    """Run history-dependent processors at every node with that node's own history.

    history ends with the root token; node i adds the draft tokens on its path. logits: (T, V).
    """
    index = {p: i for i, p in enumerate(tree.paths)}
    rows = []
    for i, path in enumerate(tree.paths):
        on_path = [index[path[:d]] for d in range(1, len(path) + 1)]  # node i's draft ancestors
        toks = mx.array(history + [draft_host[j - 1] for j in on_path], dtype=mx.int32)
        row = logits[i : i + 1]
        for proc in processors:
            row = proc(toks, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def _external_draft(
    drafter: Callable[[list[int], TreeSpec], Sequence[int]], history: list[int], spec: TreeSpec
) -> mx.array:
    draft = list(drafter(history, spec))
    if len(draft) != spec.num_nodes - 1:
        raise ValueError(
            f"drafter returned {len(draft)} tokens for a tree of {spec.num_nodes - 1} draft nodes"
        )
    return mx.array(draft, dtype=mx.int32)


def _encode(
    tokenizer: TokenizerWrapper, prompt: Any, apply_chat_template: bool, system_prompt: str | None
) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt.astype(mx.int32)
    if isinstance(prompt, str):
        if apply_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if isinstance(ids, str):
                ids = tokenizer.encode(ids, add_special_tokens=False)
            elif isinstance(ids, dict):  # transformers >= 5 may return a BatchEncoding
                ids = ids["input_ids"]
            return mx.array(ids, dtype=mx.int32)
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        return mx.array(tokenizer.encode(prompt, add_special_tokens=add_special), dtype=mx.int32)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return mx.array(list(prompt), dtype=mx.int32)
    raise ValueError("prompt must be a string, a list of token ids or an mx.array")


def stream_generate(
    model: SSModel,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    **kwargs: Any,
) -> Generator[GenerationResponse, None, None]:
    """Generate text with Speculative Streaming, yielding one response per token.

    Args:
        model: an SSModel from :func:`ss_mlx.load`.
        tokenizer: its tokenizer.
        prompt: text, or token ids.
        max_tokens: maximum number of tokens to generate.
        apply_chat_template: wrap a text prompt as a user message with the tokenizer's chat
            template (when it has one). Default: ``False``, as in mlx-lm's API.
        system_prompt: system message used with the chat template.
        temp, top_p, top_k, min_p: mlx-lm sampler settings (temp 0 = greedy).
        seed: seeds MLX's random state before generating.
        kwargs: passed to :func:`ss_generate_step` (``tree``, ``prompt_cache``,
            ``accept_rule``, ``logits_processors``, ...).
    """
    sampler = SamplerConfig(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if seed is not None:
        mx.random.seed(seed)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    ids = _encode(tokenizer, prompt, apply_chat_template, system_prompt)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = set(tokenizer.eos_token_ids)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    passes = 0
    finish = "length"
    n = 0

    def response(text: str, st: StepToken, count: int, reason: str | None) -> GenerationResponse:
        elapsed = time.perf_counter() - tic
        return GenerationResponse(
            text=text,
            token=st.token,
            from_draft=st.from_draft,
            accepted=st.accepted,
            prompt_tokens=ids.size,
            prompt_tps=prompt_tps,
            generation_tokens=count,
            generation_tps=count / elapsed if elapsed > 0 else 0.0,
            forward_passes=passes,
            tokens_per_pass=count / max(passes, 1),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=reason,
            accept_rule=st.rule,
        )

    gen = ss_generate_step(ids, model, max_tokens=max_tokens, sampler=sampler, **kwargs)
    st = None
    try:
        for n, st in enumerate(gen):
            if n == 0:
                # The first token comes from the pass right after prefill: count it as prompt time.
                prompt_tps = ids.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            passes = st.step + 1
            if st.token in eos:
                finish = "stop"
                break
            detokenizer.add_token(st.token)
            if n + 1 == max_tokens:
                break
            yield response(detokenizer.last_segment, st, n + 1, None)
    finally:
        gen.close()
    if st is None:
        return
    detokenizer.finalize()
    yield response(detokenizer.last_segment, st, n + 1, finish)


def generate(
    model: SSModel,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a complete response; with ``verbose`` print it as it comes, then statistics."""
    text = ""
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and last is not None:
        print()
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Forward passes: {last.forward_passes}, {last.tokens_per_pass:.2f} tokens per pass")
        print(f"Peak memory: {last.peak_memory:.3f} GB")
        if last.accept_rule in RELAXED_RULES:
            print(
                f"Acceptance rule '{last.accept_rule}' is relaxed: the output is NOT an exact "
                "sample of the model's distribution"
            )
    return text


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ss-mlx generate", description="Generate text with Speculative Streaming."
    )
    p.add_argument("--model", help="SS model directory (default: the embedded default model)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="prompt text ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument(
        "--tree",
        help="draft tree: widths '3,2,1', widths with node budget "
        "'4,2,1:8', a JSON list of rank paths, or a .json file",
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--accept-rule",
        choices=ACCEPT_RULES,
        default="auto",
        help="auto: greedy at temp 0, exact rejection sampling ('rrs') above; "
        "'typical' is a relaxed rule whose output is NOT the model's distribution",
    )
    p.add_argument("--typical-threshold", type=float, default=TypicalParams.threshold)
    p.add_argument("--typical-alpha", type=float, default=TypicalParams.alpha)
    p.add_argument(
        "--coarse-theta",
        type=float,
        default=0.8,
        help="embedding-cosine threshold of the relaxed 'coarse' rule's token groups",
    )
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--system-prompt", default=None)
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="feed the prompt as raw text, without the chat template",
    )
    p.add_argument("--verbose", action="store_true", help="print speed and acceptance statistics")
    return p


def main(argv: list[str] | None = None) -> None:
    args = setup_arg_parser().parse_args(argv)
    from .loader import load

    try:
        if args.model is None:
            from .default_model import ensure_default_model

            args.model = ensure_default_model()
        model, tokenizer = load(args.model)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        processors = make_logits_processors(
            repetition_penalty=args.repetition_penalty,
            repetition_context_size=args.repetition_context_size,
        )
        text = generate(
            model,
            tokenizer,
            prompt,
            args.max_tokens,
            verbose=args.verbose,
            tree=args.tree,
            apply_chat_template=not args.ignore_chat_template,
            system_prompt=args.system_prompt,
            temp=args.temp,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            accept_rule=args.accept_rule,
            logits_processors=processors,
            typical=TypicalParams(args.typical_threshold, args.typical_alpha),
            coarse_theta=args.coarse_theta,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"ss-mlx generate: error: {e}")
    if not args.verbose:
        print(text)


if __name__ == "__main__":
    main()
