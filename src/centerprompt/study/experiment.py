"""The paper's protocol for one held-out center: pretrain, adapt with each strategy, score.

Saeed et al. 2023 (arXiv 2305.18948): pretrain on all centers but one; adapt to the new center
with a few labelled cases; score on the new center's test cases and, with the adapted model
applied as it is, on the old centers' test cases (forgetting). Every stage is a run folder that
is reused when finished with the same provenance and resumed when interrupted, so rerunning the
command is cheap and never scores a stage trained for other settings or cases.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from centerprompt.artifacts import build_adapted_model, read_adapter_metadata
from centerprompt.data.hecktor import leave_one_center_out
from centerprompt.evaluate import aggregate
from centerprompt.files import write_json
from centerprompt.study.intervals import add_intervals, served_from_bank
from centerprompt.training.config import ExperimentRun, file_sha256
from centerprompt.runs.adapt import adapt
from centerprompt.runs.base import check_base_split, open_base
from centerprompt.runs.folder import keep_splits
from centerprompt.runs.selection import load_index, split_defaults
from centerprompt.runs.pretrain import pretrain
from centerprompt.study.reliance import transformer_reliance
from centerprompt.study.report import plot_case_slices, write_report
from centerprompt.scoring import Scorer
from centerprompt.strategies import BASE, ORACLE, get_strategy, is_prompt, parameter_report
from centerprompt.training.devices import default_device

logger = logging.getLogger(__name__)

WITHOUT_PROMPTS = ":no-prompts"  # attribution row: a prompt adapter scored with its prompts removed
# On a prompt-aware base (one prompt set per pretraining center), a prompt adapter's old-center
# scans are read with their own sets; this row reads them with the new center's prompts instead.
EVERYWHERE = ":everywhere"
MIN_GAP = 0.01  # below this oracle gap (DSCagg) a fraction of it closed is not reported: it is noise


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import monai

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return {"cpu": cpu, "cores": os.cpu_count(), "device": device, "python": platform.python_version(),
            "torch": torch.__version__, "monai": monai.__version__}  # fmt: skip


class PhaseClock:
    """Wall time of each phase of an experiment, in order, with what the run folders recorded of it
    (caching, training steps, validation, data waiting, checkpoints) for a stage trained now."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[dict[str, Any]]:
        row: dict[str, Any] = {"phase": phase, "seconds": 0.0, "detail": {}}
        started = time.perf_counter()
        try:
            yield row
        finally:
            row["seconds"] = time.perf_counter() - started
            self.rows.append(row)

    @staticmethod
    def trained(row: dict[str, Any], summary: dict[str, Any]) -> None:
        """After a training stage's phase: its own record (caching, steps, validation, data waiting,
        checkpoints) in the row, or that it was reused (a finished run folder: no training now)."""
        if summary.get("train_seconds", 0.0) > row["seconds"]:
            row["detail"] = {"reused": "a finished run of the same configuration"}
            return
        parts = {"caching": summary.get("cache_seconds"),
                 **{k.removesuffix("_s"): v for k, v in (summary.get("phase_seconds") or {}).items()}}  # fmt: skip
        row["detail"] = {k: round(v, 1) for k, v in parts.items() if v is not None}


def _summaries(results: list[dict[str, Any]]) -> dict[str, Any]:
    agg = aggregate(results)
    return {**agg["overall"], "per_center": agg["per_center"], "per_case": results}


