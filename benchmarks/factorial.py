"""Which strategy adapts a frozen base to a new center, measured on centers that differ by one thing.

    python benchmarks/factorial.py [--out runs/factorial] [--centers ACQ,POL,ACQPOL] [--seeds 0,1]
    # the same centers on a prompt-aware base (pretrain --center-prompts 10), summary beside the first:
    python benchmarks/factorial.py --base runs/pa/pretrain/model.safetensors --out runs/factorial-aware \
        --strategies none,full,deep,deep+head,norm --summary benchmarks/factorial_aware.json

The new centers (benchmarks/factorial_centers.yaml) change acquisition only (ACQ), contouring
only (POL), or both (ACQPOL); each has 40 patients, so 26 test cases after 8 adaptation and 6
validation cases. One base serves every new center: pretrained on CHUM, CHUP, CHUS, CHUV, HGJ and
HMR of the default synthetic data (the demo's base; made here if missing), which never saw MDA's
contouring nor the new centers. Every (center, seed) is one ``run_experiment`` folder, reused
when finished, so the protocol resumes where it stopped and runs one held-out center at a time.
Gains and old-center changes carry paired bootstrap 95% intervals over test cases
(``centerprompt.study.intervals``); the summary pools the (center, seed) pairs by resampling within each.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROFILES = HERE / "factorial_centers.yaml"
NEW_CENTERS = ("ACQ", "POL", "ACQPOL")
NEW_CASES = 40
STRATEGIES = ("none", "full", "head", "deep", "deep+head", "norm", "deep+norm", "image")


def make_data(data: Path, base_data: Path) -> None:
    """The default centers (16 patients each, as the demo's) and the new centers (40 each) in one folder."""
    cases = ",".join(f"{c}={NEW_CASES}" for c in NEW_CENTERS)
    for folder in (base_data, data):
        extra = ["--profiles", str(PROFILES), "--cases", cases] if folder == data else []
        subprocess.run(["centerprompt", "synth", "--out", str(folder), *extra], check=True)


def make_base(base_data: Path, out: Path) -> Path:
    """The demo's base: every weight trained on the default centers but MDA (reused when finished)."""
    from centerprompt.training.config import PretrainRun
    from centerprompt.runs.pretrain import pretrain

    pretrain(PretrainRun(data_dir=base_data, out=out, exclude_center="MDA", resume=True, progress=False),
             on_change="rerun")  # fmt: skip
    return out / "model.safetensors"


def run(data: Path, base: Path, out: Path, centers: list[str], seeds: list[int], strategies: list[str]) -> None:
    from centerprompt.training.config import ExperimentRun
    from centerprompt.study.experiment import run_experiment

    for center in centers:
        for seed in seeds:
            folder = out / center / f"seed{seed}"
            if (folder / "results.json").exists():
                continue
            print(f"factorial: {center} seed {seed}", file=sys.stderr, flush=True)
            run_experiment(ExperimentRun(data_dir=data, new_center=center, out=folder, strategies=tuple(strategies),
                                         base=base, seed=seed, progress=False,
                                         command=" ".join(sys.argv)))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/factorial"))
    parser.add_argument("--data", type=Path, default=Path("data/factorial"))
    parser.add_argument("--base-data", type=Path, default=Path("data/synth"))
    parser.add_argument("--base", type=Path, default=None, help="base checkpoint (default: pretrain the demo's)")
    parser.add_argument("--centers", default=",".join(NEW_CENTERS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--summary", type=Path, default=HERE / "factorial.json", help="pooled results (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (args.data / "dataset.json").exists() or not (args.base_data / "dataset.json").exists():
        make_data(args.data, args.base_data)
    base = args.base or make_base(args.base_data, args.out / "base")
    centers, seeds = args.centers.split(","), [int(s) for s in args.seeds.split(",")]
    run(args.data, base, args.out, centers, seeds, args.strategies.split(","))
    from centerprompt.study.experiment import add_served_from_bank
    from centerprompt.study.intervals import add_intervals, pool_experiments
    from centerprompt.runs.selection import load_index

    experiments = {}
    for c in centers:
        for s in seeds:
            folder = args.out / c / f"seed{s}"
            results = json.loads((folder / "results.json").read_text())
            add_intervals(results)  # results written before intervals and routing existed get them too
            if "served" not in results["strategies"].get("full", {"served": 1}):
                add_served_from_bank(results, load_index(args.data, splits_file=folder / "splits.json")[0])
            experiments[f"{c}/seed{s}"] = results
    summary: dict[str, Any] = pool_experiments(experiments)
    summary["per_center"] = {c: pool_experiments({k: v for k, v in experiments.items() if k.startswith(c + "/")})["strategies"]
                             for c in centers}  # fmt: skip
    first = next(iter(experiments.values()))
    summary.update(command=" ".join(sys.argv), machine=first["machine"], date=first["date"], base=str(base),
                   new_test_cases={k: len(e["new_center_test_cases"]) for k, e in experiments.items()},
                   old_test_cases=len(first["old_center_test_cases"]),
                   base_dsc={k: {"new": e["strategies"]["none"]["new_center"]["dsc_agg"]["mean"],
                                 "old": e["strategies"]["none"]["old_centers"]["dsc_agg"]["mean"]}
                             for k, e in experiments.items()})  # fmt: skip
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"factorial: pooled results in {args.summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
