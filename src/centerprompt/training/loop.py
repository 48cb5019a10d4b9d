"""One training loop for pretraining, adaptation and federated sites: resumable, seeded, DDP-ready.

The loop trains whatever parameters a strategy left trainable. :class:`Trainer` holds what lasts
between epochs and runs one (the same steps wherever training runs); :func:`fit` adds validation,
early stopping and checkpoints that hold only the trained tensors (plus optimizer, schedule and
counters), so an adaptation run checkpoints kilobytes while pretraining checkpoints the whole model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.optimizers import WarmupCosineSchedule
from torch import nn
from torch.utils.data import Dataset, DistributedSampler
from tqdm.auto import tqdm

from centerprompt.weights import load_weights_only
from centerprompt.files import atomic_path, bars
from centerprompt.models.cpu_conv import onednn_conv3d
from centerprompt.training.tracking import TENSORBOARD_DIR, Curves
from centerprompt.training.devices import (
    agreed,
    cpu_layout,
    default_device,
    is_distributed,
    peak_memory,
    rank,
    seed_everything,
    to_layout,
    trains_3d_kernels,
)

logger = logging.getLogger(__name__)


LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.jsonl"
# Where an epoch's time goes (per epoch in metrics.jsonl, summed in TrainResult): waiting for the
# loader, training steps, validation, and writing best.pt/last.pt.
PHASES = ("data_s", "step_s", "val_s", "save_s")


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9),
}


@dataclass
class TrainConfig:
    """Optimisation settings (AdamW or SGD, warm-up then cosine decay, gradient clipping).

    ``optimizer="sgd"`` is VPT's recipe for prompts (SGD with momentum 0.9 and large learning
    rates); AdamW is the default for everything.

    ``patience`` stops training after that many validations without improvement of the
    validation Dice (0 disables early stopping); validations up to epoch ``patience_from`` do not
    count. An adaptation starts at a trained optimum and its validation Dice often falls for
    several epochs before it rises above the start (measured: full fine-tuning on the factorial
    ACQPOL center fell for 5 epochs and was back at epoch 1's level by epoch 11, when patience 10
    counted from the start ended the run and kept epoch 1). ``amp`` (bf16 autocast) and ``compile``
    (``torch.compile``) are options for GPU users. ``class_weights`` (background, GTVp, GTVn)
    weight both halves of the Dice+CE loss (MONAI's ``DiceCELoss`` passes them to its Dice too):
    small lymph nodes are a tiny fraction of the voxels, and an unweighted loss can leave GTVn
    unlearned.
    """

    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    warmup_epochs: int = 2
    batch_size: int = 2
    grad_clip: float = 1.0
    patience: int = 10
    patience_from: int = 0
    val_every: int = 1
    seed: int = 0
    amp: bool = False
    compile: bool = False
    num_workers: int = 0
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.class_weights is not None:
            self.class_weights = tuple(float(w) for w in self.class_weights)  # a JSON list read back
            if any(w <= 0 for w in self.class_weights):
                raise ValueError(f"class_weights must be positive, got {self.class_weights}.")
        if self.epochs < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("epochs, batch_size and val_every must be at least 1.")
        if self.patience_from < 0:
            raise ValueError(f"patience_from must not be negative, got {self.patience_from}.")
        if not (math.isfinite(self.lr) and self.lr > 0) or not math.isfinite(self.weight_decay):
            raise ValueError(f"lr must be a positive finite number and weight_decay finite, got {self.lr}, {self.weight_decay}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")


@dataclass
class TrainResult:
    best_metric: float
    best_epoch: int
    epochs_run: int
    train_seconds: float
    peak_memory_mb: float
    stopped_early: bool
    phase_seconds: dict[str, float]  # where train_seconds went: PHASES summed over epochs


# ----------------------------------------------------------------------------- checkpoints


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    own = dict(model.named_parameters())
    wrong = [n for n, t in state.items() if n not in own or own[n].shape != t.shape]
    if wrong or set(state) != {n for n, p in own.items() if p.requires_grad}:
        raise ValueError(f"{source}: checkpoint does not belong to this model and strategy (e.g. {wrong[:3]}).")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def _save(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load(path: Path) -> dict[str, Any]:
    return load_weights_only(path, remedy="delete it to start over")


class NonFiniteLoss(ValueError):
    """Training diverged: the loss is NaN or infinite. Nothing of the diverged epoch is saved."""

    def __init__(self, message: str, loss: float = math.nan, step: int = 0) -> None:
        super().__init__(message)
        self.loss, self.step = loss, step


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of every training job (the one place one is made): ``cfg.optimizer`` over
    ``params`` with ``cfg.lr`` and ``cfg.weight_decay`` (the strategy's, from the registry)."""
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """What training keeps from epoch to epoch: loader, Dice+CE loss, optimizer and the warm-up +
    cosine schedule over ``cfg.epochs``, all built from ``cfg``.

    :func:`fit` drives it with validation, checkpoints and early stopping; a federated site runs its
    epochs round by round (``epoch`` continues the count across rounds, so one site trains as a
    central run of the same epochs does, its optimizer moments kept between rounds). Every epoch
    reseeds all random sources from ``(seed, epoch)``: a resumed run draws what an uninterrupted
    one draws.
    """

    def __init__(
        self, model: nn.Module, params: list[nn.Parameter], train_data: Dataset, cfg: TrainConfig,
        device: torch.device | None = None, batch_inputs: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        if not params:
            raise ValueError("nothing to train: the strategy left no trainable parameter.")
        self.model, self.params, self.data, self.cfg = model, params, train_data, cfg
        self.device = device or default_device()
        self.batch_inputs = batch_inputs
        model.to(self.device)
        self.optimizer = build_optimizer(params, cfg)
        self.sampler = DistributedSampler(train_data, seed=cfg.seed) if is_distributed() else None
        self.generator = torch.Generator()
        self.loader = DataLoader(
            train_data, batch_size=cfg.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            num_workers=cfg.num_workers, generator=self.generator, drop_last=len(train_data) > cfg.batch_size,
        )  # fmt: skip
        self.steps_per_epoch = max(1, len(self.loader))
        self.scheduler = WarmupCosineSchedule(self.optimizer, warmup_steps=cfg.warmup_epochs * self.steps_per_epoch,
                                              t_total=cfg.epochs * self.steps_per_epoch)  # fmt: skip
        weight = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, device=self.device)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
        self.net: nn.Module = model
        if is_distributed():
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        on_cpu = self.device.type == "cpu" and not cfg.compile
        self.channels_last = on_cpu and trains_3d_kernels(params)
        self._conv3d = onednn_conv3d if on_cpu else contextlib.nullcontext

    @contextlib.contextmanager
    def placed(self) -> Iterator[None]:
        """Where epochs run: on the CPU, 3D kernels in channels-last order with oneDNN's
        convolutions (:func:`cpu_layout`); the model is given back in its usual layout."""
        with cpu_layout(self.model, self.channels_last), self._conv3d():
            yield

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def catch_up(self, epoch: int) -> None:
        """Move the schedule to the start of ``epoch`` (a site that joins, or restarts, mid-run)."""
        with warnings.catch_warnings():  # stepping a schedule before its optimizer is the point here
            warnings.simplefilter("ignore", UserWarning)
            while self.scheduler.last_epoch < epoch * self.steps_per_epoch:
                self.scheduler.step()

    def step(self, image: torch.Tensor, label: torch.Tensor, penalty: Callable[[], torch.Tensor] | None = None,
             inputs: Mapping[str, Any] | None = None) -> float:  # fmt: skip
        """One optimiser step: forward (with the model's other ``inputs``, e.g. each sample's center)
        and loss (plus ``penalty``, e.g. FedProx's proximal term), a stop on a non-finite loss before
        anything is updated, backward, gradient clipping, step of optimizer and schedule. The loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            loss = self.loss_fn(self.net(image, **(inputs or {})), label)
        if penalty is not None:
            loss = loss + penalty()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the training loss became {loss.item()}", loss.item())
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def epoch(
        self, epoch: int, *, max_steps: int = 0, penalty: Callable[[], torch.Tensor] | None = None,
        phases: dict[str, float] | None = None,
    ) -> list[float]:  # fmt: skip
        """Train epoch ``epoch`` (from 0), or its first ``max_steps`` steps; the steps' losses.
        ``penalty``: a term added to each step's loss (FedProx); ``phases`` gains the seconds spent
        waiting for data and stepping. A non-finite loss raises :class:`NonFiniteLoss` naming the step."""
        seed = self.cfg.seed * 1000 + epoch + 7919 * rank()
        seed_everything(seed)
        self.generator.manual_seed(seed)
        transform = getattr(self.data, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed % 2**32)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        phases = phases if phases is not None else dict.fromkeys(PHASES, 0.0)
        self.net.train()
        losses: list[float] = []
        mark = time.perf_counter()
        for batch in self.loader:
            image, label = to_layout(batch["image"], self.device, self.channels_last), batch["label"].to(self.device)
            phases["data_s"] += (now := time.perf_counter()) - mark
            try:
                losses.append(self.step(image, label, penalty, self.batch_inputs(batch) if self.batch_inputs else None))
            except NonFiniteLoss as err:
                raise NonFiniteLoss(str(err), err.loss, len(losses)) from None
            phases["step_s"] += (mark := time.perf_counter()) - now
            if max_steps and len(losses) >= max_steps:
                break
        return losses


def _diverged(run_dir: Path, err: NonFiniteLoss, epoch: int, finished: int, lr: float) -> str:
    kept = f"{run_dir / LAST_CHECKPOINT} keeps epoch {finished}" if finished else "nothing was saved"
    return (f"{run_dir}: the training loss became {err.loss} at epoch {epoch + 1}, step {err.step + 1}; training "
            f"stopped ({kept}); lower --lr (now {lr:g}) and run again.")


def fit(
    trainer: Trainer,
    run_dir: str | Path,
    validate: Callable[[nn.Module], float] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run ``trainer`` (its model's trainable ``params`` on its data) for ``cfg.epochs`` epochs.

    ``validate(model) -> float`` (higher is better, e.g. the mean aggregated Dice) picks the best
    epoch and drives early stopping; without it the last epoch is the best. The run folder gets
    ``metrics.jsonl`` (one line per epoch), ``last.pt`` (resumable state: trainable tensors,
    optimizer, schedule, counters) and ``best.pt`` (the best trainable tensors): an adaptation
    checkpoints kilobytes, pretraining the whole model. On return the model holds the best tensors.
    Under ``torchrun`` the model is wrapped in DDP and rank 0 alone writes.
    """
    run_dir, model, cfg, device = Path(run_dir), trainer.model, trainer.cfg, trainer.device
    writer = rank() == 0
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "best_metric": -1.0, "best_epoch": 0, "since_best": 0, "seconds": 0.0, "peak_mb": 0.0}
    last_path, best_path = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT
    if resume and last_path.exists():
        ckpt = _load(last_path)
        _load_trainable_state(model, ckpt["trainable"], last_path)
        trainer.load_state_dict(ckpt)
        state.update(ckpt["state"])
        logger.info("resumed %s at epoch %d", run_dir, state["epoch"])
    elif writer:  # a fresh start: nothing of an earlier run may leak into this one
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)

    curves = Curves(run_dir, cfg.__dict__) if writer else None
    bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc=f"train {run_dir.name}", unit="epoch",
               disable=bars(bool(progress and writer)), leave=False)  # fmt: skip
    stopped_early = False
    with peak_memory(device) as mem, trainer.placed():
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            started = time.perf_counter()
            phases = dict.fromkeys(PHASES, 0.0)
            try:
                losses = trainer.epoch(epoch, phases=phases)
            except NonFiniteLoss as err:
                raise NonFiniteLoss(_diverged(run_dir, err, epoch, state["epoch"], cfg.lr), err.loss, err.step) from None
            state["epoch"] = epoch + 1
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                                   "lr": trainer.scheduler.get_last_lr()[0]}  # fmt: skip
            improved = validate is None
            if validate is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                mark = time.perf_counter()
                model.eval()
                metric = agreed(validate(model) if writer else 0.0, device)
                row["val_dice"] = metric
                improved = metric > state["best_metric"]
                counted = int(epoch + 1 > cfg.patience_from)
                state["since_best"] = 0 if improved else state["since_best"] + counted
                phases["val_s"] += time.perf_counter() - mark
            if improved:
                state["best_metric"] = row.get("val_dice", state["best_metric"])
                state["best_epoch"] = epoch + 1
            mark = time.perf_counter()
            state["seconds"] += mark - started
            state["phases"] = {k: state.get("phases", {}).get(k, 0.0) + v for k, v in phases.items()}
            if writer:  # last.pt holds this epoch's times but for its own writing
                if improved:
                    _save({"trainable": _trainable_state(model)}, best_path)
                _save({"trainable": _trainable_state(model), **trainer.state_dict(), "state": state}, last_path)
            phases["save_s"] = saved = time.perf_counter() - mark
            state["seconds"] += saved
            state["phases"]["save_s"] += saved
            row.update(seconds=state["seconds"], **{k: round(v, 3) for k, v in phases.items()})
            if writer:
                with open(run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if curves is not None:
                curves.log(row, epoch + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row.get('val_dice', float('nan')):.3f}")
            logger.debug("epoch %d: %s", epoch + 1, row)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
            if validate is not None and cfg.patience and state["since_best"] >= cfg.patience:
                stopped_early = True
                logger.info("early stop at epoch %d (best %.4f at %d)", epoch + 1, state["best_metric"], state["best_epoch"])
                break
    bar.close()
    if curves is not None:
        curves.close()
    state["peak_mb"] = max(state["peak_mb"], mem["peak_mb"])
    if is_distributed():
        dist.barrier()
    if best_path.exists():
        _load_trainable_state(model, _load(best_path)["trainable"], best_path)
    model.eval()
    return TrainResult(
        best_metric=state["best_metric"], best_epoch=state["best_epoch"], epochs_run=state["epoch"],
        train_seconds=state["seconds"], peak_memory_mb=state["peak_mb"], stopped_early=stopped_early,
        phase_seconds={k: round(v, 2) for k, v in state.get("phases", dict.fromkeys(PHASES, 0.0)).items()},
    )  # fmt: skip
