"""Adapting a frozen base model to a new center: one strategy, a few labelled cases, an adapter
file of what it trained."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from centerprompt.artifacts import save_adapter
from centerprompt.checkpoints import BaseCheckpoint
from centerprompt.data.hecktor import Splits, join_centers
from centerprompt.files import write_json
from centerprompt.runs.base import base_provenance, check_base_split, open_base
from centerprompt.runs.folder import SUMMARY, keep_splits, open_run, run_log
from centerprompt.runs.selection import adaptation_case_ids, load_index, split_defaults
from centerprompt.strategies import apply_strategy, get_strategy, parameter_report
from centerprompt.training.cases import CachedCases, fit_cases
from centerprompt.training.config import AdaptRun, config_hash, train_settings
from centerprompt.training.devices import rank
from centerprompt.training.loop import TrainConfig, Trainer
from centerprompt.training.presets import get_preset

logger = logging.getLogger(__name__)


def adapt_config(run: AdaptRun, splits: Splits, base: BaseCheckpoint | None = None) -> dict[str, Any]:
    """Everything that determines an adaptation's result: ``config.json`` of its folder.

    The base checkpoint enters by the hash of its weights, so a retrained base (same path, new
    weights) is a new configuration; a foreign one also by how it was read (:func:`base_provenance`).
    ``base``: ``run``'s base model when already opened.
    """
    base = open_base(base or run.base_spec)
    preset = get_preset(base.extra.get("preset", "cpu"))
    strategy = get_strategy(run.strategy)
    adapt_train, adapt_val = adaptation_case_ids(splits, run.centers, shots=run.shots, seed=run.seed)
    cfg = train_settings(run, preset, run.epochs, strategy, run.optimizer)
    return {"job": "adapt", **run.provenance(), **base_provenance(base), "train": cfg.__dict__,
            "splits_sha256": splits.sha256, "adapt_train": adapt_train, "adapt_val": adapt_val}  # fmt: skip


def adapt(run: AdaptRun, *, on_change: str = "refuse", base: BaseCheckpoint | None = None) -> dict[str, Any]:
    """Adapt the frozen base model to ``run.center`` with ``run.shots`` labelled cases and one strategy.

    Writes ``OUT/adapter.safetensors`` (what the strategy trained, best validation epoch),
    ``OUT/splits.json`` (the split used: ``run.splits``, ``DATA/splits.json``, the one the base was
    pretrained with, this folder's earlier one, or made with the seed) and ``OUT/summary.json``
    (parameters, artifact bytes, wall time, peak memory, the split's source and skipped cases).
    ``base``: ``run``'s base model when the caller has already opened it (an experiment opens it
    once for every stage).
    """
    run_dir, strategy = Path(run.out), get_strategy(run.strategy)
    with run_log(run_dir):
        base = open_base(base or run.base_spec)  # refuse a wrong file before reading the data
        cases, splits = load_index(run.data_dir, skip_bad_cases=run.skip_bad_cases, seed=run.seed, cache_dir=run_dir,
                                   splits_file=run.splits, split_defaults=split_defaults(base, run_dir))  # fmt: skip
        check_base_split(base, splits)
        config = adapt_config(run, splits, base)
        finished = open_run(run_dir, config, resume=run.resume, on_change=on_change, predates=run.defaults())
        if finished is not None:
            return finished
        keep_splits(splits, run_dir)
        for center in set(run.centers) & set(base.extra.get("train_centers", [])):
            logger.warning("center %s was part of the base model's pretraining data", center)
        preprocess = base.preprocess
        torch.manual_seed(run.seed)
        model = base.build(**strategy.model_fields(run.num_prompts, run.prompt_dropout, base.config))
        params = apply_strategy(model, run.strategy, **run.options)
        summary: dict[str, Any] = {"job": "adapt", "strategy": run.strategy, "center": join_centers(run.centers),
                                   **parameter_report(model), "train_seconds": 0.0, "peak_memory_mb": 0.0,
                                   "artifact": None, "artifact_bytes": 0, "config_hash": config_hash(config),
                                   "splits": splits.record()}  # fmt: skip
        if strategy.trains:
            logger.info("adapting to %s with %s on %d cases", run.center, run.strategy, len(config["adapt_train"]))
            cfg = TrainConfig(**config["train"])
            cached = CachedCases.load([cases[i] for i in config["adapt_train"]], [cases[i] for i in config["adapt_val"]],
                                      preprocess)  # fmt: skip
            if strategy.prepare is not None:  # e.g. prompts initialised from the new center's tokens
                model.eval()
                strategy.prepare(model, cached.first_crops(cfg.seed).to(next(model.parameters()).device))
            trainer = Trainer(model, params, cached.train, cfg)
            summary.update(fit_cases(trainer, cached, run_dir, resume=run.resume, progress=run.progress))
            if rank() == 0:
                extra = {"center": join_centers(run.centers), "shots": run.shots, "base": str(run.base),
                         "preprocess": preprocess.to_dict(), "splits_sha256": splits.sha256}  # fmt: skip
                artifact = save_adapter(model, run_dir / "adapter.safetensors", run.strategy, run.options, extra=extra)
                summary.update(artifact=str(artifact), artifact_bytes=artifact.stat().st_size)
        if rank() == 0:
            write_json(summary, run_dir / SUMMARY)
    return summary
