#!/usr/bin/env bash
# The cpu preset's loss and budget recipes (benchmarks/candidates.py RECIPES) side by side on one
# GPU: one process per recipe, each pretraining a base without the held-out center on the default
# synthetic data and measuring its old-center DSCagg (per class) and transformer reliance. The
# quality figures do not depend on the device; 2 CPU cores would need two hours for the sweep.
# Writes $OUT/recipes.json, $OUT/log.txt and $OUT/<recipe>.log.
#
#   bash benchmarks/gpu_recipes.sh            # every recipe, about 6 minutes on one H200
#
# MONAI and nibabel wheels in .whl/ where the machine lacks them (benchmarks/gpu_common.sh).
# Rehearsal on a CPU: DEVICE=cpu CASES=3 ONLY=cpu-w1-5-ep18 CAP_S=300 bash benchmarks/gpu_recipes.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu/recipes}
CENTER=${CENTER:-MDA}
CASES=${CASES:-16}
DATA=${DATA:-/tmp/centerprompt-synth}
WORK=${WORK:-/tmp/centerprompt-recipes}
CAP_S=${CAP_S:-420}
THREADS=${THREADS:-1}
source benchmarks/gpu_common.sh
gpu_python_path benchmarks
[ "${DEVICE:-cuda}" = cpu ] && export CUDA_VISIBLE_DEVICES=""
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; nproc; python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$LOG"

started=$SECONDS
gpu_synth
echo "synthetic data: $((SECONDS - started)) s" | tee -a "$LOG"
# The split once, before the processes start, so that none of them races to write it.
python3 -c "from pathlib import Path; from centerprompt.runs.selection import load_index; load_index(Path('$DATA'), seed=0)" >/dev/null 2>&1

names=${ONLY:-$(python3 -c "import candidates; print(' '.join(candidates.RECIPES))")}
for name in ${names//,/ }; do
  timeout "$CAP_S" python3 benchmarks/candidates.py --data "$DATA" --work "$WORK/$name" --center "$CENTER" --only "$name" \
    > "$OUT/$name.log" 2>&1 &
done
wait
echo "recipes: $((SECONDS - started)) s" | tee -a "$LOG"
python3 - "$WORK" "$OUT/recipes.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
rows = [r for f in sorted(Path(sys.argv[1]).glob("*/candidates.json")) for r in json.loads(f.read_text())]
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
for r in rows:
    print(f"{r['name']:24s} epochs {r['epochs']:3d} (best {r['best_epoch']:3d}) pretrain {r['pretrain_s']:5.0f} s  "
          f"old DSCagg {r['old_dsc_agg']:.3f} (GTVp {r['per_class']['gtvp']:.3f}, GTVn {r['per_class']['gtvn']:.3f})  reliance {r['reliance']:.3f}")
PY
