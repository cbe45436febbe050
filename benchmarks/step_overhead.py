"""What one decoding step costs when there is nothing to verify (T = 1), against mlx-lm's own.

    python benchmarks/step_overhead.py [--model DIR] [--tokens 64] [--repeats 7] [--context 256]

Interleaved in one process, greedy, the same random-token context each time:

* ``mlx-lm``: ``mlx_lm.generate.generate_step`` (the AR baseline of every speedup here);
* ``root-only``: the SS decoding loop with the dynamic drafter given no draft source (no
  context matches, streams never worth computing): every pass is its root-only pass, which
  runs the base's own forward; what remains is the loop's verification and bookkeeping;
* ``ss T=1 + 1 stream``: a pass with one stream computed (what the fixed tree ``1`` pays every
  step and the dynamic tree pays when it asks the streams for a draft);
* ``ss T=1 + all streams``: the same with every stream computed.

Prints ms per token (median of the repeats) and the ratio to mlx-lm; with ``--json`` writes
them too.
"""

# ruff: noqa: I001  (ss_mlx must load OpenBLAS before anything imports mlx.core)
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import ss_mlx  # noqa: F401  (loads OpenBLAS before mlx.core on Linux)
import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from ss_mlx.decode.loop import decode
from ss_mlx.decode.sampling import SamplerConfig
from ss_mlx.decode.verify import AcceptRule
from ss_mlx.drafters.hybrid import HybridConfig, HybridDrafter
from ss_mlx.files import write_json
from ss_mlx.prepare.default_model import ensure_default_model
from ss_mlx import load

GREEDY = AcceptRule("greedy", SamplerConfig())


class NoSource(HybridDrafter):
    """The dynamic drafter with nothing to draft from: every pass is a root-only pass."""

    def context_matches(self, history: list[int]) -> list[tuple[int, list[int]]]:
        return []

    def _stream_gain(self, depth: int) -> float:
        return 0.0


class FixedStreams(HybridDrafter):
    """A T = 1 pass computing `depth` streams every step, drafting nothing from them."""

    def __init__(self, model, depth: int):
        super().__init__(model, HybridConfig(explore_every=0))
        self.depth = depth

    def context_matches(self, history: list[int]) -> list[tuple[int, list[int]]]:
        return []

    def _choose(self, history, streams):
        self.steps += 1
        self.stream_depth = self.depth
        return self._as_draft([])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model, _ = load(args.model or ensure_default_model())
    vocab = model.inner.embed_tokens.weight.shape[0]
    prompt = mx.array(np.random.default_rng(0).integers(0, vocab, size=args.context), mx.int32)

    def run_mlx_lm() -> list[int]:
        return [int(t) for t, _ in generate_step(prompt, model.base, max_tokens=args.tokens)]

    def run_loop(drafter) -> list[int]:
        return [s.token for s in decode(prompt, drafter, GREEDY, max_tokens=args.tokens)]

    methods = {
        "mlx-lm": run_mlx_lm,
        "root-only": lambda: run_loop(NoSource(model, HybridConfig(explore_every=0))),
        "ss T=1 + 1 stream": lambda: run_loop(FixedStreams(model, 1)),
        f"ss T=1 + {model.num_streams} streams": lambda: run_loop(
            FixedStreams(model, model.num_streams)
        ),
    }
    reference = run_mlx_lm()
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, fn in methods.items():
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            if out != reference:
                sys.exit(f"error: {name} decoded other tokens than mlx-lm")
            if r:
                seconds[name].append(dt)
    # The prefill is the same for all: ms per token over the whole call, prefill included, is
    # compared after subtracting mlx-lm's time for a 1-token call (prefill + first token).
    t = time.perf_counter()
    for _ in range(3):
        list(generate_step(prompt, model.base, max_tokens=1))
    prefill = (time.perf_counter() - t) / 3
    rows = {}
    base_ms = None
    for name, s in seconds.items():
        ms = (statistics.median(s) - prefill) / (args.tokens - 1) * 1e3
        base_ms = base_ms or ms
        rows[name] = {"ms_per_token": ms, "relative": ms / base_ms, "samples_s": s}
        print(f"{name:24s} {ms:7.2f} ms/token  {ms / base_ms:5.3f}x")
    if args.json:
        write_json(args.json, {"command": " ".join(sys.argv), "context": args.context,
                               "tokens": args.tokens, "prefill_s": prefill, "rows": rows})


if __name__ == "__main__":
    main()
