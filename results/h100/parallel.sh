#!/usr/bin/env bash
# The 14-cell grid on one H100 as 14 grid workers at once, one cell each, then the plain-Trainer reference
# recipe for the depth-0 and depth-6 linear cells (two processes at once). Full SST-2, PyPI MiniLM-L6, offline.
# Why workers: run.sh showed one batch-16 step of this 22 M-parameter model is bound by the host launching
# ~600 small kernels (about 16 ms a step at depth 0 with the GPU mostly idle), so one process cannot fill an
# H100; separate processes launch in parallel on the machine's 16 cores.
# Each worker writes its own SQLite file (no shared-lock risk); $OUT/grid.tgz holds them, merged afterwards
# into one storage afterwards (results/h100/README.md). Same bundle as run.sh.
# CPU rehearsal: OUT=/tmp/h100p EXTRA="--max-train-samples 100" DEADLINE=900 bash results/h100/parallel.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h100p}; BUNDLE=${BUNDLE:-.gpu}; DEADLINE=${DEADLINE:-290}; EXTRA=${EXTRA:-}
mkdir -p "$OUT/dbs" "$OUT/logs"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
START=$(date +%s)
if ! python3 -c "import optuna, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
MODEL=/tmp/minilm32 DATA=$BUNDLE/sst2
python3 - "$BUNDLE/minilm16" "$MODEL" <<'EOF' || exit 1
import shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
shutil.copytree(src, dst, dirs_exist_ok=True)
weights = load_file(f"{src}/model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, f"{dst}/model.safetensors",
          metadata={"format": "pt"})
EOF
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/smi.csv" 2>/dev/null &
SMI=$!
left() { echo $((DEADLINE - ($(date +%s) - START))); }

t0=$(date +%s%N)
while read -r depth lr _; do
  for scheduler in linear cosine; do
    timeout -s INT -k 10 "$(left)" python3 -m ablations.grid --model "$MODEL" --dataset "$DATA" \
      --storage "sqlite:///$OUT/dbs/d$depth-$scheduler.db" --study-name grid --freeze-depths "$depth" \
      --schedulers "$scheduler" --epochs 1 --learning-rate "$lr" --no-report --no-progress --output-dir "$OUT" \
      $EXTRA > "$OUT/logs/d$depth-$scheduler.log" 2>&1 &
  done
done < <(grep -v '^#' results/lr_choice.txt)
wait $(jobs -p | grep -v "^$SMI$")
echo -e "grid, 14 workers\t$(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee "$OUT/stages.tsv"

t0=$(date +%s%N)
for spec in "0 3e-4" "6 1e-3"; do
  set -- $spec
  timeout -s INT -k 10 "$(left)" python3 "$BUNDLE/seed_recipe.py" --model "$MODEL" --data "$DATA" --epochs 1 \
    --scheduler linear --freeze-depth "$1" --learning-rate "$2" $EXTRA > "$OUT/logs/reference-d$1.log" 2>&1 &
done
wait $(jobs -p | grep -v "^$SMI$")
echo -e "reference depth 0 and 6, 2 processes\t$(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/stages.tsv"
kill $SMI 2>/dev/null
grep -h '^{"anchor"' "$OUT"/logs/reference-d*.log > "$OUT/reference.jsonl"
tar -czf "$OUT/grid.tgz" -C "$OUT" dbs logs && rm -rf "$OUT/dbs" "$OUT/logs"
cat "$OUT/stages.tsv" "$OUT/reference.jsonl"
