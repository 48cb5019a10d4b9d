#!/usr/bin/env bash
# The quality protocol of the cpu preset (3 held-out centers x 2 seeds with the in-domain oracle;
# shots and prompt-count sweeps) on one GPU machine, bases, oracles and experiments in parallel
# processes (benchmarks/run.py --jobs). The figures do not depend on the device (the same code,
# the same data, the same seeds); 2 CPU cores would need hours (twelve 40-epoch pretrainings of
# about 14 min each). Writes $OUT/results.json,
# $OUT/RESULTS.md, $OUT/log.txt and $OUT/runs.tgz (every run folder's JSON, no weights).
#
#   bash benchmarks/gpu_quality.sh     # 332 s on one H200 with 16 cores (2026-11-30)
#
# MONAI and nibabel wheels in .whl/ where the machine lacks them (benchmarks/gpu_common.sh).
# Rehearsal on a CPU: DEVICE=cpu PRESET=tiny JOBS=2 CENTERS=MDA,CHUM SWEEP=MDA EPOCHS="--pretrain-epochs 1 --adapt-epochs 1"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu/quality}
PRESET=${PRESET:-cpu}
CENTERS=${CENTERS:-MDA,CHUM,HGJ}
SWEEP=${SWEEP:-MDA,CHUM}
JOBS=${JOBS:-16}
CASES=${CASES:-16}
DATA=${DATA:-/tmp/centerprompt-synth}
WORK=${WORK:-/tmp/centerprompt-quality}
CAP_S=${CAP_S:-480}
source benchmarks/gpu_common.sh
gpu_python_path
[ "${DEVICE:-cuda}" = cpu ] && export CUDA_VISIBLE_DEVICES=""
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
trap gpu_pack EXIT
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; echo "cores: $(nproc)"; python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$LOG"

started=$SECONDS
gpu_synth
echo "synthetic data: $((SECONDS - started)) s" | tee -a "$LOG"
# shellcheck disable=SC2086
timeout "$CAP_S" python3 benchmarks/run.py --part quality --preset "$PRESET" --data "$DATA" --work "$WORK" --out "$OUT" \
  --centers "$CENTERS" --seeds 0,1 --sweep-centers "$SWEEP" --jobs "$JOBS" ${EPOCHS:-} \
  --note "run on a GPU machine ($JOBS processes side by side); the quality figures do not depend on the device" 2>&1 \
  | grep -v -E "it/s\]|s/it\]|case/s\]" | tee -a "$LOG"
echo "quality part: exit ${PIPESTATUS[0]}, $((SECONDS - started)) s since start" | tee -a "$LOG"
