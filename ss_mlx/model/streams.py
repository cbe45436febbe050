"""Speculative streams: their parameters (identifier embeddings P_j, stream-only adapters,
early-exit adapter) and their insertion into the hidden states (eq. 3)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import SSConfig
from .arch import StreamRows
from .attention import stream_mask, with_context


def insert_streams(
    h: mx.array,
    positions: mx.array,
    main_mask: mx.array,
    stream_embeddings: mx.array,
    offsets: list[int],
    context: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """Eq. 3 with f_eta = identity: stream j of token t starts as S_{t,j} = M_t + P_j.

    h: (1, T, D) main hidden states at layer N - Ns; positions: (T,); main_mask: (T, T) bool;
    stream_embeddings: (G, D); offsets: the G RoPE offsets of the streams from their token;
    context: cached positions every row sees.
    Returns the rows [main ; streams] (1, T + G*T, D), stream-major (row T + j*T + t is stream
    j of token t), their positions (T + G*T,) and the mask of eq. 2 (T + G*T, context + T +
    G*T): main rows never see streams; stream (t, j) sees what main row t sees plus streams
    (t, 1..j).
    """
    T, G = h.shape[1], stream_embeddings.shape[0]
    P = stream_embeddings.astype(h.dtype)  # (G, D)
    s = (P[:, None, :] + h[0][None]).reshape(1, G * T, -1)  # (1, G*T, D)
    rows = mx.concatenate([h, s], axis=1)  # (1, T + G*T, D)
    shift = mx.array(offsets[:G], dtype=positions.dtype)  # (G,)
    stream_pos = (shift[:, None] + positions[None]).reshape(-1)  # (G*T,)
    all_pos = mx.concatenate([positions, stream_pos])  # (T + G*T,)
    return rows, all_pos, with_context(stream_mask(main_mask, G), context)


def check_finite(tensors: dict[str, mx.array], source: str) -> None:
    """Refuse NaN/Inf stream parameters: a masked stream row holding NaN still poisons the main
    rows through attention (0 * NaN), so they must never enter the model."""
    for name, t in tensors.items():
        if name != DRAFT_VOCAB and not mx.all(mx.isfinite(t.astype(mx.float32))).item():
            raise ValueError(f"{source}: stream tensor {name!r} holds NaN or Inf values")


DRAFT_VOCAB = "draft_vocab"  # the tensor of the draft vocabulary's token ids (docs/format.md)


def check_draft_vocab(ids: mx.array, vocab_size: int, source: str) -> None:
    """A draft vocabulary is distinct ascending integer token ids of the model's vocabulary."""
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"{source}: {DRAFT_VOCAB!r} must hold integer token ids, got {ids.dtype}")
    a = np.array(ids).astype(np.int64)
    if a.size and (a[0] < 0 or a.max() >= vocab_size or (np.diff(a) <= 0).any()):
        raise ValueError(
            f"{source}: {DRAFT_VOCAB!r} must be distinct ascending token ids in [0, {vocab_size})"
        )