def run_experiment(run: ExperimentRun) -> dict[str, Any]:
    """Run (or finish) the leave-one-center-out comparison; write results.json, results.md, figures.

    Every stage (pretraining, each adaptation, the oracle) is a run folder under ``run.out``,
    reused only when its saved configuration (settings, case lists, input checkpoint hash) equals
    what this run asks; otherwise it is trained again, or refused with ``on_change="refuse"``.
    Scores are always computed afresh.

    One split throughout: chosen once (``run.splits``, ``DATA/splits.json``, the given base's
    split, ``out/splits.json`` of an earlier run, or made with the seed), kept in
    ``out/splits.json`` and given to every stage, so pretraining, adaptation and scoring never
    disagree on which cases are test cases.
    """
    out, new_center = Path(run.out), run.new_center
    clock = PhaseClock()
    spec = run.base_spec
    given = open_base(spec) if spec is not None else None  # read once for every stage: assumptions logged once
    cases, splits = load_index(run.data_dir, skip_bad_cases=run.skip_bad_cases, seed=run.seed, cache_dir=out,
                               splits_file=run.splits, split_defaults=split_defaults(given, out))  # fmt: skip
    keep_splits(splits, out)
    loco = leave_one_center_out(splits, new_center, shots=run.shots, seed=run.seed)
    stages: dict[str, dict[str, Any]] = {}

    if given is None:
        pre = run.pretrain_run()
        with clock("pretraining") as row:
            summary = pretrain(pre, on_change=run.on_change)
        clock.trained(row, summary)
        stages["pretrain"] = {"dir": str(pre.out), "config_hash": summary["config_hash"]}
        ckpt = open_base(Path(pre.out) / "model.safetensors")
    else:
        ckpt = given
        check_base_split(ckpt, splits)
        stages["base"] = {"file": str(ckpt.path), "sha256": file_sha256(ckpt.weights)}
    base, preprocess = ckpt.path, ckpt.preprocess
    old_test = old_center_tests(loco.old_test, cases, ckpt.extra.get("train_centers"))
    # The oracle copies the base model's architecture and budget (a foreign checkpoint: the preset asked for).
    base_preset = ckpt.extra.get("preset", run.preset)
    device = default_device()
    with clock("caching the test cases"):
        new_scorer = Scorer([cases[i] for i in loco.new_test], preprocess, score_at=run.score_at)
        old_scorer = Scorer([cases[i] for i in old_test], preprocess, score_at=run.score_at)

    progress = run.progress

    def score(model: torch.nn.Module, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's summaries on the new center's and the old centers' test cases."""
        return (_summaries(new_scorer.score(model, desc=f"{label}: new center", progress=progress)),
                _summaries(old_scorer.score(model, desc=f"{label}: old centers", progress=progress)))  # fmt: skip

    base_model = build_adapted_model(ckpt).to(device)
    with clock("scoring none"):
        base_new, base_old = score(base_model, "base")
    with clock("transformer reliance"):
        reliance = transformer_reliance(base_model, old_scorer, intact_cases=base_old["per_case"], progress=progress)
    logger.info("transformer reliance of the base model: DSCagg %.3f intact, %.3f with mean tokens (drop %.3f)",
                reliance["intact_dsc_agg"], reliance["ablated_dsc_agg"], reliance["drop"])  # fmt: skip
    slice_case = int(np.argmax([_label_volume(r) for r in base_new["per_case"]]))  # the largest tumour burden
    previews = {BASE: new_scorer.predict(base_model, slice_case)[0].numpy()}

    results: dict[str, Any] = {
        "new_center": new_center, "data_dir": str(run.data_dir), "base_checkpoint": str(base),
        "new_center_test_cases": list(loco.new_test), "old_center_test_cases": old_test,
        "adapt_train_cases": list(loco.adapt_train), "shots": run.shots, "prompts": run.num_prompts, "seed": run.seed,
        "preset": run.preset, "score_at": run.score_at, "machine": machine_info(), "date": date.today().isoformat(),
        "command": run.command or " ".join(sys.argv), "config": run.provenance(), "splits": splits.record(),
        "stages": stages, "smoke_run": run.smoke,
        "base": {"transformer_reliance": reliance}, "strategies": {},
    }  # fmt: skip
    for name in run.strategies:
        if name == ORACLE:
            oracle = run.pretrain_run(preset=base_preset, oracle=True)
            with clock(f"training {name}") as row:
                summary = pretrain(oracle, on_change=run.on_change)
            clock.trained(row, summary)
            artifact = Path(oracle.out) / "model.safetensors"
            summary = {**summary, "artifact": str(artifact), "artifact_bytes": artifact.stat().st_size}
            stage_dir = oracle.out
        elif get_strategy(name).trains:
            stage = run.adapt_run(name, base)
            with clock(f"training {name}") as row:
                summary = adapt(stage, on_change=run.on_change, base=ckpt)
            clock.trained(row, summary)
            stage_dir = stage.out
        else:  # the base model itself: nothing trained
            summary = {**parameter_report(base_model), "artifact": None, "artifact_bytes": 0, "train_seconds": 0.0,
                       "peak_memory_mb": 0.0}  # fmt: skip
            stage_dir = None
        if stage_dir is not None:
            stages[name] = {"dir": str(stage_dir), "config_hash": summary["config_hash"]}
        if name == BASE:
            new, old = base_new, base_old
        else:  # the oracle's own model, or the base with an adapter
            parts = (summary["artifact"], None) if name == ORACLE else (ckpt, summary["artifact"])
            with clock(f"scoring {name}"):
                model = build_adapted_model(*parts).to(device)
                new, old = score(model, name)
                previews[name] = new_scorer.predict(model, slice_case)[0].numpy()
        row = {
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "trainable_fraction": summary["trainable_fraction"], "artifact_bytes": summary["artifact_bytes"],
            "train_seconds": summary["train_seconds"], "peak_memory_mb": summary["peak_memory_mb"],
            "epochs": summary.get("epochs_run", 0), "best_epoch": summary.get("best_epoch", 0),
            "new_center": new, "old_centers": old, "old_centers_base": _without_cases(base_old),
            "artifact": summary["artifact"],
        }  # fmt: skip
        results["strategies"][name] = row
        if name not in (BASE, ORACLE) and get_strategy(name).prompt_mode != "none" and "center_prompts" in ckpt.config:
            with clock(f"scoring {name}{EVERYWHERE}"):  # the adapted model just scored, told no scan's center
                tokens = model.prompts.tokens.detach()
                old = _summaries(old_scorer.score_predictions(lambda i: old_scorer.predict(model, i, prompts=tokens),
                                                              desc=f"{name}{EVERYWHERE}", progress=progress))  # fmt: skip
            results["strategies"][name + EVERYWHERE] = {**row, "old_centers": old, "everywhere_of": name}
        if name != ORACLE and get_strategy(name).prompt_mode != "none" \
                and _trains_more_than_prompts(summary["artifact"]):
            # Attribution: the same adapter scored with its prompt tokens removed.
            with clock(f"scoring {name}{WITHOUT_PROMPTS}"):
                model = build_adapted_model(ckpt, summary["artifact"], without_prompts=True).to(device)
                new, old = score(model, name + WITHOUT_PROMPTS)
            results["strategies"][name + WITHOUT_PROMPTS] = {**row, "new_center": new, "old_centers": old,
                                                             "attribution_of": name}  # fmt: skip
    add_gap_closed(results)
    add_intervals(results)
    with clock("routing the test scans"):
        add_served_from_bank(results, cases)

    results["phase_seconds"] = clock.rows
    with clock("report and figures"):
        item = new_scorer.dataset[slice_case]
        image, label = item["image"].as_tensor().numpy(), item["label"].as_tensor()[0].numpy()
        case = new_scorer.cases[slice_case]
        mm = "x".join(f"{v:g}" for v in preprocess.spacing)
        title = (f"{case.case_id} ({case.center}, the new center's test case with the most tumour): axial slices "
                 f"(axis 2 of the RAS-oriented preprocessed crop, {mm} mm voxels), drawn as stored")  # fmt: skip
        plot_case_slices(image[0], image[1], label, previews, out / "case_slices.png", axis=2, title=title)
        paths = write_report(results, out)
    write_json(results, paths["json"])  # with the report's own time, which results.md cannot hold
    logger.info("report written to %s", paths["markdown"])
    return results


def _trains_more_than_prompts(artifact: str) -> bool:
    """Whether a prompt adapter also holds other tensors (a head, norm steering)."""
    return any(not is_prompt(n) for n in read_adapter_metadata(artifact)["tensors"])


def old_center_tests(test_ids: list[str], cases: dict[str, Any], train_centers: list[str] | None) -> list[str]:
    """The old centers' test cases: of the centers the base was pretrained on, when it records them.

    A data folder may hold several new centers (a benchmark's); one held out must not count the
    others, which the base never saw either, as old centers."""
    if not train_centers:
        return list(test_ids)
    trained = set(train_centers)
    kept = [i for i in test_ids if cases[i].center in trained]
    if len(kept) < len(test_ids):
        logger.info("old centers: the base's %s; %d test cases of other centers are not scored",
                    ", ".join(train_centers), len(test_ids) - len(kept))  # fmt: skip
    return kept


def add_served_from_bank(results: dict[str, Any], cases: dict[str, Any]) -> None:
    """How each row does when served per center by routing, beside the protocol's figures.

    The protocol applies an adapted model to every old-center scan (forgetting). A bank holding the
    new center's adapter, keyed by its adaptation cases' acquisition fingerprints, sends each scan
    to that adapter or, when it is unlike them, to the base model (``bank.routing``); a site keeping
    one whole fine-tuned model per center can route the same way. ``routing`` holds that decision
    per test scan; each row's ``served`` the new-center gain and old-center change so obtained (the
    row's score where routed, the base's elsewhere), with intervals. A scan whose acquisition is
    that of an old center (a policy-only change) is routed like its twin.
    """
    from centerprompt.bank.acquisition import acquisition_features
    from centerprompt.bank.routing import FALLBACK, RoutingKey, route_features

    rows, center = results["strategies"], results["new_center"]
    if BASE not in rows or len(rows) < 2:
        return
    features = lambda i: acquisition_features(cases[i].ct, cases[i].pet)  # noqa: E731
    key = {center: RoutingKey.from_features(np.stack([features(i) for i in results["adapt_train_cases"]]))}
    results["routing"] = {part: {c["case_id"]: route_features(features(c["case_id"]), key).center != FALLBACK
                                 for c in rows[BASE][part]["per_case"]}
                          for part in ("new_center", "old_centers")}  # fmt: skip
    for name, row in rows.items():
        if name != BASE:  # full fine-tuning too: routed to one whole model per center, as a bank routes adapters
            row["served"] = served_from_bank(results, name)


def add_gap_closed(results: dict[str, Any]) -> None:
    """Each row's new-center gain over the base and, with an oracle row, the fraction of its gap closed.

    gap = oracle - base (new-center DSCagg mean); ``gap_closed`` = gain / gap, None when the gap is
    below ``MIN_GAP`` (the base already is as good as in-domain training; nothing to close).
    """
    rows = results["strategies"]
    base = rows[BASE]["new_center"]["dsc_agg"]["mean"] if BASE in rows else None
    if base is None:
        return
    gap = rows[ORACLE]["new_center"]["dsc_agg"]["mean"] - base if ORACLE in rows else None
    results["oracle_gap"] = gap
    for row in rows.values():
        gain = row["new_center"]["dsc_agg"]["mean"] - base
        row["gain"] = gain
        row["gap_closed"] = gain / gap if gap is not None and gap >= MIN_GAP else None


def _label_volume(case_result: dict[str, Any]) -> int:
    return int(case_result["gtvp"]["label_volume"] + case_result["gtvn"]["label_volume"])


def _without_cases(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "per_case"}


def run_all_centers(run: ExperimentRun) -> str:
    """``run_experiment`` with each labelled center held out in turn (``run.new_center`` is ignored);
    each center's folder is ``run.out/CENTER``, and all of them use the one split kept in
    ``run.out/splits.json``. Returns a summary table."""
    out = Path(run.out)
    given = open_base(run.base_spec) if run.base_spec is not None else None
    _, splits = load_index(run.data_dir, skip_bad_cases=run.skip_bad_cases, seed=run.seed, cache_dir=out,
                           splits_file=run.splits, split_defaults=split_defaults(given, out))  # fmt: skip
    shared = keep_splits(splits, out)
    rows = ["| new center | strategy | new DSCagg mean | old DSCagg mean | Δ old vs base |", "|---|---|---|---|---|"]
    for center in sorted(splits):
        results = run_experiment(replace(run, new_center=center, out=out / center, splits=shared))
        for name, s in results["strategies"].items():
            new, old = s["new_center"]["dsc_agg"]["mean"], s["old_centers"]["dsc_agg"]["mean"]
            delta = old - s["old_centers_base"]["dsc_agg"]["mean"]
            rows.append(f"| {center} | {name} | {new:.3f} | {old:.3f} | {delta:+.3f} |")
    text = "\n".join(rows) + "\n"
    (Path(run.out) / "results_all.md").write_text(text)
    return text
