#!/usr/bin/env bash
# Rebuild the bundles shipped in fededge/models/ (needs TensorFlow: the `convert` extra):
# the two digits models, and the four examples of examples/ (each build is checked: LiteRT's
# train steps == TensorFlow's).
# The build is deterministic: with the same TensorFlow version a rebuild is byte-identical,
# and `git diff --stat fededge/models` shows nothing. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-/work/tfvenv/bin/python}"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0
for model in mlp cnn; do
  "$PYTHON" -m fededge.build --model "$model" --output "fededge/models/digits_$model" --seed 0
done
for example in diabetes_regression sensor_autoencoder multilabel transfer_digits; do
  "$PYTHON" "examples/$example.py" build "fededge/models/$example"
done
sha256sum fededge/models/*/*
