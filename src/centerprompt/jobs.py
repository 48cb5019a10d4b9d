"""The jobs a user runs: pretrain a base model, adapt it to a center, score it, predict with it.

Each job joins the data layer (HECKTOR reader, checks, MONAI pipelines) to the model layer
(PromptedUNETR, strategies, artifacts) and the training loop. A run folder holds the resolved
configuration (``config.json``), a log, per-epoch metrics, checkpoints and a ``summary.json``
written last, whose presence marks the run as finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from centerprompt.artifacts import (
    build_adapted_model,
    load_model,
    read_model_metadata,
    save_adapter,
    save_model,
)
from centerprompt.data.checks import validate_cases
from centerprompt.data.hecktor import Case, find_cases, leave_one_center_out, load_or_create_splits
from centerprompt.data.transforms import (
    PreprocessConfig,
    inference_transforms,
    invert_prediction,
    load_label_on_ct_grid,
    make_dataset,
    save_prediction,
    train_transforms,
)
from centerprompt.evaluate import aggregate, sliding_window_predict
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.presets import ADAPT_LR, Preset, get_preset
from centerprompt.strategies import STRATEGIES, apply_strategy, get_strategy, parameter_report
from centerprompt.report import write_json
from centerprompt.scoring import SW_BATCH, Scorer, validator
from centerprompt.train import TrainConfig, default_device, fit, rank

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
IN_CHANNELS, OUT_CHANNELS = 2, 3  # CT + PET in; background, GTVp, GTVn out


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """Copy the package's log records into ``run_dir/log.txt`` while a job runs (rank 0 only)."""
    if rank() != 0:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("centerprompt")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def load_index(
    data_dir: str | Path, *, skip_bad_cases: bool = False, check: bool = True, seed: int = 0
) -> tuple[dict[str, Case], dict[str, dict[str, list[str]]]]:
    """Cases by ID (checked like ``check-data``) and the per-center splits (``DIR/splits.json``)."""
    cases = find_cases(data_dir, skip_bad_cases=skip_bad_cases)
    if check:
        cases = validate_cases(cases, skip_bad_cases=skip_bad_cases)
    splits = load_or_create_splits(data_dir, cases, seed=seed)
    return {c.case_id: c for c in cases}, splits


