#!/usr/bin/env bash
# The GPU check on one lent H100 (issue 6) and the reference recipes on the full training set (issue 7):
# full SST-2 (67,349 / 872), the PyPI MiniLM-L6, everything offline.
#   1. grid:      the 14-cell grid (depths 0-6 x linear,cosine), 1 epoch, one command, learning rate per depth
#                 from results/lr_choice.txt (the CPU sweep);
#   2. the reference study's full fine-tune through the project, seed 42;
#   3. reference: ../shared/bench/seed_recipe.py (plain Trainer) for the depth-0 and depth-6 linear cells;
#   4. recipes:   the modified recipe, seed 42, then both recipes for seeds 43-44.
# Stages run in that order under one deadline; what finished is in $OUT/h100.db (an Optuna storage) whatever
# happens later. Bundle ($BUNDLE, default .gpu, not in git): whl/ (optuna, datasets and their missing needs),
# minilm16/ (the model with fp16 weights, to fit the transfer limit), sst2/, seed_recipe.py.
# CPU rehearsal: OUT=/tmp/h100 EXTRA="--max-train-samples 200" DEADLINE=900 bash results/h100/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h100}; BUNDLE=${BUNDLE:-.gpu}; DEADLINE=${DEADLINE:-420}; EXTRA=${EXTRA:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
if ! python3 -c "import optuna, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
MODEL=/tmp/minilm32 DATA=$BUNDLE/sst2 DB=sqlite:///$OUT/h100.db
python3 - "$BUNDLE/minilm16" "$MODEL" <<'EOF' || exit 1
# Back to fp32 on disk, so the project and the Trainer recipe load exactly the weights the CPU runs used.
import shutil, sys, torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
shutil.copytree(src, dst, dirs_exist_ok=True)
weights = load_file(f"{src}/model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, f"{dst}/model.safetensors",
          metadata={"format": "pt"})
EOF
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU";
  python3 -c "import torch, transformers, optuna, datasets, platform; print('torch', torch.__version__,
'transformers', transformers.__version__, 'optuna', optuna.__version__, 'datasets', datasets.__version__,
'python', platform.python_version(), 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  nproc; } | tee "$OUT/gpu.txt"

stage() {  # stage NAME COMMAND...: run it within what is left of the deadline; log rc and wall seconds
  local name=$1; shift
  local left=$((DEADLINE - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then echo -e "$name\tskipped\t0" | tee -a "$OUT/stages.tsv"; return; fi
  local t0; t0=$(date +%s%N)
  timeout -s INT -k 15 "$left" "$@" $EXTRA
  local rc=$?
  echo -e "$name\t$rc\t$(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$OUT/stages.tsv"
}
grid=(python3 -m ablations.grid --model "$MODEL" --dataset "$DATA" --storage "$DB" --no-report --no-progress
  --output-dir "$OUT")
reference=(python3 "$BUNDLE/seed_recipe.py" --model "$MODEL" --data "$DATA" --epochs 1 --scheduler linear)
full=(--study-name recipes --freeze-depths 0 --schedulers linear --epochs 3 --learning-rate 2e-5)
modified=(--study-name recipes --freeze-depths 4 --schedulers cosine --epochs 4 --learning-rate 3e-5)

stage grid "${grid[@]}" --study-name grid --freeze-depths 0-6 --schedulers linear,cosine --epochs 1 \
  --lr-by-depth results/lr_choice.txt
stage full-seed42 "${grid[@]}" "${full[@]}" --seed 42
stage reference-depth0 "${reference[@]}" --freeze-depth 0 --learning-rate 3e-4
stage reference-depth6 "${reference[@]}" --freeze-depth 6 --learning-rate 1e-3
stage modified-seed42 "${grid[@]}" "${modified[@]}" --seed 42
stage full-seed43-44 "${grid[@]}" "${full[@]}" --seed 43 --seeds 2
stage modified-seed43-44 "${grid[@]}" "${modified[@]}" --seed 43 --seeds 2
nvidia-smi --query-gpu=memory.used,temperature.gpu --format=csv 2>/dev/null | tee -a "$OUT/gpu.txt"
grep '^{"anchor"' "$OUT/log.txt" > "$OUT/reference.jsonl"
cat "$OUT/stages.tsv"
