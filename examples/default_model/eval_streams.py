"""Held-out per-stream accuracy (top-1, top-3, echo share, greedy chain) of a streams file.

Scores the streams against distilled held-out answers (`ss-mlx distill` output: the base's own
greedy text), the same measure `ss-mlx train --eval` writes to eval.json, for any of:
- a trained run directory (`ss-mlx train --out`), or
- a streams safetensors + its config block (the shipped `ss_mlx/assets/smollm2_streams.*`)
  on top of a base model directory.

    python examples/default_model/eval_streams.py --base "$(ss-mlx models path default --quiet)" \
      --streams ss_mlx/assets/smollm2_streams.safetensors \
      --data work/default_model/distill_eval48.jsonl --out work/default_model/eval_shipped.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from ss_mlx_convert.data import load_examples, pad_id_of
from ss_mlx_convert.dist import init_distributed
from ss_mlx_convert.modeling import StreamingLM
from ss_mlx_convert.pretrained import load_hf_model, load_hf_tokenizer, load_trained
from ss_mlx_convert.train import evaluate, format_eval

from ss_mlx.files import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a trained run directory")
    p.add_argument("--base", help="base model directory (with --streams)")
    p.add_argument("--streams", help="streams safetensors; its config is the .json beside it")
    p.add_argument("--data", required=True, help="distilled held-out JSONL")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=1024)
    args = p.parse_args()
    if bool(args.run) == bool(args.streams):
        raise SystemExit("error: give --run DIR, or --base DIR with --streams FILE")
    if args.run:
        model = load_trained(args.run)
        tok_dir = args.run
    else:
        if not args.base:
            raise SystemExit("error: --streams needs --base")
        path = Path(args.streams)
        block = json.loads(path.with_suffix(".json").read_text())
        block = {k: v for k, v in block.items() if k not in ("tree", "format_version")}
        model = StreamingLM(load_hf_model(args.base, torch.float32, "eval"), block)
        model.load_ss_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        model.eval()
        tok_dir = args.base
    tokenizer = load_hf_tokenizer(tok_dir, "eval")
    examples = load_examples(args.data, tokenizer, args.max_seq_len)
    env = init_distributed("cpu")
    metrics = evaluate(model, examples, args.batch_size, pad_id_of(tokenizer), env, {})
    metrics = {"file": args.data, "examples": len(examples), "step": 0, **metrics}
    print(format_eval(metrics))
    if args.out:
        write_json(args.out, metrics)


if __name__ == "__main__":
    main()
