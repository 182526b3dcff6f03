#!/usr/bin/env bash
# Ranks as a search unit (#16), on the built-in data, fp32 weights: the hand-designed 3-layer
# student with prune_vocab sets a size (its saved tensors); the budget search then meets that
# size from a 6-layer copy of the teacher over heads, FFN blocks and layers, and once with the
# layer weights' ranks as a unit too (truncated-SVD factorization, ranks lowered 32 at a time).
# The hand-designed 3-layer student factorized to half its linear parameters (low_rank
# param_fraction 0.5) stands beside them, smaller. Every student is distilled STEPS steps; the
# table compares test accuracy at the size. VARIANTS picks the searches (default: structure
# ranks), SEED the seed, LOWRANK=0 leaves the factorized hand student out. Last line: one
# JSON line.
#   OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 bash scripts/bench_size_ranks.sh     # ~20 min, 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
DK=${DISTILKIT:-.venv/bin/distilkit}
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-250}
SEED=${SEED:-42}
OUT=${OUT:-runs/size_ranks}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

hand() {   # name, compression
  if [ ! -f "$OUT/$1/results.json" ]; then
    echo "== hand-designed: $1" >&2
    /usr/bin/time -f "$1: %e s" "$DK" distill recipes/quickstart.yaml --no-progress \
      --max_steps "$STEPS" --seed "$SEED" --output_dir "$OUT/$1" --compression "$2" >/dev/null
  fi
}
hand hand_L3 "[{method: prune_vocab}]"
# (LOWRANK=0: not the factorized hand-designed student, e.g. for another seed)
if [ "${LOWRANK:-1}" != 0 ]; then
  hand hand_L3_lowrank "[{method: low_rank, param_fraction: 0.5}, {method: prune_vocab}]"
fi
TARGET=${TARGET:-$("$PY" scripts/size_bits_table.py --tensor-mb "$OUT/hand_L3/student")}
echo "== size target: $TARGET MB (fp32)" >&2
AUTO="method: auto, target: {size_mb: $TARGET}, step_fraction: 0.15,
  steps_between: ${BETWEEN:-10}, ffn_block: 64, eval_examples: 256, importance_batches: 4"
for name in ${VARIANTS:-structure ranks}; do
  case $name in
    structure) units="[heads, ffn, layers]" ;;
    ranks) units="[heads, ffn, layers, ranks]" ;;
    *) echo "VARIANTS: $name is not structure or ranks" >&2; exit 2 ;;
  esac
  if [ ! -f "$OUT/$name/results.json" ]; then
    echo "== search over $units, fp32" >&2
    /usr/bin/time -f "search $name: %e s" "$DK" distill recipes/search_size.yaml --no-progress \
      --max_steps "$STEPS" --seed "$SEED" --output_dir "$OUT/$name" \
      --compression "[{$AUTO, units: $units}, {method: prune_vocab}]" >/dev/null
  fi
done
"$PY" scripts/size_bits_table.py "$OUT" "$TARGET"
