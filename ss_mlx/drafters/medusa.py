"""Medusa-head decoding at runtime: the heads the PyTorch trainer writes, drafting a static tree.

Head k (0-based) maps the base's final *normed* hidden state h of a token at position i to
``h + SiLU(W_k h + b_k)`` (``num_layers`` such residual blocks) and then through an LM head (the
base's own when ``lm_head`` is "shared", else the head's ``medusa_head.{k}.{num_layers}.weight``),
and predicts the token at i + 2 + k: the same role as speculative stream k+1, so the draft tree
machinery is shared. Verification is a plain tree pass of the base model, hence lossless.

Files (written by convert/medusa.py): ``medusa_heads.safetensors`` with
``medusa_head.{k}.{i}.linear.weight`` (D, D) and ``.bias`` (D,), and the ``config.json`` block
``"medusa"``:
``{"format_version": 1, "num_heads": K, "num_layers": 1, "lm_head": "shared"}``.
"""

import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..config import MEDUSA_FILE, MEDUSA_KEY
from ..decode.loop import StepToken, decode
from ..decode.sampling import SamplerConfig
from ..decode.tree import TreeSpec, as_tree, default_tree, root_only
from ..decode.verify import AcceptRule, Draft
from ..model.ss_model import plain_tree_forward
from .lookup import DEFAULT_MAX_TOKENS


class MedusaHeads:
    """Stacked Medusa heads.

    Attributes:
        weights: per residual layer, (K, D, D); biases: per layer, (K, D).
        lm_heads: (K, V, D) own LM heads, or None when the base's LM head is shared.
    """

    def __init__(
        self,
        weights: list[mx.array],
        biases: list[mx.array],
        lm_heads: mx.array | None,
        config: dict[str, Any],
    ):
        self.weights = weights
        self.biases = biases
        self.lm_heads = lm_heads
        self.config = config

    @property
    def num_heads(self) -> int:
        return self.weights[0].shape[0]

    @property
    def nbytes(self) -> int:
        own = [self.lm_heads] if self.lm_heads is not None else []
        arrays = [*self.weights, *self.biases, *own]
        return sum(a.nbytes for a in arrays)

    def logits(self, base: nn.Module, h: mx.array, num: int | None = None) -> mx.array:
        """Logits of the first `num` heads (default all) at one token.

        h: (D,) the final normed hidden state. Returns (num, V).
        """
        k = self.num_heads if num is None else num
        z = mx.broadcast_to(h, (k, h.shape[-1]))  # (k, D)
        for w, b in zip(self.weights, self.biases, strict=True):
            z = z + nn.silu((w[:k] @ z[:, :, None])[:, :, 0] + b[:k])  # (k, D)
        if self.lm_heads is not None:
            return (self.lm_heads[:k] @ z[:, :, None])[:, :, 0]  # (k, V)
        if hasattr(base, "lm_head"):
            return base.lm_head(z)
        return base.model.embed_tokens.as_linear(z)


def _compute_dtype(base: nn.Module) -> mx.Dtype:
    # The final norm's weight is never quantized, so it carries the trunk's float dtype.
    return base.model.norm.weight.dtype


