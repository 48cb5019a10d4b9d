"""The paper's protocol for one held-out center: pretrain, adapt with each strategy, score.

Saeed et al. 2023 (arXiv 2305.18948): pretrain on all centers but one; adapt to the new center
with a few labelled cases; score on the new center's test cases and, with the adapted model
applied as it is, on the old centers' test cases (forgetting). Every stage is a run folder that
is reused when finished and resumed when interrupted, so rerunning the command is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from centerprompt.artifacts import build_adapted_model, read_model_metadata
from centerprompt.data.hecktor import leave_one_center_out
from centerprompt.evaluate import aggregate
from centerprompt.scoring import Scorer
from centerprompt.jobs import SUMMARY, adapt, base_preprocess, load_index, pretrain, pretrain_case_ids
from centerprompt.reliance import transformer_reliance
from centerprompt.report import plot_case_slices, write_report
from centerprompt.strategies import get_strategy
from centerprompt.train import default_device

logger = logging.getLogger(__name__)

ORACLE = "oracle"  # not a strategy: the base model retrained with the new center's adaptation cases
MIN_GAP = 0.01  # below this oracle gap (DSCagg) a fraction of it closed is not reported: it is noise
DEFAULT_STRATEGIES = ("none", "full", "partial", "shallow", "deep", "deep+head", "lora", ORACLE)


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


def _finished(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def _summaries(results: list[dict[str, Any]]) -> dict[str, Any]:
    agg = aggregate(results)
    return {**agg["overall"], "per_center": agg["per_center"], "per_case": results}


def run_experiment(
    data_dir: str | Path, new_center: str, out: str | Path, *, strategies: Sequence[str] = DEFAULT_STRATEGIES,
    base: str | Path | None = None, preset: str = "cpu", shots: int = 8, prompts: int = 10,
    pretrain_epochs: int | None = None, adapt_epochs: int | None = None, patience: int = 10, seed: int = 0,
    score_at: str = "ct", skip_bad_cases: bool = False, progress: bool = True, command: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run (or finish) the leave-one-center-out comparison; write results.json, results.md, figures."""
    out = Path(out)
    for name in strategies:
        if name != ORACLE:
            get_strategy(name)
    cases, splits = load_index(data_dir, skip_bad_cases=skip_bad_cases, seed=seed)
    loco = leave_one_center_out(splits, new_center, shots=shots, seed=seed)

    if base is None:
        pre_dir = out / "pretrain"
        if _finished(pre_dir) is None:
            logger.info("pretraining the base model without %s in %s", new_center, pre_dir)
            pretrain(data_dir, pre_dir, exclude_center=new_center, preset=preset, epochs=pretrain_epochs,
                     patience=patience, seed=seed, resume=True, skip_bad_cases=skip_bad_cases,
                     progress=progress)  # fmt: skip
        else:
            done = json.loads((pre_dir / "config.json").read_text())
            if (done["preset"], done["exclude_center"]) != (preset, new_center):
                raise ValueError(
                    f"{pre_dir} holds a pretraining run for preset {done['preset']} without {done['exclude_center']}; "
                    f"use another --out for preset {preset} without {new_center}."
                )
            logger.info("reusing the finished pretraining run %s", pre_dir)
        base = pre_dir / "model.safetensors"
    base = Path(base)
    preprocess = base_preprocess(base)
    # The oracle copies the base model's architecture and budget (a foreign checkpoint: the preset asked for).
    base_preset = read_model_metadata(base)["extra"].get("preset", preset) if base.suffix == ".safetensors" else preset
    device = default_device()
    new_scorer = Scorer([cases[i] for i in loco.new_test], preprocess, score_at=score_at)
    old_scorer = Scorer([cases[i] for i in loco.old_test], preprocess, score_at=score_at)

    base_model = build_adapted_model(base).to(device)
    base_new = _summaries(new_scorer.score(base_model, desc="base: new center", progress=progress))
    base_old = _summaries(old_scorer.score(base_model, desc="base: old centers", progress=progress))
    reliance = transformer_reliance(base_model, old_scorer, intact_cases=base_old["per_case"], progress=progress)
    logger.info("transformer reliance of the base model: DSCagg %.3f intact, %.3f with mean tokens (drop %.3f)",
                reliance["intact_dsc_agg"], reliance["ablated_dsc_agg"], reliance["drop"])  # fmt: skip
    slice_case = int(np.argmax([_label_volume(r) for r in base_new["per_case"]]))  # the largest tumour burden
    previews = {"none": new_scorer.predict(base_model, slice_case)[0].numpy()}

    results: dict[str, Any] = {
        "new_center": new_center, "data_dir": str(data_dir), "base_checkpoint": str(base),
        "new_center_test_cases": list(loco.new_test), "old_center_test_cases": list(loco.old_test),
        "adapt_train_cases": list(loco.adapt_train), "shots": shots, "prompts": prompts, "seed": seed,
        "preset": preset, "score_at": score_at, "machine": machine_info(), "date": date.today().isoformat(),
        "command": command or " ".join(sys.argv), "base": {"transformer_reliance": reliance}, "strategies": {},
    }  # fmt: skip
    for name in strategies:
        run_dir = out / "adapt" / name
        summary = _finished(run_dir)
        if name == ORACLE:
            summary = _oracle(data_dir, out / ORACLE, new_center, splits, preset=base_preset, shots=shots, seed=seed,
                              epochs=pretrain_epochs, patience=patience, skip_bad_cases=skip_bad_cases,
                              progress=progress)  # fmt: skip
        elif summary is None:
            summary = adapt(data_dir, new_center, base, run_dir, strategy=name, prompts=prompts, shots=shots,
                            epochs=adapt_epochs, patience=patience, seed=seed, resume=True,
                            skip_bad_cases=skip_bad_cases, progress=progress)  # fmt: skip
        else:
            logger.info("reusing the finished adaptation run %s", run_dir)
        if name == "none":
            new, old, model = base_new, base_old, base_model
        else:  # the oracle's own model, or the base with an adapter
            parts = (summary["artifact"], None) if name == ORACLE else (base, summary["artifact"])
            model = build_adapted_model(*parts).to(device)
            new = _summaries(new_scorer.score(model, desc=f"{name}: new center", progress=progress))
            old = _summaries(old_scorer.score(model, desc=f"{name}: old centers", progress=progress))
            previews[name] = new_scorer.predict(model, slice_case)[0].numpy()
        results["strategies"][name] = {
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "trainable_fraction": summary["trainable_fraction"], "artifact_bytes": summary["artifact_bytes"],
            "train_seconds": summary["train_seconds"], "peak_memory_mb": summary["peak_memory_mb"],
            "epochs": summary.get("epochs_run", 0), "best_epoch": summary.get("best_epoch", 0),
            "new_center": new, "old_centers": old, "old_centers_base": _without_cases(base_old),
            "artifact": summary["artifact"],
        }  # fmt: skip
    add_gap_closed(results)

    paths = write_report(results, out)
    item = new_scorer.dataset[slice_case]
    image, label = item["image"].as_tensor().numpy(), item["label"].as_tensor()[0].numpy()
    plot_case_slices(image[0], image[1], label, previews, out / "case_slices.png", axis=2)
    logger.info("report written to %s", paths["markdown"])
    return results


