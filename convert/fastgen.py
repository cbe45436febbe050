"""Fast batched greedy generation for distillation: slot-based decoding, preallocated KV cache.

`generate_greedy(model, prompts, ...)` runs Llama-family Hugging Face models (llama, mistral, qwen2)
with their own weights and modules (RMSNorm, rotary embedding) but without `generate`'s per-step
overheads: each of `batch_size` slots holds one sequence in a preallocated cache
`(slots, kv_heads, capacity, head_dim)` starting at position 0, so nothing is padded; a slot whose
row reaches EOS or `max_new_tokens` is refilled with the next prompt at once (continuous batching),
so every decoding step runs a full batch until the prompts run out. The K/V of each new token are
written in place (no per-step concatenation of the whole cache, which dominates `generate` on CPU).

Two things keep the work near the tokens that matter. Prompts are admitted shortest first, because
a decoding step attends every slot over the longest live row's span: one 700-token prompt among
128 short ones would otherwise make each step read ~6x the cache it needs. And the prefix all
prompts share (a chat template's system turn: ~24 of ~90 prompt tokens) is prefilled once and
copied into each slot, since on this CPU a prompt token costs about as much as a generated one.

Greedy ties break toward the lower token id, as `argmax` does in `generate`. Results depend only
on the prompt list and the settings (slot refills follow a fixed order), not on timing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class Generation:
    ids: list[int]  # generated ids, the stop token excluded
    finish: str  # "eos" or "length"


def supports(model: Any) -> bool:
    """Whether `generate_greedy` can run this HF causal LM (else use HF `generate`)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    attn = model.model.layers[0].self_attn
    if getattr(attn, "q_norm", None) is not None or getattr(cfg, "sliding_window", None):
        return bool(cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False))
    return True


class _Layer:
    def __init__(self, layer: Any) -> None:
        a, m = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        ws = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        self.wqkv = torch.cat(ws, 0).detach()
        bs = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
        self.bqkv = torch.cat(bs, 0).detach() if bs[0] is not None else None
        self.nq, self.nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
        self.wo = a.o_proj.weight.detach()
        self.bo = a.o_proj.bias.detach() if getattr(a.o_proj, "bias", None) is not None else None
        self.wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight], 0).detach()
        self.ff = m.gate_proj.weight.shape[0]
        self.wd = m.down_proj.weight.detach()
        self.act = m.act_fn


