#!/usr/bin/env bash
# The one command for a lent GPU (issue 14): `bash bench/gpu/session.sh` in the repo root, $OUT set, with
# .gpu-carry/ (bench/gpu/prepare.sh) carried. Stages, in this order, each under its own time limit:
#   setup   install what the machine lacks from .gpu-carry/wheels, cast the model back to fp32, write env.txt;
#   steps   ms per run-step of the eager, stacked and captured engines at N = 1, 14, 56, depths 0 and 3;
#   grid    the 70-run grid (depths 0-6 x linear,cosine x 5 seeds, 1 epoch, full SST-2) in one command, timed;
#   recipe  the Hugging Face Trainer recipe beside the project on one cell (python -m ablations.benchmark);
#   search  a batched search (8 trials asked at once, depths 5-6, 1-2 epochs): stacked groups that narrow and
#           recapture as their 1-epoch runs end, on CUDA; in fp16 (--precision fp16), so the loss scaling an older
#           card (a T4) trains with runs on CUDA and inside captured graphs at least once.
# Everything a stage measures lands in $OUT as the stage goes, so a stage stopped at its limit still returns
# what it finished. At most 8 files come back from $OUT: env.txt, steps.log, step_times.json, grid.log (the grid's
# and the search's output), grid.tar.gz (both ledgers), recipe.log, recipe.json, session.json (every stage's wall
# time, exit code and limit).
# Variables: STAGES (default setup,steps,grid,recipe,search); SMALL=1 (a tiny version of every stage, for a CPU
# rehearsal); SETUP_LIMIT, STEPS_LIMIT, GRID_LIMIT, RECIPE_LIMIT, SEARCH_LIMIT (seconds); STEP_PLAN (depth:runs per process);
# RECIPE_SAMPLES; WORK (scratch, default /tmp/gpu-session); PYTHON (default python3); GRID_FRESH=0 keeps an
# earlier grid's ledger and step timings (resume, not a timing).
# Each of grid, recipe and search keeps its step timings (core.timer) in a folder of its own under $WORK, emptied
# when the stage starts fresh: a rerun on a warm machine would otherwise reuse the timings an earlier attempt saved
# in the machine's timing folder, skip its timing passes, and report a shorter wall time than a cold command takes.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?OUT is not set: name the folder the results go to}"
REPO=$PWD
SCRIPT=$REPO/bench/gpu/session.sh
CARRY=${CARRY:-$REPO/.gpu-carry}
WORK=${WORK:-/tmp/gpu-session}
PY=${PYTHON:-python3}
SMALL=${SMALL:-0}
STAGES=${STAGES:-setup,steps,grid,recipe,search}
MODEL=$WORK/minilm-fp32
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=$WORK/hf MPLBACKEND=Agg
export PYTHONPATH=$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}

if [ "$SMALL" = 1 ]; then  # the CPU rehearsal: same commands, tiny sizes, a CPU's time limits
  SETUP_LIMIT=${SETUP_LIMIT:-240}; STEPS_LIMIT=${STEPS_LIMIT:-300}; GRID_LIMIT=${GRID_LIMIT:-300}
  RECIPE_LIMIT=${RECIPE_LIMIT:-420}
  STEP_PLAN=${STEP_PLAN:-3:1 3:2}; STEP_FLAGS=(--length 16 --steps 2 --rounds 1)
  GRID_FLAGS=(--freeze-depths 3 --seeds 1 --max-train-samples 64 --dev-size 32 --max-parallel-runs 2)
  RECIPE_SAMPLES=${RECIPE_SAMPLES:-64}
  SEARCH_LIMIT=${SEARCH_LIMIT:-300}
  SEARCH_FLAGS=(--trials 4 --max-parallel-runs 4 --max-train-samples 64 --dev-size 32 --precision fp16)
else  # one GPU (an H100 or H200): 40 + 110 + 180 + 60 + 60 s = 7.5 min
  SETUP_LIMIT=${SETUP_LIMIT:-40}; STEPS_LIMIT=${STEPS_LIMIT:-110}; GRID_LIMIT=${GRID_LIMIT:-180}
  RECIPE_LIMIT=${RECIPE_LIMIT:-60}; SEARCH_LIMIT=${SEARCH_LIMIT:-60}
  SEARCH_FLAGS=(--trials 8 --max-train-samples 8000 --precision fp16)  # --max-parallel-runs auto: min(fits, 8)
  # depth:runs per process. Every contender of a process lives at once: at depth 0, N = 56 stacked and captured
  # alone are 112 model copies with gradients and AdamW state (~41 GB) plus the graph's pool, so it gets its own.
  STEP_PLAN=${STEP_PLAN:-0:1,14 0:56 3:1,14,56}; STEP_FLAGS=(--length 32)
  GRID_FLAGS=(--freeze-depths 0-6 --seeds 5)
  RECIPE_SAMPLES=${RECIPE_SAMPLES:-4000}
