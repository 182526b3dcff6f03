#!/usr/bin/env bash
# The GPU path end to end, on one CUDA GPU, in under 8 minutes, needing nothing but the
# repository (and the package index, for the install):
#   1. install (scripts/install.sh; then a CUDA build of the same torch if it is CPU-only),
#   2. python -m pytest -q tests_gpu,
#   3. the quickstart recipe on CUDA in bf16 (60 steps),
#   4. scripts/bench_kd_step.py and 5. scripts/bench_kernels.py on CUDA.
# Every step prints one JSON line ({"step": ..., "ok": ..., "seconds": ...} and its figures);
# the last line sums them up. Without a usable NVIDIA GPU it prints one line,
# {"gpu": false, "reason": "..."}, and exits 0.
#   bash scripts/gpu_check.sh                  # OUT=dir keeps the logs (default: a temp dir)
#   TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu126 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d -t distilkit-gpu-check-XXXXXX)}
mkdir -p "$OUT"

no_gpu() {  # $1: why (no quotes or backslashes in it)
  printf '{"gpu": false, "reason": "%s"}\n' "$1"
  exit 0
}

command -v nvidia-smi >/dev/null 2>&1 || no_gpu "no nvidia-smi: no NVIDIA driver on this machine"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
[ -n "$GPU_NAME" ] || no_gpu "nvidia-smi lists no usable GPU"

START=$(date +%s)
DEADLINE=$(( START + ${BUDGET_S:-470} ))  # the whole check ends within 8 minutes
FAILED=""
# step NAME TIMEOUT_S CMD...: runs CMD (for at most TIMEOUT_S, and never past the deadline)
# with its output in $OUT/NAME.log, then prints one JSON line: the step's status plus the
# last JSON object CMD printed (its figures), if any. rc 124: it ran out of time.
step() {
  local name=$1 limit=$2 t0 rc figures left
  shift 2
  t0=$(date +%s)
  left=$(( DEADLINE - t0 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    echo "out of time before this step" >"$OUT/$name.log"
    rc=124
  else
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
  fi
  [ "$rc" -eq 0 ] || FAILED="${FAILED:+$FAILED, }\"$name\""
  figures=$(grep -E '^\{.*\}$' "$OUT/$name.log" | tail -n 1)
  printf '{"step": "%s", "ok": %s, "rc": %d, "seconds": %d, "log": "%s", "result": %s}\n' \
    "$name" "$([ "$rc" -eq 0 ] && echo true || echo false)" "$rc" "$(( $(date +%s) - t0 ))" \
    "$OUT/$name.log" "${figures:-null}"
  return "$rc"
}

# --- 1. install ------------------------------------------------------------------------------
step install 240 bash scripts/install.sh || { echo "install failed: see $OUT/install.log" >&2; exit 1; }
PY=.venv/bin/python
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  # install.sh pins torch in .venv/constraints.txt; the CUDA wheel of that version
  # (2.13.0+cuXXX) satisfies the same pin, so the constraints stay as they are. Only torch is
  # swapped (uninstalled, then installed from the CUDA index, which also serves its nvidia-*
  # dependencies): a --force-reinstall would reinstall, and may upgrade, every dependency.
  TV=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
  "$PY" -m pip uninstall -q -y torch
  step torch_cuda 240 "$PY" -m pip install -q -c .venv/constraints.txt \
    --index-url "${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}" \
    --extra-index-url https://pypi.org/simple "torch==$TV" \
    || { echo "could not install a CUDA torch $TV: see $OUT/torch_cuda.log" >&2; exit 1; }
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || no_gpu "torch.cuda.is_available() is False after install (GPU: ${GPU_NAME}; check the driver against the CUDA build of torch)"

# --- 2-5. tests and figures ------------------------------------------------------------------
step tests_gpu 120 "$PY" -m pytest -q -p no:cacheprovider tests_gpu
step quickstart_bf16 150 .venv/bin/distilkit distill --no-progress recipes/quickstart.yaml \
  --bf16 true --max_steps 60 --output_dir "$OUT/quickstart"
step bench_kd_step 90 "$PY" scripts/bench_kd_step.py --device cuda --bf16 --teacher-dtype bfloat16
step bench_kernels 90 "$PY" scripts/bench_kernels.py --device cuda

printf '{"gpu": "%s", "ok": %s, "failed": [%s], "seconds": %d, "logs": "%s"}\n' "$GPU_NAME" \
  "$([ -z "$FAILED" ] && echo true || echo false)" "$FAILED" "$(( $(date +%s) - START ))" "$OUT"
[ -z "$FAILED" ]
