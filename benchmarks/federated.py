"""Federated against centralised training on the default synthetic data and preset (Flower simulation).

Pretraining: the six centers other than MDA as six Flower clients (FedAvg, one local epoch per
round, the preset's epochs as rounds, the same loss, optimiser and split), against the centralised
base of ``centerprompt pretrain --exclude-center MDA`` (``--central``, e.g. the demo's); both scored
on the old centers' test cases. Adaptation: a base pretrained federated without MDA and HGJ
(five clients), then deep prompts for MDA and HGJ trained together (only prompts exchanged)
against each center adapting alone (``centerprompt adapt``), scored on each center's test cases.
Finished runs are reused. Writes ``OUT/federated.json``.

    python benchmarks/federated.py --data data/synth --work runs/federated --central runs/demo/full/pretrain
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path
from typing import Any

from centerprompt.artifacts import build_adapted_model
from centerprompt.config import AdaptRun
from centerprompt.data.hecktor import leave_one_center_out
from centerprompt.evaluate import aggregate
from centerprompt.experiment import machine_info
from centerprompt.federated.flower import simulate
from centerprompt.federated.site import FederatedJob
from centerprompt.files import write_json
from centerprompt.jobs import adapt, base_preprocess, load_index
from centerprompt.presets import get_preset
from centerprompt.scoring import Scorer

NEW, PAIR = "MDA", ("MDA", "HGJ")
PRESET = get_preset("cpu")
ROUNDS = PRESET.pretrain_epochs  # one local epoch per round: the centralised run's epoch budget


def _dsc(model: Any, cases: list[Any], preprocess: Any) -> dict[str, float]:
    return aggregate(Scorer(cases, preprocess).score(model, progress=False))["overall"]["dsc_agg"]


def _rounds(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(data: Path, work: Path, central: Path, seed: int = 0, adaptation: bool = True) -> dict[str, Any]:
    cases, splits = load_index(data, seed=seed)
    centers = sorted(splits)
    old_test = [cases[i] for i in leave_one_center_out(splits, NEW, shots=0, seed=seed).old_test]

    # Pretraining: six clients against the centralised base.
    fed = simulate(FederatedJob(job="pretrain", rounds=ROUNDS, seed=seed), data, [c for c in centers if c != NEW],
                   work / "pretrain6")
    pre = {}
    for name, folder in (("centralised", central), ("federated", work / "pretrain6")):
        model = build_adapted_model(folder / "model.safetensors")
        pre[name] = _dsc(model, old_test, base_preprocess(folder / "model.safetensors"))
    central_summary = json.loads((central / "summary.json").read_text())
    rounds = _rounds(work / "pretrain6")
    pretraining = {
        "sites": fed["site_names"], "rounds": fed["rounds_run"], "federated_seconds": fed["server_seconds"],
        "centralised_seconds": central_summary["train_seconds"], "centralised_epochs": central_summary["epochs_run"],
        "centralised_best_epoch": central_summary["best_epoch"], "old_dsc_agg": pre,
        "bytes_per_site_per_round": rounds[-1]["bytes_per_site"][0], "val_dsc_agg_by_round": [r["val_dsc_agg"] for r in rounds],
    }  # fmt: skip

    result = {"date": date.today().isoformat(), "machine": machine_info(), "seed": seed, "data": str(data),
              "command": f"python benchmarks/federated.py --data {data} --work {work} --central {central}"
                         + ("" if adaptation else " --no-adaptation"),
              "pretraining": pretraining, "adaptation": None}  # fmt: skip
    if not adaptation:
        return result

    # Adaptation: two new centers on a base that saw neither.
    simulate(FederatedJob(job="pretrain", rounds=ROUNDS, seed=seed), data, [c for c in centers if c not in PAIR], work / "pretrain5")
    base = work / "pretrain5" / "model.safetensors"
    joint_job = FederatedJob(job="adapt", base=str(base.resolve()), strategy="deep", rounds=PRESET.adapt_epochs, seed=seed)
    joint = simulate(joint_job, data, list(PAIR), work / "adapt_joint")
    adapters = {"base": None, "joint (federated)": Path(joint["artifact"])}
    for center in PAIR:
        alone = adapt(AdaptRun(data_dir=data, center=center, base=base, out=work / f"adapt_{center}", strategy="deep",
                               seed=seed, resume=True, progress=False))  # fmt: skip
        adapters[f"{center} alone"] = Path(alone["artifact"])
    preprocess = base_preprocess(base)
    scores: dict[str, dict[str, Any]] = {}
    for name, adapter in adapters.items():
        model = build_adapted_model(base, adapter)
        scores[name] = {c: _dsc(model, [cases[i] for i in leave_one_center_out(splits, c, shots=8, seed=seed).new_test],
                                preprocess) for c in PAIR}  # fmt: skip
    adapted = {"centers": list(PAIR), "rounds": joint["rounds_run"], "scores": scores,
               "bytes_per_site_per_round": _rounds(work / "adapt_joint")[-1]["bytes_per_site"][0],
               "federated_seconds": joint["server_seconds"]}  # fmt: skip
    return {**result, "adaptation": adapted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--work", type=Path, default=Path("runs/federated"))
    parser.add_argument("--central", type=Path, default=Path("runs/demo/full/pretrain"),
                        help="run folder of the centralised base without MDA (centerprompt pretrain or the demo's)")
    parser.add_argument("--no-adaptation", action="store_true", help="the pretraining comparison only")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "federated")
    args = parser.parse_args()
    result = run(args.data, args.work, args.central, adaptation=not args.no_adaptation)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out / "federated.json")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
