"""What one hospital does in a federated run, without Flower: read its own cases, train the tensors
the server sent for a few local epochs, score them on its own validation cases.

A site never sends a case, an ID or a voxel: :func:`train_round` and :func:`evaluate_round`
return tensors named like the model's own and scalar metrics (the number of cases is what FedAvg
weights by), and :mod:`centerprompt.federated.flower` packs nothing else into a message.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.data import DataLoader  # list_data_collate: several crops of a case become one batch

from centerprompt.checkpoints import BaseCheckpoint
from centerprompt.data.checks import validate_cases
from centerprompt.data.hecktor import Case, find_cases, resolve_splits
from centerprompt.data.transforms import PreprocessConfig, make_dataset, train_transforms
from centerprompt.jobs import IN_CHANNELS, OUT_CHANNELS, adaptation_case_ids, base_splits, open_base
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.presets import Preset, get_preset
from centerprompt.scoring import Scorer, validator
from centerprompt.strategies import FULL, apply_strategy, get_strategy
from centerprompt.models.cpu_conv import onednn_conv3d
from centerprompt.train import (
    cpu_layout,
    default_device,
    seed_everything,
    to_layout,
    train_step,
    trains_3d_kernels,
)

logger = logging.getLogger(__name__)

JOBS = ("pretrain", "adapt")


@dataclass(frozen=True)
class FederatedJob:
    """Everything a site needs to train its part of a round: sent once as the run's configuration
    (flat, so that Flower's run config and ConfigRecord carry it as it is).

    ``pretrain``: the whole model from a seeded initialisation, the preset's loss and optimiser.
    ``adapt``: the strategy's tensors on the frozen ``base`` (a file every site holds), with the
    sites' adaptation cases (``shots`` per site, as ``adapt`` takes them). ``local_steps`` > 0 stops
    a site's round after that many optimiser steps (for checks, or sites of very different size).
    """

    job: str = "pretrain"
    preset: str = "cpu"
    rounds: int = 10
    local_epochs: int = 1
    local_steps: int = 0
    lr: float = 0.0  # 0: the preset's pretraining rate, or the strategy's
    mu: float = 0.0  # FedProx proximal term; 0 is FedAvg
    seed: int = 0
    base: str = ""
    strategy: str = "deep"
    prompts: int = 10
    shots: int = 8

    def __post_init__(self) -> None:
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {', '.join(JOBS)}, got {self.job!r}.")
        get_preset(self.preset)
        if self.rounds < 1 or self.local_epochs < 1 or self.local_steps < 0 or self.mu < 0 or self.lr < 0:
            raise ValueError("rounds and local epochs must be at least 1; local steps, mu and lr not negative.")
        if self.job == "adapt":
            if not self.base:
                raise ValueError("a federated adaptation needs the base model every site holds (--base).")
            if not get_strategy(self.strategy).trains:
                raise ValueError(f"strategy {self.strategy!r} trains nothing: there is nothing to federate.")

    def to_config(self) -> dict[str, Any]:
        """Flower run-config keys (hyphenated, scalar)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FederatedJob:
        defaults = asdict(cls())
        values = {k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in defaults}
        return cls(**{k: type(defaults[k])(v) for k, v in values.items()})

    def learning_rate(self) -> float:
        if self.lr:
            return self.lr
        return get_preset(self.preset).pretrain_lr if self.job == "pretrain" else get_strategy(self.strategy).lr


WARMUP_ROUNDS = 2  # as TrainConfig.warmup_epochs


def round_lr(job: FederatedJob, server_round: int) -> float:
    """Linear warm-up over the first rounds, then cosine decay: the schedule centralised training
    follows over epochs (a short run of up to twice the warm-up has none)."""
    warmup = WARMUP_ROUNDS if job.rounds > 2 * WARMUP_ROUNDS else 0
    if server_round <= warmup:
        return job.learning_rate() * server_round / (warmup + 1)
    progress = (server_round - 1 - warmup) / max(1, job.rounds - warmup)
    return job.learning_rate() * 0.5 * (1 + np.cos(np.pi * progress))


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
    model = base.build(**get_strategy(job.strategy).model_fields(job.prompts, base=base.config))
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
        self.batch_size, self.class_weights = preset.batch_size, preset.class_weights
        self._train_data = None
        self._scorer: Scorer | None = None

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

    def train_round(self, state: Mapping[str, torch.Tensor], lr: float, server_round: int) -> tuple[OrderedDict[str, torch.Tensor], dict[str, float]]:
        """Local epochs from ``state``; the trained tensors and {train-loss, num-examples}."""
        self.load(state)
        job = self.job
        if self._train_data is None:
            self._train_data = make_dataset(self.train_cases, train_transforms(self.preprocess))
        seed_everything(job.seed * 1000 + server_round)
        generator = torch.Generator().manual_seed(job.seed * 1000 + server_round)
        loader = DataLoader(self._train_data, batch_size=self.batch_size, shuffle=True, generator=generator,
                            drop_last=len(self._train_data) > self.batch_size)  # fmt: skip
        weight = None if self.class_weights is None else torch.tensor(self.class_weights, device=self.device)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
        self.model.to(self.device).train()
        anchor = [p.detach().clone() for p in self.params] if job.mu > 0 else None

        def proximal() -> torch.Tensor:  # FedProx: stay near the round's global tensors
            return job.mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(self.params, anchor))

        optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-5)
        losses: list[float] = []
        on_cpu = self.device.type == "cpu"  # the CPU layout and kernels fit uses (train.py)
        channels_last = on_cpu and trains_3d_kernels(self.params)
        with cpu_layout(self.model, channels_last), onednn_conv3d() if on_cpu else contextlib.nullcontext():
            for _ in range(job.local_epochs):
                for item in loader:
                    image, label = to_layout(item["image"], self.device, channels_last), item["label"].to(self.device)
                    losses.append(train_step(self.model, loss_fn, image, label, optimizer, self.params,
                                             penalty=proximal if anchor is not None else None))  # fmt: skip
                    if job.local_steps and len(losses) >= job.local_steps:
                        break
                if job.local_steps and len(losses) >= job.local_steps:
                    break
        self.model.cpu()
        metrics = {"train-loss": float(np.mean(losses)), "num-examples": float(len(self.train_cases))}
        return trainable_tensors(self.model), metrics

    def evaluate_round(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Mean aggregated Dice (GTVp, GTVn) of ``state`` on this site's validation cases."""
        self.load(state)
        if not self.val_cases:
            return {"val-dsc-agg": 0.0, "num-examples": 0.0}
        if self._scorer is None:
            self._scorer = Scorer(self.val_cases, self.preprocess, score_at="preprocessed")
        self.model.to(self.device).eval()
        value = validator(self._scorer)(self.model)
        self.model.cpu()
        return {"val-dsc-agg": value, "num-examples": float(len(self.val_cases))}