def _oracle(
    data_dir: str | Path, run_dir: Path, new_center: str, splits: dict[str, dict[str, list[str]]], *, shots: int,
    seed: int, **train: Any,
) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) the in-domain oracle; its summary carries the model file as the artifact.

    A finished oracle is reused only if it trained on exactly the cases this split gives it, so a
    changed seed or shot count can never score an oracle that saw today's test cases.
    """
    expected, _ = pretrain_case_ids(splits, new_center, oracle_shots=shots, seed=seed)
    summary = _finished(run_dir)
    if summary is not None and json.loads((run_dir / "config.json").read_text())["train_cases"] != expected:
        raise ValueError(f"{run_dir} holds an oracle trained on other cases; use another --out for this split.")
    if summary is None:
        logger.info("training the in-domain oracle for %s in %s", new_center, run_dir)
        summary = pretrain(data_dir, run_dir, exclude_center=new_center, oracle_shots=shots, seed=seed, resume=True,
                           **train)  # fmt: skip
    artifact = run_dir / "model.safetensors"
    return {**summary, "artifact": str(artifact), "artifact_bytes": artifact.stat().st_size}


def add_gap_closed(results: dict[str, Any]) -> None:
    """Each row's new-center gain over the base and, with an oracle row, the fraction of its gap closed.

    gap = oracle - base (new-center DSCagg mean); ``gap_closed`` = gain / gap, None when the gap is
    below ``MIN_GAP`` (the base already is as good as in-domain training; nothing to close).
    """
    rows = results["strategies"]
    base = rows["none"]["new_center"]["dsc_agg"]["mean"] if "none" in rows else None
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


def run_all_centers(data_dir: str | Path, out: str | Path, **kwargs: Any) -> str:
    """``run_experiment`` with each labelled center held out in turn; returns a summary table."""
    _, splits = load_index(data_dir, skip_bad_cases=kwargs.get("skip_bad_cases", False), seed=kwargs.get("seed", 0))
    rows = ["| new center | strategy | new DSCagg mean | old DSCagg mean | Δ old vs base |", "|---|---|---|---|---|"]
    for center in sorted(splits):
        results = run_experiment(data_dir, center, Path(out) / center, **kwargs)
        for name, s in results["strategies"].items():
            new, old = s["new_center"]["dsc_agg"]["mean"], s["old_centers"]["dsc_agg"]["mean"]
            delta = old - s["old_centers_base"]["dsc_agg"]["mean"]
            rows.append(f"| {center} | {name} | {new:.3f} | {old:.3f} | {delta:+.3f} |")
    text = "\n".join(rows) + "\n"
    (Path(out) / "results_all.md").write_text(text)
    return text
