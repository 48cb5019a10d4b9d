#!/usr/bin/env bash
# The measured prompt-bank run quoted in the README: one frozen base model (the demo's, pretrained
# without MDA), deep prompts (P=10, 8 shots) for MDA and three old centers, routing keys from each
# center's training cases, then a test set mixing all seven centers (HMR, CHUP and CHUS have no
# entry: they test the fallback). Needs `make demo` first.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DATA=${DATA:-data/synth}
DEMO=${DEMO:-runs/demo/full}
BASE=${BASE:-$DEMO/pretrain/model.safetensors}
WORK=${WORK:-runs/bank}
mkdir -p "$WORK"
for C in CHUM CHUV HGJ; do
  [ -f "$WORK/adapt_$C/adapter.safetensors" ] || \
    "$BIN/centerprompt" adapt --data "$DATA" --center "$C" --base "$BASE" --strategy deep --num-prompts 10 --shots 8 \
      --out "$WORK/adapt_$C" --resume
done
rm -rf "$WORK/bank"
"$BIN/centerprompt" bank add --bank "$WORK/bank" --center MDA --adapter "$DEMO/adapt/deep/adapter.safetensors" \
  --data "$DATA" --base "$BASE"
for C in CHUM CHUV HGJ; do
  "$BIN/centerprompt" bank add --bank "$WORK/bank" --center "$C" --adapter "$WORK/adapt_$C/adapter.safetensors" \
    --data "$DATA" --base "$BASE"
done
"$BIN/centerprompt" bank list --bank "$WORK/bank"
"$BIN/centerprompt" bank evaluate --bank "$WORK/bank" --base "$BASE" --data "$DATA" --single-center MDA \
  --out "$WORK/eval"
