#!/usr/bin/env bash
# Compression to a budget (#16) on the built-in data: the hand-designed students, then
# `distilkit search` for speed-ups of 2x, 4x and 8x over the teacher (PyTorch, batch 32,
# length 64), every student distilled 250 steps, all re-measured side by side in one process
# (runs/search/pareto.md). The last line is distilkit search's JSON line of the figures.
#   OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 bash scripts/bench_budget.sh        # ~50 min, 2 cores
# A hand-designed run whose results.json exists is reused (delete runs/hand/NAME to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."
DK=${DISTILKIT:-.venv/bin/distilkit}
STEPS=${STEPS:-250}
HAND=${HAND:-runs/hand}
OUT=${OUT:-runs/search}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

hand() {  # NAME, then overrides of recipes/quickstart.yaml
  local name=$1; shift
  if [ ! -f "$HAND/$name/results.json" ]; then
    echo "== hand-designed $name: $*" >&2
    /usr/bin/time -f "$name: %e s" "$DK" distill recipes/quickstart.yaml --no-progress \
      --max_steps "$STEPS" --output_dir "$HAND/$name" "$@" >/dev/null
  fi
}
hand L3                                                     # the quickstart student
hand L2 --student.num_layers 2
hand L1 --student.num_layers 1
hand L3_heads50 --compression '[{method: prune_heads, fraction: 0.5}]'
hand L3_lowrank50 --compression '[{method: low_rank, param_fraction: 0.5}]'
hand L2_heads50 --student.num_layers 2 --compression '[{method: prune_heads, fraction: 0.5}]'

compare=()
for d in "$HAND"/*/; do compare+=(--compare "${d%/}"); done
echo "== search: speedup 2, 4, 8" >&2
/usr/bin/time -f "search, 3 targets: %e s" "$DK" search recipes/search_budget.yaml --no-progress \
  --target speedup=2 --target speedup=4 --target speedup=8 --max_steps "$STEPS" \
  --output_dir "$OUT" "${compare[@]}"
