#!/usr/bin/env bash
# ResNet-50 fine-tuning on one GPU through the real pipeline (generated photo-like JPEGs ->
# prepare -> Ray Data decode + augment -> one Ray Train worker, bf16 autocast, channels-last),
# printing images/s and the share of time the GPU waited for data. Goal on one H100: >= 2,500
# img/s with the GPU waiting < 10% of the time. Random init (weights none): no download needed.
#   bash bench/gpu_finetune.sh                 # 20,000 images, 3 epochs
#   IMAGES=40000 EPOCHS=2 bash bench/gpu_finetune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no usable CUDA device here")'
exec "$PY" bench/bench_finetune.py --gpu --backbone resnet50 --size 224 --batch "${BATCH:-256}" \
  --images "${IMAGES:-20000}" --epochs "${EPOCHS:-3}" --cores "$(nproc)"
