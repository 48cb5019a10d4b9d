"""One training loop for pretraining and adaptation: resumable, seeded, DDP-ready.

The loop trains whatever parameters a strategy left trainable. Its checkpoints hold only those
tensors (plus optimizer, schedule and counters), so an adaptation run checkpoints kilobytes while
pretraining checkpoints the whole model. Every epoch reseeds all random sources from
``(seed, epoch)``, which is what lets ``resume`` reach the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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

from centerprompt.checkpoints import load_weights_only
from centerprompt.files import atomic_path, bars
from centerprompt.models.cpu_conv import onednn_conv3d

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
    weight the cross-entropy half of the Dice+CE loss: small lymph nodes are a tiny fraction of
    the voxels, and an unweighted loss can leave GTVn unlearned.
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


# ----------------------------------------------------------------------------- process helpers


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_distributed() -> bool:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); True if joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory of the enclosed work in MB, above what was in use when it started.

    On CUDA this is the allocator's peak; on CPU the process's resident set size, sampled every
    5 ms in a thread (an approximation: allocations shorter than that can be missed).
    """
    result = {"peak_mb": 0.0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    if not os.path.exists("/proc/self/statm"):
        yield result
        return
    start, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(0, max(peak[0], _rss_bytes()) - start) / 2**20


@contextmanager
def cpu_layout(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Train a 3D network in channels-last memory order on the CPU, and give it back contiguous.

    oneDNN computes 3D convolution weight gradients about twice as fast on channels-last tensors
    (cpu preset, 2-core AMD EPYC: full fine-tuning 0.77 s a step against 0.93 s, partial 0.41 against
    0.49; prompts, LoRA and the 1^3 head gain nothing, so ``fit`` asks for it only where a 3D kernel
    trains; benchmarks/RESULTS.md). The model is returned in the default order so that saved tensors
    and later users see ordinary contiguous weights.
    """
    if not enabled:
        yield
        return
    kernels = [p for p in model.parameters() if p.dim() == 5]  # not ``model.to``: it also takes 4-D tensors
    for p in kernels:
        p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    try:
        yield
    finally:
        for p in kernels:
            p.data = p.data.contiguous()


def trains_3d_kernels(params: list[nn.Parameter]) -> bool:
    """Whether 3D convolution kernels wider than 1 train: where channels-last pays (:func:`cpu_layout`)."""
    return any(p.dim() == 5 and p.shape[2:].numel() > 1 for p in params)


def to_layout(image: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    image = image.to(device)
    return image.contiguous(memory_format=torch.channels_last_3d) if channels_last and image.dim() == 5 else image


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


def _reseed_epoch(cfg: TrainConfig, epoch: int, dataset: Dataset, loader_gen: torch.Generator) -> None:
    seed = cfg.seed * 1000 + epoch + 7919 * rank()
    seed_everything(seed)
    loader_gen.manual_seed(seed)
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % 2**32)


class NonFiniteLoss(ValueError):
    """Training diverged: the loss is NaN or infinite. Nothing of the diverged epoch is saved."""

    def __init__(self, message: str, loss: float = math.nan) -> None:
        super().__init__(message)
        self.loss = loss


def train_step(
    net: nn.Module, loss_fn: Callable[..., torch.Tensor], image: torch.Tensor, label: torch.Tensor,
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], *, grad_clip: float = 1.0, amp: bool = False,
    penalty: Callable[[], torch.Tensor] | None = None, inputs: Mapping[str, Any] | None = None,
) -> float:  # fmt: skip
    """One optimiser step, the same for ``fit`` and a federated site's round: forward (with the
    model's other ``inputs``, e.g. each sample's center) and loss (plus ``penalty``, e.g. FedProx's
    proximal term), a stop on a non-finite loss before anything is updated, backward, gradient
    clipping, step. Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(net(image, **(inputs or {})), label)
    if penalty is not None:
        loss = loss + penalty()
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"the training loss became {loss.item()}", loss.item())
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.item()


def _diverged(run_dir: Path, loss: float, epoch: int, step: int, finished: int, lr: float) -> str:
    kept = f"{run_dir / LAST_CHECKPOINT} keeps epoch {finished}" if finished else "nothing was saved"
    return (f"{run_dir}: the training loss became {loss} at epoch {epoch + 1}, step {step + 1}; training stopped "
            f"({kept}); lower --lr (now {lr:g}) and run again.")


