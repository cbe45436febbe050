#!/usr/bin/env bash
# Commit the distilled shards finished so far (safe while the distillation is running).
# A shard is renamed into place before the manifest lists it, and a shard being written exists only
# under a temporary name (.shard-*.tmp*, ignored by data/distilled/.gitignore). This stages one
# snapshot of the manifest and exactly the shards it lists, then commits only those paths.
#   bash examples/default_model/commit_shards.sh [RUN ...]      # default: every run folder
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  for m in data/distilled/*/manifest.json; do [ -f "$m" ] && runs+=("$(basename "$(dirname "$m")")"); done
fi
for run in "${runs[@]}"; do
  dir=data/distilled/$run
  snap=$(mktemp)
  cp "$dir/manifest.json" "$snap"
  python - "$snap" "$dir" <<'PY' >"$snap.files"
import json, sys
m = json.load(open(sys.argv[1]))
for e in m["shards"]:
    print(f"{sys.argv[2]}/{e['name']}")
PY
  xargs -r git add -- <"$snap.files"
  git update-index --add --cacheinfo 100644 "$(git hash-object -w "$snap")" "$dir/manifest.json"
  summary=$(python -c 'import json,sys; t=json.load(open(sys.argv[1]))["totals"]; print(t["shards"], "shards,", t["records"], "prompts,", t["completion_tokens"], "completion tokens")' "$snap")
  rm -f "$snap" "$snap.files"
  if git diff --cached --name-only | grep -qv "^$dir/"; then
    echo "other changes are staged; commit or unstage them first" >&2
    exit 1
  fi
  if git diff --cached --quiet -- "$dir"; then
    echo "$run: nothing new"
  else
    git commit -q -m "data/distilled/$run: $summary"
    echo "committed $run: $summary"
  fi
done
