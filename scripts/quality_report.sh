#!/usr/bin/env bash
# Model quality against the simulator's truth, both libraries, both tasks, in a scratch
# workspace (its own MLflow store), as reported in the README's model card.
#   scripts/quality_report.sh WORKDIR [CONFIG_OVERLAY]
# Run from the project root after `make install`.
set -euo pipefail
work=$(realpath -m "$1"); overlay=${2:+$(realpath "$2")}
root=$(cd "$(dirname "$0")/.." && pwd)
st="$root/.venv/bin/sendtime"
mkdir -p "$work" && cd "$work"
cfg=()
[ -n "$overlay" ] && cfg=(--config "$overlay")
"$st" "${cfg[@]}" simulate --out data/sim
for task in open churn; do
  for model in lightgbm xgboost; do
    "$st" "${cfg[@]}" train --task "$task" --model "$model" --events data/sim/events.parquet --users data/sim/users.parquet
  done
  "$st" "${cfg[@]}" compare --task "$task" --truth data/sim/truth.parquet
  "$st" "${cfg[@]}" promote --task "$task"
done
"$st" "${cfg[@]}" score --events data/sim/events.parquet --users data/sim/users.parquet --out tags.parquet
"$st" "${cfg[@]}" evaluate --tags tags.parquet --truth data/sim/truth.parquet --json evaluation.json