# ----------------------------------------------------------------------------- the loop


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    train_data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    validate: Callable[[nn.Module], float] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    batch_inputs: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> TrainResult:
    """Train ``params`` of ``model`` on ``train_data`` (dicts with "image" and "label").

    ``batch_inputs(batch)``: the model's other forward arguments for a batch (prompt-aware
    pretraining gives each sample's center); drawn after the epoch's reseeding, so resumable.

    ``validate(model) -> float`` (higher is better, e.g. the mean aggregated Dice) picks the best
    epoch and drives early stopping; without it the last epoch is the best. The run folder gets
    ``metrics.jsonl`` (one line per epoch), ``last.pt`` (resumable state) and ``best.pt`` (the best
    trainable tensors). On return the model holds the best tensors. Under ``torchrun`` the model is
    wrapped in DDP and rank 0 alone writes.
    """
    run_dir = Path(run_dir)
    device = device or default_device()
    writer = rank() == 0
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    if not params:
        raise ValueError("nothing to train: the strategy left no trainable parameter.")
    model.to(device)
    optimizer = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = DistributedSampler(train_data, seed=cfg.seed) if is_distributed() else None
    loader_gen = torch.Generator()
    loader = DataLoader(
        train_data, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=cfg.num_workers, generator=loader_gen, drop_last=len(train_data) > cfg.batch_size,
    )  # fmt: skip
    steps_per_epoch = max(1, len(loader))
    scheduler = WarmupCosineSchedule(
        optimizer, warmup_steps=cfg.warmup_epochs * steps_per_epoch, t_total=cfg.epochs * steps_per_epoch
    )
    weight = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, device=device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    net: nn.Module = model
    if is_distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    state = {"epoch": 0, "best_metric": -1.0, "best_epoch": 0, "since_best": 0, "seconds": 0.0, "peak_mb": 0.0}
    last_path, best_path = run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT
    if resume and last_path.exists():
        ckpt = _load(last_path)
        _load_trainable_state(model, ckpt["trainable"], last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state.update(ckpt["state"])
        logger.info("resumed %s at epoch %d", run_dir, state["epoch"])
    elif writer:  # a fresh start: nothing of an earlier run may leak into this one
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)

    bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc=f"train {run_dir.name}", unit="epoch",
               disable=bars(bool(progress and writer)), leave=False)  # fmt: skip
    stopped_early = False
    on_cpu = device.type == "cpu" and not cfg.compile
    channels_last = on_cpu and trains_3d_kernels(params)
    conv3d = onednn_conv3d() if on_cpu else contextlib.nullcontext()
    with peak_memory(device) as mem, cpu_layout(model, channels_last), conv3d:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            started = time.perf_counter()
            phases = dict.fromkeys(PHASES, 0.0)
            _reseed_epoch(cfg, epoch, train_data, loader_gen)
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            losses = []
            mark = time.perf_counter()
            for batch in loader:
                image, label = to_layout(batch["image"], device, channels_last), batch["label"].to(device)
                phases["data_s"] += (now := time.perf_counter()) - mark
                try:
                    losses.append(train_step(net, loss_fn, image, label, optimizer, params, grad_clip=cfg.grad_clip,
                                             amp=cfg.amp, inputs=batch_inputs(batch) if batch_inputs else None))  # fmt: skip
                except NonFiniteLoss as err:
                    raise NonFiniteLoss(_diverged(run_dir, err.loss, epoch, len(losses), state["epoch"], cfg.lr)) from None
                scheduler.step()
                phases["step_s"] += (mark := time.perf_counter()) - now
            state["epoch"] = epoch + 1
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                                   "lr": scheduler.get_last_lr()[0]}  # fmt: skip
            improved = validate is None
            if validate is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                mark = time.perf_counter()
                model.eval()
                metric = _agreed(validate(model) if writer else 0.0, device)
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
                _save({"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "state": state}, last_path)  # fmt: skip
            phases["save_s"] = saved = time.perf_counter() - mark
            state["seconds"] += saved
            state["phases"]["save_s"] += saved
            row.update(seconds=state["seconds"], **{k: round(v, 3) for k, v in phases.items()})
            if writer:
                with open(run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
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


def _agreed(value: float, device: torch.device) -> float:
    """Rank 0's validation metric, shared with every rank so they stop at the same epoch."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())
