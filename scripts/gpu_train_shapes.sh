#!/usr/bin/env bash
# Train the shapes-world model (VQ, then transformer) on a bare GPU machine in about 7 minutes.
#
# Runs from a copy of this repository with the machine's own python3 (torch + numpy; nothing is
# installed or downloaded). Writes at most 8 flat files to $OUT (the device tool's limits):
#   vq.pt  transformer.pt (float16 weights)  training.json  vq_history.jsonl
#   transformer_history.jsonl  recon_sheet.png  sample_sheet.png  train.log
#
# Then, where the `train` extra is installed (this repository's .venv), finish the bundle:
#   .venv/bin/python -m inference.training.pipeline --unpack GPU_OUT --out .work/shapes-gpu
#   .venv/bin/dallebot train shapes --out .work/shapes-gpu      # skips training: export, tune, eval
#   then copy .work/shapes-gpu/bundle/* to inference/shipped/shapes/ (see docs/model-card.md).
#
# Usage: OUT=/path/to/empty/dir bash scripts/gpu_train_shapes.sh
# Budgets (seconds): VQ_BUDGET, TF_BUDGET; step counts (upper bounds): VQ_STEPS, STEPS; also DEVICE,
# SCENES, VQ_BATCH, BATCH (a CPU smoke test: DEVICE=cpu SCENES=300 VQ_STEPS=5 STEPS=5 VQ_BATCH=8 BATCH=8).
set -euo pipefail
OUT="${OUT:?set OUT to an empty folder}"
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WORK="$(mktemp -d /tmp/shapes-work.XXXXXX)"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/train.log"
import torch, numpy
print("torch", torch.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PYEOF
"$PY" -m inference.training.pipeline \
    --out "$WORK/out" --work "$WORK" --device "${DEVICE:-cuda}" --no-cache \
    --seed 0 --scenes "${SCENES:-250000}" \
    --vq-steps "${VQ_STEPS:-6000}" --vq-batch "${VQ_BATCH:-128}" --vq-lr 2e-3 --vq-budget "${VQ_BUDGET:-130}" \
    --steps "${STEPS:-12000}" --batch "${BATCH:-256}" --lr 1.5e-3 --tf-budget "${TF_BUDGET:-190}" \
    --pack "$OUT" 2>&1 | tee -a "$OUT/train.log"
ls -la "$OUT"