fi

elapsed() { local ms=$(( ($2 - $1) / 1000000 )); printf '%d.%02d' $((ms / 1000)) $((ms % 1000 / 10)); }  # seconds between two date +%s%N readings

stage_setup() {
  local missing
  missing=$($PY - "$REPO/bench/gpu/wheels.txt" <<'PY'
import importlib.util, sys
for line in open(sys.argv[1]):
    if line.strip() and not line.startswith("#"):
        spec, module = line.split()
        if importlib.util.find_spec(module) is None:
            print(spec)
PY
) || return 1
  if [ -n "$missing" ]; then
    echo "installing from the carry: $(echo $missing)"
    # shellcheck disable=SC2086
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      --find-links "$CARRY/wheels" $missing || return 1
  else
    echo "every carried package is already here"
  fi
  # What the carry cannot hold (binary, or the framework itself) must be on the machine; the grid and the Trainer
  # need all of it (datasets: pyarrow, pandas, xxhash; core.timing: scipy; accelerate: psutil; the report's plots,
  # loaded with the grid's timing sitting: matplotlib, seaborn; the search's fANOVA importances: scikit-learn).
  # Then, in the same
  # process: the model back to fp32 on disk (the project loads fp32 anyway, core.model passes dtype=float32, but
  # the Trainer recipe's plain from_pretrained keeps a checkpoint's dtype in transformers 5 and would train fp16
  # master weights), and the embedded SST-2 as the train.tsv and validation.tsv the recipe reads.
  $PY - "$CARRY/minilm-fp16" "$MODEL" "$WORK/sst2" "$WORK/card.txt" <<'PY' || return 1
import importlib, importlib.metadata as md, sys
needed = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
          "numpy": "numpy", "pyarrow": "pyarrow", "pandas": "pandas", "scipy": "scipy", "xxhash": "xxhash",
          "psutil": "psutil", "yaml": "PyYAML", "tqdm": "tqdm", "fsspec": "fsspec", "huggingface_hub": "huggingface_hub",
          "datasets": "datasets", "optuna": "optuna", "sqlalchemy": "SQLAlchemy", "accelerate": "accelerate",
          "matplotlib": "matplotlib", "seaborn": "seaborn", "sklearn": "scikit-learn"}
absent = []
for module, dist in needed.items():
    try:
        importlib.import_module(module)
        print(f"  {dist} {md.version(dist)}")
    except Exception as error:
        absent.append(f"{dist} ({type(error).__name__}: {error})")
if absent:
    sys.exit("error: missing here and not in the carry: " + "; ".join(absent))
import ablations.benchmark, ablations.cells, ablations.grid, ablations.ledger, ablations.tradeoff  # noqa
import core.engine_timing, core.train  # noqa
import hashlib, lzma, pathlib, platform, shutil, torch
from safetensors.torch import load_file, save_file
from core.sources import EMBEDDED_SHA256, EMBEDDED_SST2
from core.model import device_name
card = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
print("the project imports from", pathlib.Path(core.train.__file__).parents[1], "; python", platform.python_version(),
      "torch", torch.__version__, "cuda", torch.version.cuda, "device", card)

source, model, data, card_file = sys.argv[1:]
pathlib.Path(card_file).write_text(card)  # session.json names the card from here
shutil.copytree(source, model, dirs_exist_ok=True)
weights = {k: v.float() if v.is_floating_point() else v for k, v in load_file(f"{source}/model.safetensors").items()}
save_file(weights, f"{model}/model.safetensors", metadata={"format": "pt"})
print(f"model: {model}, {len(weights)} tensors in fp32")
pathlib.Path(data).mkdir(parents=True, exist_ok=True)
for split, digest in EMBEDDED_SHA256.items():
    raw = lzma.decompress((EMBEDDED_SST2 / f"{split}.tsv.xz").read_bytes())
    if hashlib.sha256(raw).hexdigest() != digest:
        sys.exit(f"error: the embedded SST-2 {split} file is damaged")
    pathlib.Path(data, f"{split}.tsv").write_bytes(raw)
print(f"data: {data} (train.tsv, validation.tsv)")
PY
  echo "== machine"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  echo "cpus: $(nproc --all)"; free -m 2>/dev/null | head -2
  echo "== pip list"; $PY -m pip list 2>/dev/null
}

