"""Training on cases: a job's training cases cached with the training transforms, its validation
cases as a scorer, and :func:`~centerprompt.training.loop.fit` run on them (pretraining and
adaptation alike; a federated site caches its own cases the same way)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from centerprompt.data.cases import Case
from centerprompt.data.transforms import PreprocessConfig, make_dataset, train_transforms
from centerprompt.scoring import Scorer, validator
from centerprompt.training.loop import Trainer, fit

logger = logging.getLogger(__name__)


@dataclass
class CachedCases:
    """Training cases as a cached dataset (random crops, flips, intensity changes drawn per epoch)
    and validation cases as a scorer on the preprocessed grid; ``seconds``: what caching took."""

    train: Dataset
    scorer: Scorer
    seconds: float

    @classmethod
    def load(cls, train: Sequence[Case], val: Sequence[Case], preprocess: PreprocessConfig) -> CachedCases:
        started = time.perf_counter()
        train_ds = make_dataset(list(train), train_transforms(preprocess))
        scorer = Scorer(list(val), preprocess, score_at="preprocessed")
        return cls(train_ds, scorer, time.perf_counter() - started)

    def first_crops(self, seed: int) -> torch.Tensor:
        """One training crop of each case, drawn with ``seed`` (what a strategy's ``prepare`` sees)."""
        self.train.transform.set_random_state(seed=seed)
        crops = [self.train[i] for i in range(len(self.train))]
        crops = [c[0] if isinstance(c, list) else c for c in crops]  # RandCropByPosNegLabeld gives lists
        return torch.stack([torch.as_tensor(c["image"]) for c in crops])  # MetaTensors become plain tensors


def fit_cases(trainer: Trainer, cached: CachedCases, run_dir: Path, *, resume: bool, progress: bool) -> dict[str, Any]:
    """:func:`fit` with the validation DSCagg; the result's fields and ``cache_seconds`` for summary.json."""
    result = fit(trainer, run_dir, validator(cached.scorer), resume=resume, progress=progress)
    logger.info("%.0f s to cache the cases, %.0f s to train: %s", cached.seconds, result.train_seconds,
                result.phase_seconds)  # fmt: skip
    return {**result.__dict__, "cache_seconds": cached.seconds}
