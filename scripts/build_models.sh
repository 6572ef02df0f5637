#!/usr/bin/env bash
# Rebuild the bundles shipped in fededge/models/ (needs TensorFlow: the `convert` extra).
# The build is deterministic: with the same TensorFlow version a rebuild is byte-identical,
# and `git diff --stat fededge/models` shows nothing. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-/work/venv-tf/bin/python}"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0
for model in mlp cnn; do
  "$PYTHON" -m fededge.build --model "$model" --output "fededge/models/digits_$model" --seed 0
done
sha256sum fededge/models/*/*
