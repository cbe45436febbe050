"""The mlx-lm-style API: `stream_generate`, `generate`, `GenerationResponse`, `ss_generate_step`."""

import dataclasses
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.sample_utils import LogitsProcessor
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import cliargs
from .cliargs import check_text
from .decode.coarse import groups_for_model
from .decode.loop import StepToken, decode
from .decode.sampling import SamplerConfig, sampler_settings
from .decode.tree import TreeSpec, as_tree, default_tree
from .decode.verify import RELAXED_RULES, AcceptRule, TypicalParams, resolve_rule
from .drafters.hybrid import HybridConfig, HybridDrafter, HybridStats
from .drafters.streams import Proposer, StreamDrafter
from .files import cache_root
from .model.ss_model import SSModel
from .tuned import load_tuned, plain_cost_curve, row_cost_curve

DYNAMIC = "dynamic"

DEFAULT_MAX_TOKENS = 256


@dataclass
class GenerationResponse:
    """The output of :func:`stream_generate` (mlx-lm's fields plus speculation statistics).

    Args:
        text: the next segment of decoded text (may be empty).
        token: the next token.
        logprobs: (V,) log-probabilities of the distribution the token was verified against
            (after logits processors, before temperature), as mlx-lm's.
        from_draft: whether the token was a verified draft token.
        accepted: draft tokens accepted in the forward pass that produced this token.
        prompt_tokens, prompt_tps: prompt size and prefill speed (tokens/s).
        generation_tokens, generation_tps: tokens generated so far and their rate.
        forward_passes: decoding forward passes so far; tokens_per_pass = tokens / passes.
        peak_memory: peak memory so far in GB.
        finish_reason: "stop" (EOS), "length" (max_tokens) or None.
        accept_rule: the rule that accepted the token: "greedy", "simple", "rrs" (exact) or
            "typical", "coarse" (relaxed, not exact).
    """

    text: str
    token: int
    logprobs: mx.array | None
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


def _check_model(model: Any) -> SSModel:
    if not isinstance(model, SSModel):
        raise TypeError(
            f"expected an ss_mlx model (from ss_mlx.load or ss_mlx.attach_streams), got "
            f"{type(model).__module__}.{type(model).__name__}; a plain mlx-lm model has no "
            "speculative streams: wrap it with ss_mlx.attach_streams(model, config, tensors)"
        )
    return model


def tuned_record(model: SSModel) -> dict[str, Any] | None:
    """This model's `ss-mlx tune` record for this machine, read (and validated, a damaged file
    warned about) once per loaded model."""
    if "_tuned" not in model.__dict__:
        record = None
        if model.path is not None:
            vocab = model.inner.embed_tokens.weight.shape[0]
            record = load_tuned(model.path, num_streams=model.num_streams, vocab_size=vocab)
        object.__setattr__(model, "_tuned", record)  # plain attribute: not a module child
    return model.__dict__["_tuned"]


def dynamic_drafter(
    model: SSModel, config: HybridConfig | None = None, greedy: bool = True
) -> HybridDrafter:
    """The default draft source: streams + prompt lookup in one tree chosen every step, costed
    with this machine's curve from `ss-mlx tune` (or the default), with the streams' and prompt
    lookup's acceptance that tune measured for this model as the priors.

    When sampling (`greedy` False) the tree must not depend on the clock or on earlier requests:
    which drafts are verified decides which random draws a seed's sample uses, and a seeded
    request must give the same text again. So then no timing correction, no output memory, and
    acceptance rates of this request's own, starting from the priors.
    """
    record = tuned_record(model)
    config = config or HybridConfig()
    curve = row_cost_curve(record, model.num_streams)
    if greedy:
        stats = dynamic_stats(model, config, record)
        return HybridDrafter(model, config, curve, stats, plain_cost_curve(record))
    stats = _prior_stats(model, config, record)
    config = dataclasses.replace(config, memory_candidates=0)
    return HybridDrafter(model, config, curve, stats, plain_cost_curve(record), clock=None)


def dynamic_stats(
    model: SSModel, config: HybridConfig | None = None, record: dict[str, Any] | None = None
) -> HybridStats:
    """What the dynamic tree has learned of this model in this process (rates, cost correction,
    earlier outputs), kept on the model; made from the tune record's priors the first time."""
    config = config or HybridConfig()
    stats = model.__dict__.get("_hybrid_stats")
    if stats is None or len(stats.lookup_rate) != config.lookup_depth:
        stats = _prior_stats(model, config, tuned_record(model) if record is None else record)
        object.__setattr__(model, "_hybrid_stats", stats)  # plain attribute: not a module child
    return stats


