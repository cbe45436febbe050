"""The parity gate: a converted MLX model must compute what the PyTorch checkpoint computes.

Two checks on the same token ids:
1. logits: main and every stream (and the early-exit head when present), fp32 max abs diff
   below max(1e-4, 1e-5 * max|logit|) (see DEFAULT_RTOL), PyTorch `StreamingLM` (read by the
   trainer's `load_trained`) vs `SSModel.full_forward`;
2. greedy decoding: PyTorch autoregressive greedy (the fine-tuned base, KV cache) and
   `ss_mlx.stream_generate` (tree drafts + verification) must emit identical tokens.
A directory without a `speculative_streaming` block (e.g. Medusa baseline) gets the same checks
on the trunk only, with mlx-lm's own greedy decoder on the MLX side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# isort: off
import ss_mlx  # preloads OpenBLAS; must precede mlx.core
import mlx.core as mx

# isort: on
import torch

from ss_mlx.config import CONFIG_KEY, MEDUSA_KEY

from .checkpoint_io import ADAPTER_CONFIG, ADAPTER_FILES

DEFAULT_ATOL = 1e-4
# fp32 rounding grows with the logit scale: on SmolLM2-135M (|logit| <= ~38, 30 layers) PyTorch
# and MLX fp32 disagree by 0.9-1.4e-4 (PyTorch fp32 alone differs from fp64 by 0.7-0.9e-4), so a
# bare 1e-4 gate fails real models on rounding noise. The bound is max(atol, rtol * max|logit|):
# exactly 1e-4 for small logit scales, ~80 fp32 ulps of the largest logit otherwise. Conversion
# mistakes (wrong RoPE base, missed LoRA, a perturbed stream embedding) move logits by >= 1e-2.
DEFAULT_RTOL = 1e-5
# Some trained checkpoints are ill-conditioned on the gate's random token ids: a shared-mode
# (LoRA) SmolLM2 fine-tune has PyTorch fp32 itself 2.8e-3 away from fp64 there (6e-5 on text).
# The bound then also admits NOISE_FACTOR x PyTorch fp32's own error against an fp64 run of the
# same checkpoint: MLX may be as inexact as fp32 arithmetic is, not more.
NOISE_FACTOR = 4.0


@dataclass
class ParityReport:
    """Max abs logit differences per head and the two greedy token sequences."""

    main_max_abs: float
    stream_max_abs: list[float]
    exit_max_abs: float | None
    atol: float
    prompt: list[int]
    torch_tokens: list[int]
    mlx_tokens: list[int]
    require_greedy: bool = True
    notes: list[str] = field(default_factory=list)
    rtol: float = 0.0
    logit_scale: float = 0.0  # max |logit| of the PyTorch reference, over all heads
    fp32_noise: float = 0.0  # max |PyTorch fp32 - PyTorch fp64| over all heads (0: not run)
    noise_factor: float = 0.0

    @property
    def bound(self) -> float:
        """The effective bound on every max abs diff:
        max(atol, rtol * logit_scale, noise_factor * fp32_noise)."""
        return max(self.atol, self.rtol * self.logit_scale, self.noise_factor * self.fp32_noise)

    @property
    def logits_ok(self) -> bool:
        diffs = [self.main_max_abs, *self.stream_max_abs]
        if self.exit_max_abs is not None:
            diffs.append(self.exit_max_abs)
        # `d < bound` is False for NaN, so NaN fails.
        return all(d < self.bound for d in diffs)

    @property
    def greedy_ok(self) -> bool:
        return self.torch_tokens == self.mlx_tokens

    @property
    def ok(self) -> bool:
        return self.logits_ok and (self.greedy_ok or not self.require_greedy)

    def first_divergence(self) -> int | None:
        for i, (a, b) in enumerate(zip(self.torch_tokens, self.mlx_tokens, strict=False)):
            if a != b:
                return i
        n, m = len(self.torch_tokens), len(self.mlx_tokens)
        return None if n == m else min(n, m)

    def summary(self) -> str:
        def mark(ok: bool) -> str:
            return "ok" if ok else "FAIL"

        b = self.bound
        lines = [
            f"parity (fp32 max abs diff, must be < {b:.3g} = max(atol {self.atol:g}, "
            f"rtol {self.rtol:g} x max|logit| {self.logit_scale:.3g}, {self.noise_factor:g} x "
            f"PyTorch fp32-vs-fp64 {self.fp32_noise:.3g})):"
        ]
        lines.append(f"  main      {self.main_max_abs:.3e}  {mark(self.main_max_abs < b)}")
        for j, d in enumerate(self.stream_max_abs, 1):
            lines.append(f"  stream {j:<2} {d:.3e}  {mark(d < b)}")
        if self.exit_max_abs is not None:
            d = self.exit_max_abs
            lines.append(f"  exit      {d:.3e}  {mark(d < b)}")
        n = len(self.torch_tokens)
        if n == 0 and not self.mlx_tokens:
            lines.append("  greedy    skipped")
        elif self.greedy_ok:
            lines.append(f"  greedy    {n} tokens identical  ok")
        else:
            i = self.first_divergence()
            t = self.torch_tokens[i] if i is not None and i < n else None
            m = self.mlx_tokens[i] if i is not None and i < len(self.mlx_tokens) else None
            verdict = "FAIL" if self.require_greedy else "(not required)"
            lines.append(
                f"  greedy    differ at token {i}: torch {t} vs mlx {m} "
                f"(torch {n} tokens, mlx {len(self.mlx_tokens)})  {verdict}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  => {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the PyTorch side


def load_torch_model(
    torch_dir: Path | str, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(causal LM with its LoRA applied unmerged, StreamingLM or None), in `dtype`, eval mode.

    Trained checkpoints go through the trainer's own reader (`pretrained.load_trained`), so the
    gate checks the conversion against exactly what training produced; a directory with
    neither streams nor Medusa heads is read with transformers (+ peft) directly.
    """
    torch_dir = Path(torch_dir)
    config = json.loads((torch_dir / "config.json").read_text())
    if CONFIG_KEY in config or MEDUSA_KEY in config:
        from .pretrained import load_trained

        trained = load_trained(torch_dir, dtype=dtype)
        return trained.base, (trained if CONFIG_KEY in config else None)

    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(torch_dir, dtype=dtype)
    has_adapter = (torch_dir / ADAPTER_CONFIG).is_file() and any(
        (torch_dir / f).is_file() for f in ADAPTER_FILES
    )
    # transformers itself attaches an adapter found next to config.json; do it only once.
    if has_adapter and not getattr(base, "_hf_peft_config_loaded", False):
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, torch_dir)
    return base.eval(), None