def load_medusa(model_dir: str | Path, base: nn.Module) -> MedusaHeads | None:
    """The Medusa heads of a model directory, or None when it has none.

    Strict: both the file and the config block must be there, with exactly the tensors the
    block implies, in the shapes of `base`.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    path = model_dir / MEDUSA_FILE
    has_block, has_file = MEDUSA_KEY in config, path.is_file()
    if not has_block and not has_file:
        return None
    if has_block != has_file:
        missing = MEDUSA_FILE if has_block else f"a '{MEDUSA_KEY}' block in config.json"
        raise ValueError(f"{model_dir}: Medusa heads are incomplete: no {missing}")
    block = config[MEDUSA_KEY]
    try:
        num_heads, num_layers = int(block["num_heads"]), int(block.get("num_layers", 1))
        shared = block.get("lm_head", "shared") == "shared"
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{model_dir}: bad '{MEDUSA_KEY}' config block {block!r}: {e}") from None
    if num_heads < 1 or num_layers < 1:
        raise ValueError(f"{model_dir}: '{MEDUSA_KEY}' needs num_heads >= 1 and num_layers >= 1")
    dim = base.model.norm.weight.shape[0]
    vocab = base.model.embed_tokens.weight.shape[0]
    want: dict[str, tuple[int, ...]] = {}
    for k in range(num_heads):
        for i in range(num_layers):
            want[f"medusa_head.{k}.{i}.linear.weight"] = (dim, dim)
            want[f"medusa_head.{k}.{i}.linear.bias"] = (dim,)
        if not shared:
            want[f"medusa_head.{k}.{num_layers}.weight"] = (vocab, dim)
    try:
        tensors = mx.load(str(path))
    except Exception as e:  # mlx raises plain RuntimeError/ValueError for unreadable files
        raise ValueError(f"cannot read {path}: {e}") from None
    bad = [f"missing {n}" for n in want if n not in tensors]
    bad += [f"unexpected {n}" for n in tensors if n not in want]
    bad += [
        f"{n} has shape {tuple(t.shape)}, expected {want[n]}"
        for n, t in tensors.items()
        if n in want and tuple(t.shape) != want[n]
    ]
    if bad:
        raise ValueError(f"{path} does not match config['{MEDUSA_KEY}']: " + "; ".join(bad))
    dtype = _compute_dtype(base)

    def stack(fmt: str) -> mx.array:
        return mx.stack([tensors[fmt.format(k=k)] for k in range(num_heads)]).astype(dtype)

    weights = [stack(f"medusa_head.{{k}}.{i}.linear.weight") for i in range(num_layers)]
    biases = [stack(f"medusa_head.{{k}}.{i}.linear.bias") for i in range(num_layers)]
    lm_heads = None if shared else stack(f"medusa_head.{{k}}.{num_layers}.weight")
    mx.eval(weights, biases, lm_heads if lm_heads is not None else [])
    return MedusaHeads(weights, biases, lm_heads, dict(block))


def resolve_medusa_tree(heads: MedusaHeads, tree: TreeSpec | str | dict | None) -> TreeSpec:
    """The argument as a TreeSpec (default: the runtime's default tree for this many heads)."""
    if tree is None:
        return default_tree(heads.num_heads)
    return as_tree(tree, heads.num_heads, "Medusa heads")


class MedusaDrafter:
    """Drafts `tree` from the heads at the accepted node's final hidden state."""

    has_distribution = True

    def __init__(self, base: nn.Module, heads: MedusaHeads, tree: TreeSpec):
        self.base, self.heads, self.tree = base, heads, tree

    def first_draft(self, history: list[int]) -> Draft:
        return Draft(root_only(), mx.zeros((0,), dtype=mx.int32))

    def forward(
        self, tokens: mx.array, positions: mx.array, ancestor_mask: mx.array, cache: list[Any]
    ) -> tuple[mx.array, mx.array]:
        return plain_tree_forward(self.base, tokens, positions, ancestor_mask, cache)

    def to_sync(self, out: Any, best: mx.array) -> list[mx.array]:
        return []

    def draft(
        self, history: list[int], hidden: mx.array, best: mx.array, rule: AcceptRule
    ) -> Draft:
        if self.tree.depth == 0:
            return Draft(self.tree, mx.zeros((0,), dtype=mx.int32))
        h = self.base.model.norm(hidden[best])  # (D,); the heads read what the LM head reads
        return rule.draft(self.tree, self.heads.logits(self.base, h, self.tree.depth))


def medusa_generate_step(
    prompt: mx.array,
    base: nn.Module,
    heads: MedusaHeads,
    *,
    tree: TreeSpec | str | dict | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    **kwargs: Any,
) -> Generator[StepToken, None, None]:
    """Greedy Medusa decoding with a static draft tree (lossless).

    Args:
        prompt: (L,) token ids.
        base: the mlx-lm model the heads were trained on.
        heads: from :func:`load_medusa`.
        tree: draft tree (TreeSpec, CLI string like "3,2,1", or dict); default: a modest tree.
        max_tokens: how many tokens to generate.
        kwargs: passed to :func:`ss_mlx.decode.loop.decode`.
    """
    drafter = MedusaDrafter(base, heads, resolve_medusa_tree(heads, tree))
    rule = AcceptRule("greedy", SamplerConfig())
    yield from decode(prompt, drafter, rule, max_tokens=max_tokens, **kwargs)