class FastLM:
    """The decoding state of one model: fused weights and a slot KV cache."""

    def __init__(self, model: Any) -> None:
        if not supports(model):
            raise ValueError(f"fast generation does not support {model.config.model_type!r}")
        cfg = model.config
        self.model = model
        self.layers = [_Layer(layer) for layer in model.model.layers]
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.rotary = model.model.rotary_emb
        self.lm_head = model.lm_head.weight.detach()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = model.model.layers[0].self_attn.scaling
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.prefix: list[int] = []  # token ids whose K/V `prefix_k`/`prefix_v` hold
        self.prefix_k: list[torch.Tensor] = []  # per layer (kv_heads, len(prefix), head_dim)
        self.prefix_v: list[torch.Tensor] = []

    def allocate(self, slots: int, capacity: int) -> None:
        shape = (slots, self.n_kv, capacity, self.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        self.k = [torch.zeros(shape, **kw) for _ in self.layers]
        self.v = [torch.zeros(shape, **kw) for _ in self.layers]

    def compact(self, keep: torch.Tensor) -> None:
        """Keep only the cache slots `keep` (in that order)."""
        self.k = [k.index_select(0, keep) for k in self.k]
        self.v = [v.index_select(0, keep) for v in self.v]

    def _qkv(self, lay: _Layer, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        B, L, _ = x.shape
        h = lay.ln1(x)
        qkv = F.linear(h, lay.wqkv, lay.bqkv)
        q, k, v = qkv.split([lay.nq, lay.nk, lay.nk], dim=-1)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = self._rope
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _finish_layer(self, lay: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = attn.shape
        attn = attn.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        x = x + F.linear(attn, lay.wo, lay.bo)
        gu = F.linear(lay.ln2(x), lay.wgu)
        gate, up = gu.split([lay.ff, lay.ff], dim=-1)
        return x + F.linear(lay.act(gate) * up, lay.wd)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.lm_head)

    @torch.no_grad()
    def set_prefix(self, ids: Sequence[int]) -> None:
        """Compute the K/V of `ids` once; prompts that start with them copy it (uses slot 0)."""
        self.prefix, self.prefix_k, self.prefix_v = [], [], []
        if ids:
            self.prefill(0, ids)
            n = len(ids)
            self.prefix_k = [k[0, :, :n].clone() for k in self.k]
            self.prefix_v = [v[0, :, :n].clone() for v in self.v]
            self.prefix = list(ids)

    @torch.no_grad()
    def prefill(self, slot: int, ids: Sequence[int]) -> int:
        """Write one prompt's K/V into `slot` (positions 0..L-1); the greedy next token."""
        L, P = len(ids), len(self.prefix)
        if not (0 < P < L and list(ids[:P]) == self.prefix):
            P = 0
        x = self.embed(torch.tensor([list(ids[P:])], device=self.device))  # (1, L-P, hidden)
        pos = torch.arange(P, L, device=self.device)[None]
        self._rope = self.rotary(x, pos)
        # Query i (position P+i) sees keys 0..P+i: the cached prefix and the causal part of its own.
        mask = torch.arange(L, device=self.device)[None] <= pos[0][:, None] if P else None
        for i, (lay, kc, vc) in enumerate(zip(self.layers, self.k, self.v, strict=True)):
            q, k, v = self._qkv(lay, x, pos)
            kc[slot, :, P:L] = k[0]
            vc[slot, :, P:L] = v[0]
            if P:
                kc[slot, :, :P] = self.prefix_k[i]
                vc[slot, :, :P] = self.prefix_v[i]
                k, v = kc[slot : slot + 1, :, :L], vc[slot : slot + 1, :, :L]
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=not P, scale=self.scale, enable_gqa=True
            )
            x = self._finish_layer(lay, x, attn)
        return int(self._logits(x[:, -1]).argmax(-1))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per slot at positions `pos` (B,); the greedy next tokens (B,)."""
        B = tokens.shape[0]
        x = self.embed(tokens[:, None])
        span = int(pos.max()) + 1
        self._rope = self.rotary(x, pos[:, None])
        rows = torch.arange(B, device=self.device)
        # Positions past each row's own are masked out (they hold older rows' or no K/V).
        masked = (torch.arange(span, device=self.device)[None] > pos[:, None])[:, None, None]
        group = self.n_heads // self.n_kv
        for lay, kc, vc in zip(self.layers, self.k, self.v, strict=True):
            q, k, v = self._qkv(lay, x, pos)
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            # One query per row: grouped-query attention as two batched matmuls over the cache.
            qg = q.reshape(B, self.n_kv, group, self.head_dim)
            scores = torch.matmul(qg, kc[:, :, :span].transpose(-1, -2)) * self.scale
            probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
            attn = torch.matmul(probs, vc[:, :, :span]).reshape(B, self.n_heads, 1, self.head_dim)
            x = self._finish_layer(lay, x, attn)
        return self._logits(x[:, 0]).argmax(-1)


MIN_SHARED_PREFIX = 4  # shorter shared prefixes are not worth a copy per prompt


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the prefix every prompt shares, leaving each prompt at least one token to run."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = min(n, next((i for i in range(n) if p[i] != first[i]), n))
    return max(n, 0)


def generate_greedy(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    batch_size: int = 64,
    on_done: Callable[[int, Generation], None] | None = None,
    order: Sequence[int] | None = None,
    admit: Callable[[int], bool] | None = None,
) -> list[Generation | None]:
    """Greedy completions of token-id prompts, `batch_size` sequences decoding at once.

    order: the order prompts are admitted in (default: shortest first). admit(i), asked before
    prompt i is admitted: False admits no more prompts, and those never admitted get None (with
    no `admit`, every prompt gets its Generation). on_done(i, generation) as each one finishes.
    """
    n = len(prompts)
    out: list[Generation | None] = [None] * n
    if n == 0:
        return []
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    lm = FastLM(model)
    stop = {int(e) for e in eos_ids}
    slots = min(batch_size, n)
    lm.allocate(slots, max(len(p) for p in prompts) + max_new_tokens)
    shared = shared_prefix(prompts)
    if shared >= MIN_SHARED_PREFIX:
        lm.set_prefix(prompts[0][:shared])
    if order is None:
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # stable: ties keep list order
    elif sorted(order) != list(range(n)):
        raise ValueError("order must list every prompt index once")
    todo = 0  # next prompt to admit, as an index into `order`
    row = [-1] * slots  # prompt index held by each slot (-1: empty)
    gen: list[list[int]] = [[] for _ in range(slots)]
    nxt = [0] * slots  # the slot's next input token
    pos = [0] * slots  # where it goes

    def finish(s: int, reason: str) -> None:
        g = Generation(gen[s], reason)
        out[row[s]] = g
        if on_done is not None:
            on_done(row[s], g)
        row[s], nxt[s], pos[s] = -1, 0, 0  # an empty slot computes a dummy token at 0

    def push(s: int, tok: int) -> None:
        if tok in stop:
            finish(s, "eos")
            return
        gen[s].append(tok)
        nxt[s] = tok
        if len(gen[s]) >= max_new_tokens:
            finish(s, "length")

    def fill(s: int) -> None:
        """Fill slot s with the next prompts until one still needs decoding steps."""
        nonlocal todo
        while row[s] < 0 and todo < n:
            if admit is not None and not admit(order[todo]):
                todo = n  # admit nothing more
                break
            i, todo = order[todo], todo + 1
            row[s], gen[s] = i, []
            tok = lm.prefill(s, prompts[i])
            pos[s] = len(prompts[i])
            push(s, tok)

    for s in range(slots):
        fill(s)
    while True:
        live = [s for s in range(slots) if row[s] >= 0]
        if not live:
            break
        if todo >= n and len(live) <= slots // 2:
            # No prompts left: shrink the batch to the live slots instead of computing empty ones.
            lm.compact(torch.tensor(live, device=lm.device))
            row, gen = [row[s] for s in live], [gen[s] for s in live]
            nxt, pos = [nxt[s] for s in live], [pos[s] for s in live]
            slots = len(live)
        new = lm.step(
            torch.tensor(nxt, device=lm.device), torch.tensor(pos, device=lm.device)
        ).tolist()
        for s in range(slots):
            if row[s] >= 0:
                pos[s] += 1
                push(s, int(new[s]))
                fill(s)
    missing = [i for i, g in enumerate(out) if g is None]
    if missing and admit is None:
        raise RuntimeError(f"internal error: prompts {missing[:5]} were never generated")
    return out
