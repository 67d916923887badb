#!/usr/bin/env bash
# Accelerator benchmark in one script (about 6-8 minutes on one H200; no input files, no
# registry): the evaluator table (float32 and int8 products, N = 1..4096, small CNN and
# ResNet-18 at 224x224), training img/s of ResNet-18, and a PG search at budget 30000 on the
# Fashion task (a tiny any-precision small CNN trained first). Writes OUT_DIR/bench_gpu.json
# and OUT_DIR/bench_gpu.txt (the table); figures go to BUILD_NOTES.md ("Accelerator figures").
#
#   bash launch/bench_gpu.sh OUT_DIR            # the default JAX device
#   bash launch/bench_gpu.sh --dry OUT_DIR      # every part at tiny sizes on CPU (CI, < 1 min)
set -euo pipefail
dry=()
if [[ "${1:-}" == "--dry" ]]; then
  dry=(--dry)
  shift
  export JAX_PLATFORMS=cpu
fi
out=${1:?usage: bash launch/bench_gpu.sh [--dry] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m launch.bench_gpu --out_dir="$out" "${dry[@]}" 2>&1 | tee "$out/bench_gpu.log"
