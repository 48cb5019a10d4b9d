#!/usr/bin/env bash
# Profile one pretraining epoch and one deep-prompt adaptation of the cpu preset with py-spy (sampling
# at 100 Hz, native frames off), for the code in SRC (default: this checkout), and sum the samples
# by phase (benchmarks/profile_stacks.py). Needs `pip install py-spy` and data/synth.
# Usage: SRC=/path/to/checkout/src OUT=benchmarks/profile/after bash benchmarks/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SRC:-src}
OUT=${OUT:-benchmarks/profile/after}
WORK=${WORK:-runs/profile}
DATA=${DATA:-data/synth}
mkdir -p "$OUT"
rm -rf "$WORK"
run() { PYTHONPATH="$SRC" py-spy record --rate 100 --format raw -o "$OUT/$1.txt" -- \
          python -c "import sys; from centerprompt.cli import main; sys.exit(main(sys.argv[1:]))" "${@:2}"; }
start=$(date +%s)
run pretrain-1-epoch pretrain --data "$DATA" --exclude-center MDA --out "$WORK/base" --epochs 1
mid=$(date +%s)
run adapt-deep adapt --data "$DATA" --center MDA --base "$WORK/base/model.safetensors" --strategy deep \
    --out "$WORK/deep"
end=$(date +%s)
echo "pretrain (1 epoch, with caching and checks): $((mid - start)) s; adapt deep: $((end - mid)) s" | tee "$OUT/wall.txt"
gzip -9f "$OUT"/pretrain-1-epoch.txt "$OUT"/adapt-deep.txt  # raw stacks: 5 MB each as text
python benchmarks/profile_stacks.py "$OUT"/pretrain-1-epoch.txt.gz "$OUT"/adapt-deep.txt.gz | tee "$OUT/phases.md"
