#!/usr/bin/env bash
# The cost and quality benchmarks at the paper's scale on one GPU: every strategy at ViT-B 96^3 (and the cpu
# preset), the bf16 and activation-checkpointing levers, inference against MONAI's UNETR, storage
# and data wait. Writes $OUT/results.json and $OUT/RESULTS.md (OUT defaults to benchmarks/gpu).
#
#   bash benchmarks/gpu_paper_scale.sh          # about 3-5 minutes on an H100
#
# Needs python3 with CUDA torch, peft and safetensors. MONAI and nibabel are pure Python: where
# they are missing, put their wheels in .whl/ first (pip download --no-deps monai==1.6.1
# nibabel -d .whl) and carry that folder; they are installed into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu}
if ! python3 -c "import monai, nibabel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" || true
python3 benchmarks/run.py --part cost --device cuda --out "$OUT" 2>&1 | tee "$OUT/log.txt"
# Then the quality protocol at the paper's scale (ViT-B, 96^3): one held-out center, one seed, with
# the oracle, on the synthetic data (generated here if absent). The epoch budget is cut to fit a
# short GPU lease; RESULTS.md states it beside the table.
python3 benchmarks/run.py --part quality --device cuda --out "$OUT" --preset vit-b --centers MDA --seeds 0 \
  --sweep-centers none --pretrain-epochs "${PRETRAIN_EPOCHS:-40}" --adapt-epochs "${ADAPT_EPOCHS:-30}" \
  --work "$OUT/runs" 2>&1 | tee -a "$OUT/log.txt"
