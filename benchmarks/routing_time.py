"""What automatic routing adds to prediction time: the acquisition fingerprint of a scan against
``centerprompt predict`` of the same scan (median over test scans); writes benchmarks/bank/routing_time.json.

    python benchmarks/routing_time.py [--base runs/demo/full/pretrain/model.safetensors] [--data data/synth]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=Path("runs/demo/full/pretrain/model.safetensors"))
    p.add_argument("--data", type=Path, default=Path("data/synth"))
    p.add_argument("--scans", type=int, default=9)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "bank" / "routing_time.json")
    args = p.parse_args(argv)

    from centerprompt.bank.acquisition import acquisition_features
    from centerprompt.study.experiment import machine_info
    from centerprompt.files import write_json
    from centerprompt.runs.selection import load_index
    from centerprompt.runs.base import open_base
    from centerprompt.runs.predict import AdaptedModel, predict

    cases, splits = load_index(args.data, check=False)
    pairs = [(cases[i].ct, cases[i].pet) for c in sorted(splits) for i in splits[c]["test"]][: args.scans]
    base = open_base(args.base)
    fingerprint_s, predict_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (ct, pet) in enumerate(pairs):
            started = time.perf_counter()
            acquisition_features(ct, pet)
            fingerprint_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            predict(AdaptedModel(base), [(ct, pet, Path(tmp) / f"{k}.nii.gz")], progress=False)
            predict_s.append(time.perf_counter() - started)
    result = {"scans": len(pairs), "fingerprint_s": statistics.median(fingerprint_s),
              "predict_s": statistics.median(predict_s),
              "ratio": statistics.median(fingerprint_s) / statistics.median(predict_s),
              "command": "python benchmarks/routing_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": date.today().isoformat(), "machine": machine_info()}  # fmt: skip
    write_json(result, args.out)
    print(f"fingerprint {result['fingerprint_s']:.3f} s, predict {result['predict_s']:.3f} s: {result['ratio']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