merge_step_times() {  # every part done so far into $OUT/step_times.json; a row's "part" and "plan" name its
  # process, and "parts" says how each process ended (a failed one has no rows, and its number is not reused)
  $PY - "$WORK/steps" "$OUT/step_times.json" <<'PY'
import json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
parts = [dict(zip(("part", "plan", "exit_code"), line.split()))
         for line in (folder / "parts.txt").read_text().splitlines()]
rows, args = [], []
for part in parts:
    part["part"], part["exit_code"] = int(part["part"]), int(part["exit_code"])
    found = folder / f"part{part['part']}.json"
    done = json.loads(found.read_text()) if part["exit_code"] == 0 and found.exists() else \
        {"step_times": [], "args": None}
    rows += [{**row, "part": part["part"], "plan": part["plan"]} for row in done["step_times"]]
    args.append(done["args"])
pathlib.Path(sys.argv[2]).write_text(json.dumps({"step_times": rows, "parts": parts, "args": args}, indent=2))
PY
}

stage_steps() {
  rm -rf "$WORK/steps"; mkdir -p "$WORK/steps"; : > "$WORK/steps/parts.txt"
  local part=0 item rc=0 code
  for item in $STEP_PLAN; do  # one process per item, merged after each: a stop or a failure keeps what is done
    part=$((part + 1))
    $PY -m ablations.benchmark --step-times --model "$MODEL" --freeze-depths "${item%%:*}" --runs "${item#*:}" \
      "${STEP_FLAGS[@]}" --output "$WORK/steps/part$part.json"
    code=$?
    echo "$part $item $code" >> "$WORK/steps/parts.txt"
    [ "$code" = 0 ] || rc=1
    merge_step_times || rc=1
  done
  return $rc
}

stage_grid() {
  [ "${GRID_FRESH:-1}" = 1 ] && rm -rf "$WORK/grid" "$WORK/grid-times" "$WORK/grid-timing"
  mkdir -p "$WORK/grid"
  export ABLATIONS_TIMING_DIR=$WORK/grid-timing
  local command=($PY -m ablations.grid --model "$MODEL" --dataset sst2 --schedulers linear,cosine --epochs 1
    --lr-by-depth results/lr_choice.txt --no-progress --no-report --output-dir "$WORK/grid" "${GRID_FLAGS[@]}")
  echo "${command[*]}" > "$WORK/grid-command"
  local sampler=""
  if command -v nvidia-smi >/dev/null; then  # GPU busy % and memory every second, beside the runs
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$WORK/grid/smi.csv" 2>&1 &
    sampler=$!
  fi
  date +%s.%N > "$WORK/grid-times"
  "${command[@]}"
  local rc=$?
  echo "$(date +%s.%N) $rc" >> "$WORK/grid-times"
  [ -n "$sampler" ] && kill "$sampler"
  return $rc
}

stage_search() {  # a batch of trials as stacked groups of mixed epochs: narrowing and recapture on CUDA
  rm -rf "$WORK/search" "$WORK/search-times" "$WORK/search-timing"; mkdir -p "$WORK/search"
  export ABLATIONS_TIMING_DIR=$WORK/search-timing
  local command=($PY -m ablations.optuna_search --model "$MODEL" --dataset sst2 --freeze-depths 5-6 --epochs-range 1-2
    --no-progress --no-report --output-dir "$WORK/search" "${SEARCH_FLAGS[@]}")
  echo "${command[*]}" > "$WORK/search-command"
  date +%s.%N > "$WORK/search-times"
  "${command[@]}"
  local rc=$?
  echo "$(date +%s.%N) $rc" >> "$WORK/search-times"
  return $rc
}

finish_runs() {  # finish_runs NAME LIMIT: outside the stage's limit, time and count what the grid or the
  # search did (even when stopped), then pack both ledgers as far as they exist
  $PY - "$WORK" "$1" "$2" <<'PY'
import json, pathlib, sqlite3, sys
work, name, limit = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
times = (work / f"{name}-times").read_text().split() if (work / f"{name}-times").exists() else []
command = work / f"{name}-command"
result = {"command": command.read_text().strip() if command.exists() else None, "limit_s": limit,
          "finished": len(times) == 3, "trials": {},
          "wall_s_covers": "the whole command, from before its process started to its exit: imports, model and data "
                           "load, tokenizing, capture probe, timing passes, training, evaluation, ledger writes and "
                           "what it writes under --no-report (the search: its summary, pareto.csv, importance.png); "
                           "not the trade-off report, drawn afterwards from the ledger"}
if times:
    result["wall_s"] = round(float(times[1]) - float(times[0]), 2) if len(times) == 3 else None
    result["exit_code"] = int(times[2]) if len(times) == 3 else None
db = work / name / "ablations.db"
if db.exists():
    with sqlite3.connect(db) as con:
        result["trials"] = dict(con.execute("select state, count(*) from trials group by state").fetchall())
        records = [json.loads(v) for (v,) in
                   con.execute("select value_json from trial_user_attributes where key = 'record'").fetchall()]
    for key, field in (("engines", "engine"), ("devices", "device"), ("precisions", "precision"),
                       ("train_samples", "train_samples")):  # what the stored runs say ran, and on how many rows
        result[key] = sorted({r[field] for r in records if r.get(field) is not None})
(work / name / f"{name}.json").write_text(json.dumps(result, indent=2))
print(f"{name}:", json.dumps(result))
PY
  local folders=""
  for folder in grid search; do [ -d "$WORK/$folder" ] && folders="$folders $folder"; done
  # shellcheck disable=SC2086
  tar czf "$OUT/grid.tar.gz" -C "$WORK" $folders 2>&1
}

