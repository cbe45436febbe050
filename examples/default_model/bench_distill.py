"""Distillation throughput on this machine: each generation method on the same prompts.

    PYTHONPATH=. python examples/default_model/bench_distill.py --methods fast:64,hf:64 --new 64

Prompts: the first rows of the permissive pools in ../shared/data/prompts, interleaved. Each
method runs in this process, one after the other (repeat with --repeats to interleave them, since
other work on a shared CPU skews single runs). A GEMM canary (GFLOP/s of a 256x576x1536 matmul)
runs before each measurement: when it is far below the quiet machine's (~95-140 here), others
were using the cores. tokens/s counts generated tokens up to and including EOS, wall clock,
prefill included. Methods: fast:B (convert/fastgen.py, slot KV cache, continuous batching),
hf:B (HF generate, dynamic cache), hfstatic:B (generate with cache_implementation="static"),
suffix -bf16 for bfloat16 weights; mlx:B (mlx-lm batch_generate).
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

POOLS = (
    "gsm8k_train",
    "gpteacher_codegen",
    "gpteacher_roleplay",
    "awesome_chatgpt_prompts",
    "self_instruct_user_oriented",
    "chatterbot_english",
)


def canary() -> float:
    a, b = torch.randn(256, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(50):
        a @ b
    return 2 * 256 * 576 * 1536 / ((time.perf_counter() - t) / 50) / 1e9


def prompts(data: Path, n: int) -> list[str]:
    pools = [
        [json.loads(x)["prompt"] for x in (data / f"prompts/{f}.jsonl").open()][:n] for f in POOLS
    ]
    return [p for row in itertools.zip_longest(*pools) for p in row if p][:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--methods", default="fast:64")
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--new", type=int, default=64, help="max new tokens")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default=None, help="write the generated ids (JSON) per method")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from ss_mlx_convert.distill import hf_generate
    from ss_mlx_convert.fastgen import generate_greedy

    if args.model is None:
        from ss_mlx.prepare.default_model import default_model_path

        args.model = str(default_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = [
        list(
            tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for p in prompts(Path(args.data), args.n)
    ]
    eos = [tok.eos_token_id]
    models: dict = {}
    saved: dict = {}
    print(
        f"{len(ids)} prompts, mean {sum(map(len, ids)) / len(ids):.0f} tokens, "
        f"max new {args.new}, threads {args.threads}",
        flush=True,
    )
    for rep in range(args.repeats):
        for spec in args.methods.split(","):
            name, b = spec.split(":")
            bs = int(b.split("-")[0])
            bf16 = spec.endswith("-bf16")
            c = canary()
            t0, cpu0 = time.perf_counter(), time.process_time()
            if name == "mlx":
                import mlx_lm

                import ss_mlx  # noqa: F401  (OpenBLAS preload)

                if "mlx" not in models:
                    models["mlx"] = mlx_lm.load(args.model)
                m, mt = models["mlx"]
                t0, cpu0 = time.perf_counter(), time.process_time()
                r = mlx_lm.batch_generate(
                    m, mt, ids, max_tokens=args.new, completion_batch_size=bs, prefill_batch_size=8
                )
                dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                n = sum(len(mt.encode(t, add_special_tokens=False)) + 1 for t in r.texts)
                rows = None
            else:
                dtype = torch.bfloat16 if bf16 else torch.float32
                if dtype not in models:
                    models[dtype] = transformers.AutoModelForCausalLM.from_pretrained(
                        args.model, dtype=dtype
                    ).eval()
                model = models[dtype]
                t0, cpu0 = time.perf_counter(), time.process_time()
                if name == "fast":
                    g = generate_greedy(model, ids, args.new, eos, bs)
                elif name == "hf":
                    g = hf_generate(model, tok, ids, args.new, eos, bs)
                elif name == "hfstatic":
                    model.generation_config.cache_implementation = "static"
                    g = hf_generate(model, tok, ids, args.new, eos, bs)
                    model.generation_config.cache_implementation = None
                else:
                    sys.exit(f"unknown method {name}")
                dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                n = sum(len(x.ids) + (x.finish == "eos") for x in g)
                rows = [x.ids for x in g]
            c2 = canary()
            print(
                f"{spec:14s} rep {rep}: {n} tokens in {dt:6.1f} s = {n / dt:6.1f} tok/s "
                f"(cpu {cpu:.0f} s; canary {c:.0f} -> {c2:.0f} GFLOP/s)",
                flush=True,
            )
            if rows is not None:
                saved[spec] = rows
    # Greedy agreement between methods (e.g. bf16 vs fp32): identical rows, common prefix.
    specs = list(saved)
    for i, a in enumerate(specs):
        for b in specs[i + 1 :]:
            same = sum(x == y for x, y in zip(saved[a], saved[b], strict=True))
            prefix = [
                next(
                    (k for k, (u, v) in enumerate(zip(x, y, strict=False)) if u != v),
                    min(len(x), len(y)),
                )
                for x, y in zip(saved[a], saved[b], strict=True)
            ]
            print(
                f"{a} vs {b}: {same}/{len(saved[a])} rows identical, "
                f"mean common prefix {sum(prefix) / len(prefix):.1f} tokens",
                flush=True,
            )
    if args.save:
        Path(args.save).write_text(json.dumps(saved))


if __name__ == "__main__":
    main()
