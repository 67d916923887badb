#!/usr/bin/env bash
# Accelerator benchmark in one script: evaluator throughput (strategies x N candidates, vmap
# chunk sizes) and the wall-clock of a data-driven PG search, on the default JAX device.
#
#   bash launch/bench_gpu.sh OUT_DIR ANYPREC_CHECKPOINT
#
# OUT_DIR gets bench_eval*.json, search.json and search.log. ANYPREC_CHECKPOINT is a trained
# any-precision small CNN (train/small_cnn_fashion.py's WORKDIR/anyprec). Figures are recorded
# in BUILD_NOTES.md ("Accelerator figures").
set -euo pipefail
out=${1:?OUT_DIR}
ckpt=${2:?ANYPREC_CHECKPOINT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 -m launch.bench_eval --n=1,64,1024,4096 --images=1000 --max_seconds=4 \
  --out="$out/bench_eval.json"
for chunk in 256; do
  python3 -m launch.bench_eval --n=4096 --strategies=vmap,map --chunk=$chunk --images=1000 \
    --max_seconds=4 --out="$out/bench_eval_chunk$chunk.json"
done
start=$(date +%s.%N)
python3 -m launch.search --config=train/small_cnn_fashion.py --workdir="$out/search" \
  --checkpoint="$ckpt" --hw=rram_256_c4 --agent=pg --budget=3000 --acc_drop=0.5 \
  --search_images=1000 --noprogress --noplots > "$out/search.log" 2>&1 || { tail -30 "$out/search.log"; exit 1; }
end=$(date +%s.%N)
tail -1 "$out/search.log" > "$out/search.json"
python3 - "$out/search.json" "$start" "$end" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"PG search, budget 3000, 1000 search images: wall {float(sys.argv[3]) - float(sys.argv[2]):.1f} s "
      f"(incl. start-up); evals used {r.get('evals_used')}; keys {sorted(r)[:12]}")
PY
