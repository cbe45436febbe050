#!/usr/bin/env bash
# Distill the frozen base into committed token-id shards (resumes: finished shards are skipped).
#   bash examples/default_model/distill_run.sh                 # permissive prompts, foreground
#   SOURCES=sharegpt RUN=smollm2_sharegpt_t256 bash examples/default_model/distill_run.sh
#   BG=1 bash examples/default_model/distill_run.sh            # background, niced, log in work/logs
set -euo pipefail
cd "$(dirname "$0")/../.."
SOURCES=${SOURCES:-permissive}
RUN=${RUN:-smollm2_permissive_t256}
BATCH=${BATCH:-32}
THREADS=${THREADS:-2}
BASE=${BASE:-$(ss-mlx models path default --quiet)}
OUT=data/distilled/$RUN
CMD=(python -m ss_mlx_convert.distill --model "$BASE" --shards "$OUT" --data ../shared/data
     --sources "$SOURCES" --shard-size 64 --max-new-tokens 256 --max-prompt-tokens 1024
     --batch-size "$BATCH" --threads "$THREADS" --dtype float32 "$@")
if [ "${BG:-0}" = 1 ]; then
  mkdir -p work/logs
  LOG=work/logs/distill_$RUN.log
  nohup nice -n 19 setsid "${CMD[@]}" >>"$LOG" 2>&1 < /dev/null &
  echo "started pid $! (process group leader); log $LOG"
else
  "${CMD[@]}"
fi
