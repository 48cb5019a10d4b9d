"""Federated against centralised training on the synthetic data and the default preset (Flower simulation).

``--part pretraining``: the six centers other than MDA as six Flower clients (FedAvg weighted by
case count; ``--local-epochs`` per round, by default as many rounds as the preset has epochs divided
by the local epochs, so that it passes over the data as often as centralised training may), against
the centralised base of ``centerprompt pretrain --exclude-center MDA`` (``--central``, e.g. the
demo's); both scored on the old centers' test cases.

``--part adaptation``: two new centers, USZ and CHB (profiles in federated/new_centers.yaml, written
to ``--new-data``, a folder of their own), join the centralised base, which saw neither. For deep
prompts and deep+head: one adapter trained by the two sites together (Flower; only the trainable
tensors travel), each center adapting alone (``centerprompt adapt``), and the two centers' cases
pooled on one machine (``centerprompt adapt --center USZ,CHB``: the centralised result), each scored
on each center's test cases. Every adaptation uses each center's same 8 shots and validation cases.

Finished runs are reused. Writes the part into ``OUT/federated.json`` (the other part is kept).

    python benchmarks/federated.py --part adaptation --central runs/base6
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path
from typing import Any

from centerprompt.artifacts import build_adapted_model
from centerprompt.training.config import AdaptRun
from centerprompt.data.hecktor import leave_one_center_out
from centerprompt.data.synthetic.writer import generate_dataset
from centerprompt.data.synthetic.profiles import load_profiles
from centerprompt.evaluate import aggregate
from centerprompt.study.experiment import machine_info
from centerprompt.study.intervals import dsc_interval, paired_difference
from centerprompt.federated.flower import simulate
from centerprompt.federated.site import FederatedJob
from centerprompt.files import write_json
from centerprompt.runs.adapt import adapt
from centerprompt.runs.base import base_preprocess, open_base
from centerprompt.runs.selection import load_index, split_defaults
from centerprompt.training.presets import get_preset
from centerprompt.scoring import Scorer

HERE = Path(__file__).resolve().parent
NEW, PAIR, SHOTS = "MDA", ("USZ", "CHB"), 8
STRATEGIES = ("deep", "deep+head")
PRESET = get_preset("cpu")
# What a pretraining run may change at the sites beyond rounds x local epochs (FederatedJob fields, flags alike).
RECIPE = ("local_steps", "sites_per_round", "batch_size", "lr", "mu")


def _dsc(model: Any, cases: list[Any], preprocess: Any) -> dict[str, float]:
    return aggregate(_scored(model, cases, preprocess))["overall"]["dsc_agg"]


def _scored(model: Any, cases: list[Any], preprocess: Any) -> list[dict[str, Any]]:
    return Scorer(cases, preprocess).score(model, progress=False)


def _rounds(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sites(splits: dict[str, Any]) -> list[str]:
    """The pretraining sites: every center of the split but the new one."""
    return [c for c in sorted(splits) if c != NEW]


def _compared(models: dict[str, Path], cases: list[Any]) -> dict[str, Any]:
    """Each model's DSCagg on ``cases`` with its bootstrap interval, and the paired difference
    federated - centralised (the same resamples for both)."""
    scored = {name: _scored(build_adapted_model(path), cases, base_preprocess(path)) for name, path in models.items()}
    return {**{name: {"old_dsc_agg": aggregate(s)["overall"]["dsc_agg"], "interval": dsc_interval(s)}
               for name, s in scored.items()},
            "difference": paired_difference(scored["centralised"], scored["federated"])}  # fmt: skip


def pretraining(data: Path, work: Path, central: Path, job: FederatedJob, fresh: Path | None = None) -> dict[str, Any]:
    """Federated pretraining ``job`` over the six old centers against the centralised base ``central``,
    both scored on the old centers' test cases: DSCagg with bootstrap intervals and the paired
    difference federated - centralised. ``fresh``: a folder of new patients of the same centers
    (``centerprompt synth --seed 1``), where both are scored again with tighter intervals."""
    cases, splits = load_index(data, seed=job.seed)
    old_test = [cases[i] for i in leave_one_center_out(splits, NEW, shots=0, seed=job.seed).old_test]
    sites = _sites(splits)
    server = "" if job.server_optimizer == "fedavg" else f"_{job.server_optimizer}{job.server_lr or ''}m{job.server_momentum}"
    steps = "".join(f"{tag}{getattr(job, k):g}" for k, tag in zip(RECIPE, ("s", "k", "b", "lr", "mu")) if getattr(job, k))
    out = work / f"pretrain6_{job.rounds}x{job.local_epochs}{steps}{server}"
    fed = simulate(job, data, sites, out)
    summary = json.loads((central / "summary.json").read_text())
    models = {"centralised": central / "model.safetensors", "federated": out / "model.safetensors"}
    test = _compared(models, old_test)
    result = {
        "sites": fed["site_names"], "test_cases": len(old_test),
        "centralised": {"seconds": summary["train_seconds"], "epochs": summary["epochs_run"],
                        "best_epoch": summary["best_epoch"], "folder": str(central), **test["centralised"]},
        "federated": {"local_epochs": job.local_epochs, **{k: getattr(job, k) for k in RECIPE}, "rounds": fed["rounds_run"],
                      "kept_round": fed.get("kept_round"), "seconds": fed["server_seconds"],
                      "server_optimizer": job.server_optimizer, "server_lr": job.server_lr,
                      "server_momentum": job.server_momentum, "folder": str(out), **test["federated"],
                      "bytes_per_site_per_round": _rounds(out)[-1]["bytes_per_site"][0],
                      "val_dsc_agg_by_round": [r["val_dsc_agg"] for r in _rounds(out)]},
        "difference": test["difference"],
    }  # fmt: skip
    if fresh is not None:
        fresh_cases = [c for c in load_index(fresh, seed=job.seed)[0].values() if c.center in sites]
        result["fresh_test"] = {"folder": str(fresh), "cases": len(fresh_cases), **_compared(models, fresh_cases)}
    return result


def new_centers(folder: Path, seed: int = 0) -> Path:
    """USZ and CHB, 16 cases each, in a folder of their own (kept when already written)."""
    profiles = load_profiles(HERE / "federated" / "new_centers.yaml")
    return generate_dataset(folder, centers=list(PAIR), profiles=profiles, seed=seed, progress=False)


def adaptation(new_data: Path, work: Path, central: Path, seed: int = 0) -> dict[str, Any]:
    """Two new centers on ``central``: together over Flower, each alone, and pooled."""
    base_file = (central / "model.safetensors").resolve()
    base = open_base(base_file)
    cases, splits = load_index(new_data, seed=seed, split_defaults=split_defaults(base, None))
    test = {c: [cases[i] for i in leave_one_center_out(splits, c, shots=SHOTS, seed=seed).new_test] for c in PAIR}
    preprocess = base_preprocess(base_file)
    result: dict[str, Any] = {"centers": list(PAIR), "shots": SHOTS, "base": str(central),
                              "test_cases": {c: len(test[c]) for c in PAIR}, "strategies": {}}  # fmt: skip
    for strategy in STRATEGIES:
        tag = strategy.replace("+", "_")
        job = FederatedJob(job="adapt", base=str(base_file), strategy=strategy, rounds=PRESET.adapt_epochs,
                           shots=SHOTS, seed=seed)  # fmt: skip
        joint = simulate(job, new_data, list(PAIR), work / f"joint_{tag}")
        runs = {"base": (None, 0.0), "joint (federated)": (Path(joint["artifact"]), joint["server_seconds"])}
        for name, center in [*((f"{c} alone", c) for c in PAIR), ("pooled (centralised)", ",".join(PAIR))]:
            folder = work / f"{name.split()[0]}_{tag}"
            done = adapt(AdaptRun(data_dir=new_data, center=center, base=base_file, out=folder, strategy=strategy,
                                  shots=SHOTS, seed=seed, resume=True, progress=False))  # fmt: skip
            runs[name] = (Path(done["artifact"]), done["train_seconds"])
        scores = {}
        for name, (adapter, _) in runs.items():
            model = build_adapted_model(base_file, adapter)
            scores[name] = {c: _dsc(model, test[c], preprocess) for c in PAIR}
        result["strategies"][strategy] = {
            "rounds": joint["rounds_run"], "bytes_per_site_per_round": _rounds(work / f"joint_{tag}")[-1]["bytes_per_site"][0],
            "seconds": {name: seconds for name, (_, seconds) in runs.items()}, "scores": scores,
        }  # fmt: skip
    return result


def _setting(entry: dict[str, Any]) -> tuple[int, int, str, float, float, int, int, float, int, float]:
    fed = entry["federated"]
    return (fed["local_epochs"], fed["rounds"], fed.get("server_optimizer", "fedavg"), fed.get("server_lr") or 1.0,
            fed.get("server_momentum", 0.0), fed.get("local_steps", 0), fed.get("batch_size") or PRESET.batch_size,
            fed.get("lr") or PRESET.pretrain_lr, fed.get("sites_per_round", 0), fed.get("mu") or 0.0)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("pretraining", "adaptation"), required=True)
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--new-data", type=Path, default=Path("data/synth-new"), help="USZ and CHB (written if absent)")
    parser.add_argument("--work", type=Path, default=Path("runs/federated"))
    parser.add_argument("--central", type=Path, default=Path("runs/demo/full/pretrain"),
                        help="run folder of the centralised base without MDA (centerprompt pretrain or the demo's)")
    parser.add_argument("--local-epochs", type=int, default=1, help="pretraining: local epochs per round")
    parser.add_argument("--rounds", type=int, help="pretraining: rounds (default: the preset's epochs / local epochs)")
    parser.add_argument("--local-steps", type=int, default=0, help="pretraining: a site's optimiser steps per round (0: its epochs)")
    parser.add_argument("--sites-per-round", type=int, default=0,
                        help="pretraining: sites that train a round, in turn (1: cyclic; default 0: all)")
    parser.add_argument("--batch-size", type=int, help="pretraining: a site's batch size (default: the preset's)")
    parser.add_argument("--lr", type=float, help="pretraining: the sites' learning rate (default: the preset's)")
    parser.add_argument("--mu", type=float, default=0.0, help="pretraining: FedProx's proximal weight at the sites (0: none)")
    parser.add_argument("--server-optimizer", default="fedavg", help="pretraining: fedavg, fedavgm, fedadam or fedyogi")
    parser.add_argument("--server-lr", type=float, help="pretraining: the server optimiser's rate")
    parser.add_argument("--server-momentum", type=float, default=0.0, help="pretraining: the server optimiser's momentum")
    parser.add_argument("--fresh-test", type=Path, help="pretraining: also score both models on every case of this "
                        "folder of new patients of the same centers (e.g. centerprompt synth --seed 1)")
    parser.add_argument("--note", default="", help="how the machine was during the run (stored with the part)")
    parser.add_argument("--out", type=Path, default=HERE / "federated")
    args = parser.parse_args()
    command = f"python benchmarks/federated.py --part {args.part} --central {args.central} --work {args.work}"
    if args.part == "pretraining":
        sites = len(_sites(load_index(args.data, seed=0)[1]))
        turns = -(-sites // args.sites_per_round) if args.sites_per_round else 1  # rounds that pass once over every site
        rounds = args.rounds or PRESET.pretrain_epochs // args.local_epochs * turns
        job = FederatedJob(job="pretrain", rounds=rounds, local_epochs=args.local_epochs, local_steps=args.local_steps, seed=0,
                           server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                           server_momentum=args.server_momentum, batch_size=args.batch_size, lr=args.lr,
                           sites_per_round=args.sites_per_round, mu=args.mu)  # fmt: skip
        part = pretraining(args.data, args.work, args.central, job, args.fresh_test)
        command += f" --data {args.data} --local-epochs {args.local_epochs}" + (f" --rounds {rounds}" if args.rounds else "")
        command += f" --fresh-test {args.fresh_test}" if args.fresh_test else ""
        command += "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in RECIPE if getattr(args, k))
        if args.server_optimizer != "fedavg":
            command += f" --server-optimizer {args.server_optimizer} --server-momentum {args.server_momentum}" + \
                (f" --server-lr {args.server_lr}" if args.server_lr is not None else "")
    else:
        part = adaptation(new_centers(args.new_data), args.work, args.central)
        command += f" --new-data {args.new_data}"
    part.update(date=date.today().isoformat(), machine=machine_info(), seed=0, command=command, note=args.note)
    path = args.out / "federated.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    if args.part == "pretraining":  # one entry per (local epochs, rounds)
        runs = [r for r in stored.get("pretraining", []) if _setting(r) != _setting(part)]
        stored["pretraining"] = sorted([*runs, part], key=_setting)
    else:
        stored["adaptation"] = part
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(stored, path)
    print(json.dumps(part, indent=1))


if __name__ == "__main__":
    main()
