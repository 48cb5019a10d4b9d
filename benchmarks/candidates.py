"""Which CPU preset makes the decoder use the transformer? Candidates measured side by side.

For each candidate: the median time of one full-training step (random batch of the preset's
size, after warm-up), the pretraining of a base model without the held-out center (wall time and
epochs), the base model's old-center DSCagg on the original CT grid, and its transformer reliance
(the DSCagg drop when every ViT token grid feeding the decoder is replaced by its mean token,
``centerprompt.study.reliance``). Run one candidate at a time on a quiet machine; a finished
pretraining run is reused.

    python benchmarks/candidates.py --data data/synth --work runs/candidates [--only NAME,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss

from centerprompt.artifacts import build_adapted_model
from centerprompt.data.hecktor import leave_one_center_out
from centerprompt.evaluate import aggregate
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.training.config import PretrainRun
from centerprompt.training.loop import TrainConfig, build_optimizer
from centerprompt.runs.base import IN_CHANNELS, OUT_CHANNELS
from centerprompt.runs.selection import load_index
from centerprompt.runs.pretrain import pretrain
from centerprompt.scoring import Scorer
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.training.presets import PRESETS, Preset, register_preset
from centerprompt.study.reliance import transformer_reliance

CHOSEN = "p8-48@4mm-fs8-1crop-lr1e-3"  # the candidate that became PRESETS["cpu"]
VIT_S6 = dict(hidden_size=192, mlp_dim=768, num_heads=6, num_layers=6)  # the ViT of the old cpu preset


def _candidate(
    name: str, img: int, patch: int, fs: int, spacing: float, crop: float, epochs: int, crops_per_case: int = 2,
    lr: float = 3e-3,
) -> Preset:
    return Preset(
        name=name,
        model=dict(img_size=(img,) * 3, patch_size=patch, feature_size=fs, **VIT_S6),
        preprocess=PreprocessConfig(spacing=(spacing,) * 3, crop_mm=(crop,) * 3, roi_size=(img,) * 3,
                                    num_samples=crops_per_case),  # fmt: skip
        pretrain_epochs=epochs, adapt_epochs=20, batch_size=2, pretrain_lr=lr,
    )  # fmt: skip


CANDIDATES: dict[str, Preset] = {
    p.name: p
    for p in (
        _candidate("p16-32@4mm", img=32, patch=16, fs=16, spacing=4.0, crop=192.0, epochs=12),  # former cpu: 2^3 tokens
        _candidate("p8-32@4mm", img=32, patch=8, fs=16, spacing=4.0, crop=192.0, epochs=12),  # 4^3 tokens
        _candidate("p8-48@4mm-fs8", img=48, patch=8, fs=8, spacing=4.0, crop=192.0, epochs=12),  # 6^3 tokens
        # The window is the whole 192 mm crop, so two crops of a case are the same crop: one per case,
        # two cases per batch, 1.5x the epochs in 3/4 of the steps; a ViT that now does the work
        # wants a smaller step than the 3e-3 the convolutional path tolerated. Chosen: the cpu preset.
        dataclasses.replace(PRESETS["cpu"], name=CHOSEN),
        _candidate("p8-48@4mm-fs16-1crop", img=48, patch=8, fs=16, spacing=4.0, crop=192.0, epochs=12, crops_per_case=1),
        # The chosen whole-crop candidate predicts no GTVn at all (DSCagg 0.000): a 240 mm crop lets
        # the tumour/background-balanced 48^3 crops centre on a tumour or node half the time, as the
        # 32^3 crops of the patch-16 candidate did (GTVn > 0 there).
        _candidate("p8-48@4mm-fs8-crop240-lr1e-3", img=48, patch=8, fs=8, spacing=4.0, crop=240.0, epochs=12, lr=1e-3),
    )
}


# The chosen geometry with the cross-entropy weighted towards GTVn and longer pretraining: the
# unweighted cpu preset never predicts a lymph node (GTVn DSCagg 0.000), which caps its old-center
# DSCagg near 0.35 whatever the transformer does. Too slow to sweep on 2 cores (7-15 min each):
# benchmarks/gpu_recipes.sh runs them side by side on one GPU.
def _recipe(weights: tuple[float, float, float] | None, epochs: int = 18, base: str = CHOSEN) -> Preset:
    tag = "w1" if weights is None else "w" + "-".join(f"{w:g}" for w in weights[1:])
    return dataclasses.replace(CANDIDATES[base], name=f"cpu-{tag}-ep{epochs}" + ("" if base == CHOSEN else "-crop240"),
                               class_weights=weights, pretrain_epochs=epochs)  # fmt: skip


RECIPES: dict[str, Preset] = {
    p.name: p
    for p in (
        _recipe(None),
        _recipe((1.0, 1.0, 5.0)),
        _recipe((1.0, 1.0, 10.0)),
        _recipe((1.0, 1.0, 20.0)),
        _recipe((1.0, 2.0, 10.0)),
        _recipe((1.0, 1.0, 5.0), epochs=40),
        _recipe((1.0, 1.0, 10.0), epochs=40),
        _recipe((1.0, 1.0, 10.0), epochs=80),
        _recipe((1.0, 1.0, 10.0), epochs=40, base="p8-48@4mm-fs8-crop240-lr1e-3"),
    )
}


def step_seconds(preset: Preset, warmup: int = 2, rounds: int = 5) -> float:
    """Median seconds of one full fine-tuning step (forward, backward, AdamW) on a random batch."""
    torch.manual_seed(0)
    model = PromptedUNETR(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, **preset.model).train()
    opt = build_optimizer(list(model.parameters()), TrainConfig(lr=1e-4, weight_decay=0.01))  # AdamW's own default
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    size = preset.preprocess.roi_size
    x = torch.rand(preset.batch_size, IN_CHANNELS, *size)
    y = torch.randint(0, OUT_CHANNELS, (preset.batch_size, 1, *size))
    times = []
    for i in range(warmup + rounds):
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(preset: Preset, data: Path, work: Path, center: str, seed: int) -> dict[str, Any]:
    run_dir = work / preset.name
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        started = time.perf_counter()
        register_preset(preset)
        summary = pretrain(PretrainRun(data_dir=data, out=run_dir, exclude_center=center, preset=preset.name, seed=seed,
                                       resume=True, progress=False))
        summary["wall_seconds"] = time.perf_counter() - started
        summary_path.write_text(json.dumps(summary, indent=1))
    cases, splits = load_index(data, seed=seed)
    loco = leave_one_center_out(splits, center, shots=0, seed=seed)
    model = build_adapted_model(run_dir / "model.safetensors")
    scorer = Scorer([cases[i] for i in loco.old_test], preset.preprocess, score_at="ct")
    intact = scorer.score(model, progress=False)
    reliance = transformer_reliance(model, scorer, intact_cases=intact)
    model_cfg = {**preset.model, "img_size": list(preset.model["img_size"])}
    return {
        "name": preset.name, "model": model_cfg, "spacing": preset.preprocess.spacing[0],
        "tokens": model.feat_size[0], "trainable_params": summary["trainable_params"],
        "step_s": step_seconds(preset), "pretrain_s": summary.get("wall_seconds", summary["train_seconds"]),
        "epochs": summary["epochs_run"], "best_epoch": summary["best_epoch"],
        "old_dsc_agg": reliance["intact_dsc_agg"], "ablated_dsc_agg": reliance["ablated_dsc_agg"],
        "reliance": reliance["drop"], "held_out": center, "seed": seed,
        "per_class": aggregate(intact)["overall"]["dsc_agg"], "class_weights": preset.class_weights,
    }  # fmt: skip


def run_candidates(
    data: Path, work: Path, *, center: str = "MDA", seed: int = 0, names: list[str] | None = None
) -> dict[str, Any]:
    """Every candidate (or ``names``), one after the other: the ``presets`` part of benchmarks/run.py."""
    rows = [measure(CANDIDATES[n], data, work, center, seed) for n in (names or list(CANDIDATES))]
    return {"held_out": center, "seed": seed, "rows": rows}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| candidate | tokens | decoder width | step (s) | pretraining (s) | epochs (best) | old-center DSCagg | ablated | reliance (drop) |",
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']}{' (chosen: cpu)' if r['name'] == CHOSEN else ''} | {r['tokens']}³ | {r['model']['feature_size']} | {r['step_s']:.3f} | {r['pretrain_s']:.0f} | "
            f"{r['epochs']} ({r['best_epoch']}) | {r['old_dsc_agg']:.3f} | {r['ablated_dsc_agg']:.3f} | {r['reliance']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synth"))
    parser.add_argument("--work", type=Path, default=Path("runs/candidates"))
    parser.add_argument("--center", default="MDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated candidate or recipe names (default: every candidate)")
    parser.add_argument("--probe", action="store_true", help="step times only, no training")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CANDIDATES)
    presets = {**CANDIDATES, **RECIPES}
    if args.probe:
        for name in names:
            print(name, f"{step_seconds(presets[name]):.3f} s/step", flush=True)
        return
    out = args.work / "candidates.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for name in names:
        rows = [r for r in rows if r["name"] != name] + [measure(presets[name], args.data, args.work, args.center, args.seed)]
        args.work.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
