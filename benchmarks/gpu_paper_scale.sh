#!/usr/bin/env bash
# The cost and quality benchmarks at the paper's scale on one GPU, sized for a 10-minute lease:
# every strategy's training step at ViT-B 96^3 (and the cpu preset) with the bf16 and
# activation-checkpointing levers, inference against MONAI's UNETR, storage and data wait; then
# the quality protocol (base, full, partial, deep, deep+head, LoRA and the in-domain oracle, one
# held-out center, one seed) at the vit-b preset on synthetic data generated there, with the
# epoch budget cut to fit. Writes $OUT/results.json, $OUT/RESULTS.md, $OUT/log.txt and
# $OUT/runs.tgz (every run folder's JSON: configs, metrics, summaries, reports; no weights).
#
#   bash benchmarks/gpu_paper_scale.sh
#
# Each part has a wall-clock cap (COST_S, QUALITY_S); a part cut short leaves its run folders in
# runs.tgz, and running the script again on the same machine resumes it (finished runs are reused,
# an interrupted training resumes from its last checkpoint). Measured on one H200 (2026-11-29):
# data 12 s, cost part 73 s, quality part about 480 s (pretraining epochs take 10 s, mostly data
# augmentation in the main process), so the whole script fits a 10-minute call only just. Needs python3 with CUDA torch, peft, safetensors, einops, scipy and tqdm. MONAI and
# nibabel are pure Python: where they are missing, put their wheels in .whl/ first
# (pip download --no-deps monai==1.6.1 nibabel -d .whl) and carry that folder.
# The same script rehearses on a CPU: DEVICE=cpu PRESET=tiny PRETRAIN_EPOCHS=1 ADAPT_EPOCHS=1 COST_S=0 (8 shots need
# the default 16 cases per center).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-vit-b}
CENTER=${CENTER:-MDA}
CASES=${CASES:-16}
DATA=${DATA:-/tmp/centerprompt-synth}
WORK=${WORK:-/tmp/centerprompt-runs}
COST_S=${COST_S:-100}
QUALITY_S=${QUALITY_S:-470}
source benchmarks/gpu_common.sh
gpu_python_path
# TF32 matrix products (cuDNN convolutions use TF32 by default already): what a user of this GPU runs.
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
trap gpu_pack EXIT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$LOG"

started=$SECONDS
gpu_synth
echo "synthetic data: $((SECONDS - started)) s" | tee -a "$LOG"

if [ "$COST_S" -gt 0 ]; then
  timeout "$COST_S" python3 benchmarks/run.py --part cost --device "$DEVICE" --out "$OUT" 2>&1 | tee -a "$LOG"
  echo "cost part: exit ${PIPESTATUS[0]}, $((SECONDS - started)) s since start" | tee -a "$LOG"
fi
timeout "$QUALITY_S" python3 benchmarks/run.py --part quality --device "$DEVICE" --out "$OUT" --preset "$PRESET" \
  --data "$DATA" --work "$WORK" --centers "$CENTER" --seeds 0 --sweep-centers none \
  --pretrain-epochs "${PRETRAIN_EPOCHS:-12}" --adapt-epochs "${ADAPT_EPOCHS:-10}" \
  --note "paper scale cut to a 10-minute GPU lease: ${PRETRAIN_EPOCHS:-12} pretraining epochs (the preset: 300), ${ADAPT_EPOCHS:-10} adaptation epochs (100), $CASES cases per center, TF32" \
  2>&1 | tee -a "$LOG"
echo "quality part: exit ${PIPESTATUS[0]}, $((SECONDS - started)) s since start" | tee -a "$LOG"
