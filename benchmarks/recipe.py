"""Is it the recipe? Deep prompts trained the VPT way and other ways, against one base model.

VPT (Jia et al. 2022) trains prompts with SGD (momentum 0.9) at large learning rates, with prompt
dropout 0.1 for deep prompts and a trained task head; our default is AdamW at 1e-2 for 20 epochs.
Each recipe adapts the same base model to the same center with the same cases and is scored on
the same new-center and old-center test cases as the quality benchmark's headline.

    python benchmarks/run.py --part recipe --work runs/bench    # after the quality part (reuses its base)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# label: (strategy, AdaptRun fields)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "deep, AdamW 1e-2 (default)": ("deep", {}),
    "deep, AdamW 1e-1": ("deep", {"lr": 1e-1}),
    "deep, SGD 0.5 (VPT)": ("deep", {"optimizer": "sgd", "lr": 0.5}),
    "deep, SGD 5 (VPT)": ("deep", {"optimizer": "sgd", "lr": 5.0}),
    "deep, 3x epochs": ("deep", {"epochs": 60}),
    "deep, prompt dropout 0.1": ("deep", {"prompt_dropout": 0.1}),
    "deep, P=50, AdamW 1e-1": ("deep", {"num_prompts": 50, "lr": 1e-1}),
    "deep+head (VPT's head)": ("deep+head", {}),
    # At the GTVn-weighted preset deep prompts' validation Dice (one or two cases) fell while the
    # training loss fell, and patience 10 stopped them at epoch 11 with epoch 1 the best.
    "deep, no early stopping, 60 epochs": ("deep", {"epochs": 60, "patience": 0}),
    "deep, AdamW 1e-1, no early stopping, 60 epochs": ("deep", {"lr": 1e-1, "epochs": 60, "patience": 0}),
}


def run_recipes(
    data_dir: Path, work: Path, *, center: str = "MDA", seed: int = 0, shots: int = 8, progress: bool = False
) -> dict[str, Any]:
    """Adapt ``work/seed{seed}/{center}/pretrain``'s base with every recipe; new and old DSCagg of each."""
    from centerprompt.artifacts import build_adapted_model
    from centerprompt.data.hecktor import leave_one_center_out
    from centerprompt.evaluate import aggregate
    from centerprompt.training.config import AdaptRun
    from centerprompt.runs.adapt import adapt
    from centerprompt.runs.base import base_preprocess
    from centerprompt.runs.selection import load_index
    from centerprompt.scoring import Scorer

    root = work / f"seed{seed}" / center
    base = root / "pretrain" / "model.safetensors"
    cases, splits = load_index(data_dir, seed=seed)
    loco = leave_one_center_out(splits, center, shots=shots, seed=seed)
    scorers = {part: Scorer([cases[i] for i in ids], base_preprocess(base))
               for part, ids in (("new", loco.new_test), ("old", loco.old_test))}  # fmt: skip

    def dsc(model: Any) -> dict[str, float]:
        return {part: aggregate(s.score(model, progress=False))["overall"]["dsc_agg"]["mean"] for part, s in scorers.items()}

    rows = [{"recipe": "base (no adaptation)", **dsc(build_adapted_model(base))}]
    for i, (label, (strategy, kwargs)) in enumerate(RECIPES.items()):
        run_dir = root / "recipe" / f"r{i}"
        summary = adapt(AdaptRun(data_dir=data_dir, center=center, base=base, out=run_dir, strategy=strategy, shots=shots,
                                 seed=seed, resume=True, progress=progress, **{"num_prompts": 10, **kwargs}))  # fmt: skip
        model = build_adapted_model(base, summary["artifact"])
        rows.append({"recipe": label, "strategy": strategy, **kwargs, **dsc(model), "epochs": summary["epochs_run"],
                     "best_epoch": summary["best_epoch"], "train_s": summary["train_seconds"]})  # fmt: skip
    return {"center": center, "seed": seed, "shots": shots, "base": str(base), "rows": rows}


def table(recipe: dict[str, Any]) -> list[str]:
    base = recipe["rows"][0]
    lines = ["| recipe | new-center DSCagg | gain over base | old-center DSCagg | Δ old | best epoch / run |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in recipe["rows"]:
        epochs = f"{r['best_epoch']} / {r['epochs']}" if "epochs" in r else "–"
        lines.append(f"| {r['recipe']} | {r['new']:.3f} | {r['new'] - base['new']:+.3f} | {r['old']:.3f} | "
                     f"{r['old'] - base['old']:+.3f} | {epochs} |")  # fmt: skip
    return lines
