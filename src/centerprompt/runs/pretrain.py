"""Pretraining a base model: every weight, on every center but the one left out (or the in-domain
oracle, which also sees that center's adaptation cases)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from centerprompt.artifacts import save_model
from centerprompt.data.hecktor import Splits
from centerprompt.files import write_json
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.runs.base import IN_CHANNELS, OUT_CHANNELS
from centerprompt.runs.folder import SUMMARY, keep_splits, open_run, run_log
from centerprompt.runs.selection import load_index, pretrain_case_ids, split_defaults
from centerprompt.strategies import FULL, apply_strategy, parameter_report
from centerprompt.training.cases import CachedCases, fit_cases
from centerprompt.training.config import PretrainRun, config_hash, train_settings
from centerprompt.training.devices import rank
from centerprompt.training.loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)


# Prompt-aware pretraining: share of samples read with the shared prompt set instead of their
# center's (chosen before any run: most steps teach center prompts, enough teach the shared set).
SHARED_PROMPT_SHARE = 0.3


def pretrain_config(run: PretrainRun, splits: Splits) -> dict[str, Any]:
    """Everything that determines a pretraining run's result: ``config.json`` of its folder (the
    split enters by its hash, not its file's path: the same split read from elsewhere is the same run)."""
    p = run.preset_obj
    train_ids, val_ids = pretrain_case_ids(splits, run.exclude_center, oracle_shots=run.oracle_shots, seed=run.seed)
    train_ids = train_ids[: run.cases_limit] if run.cases_limit else train_ids
    cfg = train_settings(run, p, run.epochs)
    model: dict[str, Any] = {"in_channels": IN_CHANNELS, "out_channels": OUT_CHANNELS, **p.model}
    if run.center_prompts:
        center_of = {i: center for center, parts in splits.items() for ids in parts.values() for i in ids}
        model.update(prompt_mode="deep", num_prompts=run.center_prompts,
                     center_prompts=sorted({center_of[i] for i in train_ids}))  # fmt: skip
    return {
        "job": "pretrain", **run.provenance(), "model": model, "preprocess": p.preprocess.to_dict(),
        "train": cfg.__dict__, "splits_sha256": splits.sha256, "train_cases": train_ids, "val_cases": val_ids,
        **({"shared_prompt_share": SHARED_PROMPT_SHARE} if run.center_prompts else {}),
    }  # fmt: skip


def shared_prompts_sometimes(share: float) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """Each sample's center for prompt-aware pretraining, replaced by None (the shared set) with
    probability ``share``, so the shared set learns to serve any center (``random`` is reseeded
    every epoch by ``fit``: a resumed run draws the same)."""

    def inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"centers": [None if random.random() < share else c for c in batch["center"]]}

    return inputs


def pretrain(run: PretrainRun, *, on_change: str = "refuse") -> dict[str, Any]:
    """Train the base model with every weight on all centers but ``run.exclude_center``.

    Writes ``OUT/model.safetensors`` (the best epoch on the validation cases, with its
    configuration, preprocessing and split in the metadata), ``OUT/splits.json`` (the split used:
    ``run.splits``, ``DATA/splits.json``, this folder's earlier one, or made with the seed) and
    ``OUT/summary.json`` (with the split's source, hash and skipped cases).
    """
    run_dir, p = Path(run.out), run.preset_obj
    with run_log(run_dir):
        cases, splits = load_index(run.data_dir, skip_bad_cases=run.skip_bad_cases, seed=run.seed, cache_dir=run_dir,
                                   splits_file=run.splits, split_defaults=split_defaults(None, run_dir))  # fmt: skip
        config = pretrain_config(run, splits)
        finished = open_run(run_dir, config, resume=run.resume, on_change=on_change, predates=run.defaults())
        if finished is not None:
            return finished
        keep_splits(splits, run_dir)
        train_ids, val_ids = config["train_cases"], config["val_cases"]
        torch.manual_seed(run.seed)
        model = PromptedUNETR(**config["model"])
        params = apply_strategy(model, FULL)
        logger.info("pretraining on %d cases (%d for validation), excluding %s", len(train_ids), len(val_ids),
                    run.exclude_center)  # fmt: skip
        share = config.get("shared_prompt_share")
        cached = CachedCases.load([cases[i] for i in train_ids], [cases[i] for i in val_ids], p.preprocess)
        trainer = Trainer(model, params, cached.train, TrainConfig(**config["train"]),
                          batch_inputs=shared_prompts_sometimes(share) if share is not None else None)  # fmt: skip
        timing = fit_cases(trainer, cached, run_dir, resume=run.resume, progress=run.progress)
        summary = {"job": "pretrain", **timing, **parameter_report(model), "config_hash": config_hash(config),
                   "splits": splits.record()}  # fmt: skip
        if rank() == 0:
            train_centers = sorted({cases[i].center for i in train_ids})
            extra = {"preprocess": p.preprocess.to_dict(), "preset": p.name, "train_centers": train_centers,
                     "exclude_center": run.exclude_center, "oracle_shots": run.oracle_shots,
                     "splits": splits.to_json()}  # fmt: skip
            save_model(model, run_dir / "model.safetensors", extra=extra)
            write_json(summary, run_dir / SUMMARY)
    return summary
