"""What one hospital does in a federated run, without Flower: read its own cases, train the tensors
the server sent for a few local epochs, score them on its own validation cases.

A site trains with the same :class:`~centerprompt.training.loop.Trainer` as a central run, with
the settings :func:`~centerprompt.training.config.train_settings` gives both, and keeps it (its
optimizer moments and schedule) from round to round: only model tensors travel. One site alone
therefore trains exactly as a central run of the same epochs does.

A site never sends a case, an ID or a voxel: :func:`train_round` and :func:`evaluate_round`
return tensors named like the model's own and scalar metrics (the number of cases is what FedAvg
weights by), and :mod:`centerprompt.federated.flower` packs nothing else into a message.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from centerprompt.checkpoints import BaseCheckpoint
from centerprompt.data.checks import validate_cases
from centerprompt.data.cases import Case
from centerprompt.data.hecktor import find_cases, resolve_splits
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.runs.base import IN_CHANNELS, OUT_CHANNELS, base_splits, open_base
from centerprompt.runs.selection import adaptation_case_ids
from centerprompt.strategies import FULL, apply_strategy, get_strategy
from centerprompt.training.cases import CachedCases
from centerprompt.training.config import MAX_PROMPTS, train_settings
from centerprompt.training.devices import default_device
from centerprompt.training.loop import OPTIMIZERS, TrainConfig, Trainer
from centerprompt.training.presets import Preset, get_preset
from centerprompt.scoring import validator

logger = logging.getLogger(__name__)

JOBS = ("pretrain", "adapt")
# The server's rate when none is given (federated.aggregation): FedAvgM steps by the
# (momentum-accumulated) averaged change itself; FedAdam and FedYogi take a per-coordinate step of
# about this size each round.
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}


def check_server_optimizer(name: str, lr: float | None, momentum: float) -> None:
    """One clear error for a server optimiser, rate or momentum that cannot work."""
    if name not in DEFAULT_SERVER_LR:
        raise ValueError(f"server optimizer must be one of {', '.join(DEFAULT_SERVER_LR)}, got {name!r}.")
    if name == "fedavg" and (lr not in (None, 1.0) or momentum):
        raise ValueError("FedAvg has no server rate or momentum: choose --server-optimizer fedavgm, fedadam or fedyogi.")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"the server learning rate must be a positive number, got {lr}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"the server momentum must be in [0, 1), got {momentum}.")


@dataclass(frozen=True)
class FederatedJob:
    """Everything a site needs to train its part of a round: sent once as the run's configuration
    (flat, so that Flower's run config and ConfigRecord carry it as it is; None is left out).

    ``pretrain``: the whole model from a seeded initialisation, the preset's loss and optimiser.
    ``adapt``: the strategy's tensors on the frozen ``base`` (a file every site holds), with the
    sites' adaptation cases (``shots`` per site, as ``adapt`` takes them). The optimisation fields
    mean what they mean for ``pretrain`` and ``adapt`` (:func:`train_settings`), over
    ``rounds x local_epochs`` epochs. ``local_steps`` > 0 stops a site's round after that many
    optimiser steps (for checks, or sites of very different size); ``mu`` > 0 is FedProx.
    ``sites_per_round`` k > 0 trains k sites a round, in turn, from the last global tensors (1:
    cyclic weight transfer, the model handed from hospital to hospital; Chang et al. 2018), so a
    round is k/n of a pass over the federation's data and the sites take n/k times more steps in
    sequence than with every site in every round (0). ``server_optimizer`` is how the server
    combines a round (FedAvg, or FedAvgM, FedAdam, FedYogi with ``server_lr`` and
    ``server_momentum``: :mod:`centerprompt.federated.aggregation`).
    """

    job: str = "pretrain"
    preset: str = "cpu"
    rounds: int = 10
    local_epochs: int = 1
    local_steps: int = 0
    sites_per_round: int = 0  # 0: every site every round
    mu: float = 0.0  # FedProx proximal term; 0 is FedAvg
    seed: int = 0
    lr: float | None = None  # None: the preset's pretraining rate, or the strategy's
    batch_size: int | None = None  # None: the preset's
    optimizer: str = "adamw"
    base: str = ""
    strategy: str = "deep"
    num_prompts: int = 10
    prompt_dropout: float = 0.0
    shots: int = 8
    server_optimizer: str = "fedavg"
    server_lr: float | None = None  # None: DEFAULT_SERVER_LR's
    server_momentum: float = 0.0
    # What a central run also says, fixed here: every round trains, nothing stops early.
    patience = 0
    amp = False
    compile = False

    def __post_init__(self) -> None:
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {', '.join(JOBS)}, got {self.job!r}.")
        get_preset(self.preset)
        if self.rounds < 1 or self.local_epochs < 1 or min(self.local_steps, self.sites_per_round, self.mu, self.lr or 0) < 0:
            raise ValueError("rounds and local epochs must be at least 1; local steps, sites per round, mu and lr not negative.")
        if not 1 <= self.num_prompts <= MAX_PROMPTS or not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"num_prompts must be in [1, {MAX_PROMPTS}] and prompt_dropout in [0, 1).")
        check_server_optimizer(self.server_optimizer, self.server_lr, self.server_momentum)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.job == "adapt":
            if not self.base:
                raise ValueError("a federated adaptation needs the base model every site holds (--base).")
            if not get_strategy(self.strategy).trains:
                raise ValueError(f"strategy {self.strategy!r} trains nothing: there is nothing to federate.")

    def to_config(self) -> dict[str, Any]:
        """Flower run-config keys (hyphenated, scalar; None left out)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FederatedJob:
        defaults = asdict(cls())
        values = {k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in defaults}
        return cls(**{k: v if defaults[k] is None else type(defaults[k])(v) for k, v in values.items()})

    def train_config(self, preset: Preset) -> TrainConfig:
        """A site's optimisation settings: a central run's over ``rounds x local_epochs`` epochs."""
        strategy = get_strategy(self.strategy) if self.job == "adapt" else None
        return train_settings(self, preset, self.rounds * self.local_epochs, strategy, self.optimizer)


def job_model(job: FederatedJob) -> tuple[PromptedUNETR, PreprocessConfig, Preset]:
    """The model whose tensors ``job`` trains, frozen as its strategy says and built the same way at
    every site and on the server (same seed); with its preprocessing and the preset whose loss and
    batch size it trains with (an adaptation: the base model's, as ``adapt`` does)."""
    torch.manual_seed(job.seed)
    if job.job == "pretrain":
        preset = get_preset(job.preset)
        model = PromptedUNETR(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, **preset.model)
        apply_strategy(model, FULL)
        return model, preset.preprocess, preset
    base: BaseCheckpoint = open_base(job.base)
    model = base.build(**get_strategy(job.strategy).model_fields(job.num_prompts, job.prompt_dropout, base.config))
    apply_strategy(model, job.strategy)
    return model, base.preprocess, get_preset(base.extra.get("preset", "cpu"))


def trainable_tensors(model: PromptedUNETR) -> OrderedDict[str, torch.Tensor]:
    """What travels in a round: the tensors the job trains, by the model's own names, float32 on the CPU."""
    return OrderedDict((n, p.detach().cpu().float().contiguous()) for n, p in model.named_parameters() if p.requires_grad)


class Site:
    """One hospital's cases (its own folder, or its center's cases in a shared HECKTOR folder) and
    the model it trains. Only this site's images are read; the split of the whole folder (its
    ``splits.json``; for an adaptation the split the base was pretrained with; else made with the
    seed from the file names, per center) decides which are training cases, so a simulated
    federation trains on the cases centralised pretraining or ``adapt`` would."""

    def __init__(self, data_dir: str | Path, job: FederatedJob, center: str | None = None) -> None:
        self.data_dir, self.job = Path(data_dir), job
        index = find_cases(self.data_dir)
        centers = sorted({c.center for c in index})
        if center is None:
            if len(centers) != 1:
                raise ValueError(f"{self.data_dir} holds cases of {', '.join(centers)}: name this site's center.")
            center = centers[0]
        if center not in centers:
            raise ValueError(f"{self.data_dir} holds no case of center {center!r} (it has {', '.join(centers)}).")
        self.center = center
        own = validate_cases([c for c in index if c.center == center])
        # An adaptation tests on what the base never trained on: the base's recorded split comes first.
        defaults = [base_splits(open_base(job.base))] if job.job == "adapt" else []
        splits = resolve_splits(self.data_dir, index, seed=job.seed, defaults=defaults)
        by_id = {c.case_id: c for c in own}
        if job.job == "pretrain":
            train_ids, val_ids = splits[center]["train"], splits[center]["val"]
        else:
            train_ids, val_ids = adaptation_case_ids(splits, [center], shots=job.shots, seed=job.seed)
        self.train_cases: list[Case] = [by_id[i] for i in train_ids if i in by_id]
        self.val_cases: list[Case] = [by_id[i] for i in val_ids if i in by_id]
        if not self.train_cases:
            raise ValueError(f"site {center} of {self.data_dir} has no training case.")
        logger.info("site %s: %d training and %d validation cases (%s)", center, len(self.train_cases),
                    len(self.val_cases), job.job)  # fmt: skip
        self.device = default_device()
        self.model, self.preprocess, preset = job_model(job)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Each site draws its own batches, crops and augmentations (as a DDP rank does): with one
        # shared stream every site would pick positive or negative crops at the same steps.
        self.cfg = replace(job.train_config(preset), seed=job.seed + zlib.crc32(center.encode()) % 100_003)
        self._cached: CachedCases | None = None
        self._trainer: Trainer | None = None

    def _cases(self) -> CachedCases:
        if self._cached is None:
            self._cached = CachedCases.load(self.train_cases, self.val_cases, self.preprocess)
        return self._cached

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        if set(state) != expected:
            raise ValueError(f"the server sent {len(state)} tensors; site {self.center} trains {len(expected)} "
                             "others: the sites run different jobs or models.")  # fmt: skip
        with torch.no_grad():
            for name, tensor in state.items():
                if own[name].shape != tensor.shape:
                    raise ValueError(f"tensor {name}: the server sent shape {tuple(tensor.shape)}, "
                                     f"this site's model has {tuple(own[name].shape)}.")  # fmt: skip
                own[name].copy_(tensor)

    def train_round(self, state: Mapping[str, torch.Tensor], server_round: int) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
        """Epochs ``(round - 1) x local_epochs`` onwards from ``state``; the trained tensors and
        {train-loss, lr (at the round's end), num-examples}."""
        self.load(state)
        job = self.job
        if self._trainer is None:
            self._trainer = Trainer(self.model, self.params, self._cases().train, self.cfg, self.device)
        trainer = self._trainer
        first = (server_round - 1) * job.local_epochs
        trainer.catch_up(first)  # a site that joined late, restarted, or stopped rounds early with local_steps
        anchor = [p.detach().clone() for p in self.params] if job.mu > 0 else None

        def proximal() -> torch.Tensor:  # FedProx: stay near the round's global tensors
            return job.mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(self.params, anchor))

        self.model.to(self.device)
        losses: list[float] = []
        with trainer.placed():
            for epoch in range(first, first + job.local_epochs):
                left = job.local_steps - len(losses) if job.local_steps else 0
                losses += trainer.epoch(epoch, max_steps=left, penalty=proximal if anchor is not None else None)
                if job.local_steps and len(losses) >= job.local_steps:
                    break
        self.model.cpu()
        metrics = {"train-loss": float(np.mean(losses)), "lr": float(trainer.scheduler.get_last_lr()[0]),
                   "num-examples": float(len(self.train_cases))}  # fmt: skip
        return trainable_tensors(self.model), metrics

    def evaluate_round(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Mean aggregated Dice (GTVp, GTVn) of ``state`` on this site's validation cases."""
        self.load(state)
        if not self.val_cases:
            return {"val-dsc-agg": 0.0, "num-examples": 0.0}
        self.model.to(self.device).eval()
        value = validator(self._cases().scorer)(self.model)
        self.model.cpu()
        return {"val-dsc-agg": value, "num-examples": float(len(self.val_cases))}