def _check_resumable(run_dir: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse to resume a run folder made with another configuration."""
    path = run_dir / "config.json"
    if resume and path.exists():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(config, default=str))  # tuples become lists, as in the file
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            raise ValueError(f"{run_dir}: cannot resume, the configuration changed ({', '.join(changed)}).")
    if rank() == 0:
        write_json(config, path)


# ----------------------------------------------------------------------------- pretrain


def pretrain_case_ids(
    splits: dict[str, dict[str, list[str]]], exclude_center: str | None, *, oracle_shots: int = 0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, validation) case IDs of a base model, or of the in-domain oracle for ``exclude_center``.

    The oracle adds the excluded center's ``oracle_shots`` adaptation cases to the training set
    and its adaptation validation cases to the validation set, exactly those that ``adapt`` with
    ``shots=oracle_shots`` and this seed uses; the center's test cases never enter.
    """
    if exclude_center is None:
        if oracle_shots:
            raise ValueError("an oracle needs the center it stands for: give exclude_center.")
        return sorted(i for s in splits.values() for i in s["train"]), sorted(i for s in splits.values() for i in s["val"])
    loco = leave_one_center_out(splits, exclude_center, shots=oracle_shots, seed=seed)
    if not oracle_shots:
        return loco.pretrain_train, loco.pretrain_val
    return sorted(loco.pretrain_train + loco.adapt_train), sorted(loco.pretrain_val + loco.adapt_val)


def pretrain(
    data_dir: str | Path, out: str | Path, *, exclude_center: str | None = None, preset: str | Preset = "cpu",
    epochs: int | None = None, lr: float | None = None, batch_size: int | None = None, patience: int = 10,
    seed: int = 0, resume: bool = False, skip_bad_cases: bool = False, amp: bool = False,
    compile: bool = False, progress: bool = True, cases_limit: int | None = None,
    oracle_shots: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Train the base model with every weight on all centers but ``exclude_center``.

    Writes ``OUT/model.safetensors`` (the best epoch on the validation cases, with its
    configuration and preprocessing in the metadata). ``cases_limit`` caps the training cases
    (for smoke tests). ``oracle_shots`` > 0 trains the in-domain oracle instead, with the same
    budget: see :func:`pretrain_case_ids`.
    """
    run_dir = Path(out)
    p = preset if isinstance(preset, Preset) else get_preset(preset)
    with run_log(run_dir):
        cases, splits = load_index(data_dir, skip_bad_cases=skip_bad_cases, seed=seed)
        train_ids, val_ids = pretrain_case_ids(splits, exclude_center, oracle_shots=oracle_shots, seed=seed)
        train_ids = train_ids[:cases_limit] if cases_limit else train_ids
        cfg = TrainConfig(epochs=epochs or p.pretrain_epochs, lr=lr or p.pretrain_lr, batch_size=batch_size or p.batch_size,
                          patience=patience, seed=seed, amp=amp, compile=compile)  # fmt: skip
        config = {
            "job": "pretrain", "data_dir": str(data_dir), "exclude_center": exclude_center, "preset": p.name,
            "oracle_shots": oracle_shots,
            "model": {"in_channels": IN_CHANNELS, "out_channels": OUT_CHANNELS, **p.model},
            "preprocess": p.preprocess.to_dict(), "train": cfg.__dict__, "train_cases": train_ids,
            "val_cases": val_ids,
        }  # fmt: skip
        _check_resumable(run_dir, config, resume)
        torch.manual_seed(seed)
        model = PromptedUNETR(**config["model"])
        params = apply_strategy(model, "full")
        train_ds = make_dataset([cases[i] for i in train_ids], train_transforms(p.preprocess))
        scorer = Scorer([cases[i] for i in val_ids], p.preprocess, score_at="preprocessed")
        logger.info("pretraining on %d cases (%d for validation), excluding %s", len(train_ids), len(val_ids), exclude_center)
        result = fit(model, params, train_ds, cfg, run_dir, validator(scorer), resume=resume, progress=progress)
        summary = {"job": "pretrain", **result.__dict__, **parameter_report(model)}
        if rank() == 0:
            train_centers = sorted({cases[i].center for i in train_ids})
            extra = {"preprocess": p.preprocess.to_dict(), "preset": p.name, "train_centers": train_centers,
                     "exclude_center": exclude_center, "oracle_shots": oracle_shots}  # fmt: skip
            save_model(model, run_dir / "model.safetensors", extra=extra)
            write_json(summary, run_dir / SUMMARY)
    return summary


def base_preprocess(base: str | Path) -> PreprocessConfig:
    """The preprocessing a base checkpoint was trained with (default pipeline for foreign checkpoints)."""
    if Path(base).suffix != ".safetensors":
        return PreprocessConfig()
    extra = read_model_metadata(base)["extra"]
    return PreprocessConfig.from_dict(extra["preprocess"]) if "preprocess" in extra else PreprocessConfig()


# ----------------------------------------------------------------------------- adapt


def adapt(
    data_dir: str | Path, center: str, base: str | Path, out: str | Path, *, strategy: str = "deep",
    prompts: int = 10, shots: int = 8, epochs: int | None = None, lr: float | None = None,
    batch_size: int | None = None, patience: int = 10, options: dict[str, Any] | None = None,
    prompt_dropout: float = 0.0, seed: int = 0, resume: bool = False, skip_bad_cases: bool = False,
    amp: bool = False, compile: bool = False, progress: bool = True, optimizer: str = "adamw",
) -> dict[str, Any]:  # fmt: skip
    """Adapt the frozen base model to ``center`` with ``shots`` labelled cases and one strategy.

    Writes ``OUT/adapter.safetensors`` (what the strategy trained, best validation epoch) and
    ``OUT/summary.json`` (parameters, artifact bytes, wall time, peak memory).
    """
    run_dir, options = Path(out), dict(options or {})
    get_strategy(strategy)
    with run_log(run_dir):
        cases, splits = load_index(data_dir, skip_bad_cases=skip_bad_cases, seed=seed)
        meta = read_model_metadata(base)
        preset = get_preset(meta["extra"].get("preset", "cpu"))
        preprocess = base_preprocess(base)
        if center in meta["extra"].get("train_centers", []):
            logger.warning("center %s was part of the base model's pretraining data", center)
        loco = leave_one_center_out(splits, center, shots=shots, seed=seed)
        mode = STRATEGIES[strategy].prompt_mode
        cfg = TrainConfig(epochs=epochs or preset.adapt_epochs, lr=lr or ADAPT_LR.get(strategy, 1e-3),
                          batch_size=batch_size or preset.batch_size, patience=patience, seed=seed,
                          weight_decay=0.0 if mode != "none" else 1e-5, amp=amp, compile=compile,
                          optimizer=optimizer)  # fmt: skip
        config = {
            "job": "adapt", "data_dir": str(data_dir), "center": center, "base": str(base), "strategy": strategy,
            "prompts": prompts, "prompt_dropout": prompt_dropout, "shots": shots, "options": options,
            "train": cfg.__dict__, "adapt_train": loco.adapt_train, "adapt_val": loco.adapt_val,
        }  # fmt: skip
        _check_resumable(run_dir, config, resume)
        torch.manual_seed(seed)
        model = load_model(base, prompt_mode=mode, num_prompts=prompts, prompt_dropout=prompt_dropout)
        params = apply_strategy(model, strategy, **options)
        report = parameter_report(model)
        summary: dict[str, Any] = {"job": "adapt", "strategy": strategy, "center": center, **report,
                                   "train_seconds": 0.0, "peak_memory_mb": 0.0, "artifact": None,
                                   "artifact_bytes": 0}  # fmt: skip
        if strategy != "none":
            train_ds = make_dataset([cases[i] for i in loco.adapt_train], train_transforms(preprocess))
            scorer = Scorer([cases[i] for i in loco.adapt_val], preprocess, score_at="preprocessed")
            logger.info("adapting to %s with %s on %d cases", center, strategy, len(loco.adapt_train))
            result = fit(model, params, train_ds, cfg, run_dir, validator(scorer), resume=resume, progress=progress)
            summary.update(result.__dict__)
            if rank() == 0:
                extra = {"center": center, "shots": shots, "base": str(base)}
                artifact = save_adapter(model, run_dir / "adapter.safetensors", strategy, options, extra=extra)
                summary.update(artifact=str(artifact), artifact_bytes=artifact.stat().st_size)
        if rank() == 0:
            write_json(summary, run_dir / SUMMARY)
    return summary


# ----------------------------------------------------------------------------- evaluate and predict


def split_case_ids(
    splits: dict[str, dict[str, list[str]]], centers: Sequence[str], split: str, data_dir: str | Path
) -> list[str]:
    """Case IDs of ``centers`` in ``split`` (train, val, test or all); unknown centers are an error."""
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be train, val, test or all, got {split!r}.")
    unknown = sorted(set(centers) - set(splits))
    if unknown or not centers:
        raise ValueError(f"no labelled cases for center(s) {unknown or '(none)'} in {data_dir}.")
    parts = ("train", "val", "test") if split == "all" else (split,)
    return sorted(i for c in centers for part in parts for i in splits[c][part])


def evaluate(
    data_dir: str | Path, base: str | Path, *, adapter: str | Path | None = None, centers: Sequence[str] | None = None,
    split: str = "test", score_at: str = "ct", skip_bad_cases: bool = False, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Per-case and per-center scores of the base model (with an adapter if given) on one split."""
    cases, splits = load_index(data_dir, skip_bad_cases=skip_bad_cases)
    ids = split_case_ids(splits, centers or sorted(splits), split, data_dir)
    model = build_adapted_model(base, adapter).to(default_device())
    scorer = Scorer([cases[i] for i in ids], base_preprocess(base), score_at=score_at)
    per_case = scorer.score(model, desc="evaluate", progress=progress)
    return {"data_dir": str(data_dir), "base": str(base), "adapter": str(adapter) if adapter else None,
            "split": split, "score_at": score_at, **aggregate(per_case), "per_case": per_case}  # fmt: skip


def prediction_inputs(
    pairs: Sequence[tuple[str | Path, str | Path, str | Path]], preprocess: PreprocessConfig, progress: bool = True
) -> Iterator[tuple[Path, Path, dict[str, Any], torch.Tensor, Any]]:
    """For each (CT, PET, output): the CT path, the output path, the preprocessed item, the network
    input (1, 2, D, H, W) on the default device, and the transform that inverts it."""
    transform = inference_transforms(preprocess, with_label=False)
    for ct, pet, out in tqdm(pairs, desc="predict", unit="case", disable=not progress):
        for path in (ct, pet):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file.")
        data = transform({"ct": str(ct), "pet": str(pet), "case_id": Path(out).name})
        yield Path(ct), Path(out), data, data["image"].as_tensor()[None].to(default_device()), transform


def predict(
    base: str | Path, pairs: Sequence[tuple[str | Path, str | Path, str | Path]], *,
    adapter: str | Path | None = None, progress: bool = True,
) -> list[Path]:  # fmt: skip
    """Segment each (CT, PET) pair and write the label map to its output path on the CT grid."""
    model = build_adapted_model(base, adapter).to(default_device())
    preprocess = base_preprocess(base)
    written = []
    for ct, out, data, image, transform in prediction_inputs(pairs, preprocess, progress):
        started = time.perf_counter()
        pred = sliding_window_predict(model, image, preprocess.roi_size, SW_BATCH).argmax(1).cpu()
        written.append(save_prediction(pred, data, out, transform))
        logger.info("%s -> %s (%.1f s)", ct, out, time.perf_counter() - started)
    return written


def folder_pairs(folder: str | Path, out_dir: str | Path) -> list[tuple[Path, Path, Path]]:
    """(CT, PET, output) for every case of a HECKTOR-style folder (``imagesTr`` or the folder itself)."""
    folder = Path(folder)
    images = folder / "imagesTr" if (folder / "imagesTr").is_dir() else folder
    cts = sorted(images.glob("*__CT.nii*"))
    if not cts:
        raise FileNotFoundError(f"{images}: no *__CT.nii.gz files to segment.")
    pairs = []
    for ct in cts:
        case_id = ct.name.split("__CT")[0]
        pet = next(iter(sorted(images.glob(f"{case_id}__PT.nii*"))), None)
        if pet is None:
            raise FileNotFoundError(f"{case_id}: no PET file {case_id}__PT.nii.gz beside {ct.name}.")
        pairs.append((ct, pet, Path(out_dir) / f"{case_id}.nii.gz"))
    return pairs
