"""Medusa-1 heads on a frozen base: the paper's baseline (1 residual block per head, same data).

Head k (0-based) maps the base's final normed hidden state h_i (what the LM head sees) to
`h_i + SiLU(W_k h_i + b_k)` and then through the base's own LM head (shared, frozen), and predicts
token i + 2 + k, i.e. "stream" k+1 in the ss_loss sense. Sharing the LM head keeps the baseline
small (h^2 + h per head); Medusa's original per-head LM head copy would add h*V per head.

Files: `medusa_heads.safetensors` with `medusa_head.{k}.0.linear.weight` (D, D) and
`medusa_head.{k}.0.linear.bias` (D,) (Medusa's names, minus the absent per-head LM head
`medusa_head.{k}.1.weight`), and the config block `ss_mlx.config.MEDUSA_KEY`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ss_mlx.config import check_model_type, medusa_config

from .modeling import BaseOutput, default_position_ids, hf_causal_lm


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        # Zero init: every head starts as the base's next-token prediction, as in Medusa.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h))


class MedusaLM(nn.Module):
    """Same calling convention as StreamingLM: forward -> (main, heads (B,L,K,V), None)."""

    def __init__(self, base: nn.Module, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError("medusa: num_heads must be >= 1")
        self.base = base
        hf = hf_causal_lm(base)
        check_model_type(hf.config.model_type)
        self.num_streams = num_heads
        self.medusa_head = nn.ModuleList(
            nn.Sequential(ResBlock(hf.config.hidden_size)) for _ in range(num_heads)
        )

    def config_block(self) -> dict[str, Any]:
        return medusa_config(self.num_streams)

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"medusa_head.{k}": v.detach() for k, v in self.medusa_head.state_dict().items()}

    def load_heads_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = "medusa_head."
        bad = [k for k in tensors if not k.startswith(prefix)]
        if bad:
            raise ValueError(f"medusa heads: unexpected tensors {bad}")
        self.medusa_head.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()})

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return hf_causal_lm(self.base).get_output_embeddings()(h)

    def base_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BaseOutput:
        if position_ids is None:
            position_ids = default_position_ids(input_ids, attention_mask)
        out = hf_causal_lm(self.base).model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        h = out.last_hidden_state  # (B, L, D), after the final norm
        return BaseOutput(h, (h,), position_ids)

    def main_layer_inputs(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor]:
        """What the heads read, from what a trunk cache stores: the final state itself."""
        return (h,)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        base_output: BaseOutput | None = None,
        return_hidden: bool = False,
        anchors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, None]:
        """-> main logits (B,L,V), head logits (B,L,K,V), None; LM-head inputs if return_hidden."""
        if base_output is None:
            with torch.no_grad():
                base_output = self.base_forward(input_ids, attention_mask, position_ids)
        heads, _ = self.stream_hidden(
            base_output.stream_inputs, base_output.position_ids, anchors=anchors
        )
        main = base_output.main_hidden
        if return_hidden:
            return main, heads, None
        return (None if main is None else self.lm_head(main)), self.lm_head(heads), None

    def stream_hidden(
        self,
        stream_inputs: Sequence[torch.Tensor],
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        anchors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """LM-head inputs of the K heads (B,P,K,D) from the final normed hidden state, at the
        positions anchors (B,P) names (all L when None)."""
        h = stream_inputs[0]  # (B, L, D)
        if anchors is not None:
            h = h.gather(1, anchors[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, P, D)
        return torch.stack([head(h) for head in self.medusa_head], dim=2), None