def expected_shapes(
    cfg: SSConfig, num_layers: int, module_dims: dict[str, tuple[int, int]], hidden: int
) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies, with its shape (see docs/format.md)."""
    G, r = cfg.num_streams, cfg.adapter_rank
    shapes: dict[str, tuple[int, ...]] = {"stream_embeddings": (G, hidden)}
    for layer in range(num_layers - cfg.stream_layers, num_layers):
        for name in cfg.adapted_modules:
            d_in, d_out = module_dims[name]
            shapes[f"adapters.{layer}.{name}.a"] = (G, d_in, r)
            shapes[f"adapters.{layer}.{name}.b"] = (G, r, d_out)
    if cfg.prune_rank > 0:
        shapes["prune.a"] = (hidden, cfg.prune_rank)
        shapes["prune.b"] = (cfg.prune_rank, hidden)
    if cfg.draft_vocab_size > 0:
        shapes[DRAFT_VOCAB] = (cfg.draft_vocab_size,)
    return shapes


def check_tensors(
    tensors: dict[str, mx.array], shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    """Strict match of names and shapes; one error listing every problem."""
    missing = sorted(shapes.keys() - tensors.keys())
    extra = sorted(tensors.keys() - shapes.keys())
    wrong = sorted(
        f"{k}: expected {shapes[k]}, got {tuple(tensors[k].shape)}"
        for k in shapes.keys() & tensors.keys()
        if tuple(tensors[k].shape) != shapes[k]
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if extra:
        problems.append(f"unexpected tensors: {extra}")
    if wrong:
        problems.append(f"wrong shapes: {wrong}")
    if problems:
        raise ValueError(
            f"{source} does not match the speculative_streaming config; " + "; ".join(problems)
        )
    check_finite(tensors, source)


class StreamParams(nn.Module):
    """Holds the stream tensors keyed as in the file; never quantized."""

    def __init__(self, cfg: SSConfig, tensors: dict[str, mx.array], first_layer: int):
        super().__init__()
        self.cfg = cfg
        self.first_layer = first_layer
        self.stream_embeddings = tensors["stream_embeddings"]
        # Keep adapters as a plain dict keyed by layer: module path -> (a, b).
        self.adapters = {
            layer: {
                name: (tensors[f"adapters.{layer}.{name}.a"], tensors[f"adapters.{layer}.{name}.b"])
                for name in cfg.adapted_modules
            }
            for layer in range(first_layer, first_layer + cfg.stream_layers)
        }
        self.prune = (tensors["prune.a"], tensors["prune.b"]) if cfg.prune_rank > 0 else None
        # Token ids, not parameters: held in a plain object, so that a dtype cast of the
        # model's parameters leaves them integers.
        self.draft = DraftVocab(tensors[DRAFT_VOCAB]) if cfg.draft_vocab_size > 0 else None
        self._ready = _ReadyAdapters()

    def rows(
        self, layer: int, n_main: int, dtype: mx.Dtype, num_streams: int | None = None
    ) -> StreamRows:
        """The row layout of `layer` with the first `num_streams` streams (default: all), its
        adapters ready for activations of `dtype`."""
        G = self.cfg.num_streams if num_streams is None else num_streams
        adapters = self._ready.get(layer, G, dtype, self.adapters[layer], self.cfg.adapter_scale)
        return StreamRows(n_main, G, adapters)

    def tensors(self) -> dict[str, mx.array]:
        out = {"stream_embeddings": self.stream_embeddings}
        for layer, mods in self.adapters.items():
            for name, (a, b) in mods.items():
                out[f"adapters.{layer}.{name}.a"] = a
                out[f"adapters.{layer}.{name}.b"] = b
        if self.prune is not None:
            out["prune.a"], out["prune.b"] = self.prune
        if self.draft is not None:
            out[DRAFT_VOCAB] = self.draft.ids
        return out

    def num_parameters(self) -> int:
        """Learned values (the draft vocabulary's token ids are none)."""
        return sum(t.size for n, t in self.tensors().items() if n != DRAFT_VOCAB)


class _ReadyAdapters:
    """The adapters as a pass multiplies them: the first G streams, `a` scaled by the adapter
    scale, in the activations' dtype. A pass would otherwise slice, scale and cast every one of
    them again (~170 small ops of ~5 us each on a CPU, for a pass whose stream rows cost
    ~0.2 ms a layer beyond their matmuls). Kept per (layer, G, dtype) and rebuilt when the
    arrays behind them were replaced (checked by identity each pass)."""

    def __init__(self) -> None:
        self._store: dict[tuple, tuple[list[mx.array], dict[str, tuple[mx.array, mx.array]]]] = {}

    def get(
        self,
        layer: int,
        G: int,
        dtype: mx.Dtype,
        adapters: dict[str, tuple[mx.array, mx.array]],
        scale: float,
    ) -> dict[str, tuple[mx.array, mx.array]]:
        sources = [t for pair in adapters.values() for t in pair]
        hit = self._store.get((layer, G, dtype))
        if hit is not None and len(hit[0]) == len(sources) and all(
            x is y for x, y in zip(hit[0], sources, strict=True)
        ):
            return hit[1]
        ready = {}
        for name, (a, b) in adapters.items():
            a, b = a[:G].astype(dtype), b[:G].astype(dtype)
            ready[name] = (a if scale == 1.0 else a * scale, b)
        mx.eval(ready)
        self._store[(layer, G, dtype)] = (sources, ready)
        return ready


class DraftVocab:
    """The token ids (V_d,) the streams may draft; `mask` turns logits over the whole
    vocabulary into the draft vocabulary's."""

    def __init__(self, ids: mx.array):
        self.ids = ids.astype(mx.int32)
        self._masks: dict[tuple[int, mx.Dtype], mx.array] = {}

    def mask(self, vocab_size: int, dtype: mx.Dtype) -> mx.array:
        """(V,) additive mask: 0 on the draft vocabulary, -inf elsewhere (kept per dtype)."""
        key = (vocab_size, dtype)
        if key not in self._masks:
            m = mx.full((vocab_size,), -mx.inf, dtype=dtype)
            m[self.ids] = 0
            mx.eval(m)
            self._masks[key] = m
        return self._masks[key]


def random_stream_tensors(
    shapes: dict[str, tuple[int, ...]],
    seed: int = 0,
    embed_scale: float = 0.02,
    adapter_scale: float = 0.0,
    vocab_size: int | None = None,
) -> dict[str, mx.array]:
    """Fresh stream parameters: small random P_j; adapters `b` zero (off) unless adapter_scale>0;
    a draft vocabulary of random ids below `vocab_size` (the lowest ids without it)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name == DRAFT_VOCAB:
            n = shape[0]
            ids = np.arange(n) if vocab_size is None else rng.choice(vocab_size, n, replace=False)
            out[name] = mx.array(np.sort(ids).astype(np.int32))
            continue
        if name == "stream_embeddings":
            arr = rng.normal(0.0, embed_scale, shape)
        elif name.endswith(".b") and adapter_scale == 0.0:
            arr = np.zeros(shape)
        elif name.endswith(".b"):
            arr = rng.normal(0.0, adapter_scale, shape)
        else:
            arr = rng.normal(0.0, 1.0 / np.sqrt(shape[-2]), shape)
        out[name] = mx.array(arr.astype(np.float32))
    return out
