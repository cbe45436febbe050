"""Speculative Streaming on top of a Hugging Face causal LM (docs/format.md, "The computation").

The main path is the untouched HF model (with peft LoRA in shared mode). Streams reuse the real
decoder modules of the top `stream_layers` layers; only the stream attention (eq. 2) is new here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ss_mlx.config import SSConfig


@dataclass
class BaseOutput:
    """What the (possibly frozen) base contributes to the stream computation."""

    main_hidden: torch.Tensor | None  # (B, L, D) final normed main hidden (lm_head input)
    stream_inputs: tuple[torch.Tensor, ...]  # Ns x (B, L, D): main hidden entering layers s..N-1
    position_ids: torch.Tensor  # (B, L)


def hf_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def default_position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Positions that count only real tokens, so left padding gives the same positions as none."""
    if attention_mask is None:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return pos[None].expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half RoPE on the first cos.shape[-1] dims (partial rotary passes the rest)."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


class StreamAdapter(nn.Module):
    """Per-stream low-rank delta on one linear module: x_j @ a[j] @ b[j]."""

    def __init__(self, num_streams: int, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        # b = 0 so a fresh adapter is exactly "off"; a small so early updates stay small.
        self.a = nn.Parameter(torch.randn(num_streams, d_in, rank) / math.sqrt(d_in))
        self.b = nn.Parameter(torch.zeros(num_streams, rank, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, L, G, in) -> (B, L, G, out)
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        return torch.einsum("blgr,gro->blgo", torch.einsum("blgi,gir->blgr", x, a), b)


class StreamingLM(nn.Module):
    """Main stream = the base model; G speculative streams in the top Ns layers (eq. 2, 3)."""

    def __init__(self, base: nn.Module, ss: dict[str, Any]) -> None:
        super().__init__()
        self.base = base
        hf = hf_causal_lm(base)
        cfg = hf.config
        self.model_type = cfg.model_type
        self.num_layers = cfg.num_hidden_layers
        ss_cfg = SSConfig.from_dict(ss, strict=True)
        ss_cfg.check_model(self.model_type, self.num_layers)
        self.ss = ss_cfg.to_dict()
        self.num_streams = G = self.ss["num_streams"]
        self.first_stream_layer = self.num_layers - self.ss["stream_layers"]
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        D = cfg.hidden_size

        # Init scale ~ embedding scale: P_j must move the stream off the main row, not swamp it.
        self.stream_embeddings = nn.Parameter(torch.randn(G, D) * 0.02)
        self.adapters = nn.ModuleDict()
        r = self.ss["adapter_rank"]
        if r > 0:
            layers = self._layers()
            for layer_idx in range(self.first_stream_layer, self.num_layers):
                per_module = nn.ModuleDict()
                for path in self.ss["adapter_modules"]:
                    lin = _linear(layers[layer_idx].get_submodule(path))
                    per_module[_key(path)] = StreamAdapter(G, lin.in_features, lin.out_features, r)
                self.adapters[str(layer_idx)] = per_module
        self.prune: nn.Module | None = None
        rp = self.ss["prune_rank"]
        if rp > 0:
            self.prune = nn.Module()
            self.prune.a = nn.Parameter(torch.randn(D, rp) / math.sqrt(D))
            self.prune.b = nn.Parameter(torch.zeros(rp, D))
        # The draft vocabulary (docs/format.md): the token ids the streams' head covers, and each
        # token's index among them (-1 outside). Set by the trainer from its data
        # (`draft_vocab.frequent_tokens`) or by loading a stream file; not trainable.
        self.draft_vocab: torch.Tensor | None
        self.to_draft: torch.Tensor | None
        self.register_buffer("draft_vocab", None, persistent=False)  # buffers follow .to()
        self.register_buffer("to_draft", None, persistent=False)
        if self.ss["draft_vocab_size"] > 0:
            self.set_draft_vocab(torch.arange(self.ss["draft_vocab_size"]))

    # ---- access to the HF model's parts --------------------------------------------------------

    def hf(self) -> nn.Module:
        return hf_causal_lm(self.base)

    def _layers(self) -> nn.ModuleList:
        return self.hf().model.layers

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """The base's LM head on final normed hidden states (..., D) -> (..., V)."""
        return self.hf().get_output_embeddings()(h)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Restrict the streams' head to token ids (V_d,): distinct, ascending, inside V."""
        V = self.hf().get_output_embeddings().weight.shape[0]
        ids = ids.detach().long().cpu()
        n = self.ss["draft_vocab_size"]
        if ids.shape != (n,):
            raise ValueError(f"draft vocabulary: expected {n} ids, got shape {tuple(ids.shape)}")
        if n and (ids[0] < 0 or ids[-1] >= V or (ids.diff() <= 0).any()):
            raise ValueError(f"draft vocabulary: ids must be distinct, ascending, in [0, {V})")
        to_draft = torch.full((V,), -1, dtype=torch.long)
        to_draft[ids] = torch.arange(n)
        device = self.stream_embeddings.device
        self.draft_vocab, self.to_draft = ids.to(device), to_draft.to(device)

    def stream_head(self, h: torch.Tensor) -> torch.Tensor:
        """The streams' LM head: normed states (..., D) -> (..., V_d) logits over the draft
        vocabulary (index i is token draft_vocab[i]), or (..., V) without one."""
        if self.draft_vocab is None:
            return self.lm_head(h)
        head = self.hf().get_output_embeddings()
        bias = None if head.bias is None else head.bias[self.draft_vocab]
        return nn.functional.linear(h, head.weight[self.draft_vocab], bias)

    def stream_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The streams' logits over the whole vocabulary (..., V): -inf outside the draft
        vocabulary (what the runtime drafts from; docs/format.md)."""
        if self.draft_vocab is None:
            return self.lm_head(h)
        sub = self.stream_head(h)  # (..., V_d)
        full = sub.new_full((*sub.shape[:-1], self.to_draft.shape[0]), float("-inf"))
        full[..., self.draft_vocab] = sub
        return full

    # ---- stream parameters in docs/format.md naming ------------------------------------------

    def ss_state_dict(self) -> dict[str, torch.Tensor]:
        out = {"stream_embeddings": self.stream_embeddings.detach()}
        for layer_idx, per_module in self.adapters.items():
            for path in self.ss["adapter_modules"]:
                ad = per_module[_key(path)]
                out[f"adapters.{layer_idx}.{path}.a"] = ad.a.detach()
                out[f"adapters.{layer_idx}.{path}.b"] = ad.b.detach()
        if self.prune is not None:
            out["prune.a"] = self.prune.a.detach()
            out["prune.b"] = self.prune.b.detach()
        if self.draft_vocab is not None:
            out["draft_vocab"] = self.draft_vocab.to(torch.int32)
        return out

    def load_ss_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strict: the names must be exactly those ss_state_dict() gives, with the same shapes."""
        own = self.ss_state_dict()
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        wrong = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
        if missing or extra or wrong:
            raise ValueError(
                f"stream tensors: missing {missing}, unexpected {extra}, bad shape {wrong}"
            )
        with torch.no_grad():
            for k, v in own.items():
                if k == "draft_vocab":
                    self.set_draft_vocab(tensors[k])
                else:
                    v.copy_(tensors[k].to(v.dtype))

    # ---- forward ---------------------------------------------------------------------------------

    def base_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BaseOutput:
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        out = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,  # the loss applies the LM head to the scored rows only
        )
        # hidden_states[l] is the input of layer l (hidden_states[0] = token embeddings);
        # hidden_states[N] is the final normed state that the LM head reads.
        hs = out.hidden_states
        return BaseOutput(
            hs[self.num_layers], tuple(hs[self.first_stream_layer : self.num_layers]), position_ids
        )

    @torch.no_grad()
    def main_layer_inputs(
        self, h: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The main hidden states entering layers s..N-1 (Ns x (B,L,D)) from the one entering
        layer s (B,L,D), by running the frozen base's own layers s..N-2 again.

        A trunk cache then stores one layer's input instead of Ns (Ns times smaller). Only the
        causal mask is applied: with right padding a real token never sees a padding row, and
        padding rows' states are never read as keys (the stream attention masks them).
        """
        hf = self.hf()
        L = h.shape[1]
        position_embeddings = hf.model.rotary_emb(h, position_ids)
        # Additive (1, 1, L, L): what both the eager and the SDPA attention of HF layers take.
        future = torch.ones(L, L, dtype=torch.bool, device=h.device).triu(1)
        mask = torch.zeros(L, L, dtype=h.dtype, device=h.device)
        mask = mask.masked_fill(future, torch.finfo(h.dtype).min)[None, None]
        out = [h]
        for layer in self._layers()[self.first_stream_layer : self.num_layers - 1]:
            h = layer(
                h,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            h = h[0] if isinstance(h, tuple) else h
            out.append(h)
        return tuple(out)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        base_output: BaseOutput | None = None,
        return_hidden: bool = False,
        anchors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """-> main logits (B,L,V), stream logits (B,L,G,V), early-exit logits (B,L,V) or None.

        return_hidden: the same three as LM-head inputs (D instead of V; apply `lm_head`), so a
        loss can score selected rows without materialising (B,L,G,V) logits.
        base_output (e.g. cached for a frozen base) skips the base pass; its main_hidden may
        be None (then so is the first output).
        anchors (B,P): compute the streams of these positions only (P replaces L in the stream
        and exit outputs); see `stream_hidden`.
        """
        if base_output is None:
            trainable_base = any(p.requires_grad for p in self.base.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and trainable_base):
                base_output = self.base_forward(input_ids, attention_mask, position_ids)
        streams, exits = self.stream_hidden(
            base_output.stream_inputs, base_output.position_ids, attention_mask, anchors
        )
        outs = (base_output.main_hidden, streams, exits)
        if return_hidden:
            return outs
        main, exits = (None if h is None else self.lm_head(h) for h in (outs[0], outs[2]))
        return main, self.stream_logits(streams), exits

    def stream_hidden(
        self,
        stream_inputs: Sequence[torch.Tensor],
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        anchors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final normed stream states (B,P,G,D) and early-exit states (B,P,D) or None, from the
        main hidden states entering layers s..N-1 (Ns x (B,L,D)).

        The streams of position t read only main rows <= t and their own rows, so any subset of
        positions gives exactly those positions' streams: anchors (B,P) picks them (P = L, all
        positions, when None). Training on a sample of positions cuts the stream layers' cost,
        quadratic in L through the main-key scores, to P/L of it.
        """
        h_all = stream_inputs[0]  # (B, L, D)
        B, L, D = h_all.shape
        G = self.num_streams
        hf = self.hf()
        rotary = hf.model.rotary_emb
        keys = torch.arange(L, device=h_all.device)
        if anchors is None:
            q_pos = keys.expand(B, L)  # (B, P=L)
            h = h_all
        else:
            q_pos = anchors
            h = h_all.gather(1, anchors[:, :, None].expand(-1, -1, D))  # (B, P, D)
        P = q_pos.shape[1]

        # Main keys t' are visible to stream rows of t when t' <= t and t' is a real token.
        key_ok = q_pos[:, :, None] >= keys[None, None, :]  # (B, P, L)
        if attention_mask is not None:
            key_ok = key_ok & attention_mask[:, None, :].bool()
        main_allowed = key_ok[:, None, None, :, None, :]  # (B, 1, 1, P, 1, L)
        stream_allowed = torch.ones(G, G, dtype=torch.bool, device=h.device).tril()  # (j, j')

        cos_m, sin_m = rotary(h_all, position_ids)  # (B, L, rot)
        offsets = torch.arange(1, G + 1, device=h.device)
        if self.ss["stream_position_mode"] == "anchor":
            offsets = torch.zeros_like(offsets)
        pos_s = (position_ids.gather(1, q_pos)[:, :, None] + offsets).reshape(B, P * G)
        cos_s, sin_s = (c.view(B, P, G, -1) for c in rotary(h, pos_s))  # (B, P, G, rot)

        S = h[:, :, None, :] + self.stream_embeddings.to(h.dtype)  # (B, P, G, D)
        layers = self._layers()
        for i, layer_idx in enumerate(range(self.first_stream_layer, self.num_layers)):
            S = self._stream_layer(
                layer_idx,
                layers[layer_idx],
                S,
                stream_inputs[i],
                (cos_m, sin_m),
                (cos_s, sin_s),
                main_allowed,
                stream_allowed,
            )
        norm = hf.model.norm
        exits = None
        if self.prune is not None:
            delta = (h @ self.prune.a.to(h.dtype)) @ self.prune.b.to(h.dtype)
            exits = norm(h + delta)
        return norm(S), exits

    # ---- one stream layer ------------------------------------------------------------------------

    def _proj(self, layer_idx: int, path: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x) on stream rows x (B,L,G,in), plus the stream adapter when configured."""
        y = module(x)
        per_module = self.adapters[str(layer_idx)] if str(layer_idx) in self.adapters else None
        if per_module is not None and _key(path) in per_module:
            y = y + self.ss["adapter_scale"] * per_module[_key(path)](x)
        return y

    def _stream_qkv(
        self, layer_idx: int, attn: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stream q (B,L,G,H,hd), k and v (B,L,G,Hk,hd), before RoPE (after q/k norm)."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        if self.model_type == "phi3":
            qkv = self._proj(layer_idx, "self_attn.qkv_proj", attn.qkv_proj, x)
            q, k, v = _split_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        else:
            q = self._proj(layer_idx, "self_attn.q_proj", attn.q_proj, x)
            k = self._proj(layer_idx, "self_attn.k_proj", attn.k_proj, x)
            v = self._proj(layer_idx, "self_attn.v_proj", attn.v_proj, x)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if self.model_type == "qwen3":
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    def _main_kv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Main-row k, v (B,L,Hk,hd) of this layer, recomputed exactly as the base computes them."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        if self.model_type == "phi3":
            _, k, v = _split_qkv(attn.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim)
        else:
            k, v = attn.k_proj(x), attn.v_proj(x)
        k, v = k.view(shape), v.view(shape)
        if self.model_type == "qwen3":
            k = attn.k_norm(k)
        return k, v

    def _mlp(self, layer_idx: int, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.model_type == "phi3":
            gate, up = self._proj(layer_idx, "mlp.gate_up_proj", mlp.gate_up_proj, x).chunk(
                2, dim=-1
            )
            act = mlp.activation_fn
        else:
            gate = self._proj(layer_idx, "mlp.gate_proj", mlp.gate_proj, x)
            up = self._proj(layer_idx, "mlp.up_proj", mlp.up_proj, x)
            act = mlp.act_fn
        return self._proj(layer_idx, "mlp.down_proj", mlp.down_proj, act(gate) * up)

    def _stream_layer(
        self,
        layer_idx: int,
        layer: nn.Module,
        S: torch.Tensor,
        x_main: torch.Tensor,
        rope_main: tuple[torch.Tensor, torch.Tensor],
        rope_stream: tuple[torch.Tensor, torch.Tensor],
        main_allowed: torch.Tensor,
        stream_allowed: torch.Tensor,
    ) -> torch.Tensor:
        # S: (B, P, G, D) stream rows entering this layer; x_main: (B, L, D) main rows entering it.
        B, P, G, _ = S.shape
        L = x_main.shape[1]
        Hk, hd = self.num_kv_heads, self.head_dim
        rep = self.num_heads // Hk
        attn = layer.self_attn

        k_m, v_m = self._main_kv(attn, layer.input_layernorm(x_main))  # (B, L, Hk, hd)
        k_m = apply_rope(k_m, rope_main[0][:, :, None], rope_main[1][:, :, None])
        k_m, v_m = k_m.transpose(1, 2), v_m.transpose(1, 2)  # (B, Hk, L, hd)

        q, k_s, v_s = self._stream_qkv(layer_idx, attn, layer.input_layernorm(S))
        cos_s, sin_s = rope_stream[0][:, :, :, None], rope_stream[1][:, :, :, None]
        q, k_s = apply_rope(q, cos_s, sin_s), apply_rope(k_s, cos_s, sin_s)
        # Query head h uses kv head h // rep (HF repeat_kv order).
        q = q.permute(0, 3, 1, 2, 4).reshape(B, Hk, rep, P, G, hd)
        k_s = k_s.permute(0, 3, 1, 2, 4)[:, :, None]  # (B, Hk, 1, P, G, hd)
        v_s = v_s.permute(0, 3, 1, 2, 4)[:, :, None]

        scale = hd**-0.5
        # Scores vs main keys: (B, Hk, rep, P, G, L); vs same-token streams: (B, Hk, rep, P, G, G).
        sc_m = (q.reshape(B, Hk, rep * P * G, hd) @ k_m.transpose(-1, -2)).view(B, Hk, rep, P, G, L)
        sc_s = q @ k_s.transpose(-1, -2)
        sc_m = (sc_m * scale).masked_fill(~main_allowed, float("-inf"))
        sc_s = (sc_s * scale).masked_fill(~stream_allowed, float("-inf"))
        probs = torch.softmax(torch.cat((sc_m, sc_s), dim=-1), dim=-1, dtype=torch.float32)
        probs = probs.to(q.dtype)
        p_m, p_s = probs[..., :L], probs[..., L:]
        o = (p_m.reshape(B, Hk, rep * P * G, L) @ v_m).view(B, Hk, rep, P, G, hd) + p_s @ v_s
        o = o.reshape(B, Hk * rep, P, G, hd).permute(0, 2, 3, 1, 4).reshape(B, P, G, -1)

        S = S + self._proj(layer_idx, "self_attn.o_proj", attn.o_proj, o)
        return S + self._mlp(layer_idx, layer.mlp, layer.post_attention_layernorm(S))


def _key(path: str) -> str:
    # nn.ModuleDict keys may not contain dots.
    return path.replace(".", "__")


def _linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear itself, also when peft has wrapped it."""
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"stream adapters need nn.Linear modules, got {type(base).__name__}")
    return base


def _split_qkv(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nq, nk = num_heads * head_dim, num_kv_heads * head_dim
    return qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
