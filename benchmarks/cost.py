"""What each adaptation strategy costs: training step time and memory, inference, storage, data wait.

Every comparison runs in one process on one machine with the same weights and the same batch.
Strategies are interleaved round-robin (the order rotates every round), so machine noise hits all
of them alike; the figures are medians over the timed rounds and ratios to ``full``.

Training memory is counted, not sampled: weights + the tensors autograd saves for backward
(found with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded)
+ gradients + optimizer state. That is deterministic, unlike the resident set size, which is
reported beside it (``training.devices.peak_memory``; on CUDA the allocator's own peak).
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.checkpoint import checkpoint

from centerprompt.artifacts import save_adapter, save_model
from centerprompt.runs.base import IN_CHANNELS, OUT_CHANNELS
from centerprompt.models.prompted_unetr import MONAI_NUM_LAYERS, PromptedUNETR
from centerprompt.training.presets import PRESETS
from centerprompt.strategies import STRATEGIES, apply_strategy, parameter_report, strategy_names
from centerprompt.training.devices import peak_memory
from centerprompt.training.loop import TrainConfig, build_optimizer

COST_STRATEGIES = tuple(n for n in strategy_names() if STRATEGIES[n].trains)  # every registered strategy that trains
# The two configurations compared: the CPU demo and the paper's ViT-B (PromptedUNETR defaults).
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"model": dict(PRESETS["cpu"].model), "batch": 2},
    "vit-b": {"model": dict(PRESETS["vit-b"].model), "batch": 1},
}
# Levers measured as extra variants: name -> (strategy, activation checkpointing, bf16 autocast).
LEVER_VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "deep+ckpt": ("deep", True, False),
    "full+bf16": ("full", False, True),
    "deep+bf16": ("deep", False, True),
}
MB = 2**20


def build(
    model_kwargs: dict[str, Any], strategy: str, num_prompts: int = 10, seed: int = 0
) -> tuple[PromptedUNETR, list[nn.Parameter]]:
    """A model frozen for ``strategy``; the same seed gives every strategy the same backbone weights."""
    torch.manual_seed(seed)  # prompts are created after the backbone, so they do not shift its weights
    mode = STRATEGIES[strategy].prompt_mode
    model = PromptedUNETR(IN_CHANNELS, OUT_CHANNELS, prompt_mode=mode, num_prompts=num_prompts, **model_kwargs)
    params = apply_strategy(model, strategy)
    return model.train(), params


def checkpoint_backbone(model: PromptedUNETR) -> None:
    """Recompute the ViT blocks and the ViT-fed decoder blocks in backward instead of keeping their activations."""
    names = [f"vit.blocks.{i}" for i in range(model.num_layers)]
    names += [n for n, _ in model.named_children() if n.startswith("decoder") or n in ("encoder2", "encoder3", "encoder4")]
    for name in names:
        module = model.get_submodule(name)
        forward = module.forward
        module.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
        module.bench_checkpointed = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS so the next RSS peak starts from a clean baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class ActivationTracker:
    """Bytes autograd saves for backward, by top-level module, and the modules backward reaches.

    A top-level module is "reached" when one of its outputs requires grad: backward then runs
    through it (input gradients) even when none of its own weights train.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.by_module: dict[str, int] = {}
        self.reached: set[str] = set()
        self.stack: list[str] = []

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.params or ptr in self.seen:
            return
        self.seen.add(ptr)
        owner = self.stack[0] if self.stack else "loss and glue"
        self.by_module[owner] = self.by_module.get(owner, 0) + storage.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @contextmanager
    def track(self) -> Iterator[ActivationTracker]:
        def pre(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                self.stack.append(name)
                if getattr(module, "bench_checkpointed", False):  # a checkpoint keeps its inputs alive
                    for a in args:
                        if torch.is_tensor(a):
                            self.add(a)
            return hook

        def post(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                self.stack.pop()
                if torch.is_tensor(output) and output.requires_grad:
                    self.reached.add(name)
            return hook

        handles = []
        for qualified, module in self.model.named_modules():
            if qualified:
                top = qualified.split(".")[0]
                handles += [module.register_forward_pre_hook(pre(top)), module.register_forward_hook(post(top))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    @property
    def total(self) -> int:
        return sum(self.by_module.values())


@dataclass
class Trainer:
    """One model, its optimizer and a fixed batch: a training step as ``training.loop.Trainer.step`` takes it."""

    model: PromptedUNETR
    params: list[nn.Parameter]
    image: torch.Tensor
    label: torch.Tensor
    amp: bool = False

    def __post_init__(self) -> None:
        self.optimizer = build_optimizer(self.params, TrainConfig(lr=1e-4, weight_decay=1e-5))
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def step(self) -> float:
        """Seconds for zero_grad, forward, loss, backward, gradient clipping and AdamW step."""
        device = self.image.device
        _sync(device)
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss_fn(self.model(self.image), self.label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        _sync(device)
        return time.perf_counter() - started


def _batch(model_kwargs: dict[str, Any], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = tuple(model_kwargs["img_size"])
    image = torch.rand((batch, IN_CHANNELS, *size), generator=gen)
    label = torch.randint(0, OUT_CHANNELS, (batch, 1, *size), generator=gen).float()
    return image.to(device), label.to(device)


def _rounds(names: Sequence[str], count: int) -> Iterator[tuple[int, list[str]]]:
    """Round-robin order, rotated every round so no strategy always runs first or last."""
    for r in range(count):
        k = r % len(names)
        yield r, list(names[k:]) + list(names[:k])


def measure_training(
    model_kwargs: dict[str, Any], batch: int, strategies: Sequence[str] = COST_STRATEGIES, *,
    levers: Sequence[str] = (), warmup: int = 2, repeats: int = 5, device: torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Step time and training memory of each strategy (and lever variant), ratios to ``full``.

    The first warm-up round also counts saved activations, records which top-level modules
    backward reaches and samples the peak memory of that step (it allocates the optimizer state).
    """
    if warmup < 1 or repeats < 1:
        raise ValueError("warmup and repeats must be at least 1.")
    device = device or torch.device("cpu")
    image, label = _batch(model_kwargs, batch, device)
    trainers: dict[str, Trainer] = {}
    for name in list(strategies) + list(levers):
        strategy, ckpt, amp = LEVER_VARIANTS.get(name, (name, False, False))
        model, params = build(model_kwargs, strategy)
        if ckpt:
            checkpoint_backbone(model)
        trainers[name] = Trainer(model.to(device), params, image, label, amp=amp)

    times: dict[str, list[float]] = {n: [] for n in trainers}
    first: dict[str, dict[str, Any]] = {}
    for r, order in _rounds(list(trainers), warmup + repeats):
        for name in order:
            trainer = trainers[name]
            if r == 0:
                _trim_heap()
                tracker = ActivationTracker(trainer.model)
                with peak_memory(device) as mem, tracker.track():
                    trainer.step()
                first[name] = {"tracker": tracker, "peak_mb": mem["peak_mb"]}
            else:
                seconds = trainer.step()
                if r >= warmup:
                    times[name].append(seconds)
        if progress:
            print(f"  round {r + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)

    rows: dict[str, dict[str, Any]] = {}
    for name, trainer in trainers.items():
        tracker = first[name]["tracker"]
        memory = {
            "weights_mb": _bytes(trainer.model.parameters()) / MB,
            "activations_mb": tracker.total / MB,
            "gradients_mb": _bytes(trainer.params) / MB,
            "optimizer_mb": _bytes(v for s in trainer.optimizer.state.values() for v in s.values()) / MB,
        }
        memory["training_mb"] = sum(memory.values())
        memory["peak_sampled_mb"] = first[name]["peak_mb"]
        report = parameter_report(trainer.model)
        rows[name] = {
            "step_s": statistics.median(times[name]), "min_step_s": min(times[name]), "steps_s": times[name],
            "memory": memory,
            "activations_by_module_mb": {k: v / MB for k, v in sorted(tracker.by_module.items())},
            "backward_reaches": sorted(tracker.reached), "trainable_params": report["trainable_params"],
            "trainable_fraction": report["trainable_fraction"],
        }  # fmt: skip
    if "full" in rows:
        full = rows["full"]
        for row in rows.values():
            row["time_ratio"] = row["step_s"] / full["step_s"]
            row["min_time_ratio"] = row["min_step_s"] / full["min_step_s"]
            row["memory_ratio"] = row["memory"]["training_mb"] / full["memory"]["training_mb"]
            sampled = full["memory"]["peak_sampled_mb"]
            row["peak_sampled_ratio"] = row["memory"]["peak_sampled_mb"] / sampled if sampled > 0 else None
    return {"model": model_kwargs, "batch": batch, "warmup": warmup, "repeats": repeats, "device": str(device),
            "threads": torch.get_num_threads(), "strategies": rows}  # fmt: skip


def measure_inference(
    model_kwargs: dict[str, Any], volume: Sequence[int], *, num_prompts: int = 10, warmup: int = 1,
    repeats: int = 3, overlap: float = 0.25, device: torch.device | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Sliding-window wall time of deep prompts (P=``num_prompts``) against the same weights without them.

    Baselines: PromptedUNETR without prompts and, where MONAI can build the configuration (12
    layers), ``monai.networks.nets.UNETR`` as shipped. ``roi_size`` is the model's ``img_size``.
    """
    from monai.networks.nets import UNETR

    device = device or torch.device("cpu")
    deep, _ = build(model_kwargs, "deep", num_prompts)
    plain, _ = build(model_kwargs, "none")
    models: dict[str, nn.Module] = {"deep": deep, "plain": plain}
    if model_kwargs.get("num_layers", MONAI_NUM_LAYERS) == MONAI_NUM_LAYERS:
        kwargs = {k: v for k, v in model_kwargs.items() if k != "num_layers"}
        models["monai"] = UNETR(IN_CHANNELS, OUT_CHANNELS, **kwargs)
        models["monai"].load_state_dict(plain.state_dict())
    roi = tuple(model_kwargs["img_size"])
    image = torch.rand((1, IN_CHANNELS, *volume), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[str, list[float]] = {n: [] for n in models}
    outputs: dict[str, torch.Tensor] = {}
    for model in models.values():
        model.to(device).eval()
    with torch.inference_mode():
        for r, order in _rounds(list(models), warmup + repeats):
            for name in order:
                _sync(device)
                started = time.perf_counter()
                out = sliding_window_inference(image, roi, 1, models[name], overlap=overlap, mode="constant")
                _sync(device)
                if r >= warmup:
                    times[name].append(time.perf_counter() - started)
                outputs[name] = out
    seconds = {n: statistics.median(t) for n, t in times.items()}
    baseline = "monai" if "monai" in models else "plain"
    voxels = int(torch.tensor(volume).prod())
    result = {
        "model": model_kwargs, "volume": list(volume), "roi": list(roi), "overlap": overlap,
        "num_prompts": num_prompts, "repeats": repeats, "baseline": baseline, "seconds": seconds,
        "ratio": seconds["deep"] / seconds[baseline], "ratio_to_plain": seconds["deep"] / seconds["plain"],
        "voxels_per_s": {n: voxels / s for n, s in seconds.items()},
    }  # fmt: skip
    if "monai" in outputs:  # same weights, no prompts: the two implementations must agree
        result["max_abs_diff_plain_vs_monai"] = float((outputs["plain"] - outputs["monai"]).abs().max())
    return result


def measure_storage(model_kwargs: dict[str, Any], num_prompts: int = 10) -> dict[str, Any]:
    """File bytes of a deep-prompt adapter against the full checkpoint of the same model."""
    model, _ = build(model_kwargs, "deep", num_prompts)
    plain, _ = build(model_kwargs, "none")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_adapter(model, Path(tmp) / "adapter.safetensors", "deep").stat().st_size
        full = save_model(plain, Path(tmp) / "model.safetensors").stat().st_size
    return {"model": model_kwargs, "num_prompts": num_prompts, "adapter_bytes": adapter,
            "checkpoint_bytes": full, "ratio": adapter / full}  # fmt: skip


def _endless(loader: Any) -> Iterator[dict[str, Any]]:
    """Batches forever; starting a new epoch (shuffling, a new iterator) counts as waiting for data."""
    while True:
        yield from loader


def measure_data(
    strategy: str = "deep", cases: int = 4, steps: int = 8, device: torch.device | None = None, progress: bool = False
) -> dict[str, Any]:
    """Time waiting in ``next(iterator)`` as a fraction of step time, cpu preset, cached cases.

    The deterministic preprocessing is cached in memory (``make_dataset(cache="memory")``), so what
    is left per batch is the random crops and augmentation, done in the main process
    (``num_workers=0``), as the CPU demo trains.
    """
    from monai.data import DataLoader

    from centerprompt.data.hecktor import find_cases
    from centerprompt.data.synthetic.writer import generate_dataset
    from centerprompt.data.transforms import make_dataset, train_transforms

    preset = PRESETS["cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, centers=["CHUM"], cases_per_center=cases, progress=progress)
        dataset = make_dataset(find_cases(tmp), train_transforms(preset.preprocess), cache="memory")
    loader = DataLoader(dataset, batch_size=preset.batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    device = device or torch.device("cpu")
    model, params = build(dict(preset.model), strategy)
    batches = _endless(loader)
    first = next(batches)
    trainer = Trainer(model.to(device), params, first["image"].to(device), first["label"].to(device))
    trainer.step()  # warm-up
    waits, steps_s = [], []
    for _ in range(steps):
        started = time.perf_counter()
        batch = next(batches)
        trainer.image, trainer.label = batch["image"].to(device), batch["label"].to(device)  # copy counts as waiting
        waits.append(time.perf_counter() - started)
        steps_s.append(trainer.step())
    return {"strategy": strategy, "cases": cases, "steps": steps, "crops_per_batch": int(batch["image"].shape[0]),
            "wait_s": statistics.median(waits), "step_s": statistics.median(steps_s),
            "fraction": sum(waits) / sum(steps_s)}  # fmt: skip


def measure_compile(model_kwargs: dict[str, Any], batch: int, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Deep-prompt step time eager vs ``torch.compile`` (first compiled step = compile time)."""
    eager_model, eager_params = build(model_kwargs, "deep")
    compiled_model, compiled_params = build(model_kwargs, "deep")
    image, label = _batch(model_kwargs, batch, torch.device("cpu"))
    eager = Trainer(eager_model, eager_params, image, label)
    compiled = Trainer(torch.compile(compiled_model), compiled_params, image, label)  # type: ignore[arg-type]
    compile_s = compiled.step()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    trainers = {"eager": eager, "compiled": compiled}
    for r, order in _rounds(list(trainers), warmup + repeats):
        for name in order:
            seconds = trainers[name].step()
            if r >= warmup:
                times[name].append(seconds)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"compile_s": compile_s, "eager_step_s": eager_s, "compiled_step_s": compiled_s, "ratio": compiled_s / eager_s}


def compile_in_subprocess(model_kwargs: dict[str, Any], batch: int, timeout_s: float = 900) -> dict[str, Any]:
    """``measure_compile`` in a child process, so a slow or failing compiler cannot stall the benchmark."""
    args = json.dumps({"model_kwargs": model_kwargs, "batch": batch})
    try:
        done = subprocess.run([sys.executable, __file__, "compile", args], capture_output=True, text=True,
                              timeout=timeout_s, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"skipped": f"torch.compile did not finish within {timeout_s:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"torch.compile failed: {last[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and sys.argv[1:2] == ["compile"]:
    print(json.dumps(measure_compile(**json.loads(sys.argv[2]))))