def _prior_stats(
    model: SSModel, config: HybridConfig, record: dict[str, Any] | None
) -> HybridStats:
    """Fresh statistics holding only the priors: the acceptance `ss-mlx tune` measured for this
    model (records before it measured them: the defaults)."""
    acc = (record or {}).get("acceptance")
    acc = acc if isinstance(acc, dict) else {}
    lookup = acc.get("lookup") if isinstance(acc.get("lookup"), dict) else {}
    # HybridStats replaces anything unusable in the record with the default prior.
    return HybridStats(model.num_streams, config.lookup_depth, _seq(acc.get("top1_chain")),
                       _seq(lookup.get("first_by_match")),
                       _seq(lookup.get("continue_by_depth")))  # fmt: skip


def _seq(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def resolve_tree(model: SSModel, tree: TreeSpec | str | dict | None) -> TreeSpec:
    """The static draft tree to use: the argument, else one `ss-mlx tune` saved for this model
    on this machine, else the model config's, else a default."""
    model = _check_model(model)
    vocab = model.inner.embed_tokens.weight.shape[0]
    if tree is None:
        tree = (tuned_record(model) or {}).get("tree")
    if tree is None:
        tree = model.cfg.tree
    spec = default_tree(model.num_streams) if tree is None else as_tree(
        tree, model.num_streams, "speculative streams"
    )
    if spec.max_width > vocab:
        raise ValueError(f"the draft tree is {spec.max_width} wide but the vocabulary has {vocab}")
    return spec


def ss_generate_step(
    prompt: mx.array,
    model: SSModel,
    *,
    tree: TreeSpec | str | dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 2048,
    drafter: Proposer | None = None,
    sampler: SamplerConfig | Callable | None = None,
    accept_rule: str = "auto",
    typical: TypicalParams | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    coarse_theta: float = 0.8,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = cliargs.DEFAULT_QUANTIZED_KV_START,
    stream: mx.Stream | Any = generation_stream,
) -> Generator[StepToken, None, None]:
    """Speculative Streaming decoding, token by token.

    Each forward pass verifies the previous draft tree and drafts the next one from the
    streams of the deepest accepted node, with one host sync per pass. With the exact rules
    (greedy at temp 0; "simple" or "rrs" above) the tokens have exactly the distribution of
    mlx-lm's autoregressive decoding with the same sampler and logits processors.

    Args:
        prompt: (L,) token ids.
        model: the SS model.
        tree: None or "dynamic" (default): streams + prompt lookup in one tree chosen every
            step by confidence and this machine's cost (`ss_mlx.drafters.hybrid`); or a static
            tree (TreeSpec, CLI string like "3,2,1", or dict) drafted by the streams alone.
        max_tokens: how many tokens to generate (-1: no limit).
        prompt_cache: a cache from an earlier call to continue from (updated in place). When
            generation ends it holds the prompt and every emitted token, as mlx-lm's.
        prefill_step_size: prompt chunk size for prefill.
        drafter: replaces the streams' tokens: called after each pass with the token history
            (prompt + emitted tokens, the pending root last) and the tree, it returns the
            T - 1 draft tokens (oracle tests, other draft sources); output stays lossless.
        sampler: sampling settings (default greedy): a SamplerConfig or a sampler built by
            mlx-lm's ``make_sampler``.
        accept_rule: "auto" (greedy at temp 0, "rrs" above), "greedy", "simple", "rrs", or
            the relaxed, NOT exact "typical" and "coarse".
        typical: thresholds of the "typical" rule.
        logits_processors: mlx-lm style ``processor(tokens, logits) -> logits``; at each tree
            node ``tokens`` is that node's own history (prompt, emitted tokens, its path).
        coarse_theta: embedding-cosine threshold of the relaxed "coarse" rule's token groups.
        prompt_progress_callback: ``callback(done, total)`` during prefill, as mlx-lm's.
        max_kv_size, kv_bits, kv_group_size, quantized_kv_start: mlx-lm's rotating and
            quantized KV caches. A tree pass must drop its rejected nodes, which neither cache
            can do, so these are accepted only where mlx-lm's cache would never rotate (the
            context fits in ``max_kv_size``, or mlx-lm ignores it: with a prompt cache, or a
            model with its own ``make_cache`` such as llama) or quantize (the context stays
            below ``quantized_kv_start``): there a plain cache gives exactly mlx-lm's output.
            Otherwise a ValueError says so.
        stream: the stream the computation runs on (mlx-lm's thread-local generation stream
            by default, as mlx-lm's ``generate_step``).
    """
    model = _check_model(model)
    _check_cache_limits(model, prompt, max_tokens, prompt_cache, max_kv_size, kv_bits,
                        quantized_kv_start)
    settings = sampler_settings(sampler) if sampler is not None else SamplerConfig()
    if tree in (None, DYNAMIC) and drafter is None:
        source: Any = dynamic_drafter(model, greedy=settings.greedy)
    else:
        source = StreamDrafter(model, resolve_tree(model, None if tree == DYNAMIC else tree),
                               drafter)
    name = resolve_rule(accept_rule, settings, has_distribution=source.has_distribution)
    groups = None
    if name == "coarse":
        groups = groups_for_model(model.inner.embed_tokens, coarse_theta, cache_root() / "coarse")
    rule = AcceptRule(name, settings, typical or TypicalParams(), groups)
    gen = decode(
        prompt,
        source,
        rule,
        max_tokens=max_tokens,
        prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size,
        logits_processors=logits_processors,
        prompt_progress_callback=(
            None if prompt_progress_callback is None
            else lambda done, _: prompt_progress_callback(done, getattr(prompt, "size", 0))
        ),
    )
    gen = _on_stream(gen, stream)
    if prompt_progress_callback is None:
        yield from gen
        return
    # mlx-lm's callback sequence: (0, L), chunks (done, L), then (L, L) with the first token.
    total, report = getattr(prompt, "size", 0), prompt_progress_callback
    report(0, total)
    done = False
    try:
        for st in gen:
            if not done:
                report(total, total)
                done = True
            yield st
    finally:
        gen.close()
    if not done:
        report(total, total)


def _on_stream(gen: Generator[StepToken, None, None], stream: Any) -> Generator[StepToken]:
    """Run each step of `gen` with `stream` as the default stream, as mlx-lm's generate_step
    does; the caller's code between tokens keeps its own default stream."""
    try:
        while True:
            with mx.stream(stream):
                try:
                    item = next(gen)
                except StopIteration:
                    return
            yield item
    finally:
        with mx.stream(stream):
            gen.close()  # the loop's cleanup (settling the prompt cache) runs there too


def _rotates(model: SSModel, max_kv_size: int) -> bool:
    from mlx_lm.models.cache import KVCache
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    base = getattr(model, "base", model)
    return any(type(c) is not KVCache for c in mlx_lm_cache(base, max_kv_size=max_kv_size))


def _check_cache_limits(
    model: SSModel,
    prompt: Any,
    max_tokens: int,
    prompt_cache: list[Any] | None,
    max_kv_size: int | None,
    kv_bits: int | None,
    quantized_kv_start: int,
) -> None:
    """Refuse mlx-lm's rotating / quantized caches where they would change the output."""
    size = getattr(prompt, "size", None)
    if not isinstance(size, int):
        return  # decode's own checks reject the prompt with a better message
    unbounded = max_tokens < 0
    # mlx-lm ignores max_kv_size with a prompt cache, and for models with their own
    # make_cache (llama): refuse only where it would really build a rotating cache.
    if max_kv_size is not None and prompt_cache is None and _rotates(model, max_kv_size):
        need = size + max_tokens
        if unbounded or need > max_kv_size:
            why = "max_tokens=-1 has no limit" if unbounded else (
                f"the prompt ({size}) plus max_tokens ({max_tokens}) is {need} tokens")
            raise ValueError(
                f"max_kv_size={max_kv_size}: Speculative Streaming cannot use a rotating KV "
                "cache (a tree pass must rewind its rejected nodes, and a rotating cache that "
                "has wrapped around cannot), and a plain cache equals mlx-lm's rotating one "
                f"only while the context fits; {why}: raise max_kv_size, lower max_tokens, or "
                "leave max_kv_size unset"
            )
    if kv_bits is not None:
        start = prompt_cache[0].offset if prompt_cache else 0
        need = start + size + max_tokens
        if unbounded or need >= quantized_kv_start:
            why = "max_tokens=-1 has no limit" if unbounded else f"the context reaches {need}"
            raise ValueError(
                f"kv_bits={kv_bits}: Speculative Streaming cannot use a quantized KV cache "
                "(tree verification rewinds and compacts cache rows), and mlx-lm quantizes "
                f"once the context reaches quantized_kv_start={quantized_kv_start} tokens; "
                f"{why}: leave kv_bits unset or raise quantized_kv_start"
            )


def encode_prompt(
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
) -> mx.array:
    """Token ids (L,) of a text or token prompt (text through the chat template if asked)."""
    if isinstance(prompt, mx.array):
        if prompt.ndim != 1:
            raise ValueError(f"the prompt must be a 1-D array of token ids, got {prompt.shape}")
        return prompt.astype(mx.int32)
    if isinstance(prompt, str):
        check_text(prompt, "the prompt")
        if system_prompt is not None:
            check_text(system_prompt, "the system prompt")
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
    if isinstance(prompt, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return mx.array(list(prompt), dtype=mx.int32)
    raise ValueError("prompt must be a string, a list of token ids or a 1-D mx.array")


def stream_generate(
    model: SSModel,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    draft_model: Any = None,
    stream: mx.Stream | Any = generation_stream,
    *,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    seed: int | None = None,
    sampler: SamplerConfig | Callable | None = None,
    **kwargs: Any,
) -> Generator[GenerationResponse, None, None]:
    """Generate text with Speculative Streaming, yielding one response per token.

    Args:
        model: an SSModel from :func:`ss_mlx.load`.
        tokenizer: its tokenizer.
        prompt: text, or token ids.
        max_tokens: maximum number of tokens to generate (-1: no limit).
        draft_model: mlx-lm's two-model speculative decoding; not needed here (the model
            drafts for itself), so anything but None is refused.
        stream: the stream generation runs on (default: mlx-lm's generation stream); as in
            mlx-lm, generation runs inside ``mlx_lm.generate.wired_limit`` (Metal only).
        apply_chat_template: wrap a text prompt as a user message with the tokenizer's chat
            template (when it has one). Default: ``False``, as in mlx-lm's API.
        system_prompt: system message used with the chat template.
        temp, top_p, top_k, min_p, min_tokens_to_keep: sampler settings (temp 0 = greedy).
        seed: seeds MLX's random state before generating.
        sampler: instead of the settings above, a sampler from mlx-lm's ``make_sampler`` (or a
            SamplerConfig); other callables are refused (they cannot be verified exactly).
        kwargs: passed to :func:`ss_generate_step` (``tree``, ``prompt_cache``,
            ``accept_rule``, ``logits_processors``, ...).
    """
    model = _check_model(model)
    if draft_model is not None:
        raise ValueError(
            "draft_model is not supported: Speculative Streaming drafts with the model's own "
            "streams (a separate draft model is what `ss-mlx bench --methods draft` measures)"
        )
    if sampler is None:
        sampler = SamplerConfig(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                min_tokens_to_keep=min_tokens_to_keep)
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        mx.random.seed(seed)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    ids = encode_prompt(tokenizer, prompt, apply_chat_template, system_prompt)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = set(tokenizer.eos_token_ids)
    tic = time.perf_counter()
    prompt_tps = 0.0

    def response(st: StepToken, count: int, reason: str | None) -> GenerationResponse:
        elapsed = time.perf_counter() - tic
        passes = st.step + 1
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=st.token,
            logprobs=st.logprobs,
            from_draft=st.from_draft,
            accepted=st.accepted,
            prompt_tokens=ids.size,
            prompt_tps=prompt_tps,
            generation_tokens=count,
            generation_tps=count / elapsed if elapsed > 0 else 0.0,
            forward_passes=passes,
            tokens_per_pass=count / passes,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=reason,
            accept_rule=st.rule,
        )

    gen = ss_generate_step(
        ids, model, max_tokens=max_tokens, sampler=sampler, stream=stream, **kwargs
    )
    last, count, finish = None, 0, "length"
    with wired_limit(model, [stream]):
        try:
            for count, st in enumerate(gen, start=1):
                if count == 1:
                    # The first token comes from the pass right after prefill: prompt time.
                    prompt_tps = ids.size / (time.perf_counter() - tic)
                    tic = time.perf_counter()
                if st.token in eos:
                    last, finish = st, "stop"
                    break
                detokenizer.add_token(st.token)
                if count == max_tokens:
                    last = st
                    break
                yield response(st, count, None)
                last = st
        finally:
            gen.close()
        if last is None:
            return
        detokenizer.finalize()
        yield response(last, count, finish)


def generate(
    model: SSModel,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a complete response; with ``verbose`` print it as it comes, then statistics.

    Same signature as mlx-lm's ``generate``; ``kwargs`` go to :func:`stream_generate`.
    """
    if "formatter" in kwargs:
        warnings.warn("'formatter' is not supported and is ignored", stacklevel=2)
        kwargs.pop("formatter")
    text = ""
    last = None
    header = "=" * 10 + "\n" if verbose else ""
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            # mlx-lm prints the header first; printing it with the first token keeps a bad
            # argument's error (raised when generation starts) from following a header.
            print(header + last.text, end="", flush=True)
            header = ""
        text += last.text
    if verbose:
        print(header)
        print("=" * 10)
    if verbose and (last is None or not text):
        print("No text generated for this prompt")
    elif verbose:
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
