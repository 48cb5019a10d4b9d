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
# MONAI and nibabel wheels in .whl/ where the machine lacks them (see gpu_paper_scale.sh).
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
if ! python3 -c "import monai, nibabel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ "${DEVICE:-cuda}" = cpu ] && export CUDA_VISIBLE_DEVICES=""
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
pack() { tar czf "$OUT/runs.tgz" -C "$WORK" $(cd "$WORK" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \) | sort) 2>/dev/null || true; }
trap pack EXIT
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; echo "cores: $(nproc)"; python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$LOG"

started=$SECONDS
if [ ! -f "$DATA/dataset.json" ]; then  # one process per center (cases are independent), then dataset.json
  synth() { python3 -c "import sys; from centerprompt.data.synthetic import generate_dataset as g; g(sys.argv[1], centers=sys.argv[2].split(',') if sys.argv[2] else None, cases_per_center=int(sys.argv[3]), progress=False)" "$DATA" "$1" "$CASES"; }
  for c in CHUM CHUP CHUS CHUV HGJ HMR MDA; do synth "$c" & done; wait
  synth "" >/dev/null 2>&1
fi
echo "synthetic data: $((SECONDS - started)) s" | tee -a "$LOG"
# shellcheck disable=SC2086
timeout "$CAP_S" python3 benchmarks/run.py --part quality --preset "$PRESET" --data "$DATA" --work "$WORK" --out "$OUT" \
  --centers "$CENTERS" --seeds 0,1 --sweep-centers "$SWEEP" --jobs "$JOBS" ${EPOCHS:-} \
  --note "run on a GPU machine ($JOBS processes side by side); the quality figures do not depend on the device" 2>&1 \
  | grep -v -E "it/s\]|s/it\]|case/s\]" | tee -a "$LOG"
echo "quality part: exit ${PIPESTATUS[0]}, $((SECONDS - started)) s since start" | tee -a "$LOG"
