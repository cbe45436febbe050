# ruff: noqa: I001
"""Acceptance of the sampling rules on one model, in one process (issue: exact sampling).

For each rule: tokens per forward pass, tok/s, and the mean negative log-likelihood of the
emitted tokens under the model's own sampling distribution. The exact rules sample that
distribution, so their NLL estimates its entropy; a relaxed rule moving away from it shows the
quality cost as a shift of this number.

    python benchmarks/sampling_rules.py [--model DIR] [--n 4] [--max-tokens 48] [--temp 0.7]
        [--out benchmarks/results/sampling_rules.json]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import ss_mlx  # OpenBLAS preload: before mlx.core
import mlx.core as mx

from ss_mlx.bench.datasets import encode_prompt, load_prompts
from ss_mlx.bench.machine import describe_machine
from ss_mlx.decode.sampling import SamplerConfig, target_logprobs

RULES = ("simple", "rrs", "typical", "coarse")


def nll(model, prompt: list[int], out: list[int], cfg: SamplerConfig) -> float:
    seq = mx.array([prompt + out])
    logits = model.base(seq)[0, len(prompt) - 1 : -1]
    logp = target_logprobs(logits, cfg)
    picked = mx.take_along_axis(logp, mx.array(out)[:, None], axis=-1)
    return -float(picked.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default="chat")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temp", type=float, default=0.7)
    p.add_argument("--tree", default="3,2,2")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.model is None:
        from ss_mlx.prepare.default_model import ensure_default_model

        args.model = ensure_default_model(progress=False)
    model, tok = ss_mlx.load(args.model)
    ps = load_prompts(args.dataset, n=args.n)
    prompts = [encode_prompt(tok, t, ps.chat) for t in ps.prompts]
    cfg = SamplerConfig(temp=args.temp)
    rows = {}
    for rule in RULES:
        tpp, tps, nlls = [], [], []
        for seed in range(args.seeds):
            for ids in prompts:
                mx.random.seed(seed)
                tic = time.perf_counter()
                steps = list(ss_mlx.ss_generate_step(
                    mx.array(ids), model, max_tokens=args.max_tokens, tree=args.tree,
                    sampler=cfg, accept_rule=rule))
                dt = time.perf_counter() - tic
                out = [s.token for s in steps]
                tpp.append(len(out) / (steps[-1].step + 1))
                tps.append(len(out) / dt)
                nlls.append(nll(model, ids, out, cfg))
        rows[rule] = {"tokens_per_pass": statistics.mean(tpp), "tok_s": statistics.median(tps),
                      "nll": statistics.mean(nlls), "exact": rule in ("simple", "rrs")}
        print(f"{rule:8s} tokens/pass {rows[rule]['tokens_per_pass']:.3f}  "
              f"tok/s {rows[rule]['tok_s']:.2f}  nll {rows[rule]['nll']:.3f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": vars(args) | {"model": str(args.model), "out": str(args.out)},
                  "machine": describe_machine("float32"), "rules": rows}
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
