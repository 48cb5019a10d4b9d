"""Routing's abstention measured leave-one-center-out: how many held-out scans of banked centers go
home, how many scans of an unbanked center fall back, at several nominal false-fallback rates.

For each center (or acquisition group) in turn left out of the bank, every other center is banked
with a key from its training cases (as ``bank add`` builds it); their validation and test scans
should route home, and every scan of the left-out center should fall back to the base model. On
the factorial centers, POL shares CHUS's acquisition and ACQPOL ACQ's (they differ in contouring
only, by construction): an acquisition fingerprint cannot tell them apart, so each pair counts as
one acquisition (one of them banked, the pair left out together). Writes
benchmarks/bank/routing_calibration.json.

    python benchmarks/routing_calibration.py --data data/synth --data data/factorial
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from centerprompt.bank.acquisition import acquisition_features
from centerprompt.bank.routing import FALSE_FALLBACK, RoutingKey, false_fallback_threshold, route_features
from centerprompt.files import write_json
from centerprompt.runs.selection import load_index
from centerprompt.study.experiment import machine_info

HERE = Path(__file__).resolve().parent
RATES = (0.05, 0.01, 0.001, 0.0001)
TWINS = {"POL": "CHUS", "ACQPOL": "ACQ"}  # benchmarks/factorial_centers.yaml: same acquisition as their base


def study(data: Path, rates: tuple[float, ...] = RATES) -> dict[str, Any]:
    """Home and fallback rates over leave-one-acquisition-out folds of the centers in ``data``."""
    cases, splits = load_index(data, check=False)
    fingerprint = {i: acquisition_features(c.ct, c.pet) for i, c in cases.items()}
    group = lambda c: TWINS.get(c, c)  # noqa: E731
    keys = {c: RoutingKey.from_features(np.stack([fingerprint[i] for i in splits[c]["train"]])) for c in splits}
    result: dict[str, Any] = {"data": str(data), "centers": sorted(splits), "groups": {c: group(c) for c in splits},
                              "key_cases": {c: len(splits[c]["train"]) for c in splits}, "rates": {}}  # fmt: skip
    for rate in rates:
        home, fallback, wrong, distinct, nearest, own = [], [], 0, set(), [], []
        for left_out in sorted({group(c) for c in splits}):
            banked: dict[str, str] = {}
            for c in sorted(splits):  # one center per acquisition: the pair's first name
                if group(c) != left_out:
                    banked.setdefault(group(c), c)
            bank = {c: keys[c] for c in banked.values()}
            for c in bank:
                held_out = splits[c]["val"] + splits[c]["test"]
                routes = [route_features(fingerprint[i], bank, rate) for i in held_out]
                home += [r.center == c for r in routes]
                own += [keys[c].distance(fingerprint[i]) for i in held_out]
                distinct.update(held_out)
            for c in (c for c in splits if group(c) == left_out):
                routes = [route_features(fingerprint[i], bank, rate) for ids in splits[c].values() for i in ids]
                fallback += [r.fallback for r in routes]
                wrong += sum(not r.fallback for r in routes)
                nearest += [r.distance for r in routes]
        result["rates"][str(rate)] = {"home": float(np.mean(home)), "home_routings": len(home),
                                      "home_scans": len(distinct),
                                      "fallback": float(np.mean(fallback)), "fallback_scans": len(fallback),
                                      "unbanked_to_a_center": wrong, "unbanked_nearest_distance": float(min(nearest)),
                                      "home_largest_distance": float(max(own)), "threshold": false_fallback_threshold(rate)}  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, action="append", required=True, help="a folder of centers (repeatable)")
    p.add_argument("--out", type=Path, default=HERE / "bank" / "routing_calibration.json")
    args = p.parse_args(argv)
    studies = [study(d) for d in args.data]
    for s in studies:
        for rate, r in s["rates"].items():
            print(f"{s['data']}: nominal {rate}: home {r['home']:.1%} of {r['home_routings']} routings "
                  f"({r['home_scans']} scans, each in every fold that banks its center), "
                  f"fallback {r['fallback']:.1%} of {r['fallback_scans']} (threshold {r['threshold']:.1f}, largest own "
                  f"distance {r['home_largest_distance']:.1f}, nearest unbanked {r['unbanked_nearest_distance']:.1f})")
    write_json({"default_false_fallback": FALSE_FALLBACK, "studies": studies,
                "command": "python benchmarks/routing_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": date.today().isoformat(), "machine": machine_info()}, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