@torch.no_grad()
def torch_greedy(lm: torch.nn.Module, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """Plain autoregressive greedy with the KV cache; stops after an EOS token (kept)."""
    out = lm(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        if tok in eos:
            break
        # transformers >= 5.2x names the cache `cache`; older releases `past_key_values`.
        key = "cache" if "cache" in out else "past_key_values"
        out = lm(input_ids=torch.tensor([[tok]]), use_cache=True, **{key: out[key]})
    return tokens


# ---------------------------------------------------------------- the MLX side


def _mlx_greedy_ar(model: Any, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    from mlx_lm.generate import generate_step

    tokens: list[int] = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        tokens.append(int(tok))
        if tokens[-1] in eos:
            break
    return tokens


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: torch {b.shape} vs mlx {a.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    # Both -inf: a token outside the streams' draft vocabulary, the same on both sides.
    differ = a != b
    return float(np.abs(a[differ] - b[differ]).max(initial=0.0))


def _np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def check_parity(
    torch_dir: Path | str,
    mlx_dir: Path | str,
    *,
    tokens: list[int] | None = None,
    n_tokens: int = 32,
    greedy_tokens: int = 24,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    require_greedy: bool = True,
    seed: int = 0,
    noise_factor: float = NOISE_FACTOR,
) -> ParityReport:
    """Compare a PyTorch SS checkpoint with its MLX conversion; see the module docstring.

    Args:
        torch_dir: the HF checkpoint dir that was converted.
        mlx_dir: the converted MLX model dir.
        tokens: token ids for the logit check (and, as the prompt, for greedy decoding);
            default: `n_tokens` seeded random ids.
        greedy_tokens: tokens to decode greedily on both sides (stops early at EOS on both);
            0 skips the greedy check.
        atol, rtol: every fp32 max abs logit difference must be below
            max(atol, rtol * max|reference logit|); see DEFAULT_RTOL for why.
        require_greedy: whether differing greedy tokens fail the report.
        noise_factor: also admit this multiple of PyTorch fp32's own error against an fp64 run
            (0 skips the fp64 run).
    """
    torch_dir, mlx_dir = Path(torch_dir), Path(mlx_dir)
    base, ss_torch = load_torch_model(torch_dir)
    vocab = int(base.config.vocab_size)
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(0, vocab, size=n_tokens).tolist()
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("parity needs at least one token")
    ids = torch.tensor([tokens])
    notes: list[str] = []

    with torch.no_grad():
        if ss_torch is not None:
            t_main, t_streams, t_exit = ss_torch(ids)
        else:
            t_main, t_streams, t_exit = base(input_ids=ids).logits, None, None

    if ss_torch is not None:
        model, tokenizer = ss_mlx.load(mlx_dir)
        m_main, m_streams = model.full_forward(mx.array([tokens]))
        m_exit = model.exit_logits(mx.array([tokens])) if t_exit is not None else None
    else:
        import mlx_lm

        model, tokenizer = mlx_lm.load(str(mlx_dir))
        m_main, m_streams, m_exit = model(mx.array([tokens])), None, None
        notes.append("no speculative_streaming block: trunk and AR greedy only")

    main_diff = _max_abs(_np(m_main), t_main.numpy())
    stream_diffs = []
    if t_streams is not None:
        m_s, t_s = _np(m_streams), t_streams.numpy()
        stream_diffs = [_max_abs(m_s[:, :, j], t_s[:, :, j]) for j in range(t_s.shape[2])]
    exit_diff = _max_abs(_np(m_exit), t_exit.numpy()) if t_exit is not None else None

    refs = [t_main] + ([t_streams] if t_streams is not None else [])
    refs += [t_exit] if t_exit is not None else []
    # Finite logits only: a draft vocabulary's -inf would make the bound infinite.
    scale = max(_finite_abs_max(t) for t in refs)
    noise = _fp32_noise(torch_dir, ids, refs) if noise_factor > 0 else 0.0

    eos = set(tokenizer.eos_token_ids)
    torch_tokens: list[int] = []
    mlx_tokens: list[int] = []
    if greedy_tokens > 0:
        torch_tokens = torch_greedy(base, tokens, greedy_tokens, eos)
        if ss_torch is not None:
            mlx_tokens = [
                r.token
                for r in ss_mlx.stream_generate(model, tokenizer, tokens, max_tokens=greedy_tokens)
            ]
        else:
            mlx_tokens = _mlx_greedy_ar(model, tokens, greedy_tokens, eos)
    return ParityReport(
        main_max_abs=main_diff,
        stream_max_abs=stream_diffs,
        exit_max_abs=exit_diff,
        atol=atol,
        prompt=tokens,
        torch_tokens=torch_tokens,
        mlx_tokens=mlx_tokens,
        require_greedy=require_greedy,
        notes=notes,
        rtol=rtol,
        logit_scale=scale,
        fp32_noise=noise,
        noise_factor=noise_factor,
    )


def _fp32_noise(torch_dir: Path, ids: torch.Tensor, refs: list[torch.Tensor]) -> float:
    """Max |fp32 - fp64| of the PyTorch model's logits (same heads, same order as `refs`)."""
    base64, ss64 = load_torch_model(torch_dir, dtype=torch.float64)
    with torch.no_grad():
        if ss64 is not None:
            main, streams, exits = ss64(ids)
            exact = [main] + ([streams] if streams is not None else [])
            exact += [exits] if exits is not None else []
        else:
            exact = [base64(input_ids=ids).logits]
    return max(_max_abs(a.double().numpy(), b.numpy()) for a, b in zip(refs, exact, strict=True))


def _finite_abs_max(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "ParityReport",
    "check_parity",
    "load_torch_model",
    "torch_greedy",
]
