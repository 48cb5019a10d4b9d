# Shared by the gpu_*.sh scripts (sourced, after `cd` to the repository root): the Python path on a
# bare GPU machine, the synthetic data made there, and the run folders' JSON packed for the way back.

# MONAI and nibabel are pure Python: where the machine lacks them, install their wheels from .whl/
# (pip download --no-deps monai==1.6.1 nibabel -d .whl; carry that folder). Then src/ (and $1).
gpu_python_path() {
  if ! python3 -c "import monai, nibabel" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="src${1:+:$1}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
}

# The default synthetic data in $DATA ($CASES per center): one process per center (cases are
# independent), then one pass that writes dataset.json; kept when $DATA already holds it.
gpu_synth() {
  [ -f "$DATA/dataset.json" ] && return 0
  synth() { python3 -c "import sys; from centerprompt.data.synthetic.writer import generate_dataset as g; g(sys.argv[1], centers=sys.argv[2].split(',') if sys.argv[2] else None, cases_per_center=int(sys.argv[3]), progress=False)" "$DATA" "$1" "$CASES"; }
  for c in CHUM CHUP CHUS CHUV HGJ HMR MDA; do synth "$c" & done; wait
  synth "" >/dev/null 2>&1
}

# Every run folder's JSON under $WORK into $OUT/runs.tgz (no weights): what a cut-short run leaves.
gpu_pack() { tar czf "$OUT/runs.tgz" -C "$WORK" $(cd "$WORK" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \) | sort) 2>/dev/null || true; }