stage_recipe() {
  rm -rf "$WORK/recipe-timing"; export ABLATIONS_TIMING_DIR=$WORK/recipe-timing  # the project's grid times afresh
  $PY -m ablations.benchmark --model "$MODEL" --dataset "$WORK/sst2" --freeze-depths 0 --schedulers linear \
    --epochs 1 --learning-rate 1e-4 --max-train-samples "$RECIPE_SAMPLES" --recipe bench/gpu/seed_recipe.py \
    --output "$OUT/recipe.json"
}

record() {  # record NAME LIMIT RC SECONDS: one line per stage, then $OUT/session.json rewritten from them
  echo "{\"stage\": \"$1\", \"limit_s\": $2, \"exit_code\": $3, \"timed_out\": $([ "$3" = 124 ] || [ "$3" = 137 ] \
    && echo true || echo false), \"wall_s\": $4}" >> "$WORK/stages.jsonl"
  $PY - "$WORK" "$OUT/session.json" "$SMALL" "$STAGES" <<'PY'
import json, pathlib, sys
work, out, small, stages = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
card = work / "card.txt"
summary = {"small": small == "1", "device": card.read_text() if card.exists() else None, "stages_asked": stages,
           "stages": [json.loads(line) for line in (work / "stages.jsonl").read_text().splitlines()]}
for name in ("grid", "search"):
    if (work / name / f"{name}.json").exists():
        summary[name] = json.loads((work / name / f"{name}.json").read_text())
pathlib.Path(out).write_text(json.dumps(summary, indent=2))
PY
}

run_stage() {  # run_stage NAME LIMIT LOG
  local name=$1 limit=$2 log=$3 started rc
  echo "=== $name: limit ${limit} s, $(date -u +%FT%TZ)" | tee -a "$log"
  started=$(date +%s%N)
  timeout -k 10 "$limit" bash "$SCRIPT" __stage "$name" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local seconds; seconds=$(elapsed "$started" "$(date +%s%N)")
  [ "$name" = grid ] && finish_runs grid "$GRID_LIMIT" 2>&1 | tee -a "$log"
  [ "$name" = search ] && finish_runs search "$SEARCH_LIMIT" 2>&1 | tee -a "$log"
  echo "=== $name: exit $rc after $seconds s$([ "$rc" = 124 ] && echo ' (stopped at its limit)')" | tee -a "$log"
  record "$name" "$limit" "$rc" "$seconds"
  return "$rc"
}

if [ "${1:-}" = __stage ]; then
  "stage_$2"
  exit $?
fi

for stage in ${STAGES//,/ }; do  # a misspelt stage fails now, not after minutes of the ones before it
  case $stage in setup|steps|grid|recipe|search) ;; *) echo "error: unknown stage $stage (setup, steps, grid, recipe, search)" >&2
    exit 2 ;; esac
done
mkdir -p "$OUT" "$WORK"
rm -f "$WORK/stages.jsonl"
failed=0
for stage in ${STAGES//,/ }; do
  case $stage in
    setup) run_stage setup "$SETUP_LIMIT" "$OUT/env.txt" || { echo "setup failed: the other stages cannot run"
           exit 1; } ;;
    steps) run_stage steps "$STEPS_LIMIT" "$OUT/steps.log" || failed=1 ;;
    grid) run_stage grid "$GRID_LIMIT" "$OUT/grid.log" || failed=1 ;;
    recipe) run_stage recipe "$RECIPE_LIMIT" "$OUT/recipe.log" || failed=1 ;;
    search) run_stage search "$SEARCH_LIMIT" "$OUT/grid.log" || failed=1 ;;
  esac
done
cat "$OUT/session.json"
exit $failed
