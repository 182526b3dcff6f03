#!/usr/bin/env bash
# Bits as a search unit (#16), on the built-in data: the hand-designed 3-layer student stored
# by prune_vocab + 4-bit ptq sets a size; the budget search then meets that size twice from a
# 6-layer copy of the teacher, once over heads, FFN blocks and layers (every weight at 4 bits)
# and once with bits as a unit too (weights at 3 or 2 bits where the Fisher estimate and the
# quantized validation loss allow), and once with the word rows as a unit too (the rarest
# training tokens read [UNK], their rows paying for heads and neurons). Every student is
# distilled STEPS steps, then stored the same way; the table compares test accuracy at the size
# on disk. VARIANTS picks the searches (default: structure bits vocab structure8 bits8
# bits8_quantize; also hand_L3_quantize, structure_quantize), SEED the seed. Last line: one
# JSON line.
#   OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 bash scripts/bench_size_bits.sh     # ~45 min, 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
DK=${DISTILKIT:-.venv/bin/distilkit}
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-250}
SEED=${SEED:-42}   # the recipes' seed: the search's batches and the final run's
OUT=${OUT:-runs/size_bits}
STORE='{method: ptq, bits: 4, bucket_size: 256, quantize_embeddings: true}'
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ ! -f "$OUT/hand_L3/results.json" ]; then
  echo "== hand-designed: 3 alternate layers + prune_vocab + 4-bit ptq" >&2
  /usr/bin/time -f "hand_L3: %e s" "$DK" distill recipes/quickstart.yaml --no-progress \
    --max_steps "$STEPS" --seed "$SEED" --output_dir "$OUT/hand_L3" \
    --compression "[{method: prune_vocab}, $STORE]" >/dev/null
fi
# the hand-designed student's saved tensors (codes, scales, fp32 rest, prune_vocab's id map):
# what a size target counts (the directory adds the tokenizer files and the card)
TARGET=${TARGET:-$("$PY" scripts/size_bits_table.py --tensor-mb "$OUT/hand_L3/student")}
echo "== size target: $TARGET MB" >&2
AUTO="method: auto, target: {size_mb: $TARGET}, min_bits: 2, step_fraction: 0.15,
  steps_between: ${BETWEEN:-10}, ffn_block: 64, eval_examples: 256, importance_batches: 4"
# structure8 / bits8: the layers start at 8 bits (the word table stays at 4), as a user who
# deploys int8 weights would start; bits8 may lower them, structure8 only cuts units
STORE8='{method: ptq, bits: 8, bits_per_pattern: {"*word_embeddings*": 4}, bucket_size: 256,
  quantize_embeddings: true}'
# bits8_quantize: as bits8, then quantized distillation (quantize) instead of ptq, so the
# student trains at the bits the search chose instead of being rounded to them after training
STORE8Q=${STORE8/ptq/quantize}
# *_quantize of the 4-bit students: the same, trained by quantized distillation, for a fair
# comparison with bits8_quantize
STOREQ=${STORE/ptq/quantize}
if [[ " ${VARIANTS:-} " == *" hand_L3_quantize "* ]] && [ ! -f "$OUT/hand_L3_quantize/results.json" ]; then
  echo "== hand-designed: 3 alternate layers + prune_vocab + 4-bit quantize" >&2
  /usr/bin/time -f "hand_L3_quantize: %e s" "$DK" distill recipes/quickstart.yaml --no-progress \
    --max_steps "$STEPS" --seed "$SEED" --output_dir "$OUT/hand_L3_quantize" \
    --compression "[{method: prune_vocab}, $STOREQ]" >/dev/null
fi
for name in ${VARIANTS:-structure bits vocab structure8 bits8 bits8_quantize}; do
  store=$STORE
  case $name in
    hand_L3_quantize) continue ;;
    structure_quantize) units="[heads, ffn, layers]"; store=$STOREQ ;;
    structure) units="[heads, ffn, layers]" ;;
    bits) units="[heads, ffn, layers, bits]" ;;
    vocab) units="[heads, ffn, layers, vocab]" ;;
    structure8) units="[heads, ffn, layers]"; store=$STORE8 ;;
    bits8) units="[heads, ffn, layers, bits]"; store=$STORE8 ;;
    bits8_quantize) units="[heads, ffn, layers, bits]"; store=$STORE8Q ;;
    *) echo "VARIANTS: $name is not structure, bits, vocab, structure8, bits8," \
         "bits8_quantize, hand_L3_quantize or structure_quantize" >&2; exit 2 ;;
  esac
  if [ ! -f "$OUT/$name/results.json" ]; then
    echo "== search over $units, stored as $store" >&2
    /usr/bin/time -f "search $name: %e s" "$DK" distill recipes/search_size.yaml --no-progress \
      --max_steps "$STEPS" --seed "$SEED" --output_dir "$OUT/$name" \
      --compression "[{$AUTO, units: $units}, {method: prune_vocab}, $store]" >/dev/null
  fi
done
"$PY" scripts/size_bits_table.py "$OUT" "$TARGET"
