"""Named configurations: the model size, the preprocessing and the default training budget.

``cpu`` is what the demo and the CPU benchmarks run: a small ViT (192 wide, 6 layers) with patch
8 over one 48^3 window at 4 mm that holds the whole 192 mm head-and-neck crop, so the ViT sees the
paper's 6x6x6 token grid and the decoder depends on it (transformer reliance 0.65 DSCagg; the
former 32^3 windows at patch 16 gave 2x2x2 tokens and a decoder that ignored them). Its geometry
was chosen among measured candidates, its GTVn-weighted loss and 40 epochs among recipes
(benchmarks/candidates.py, gpu_recipes.sh, RESULTS.md). ``vit-b`` is the paper's
configuration (MONAI's default UNETR, 96^3 crops at 2 mm), meant for a GPU; ``tiny`` exists for
tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from centerprompt.data.transforms import PreprocessConfig


@dataclass(frozen=True)
class FederatedRecipe:
    """How federated pretraining sites train by default. FedAvg moves the global model by the mean
    of the sites' changes, less than any one site moved: a site stepping as a central run does gets
    a fraction of its progress per pass over the data. So the sites take more, larger steps (batch,
    rate) and meet more often (``local_steps`` a round, ``rounds`` of them for the central epoch
    budget), which also keeps each site from drifting to its own center between averages; a FedProx
    term (``mu``) pulls each site's round toward the global tensors it started from."""

    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    mu: float = 0.0


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict[str, Any]
    preprocess: PreprocessConfig
    pretrain_epochs: int
    adapt_epochs: int
    batch_size: int
    pretrain_lr: float
    class_weights: tuple[float, ...] | None = None  # Dice and cross-entropy weights (background, GTVp, GTVn), pretraining and adaptation
    federated: FederatedRecipe | None = None  # federated pretraining's defaults (None: a central run's, a round an epoch)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # ViT 192 wide, 6 layers, patch 8, one 48^3 window at 4 mm (6^3 tokens): a CPU demo in minutes.
        Preset(
            name="cpu",
            model=dict(img_size=(48, 48, 48), patch_size=8, feature_size=8, hidden_size=192, mlp_dim=768,
                       num_heads=6, num_layers=6),  # fmt: skip
            # The window is the whole crop: a second crop of the same case would be the same crop.
            preprocess=PreprocessConfig(spacing=(4.0, 4.0, 4.0), crop_mm=(192.0, 192.0, 192.0), roi_size=(48, 48, 48),
                                        num_samples=1),  # fmt: skip
            pretrain_epochs=40,
            adapt_epochs=20,
            batch_size=2,
            pretrain_lr=1e-3,
            # Lymph nodes are 8-30 mm across (2-7 voxels at 4 mm): unweighted, the base never predicts
            # one (GTVn DSCagg 0.000, old-center DSCagg 0.37 at 18 epochs); GTVn weighted 10x and 40
            # epochs (early stopping after 37): 0.73, GTVn 0.68 (benchmarks/gpu_recipes.sh, RESULTS.md).
            class_weights=(1.0, 1.0, 10.0),
            # Measured on six sites of 11 training cases (benchmarks/RESULTS.md), 40 passes each:
            # rounds of one epoch at batch 2 and 1e-3 never learned GTVp (old-center DSCagg 0.158);
            # at batch 1, 2e-3 trailed central by 0.073 and 4e-3 by 0.083 (drift between averages);
            # 88 rounds of 5 steps at batch 1 and 4e-3 (88 x 5 = 40 x 11) by 0.024 [-0.082, 0.011], and
            # by 0.038 [-0.057, -0.022] on 120 fresh patients (GTVn): the best measured, not yet parity.
            federated=FederatedRecipe(rounds=88, local_steps=5, batch_size=1, lr=4e-3, mu=1e-3),
        ),
        # MONAI's default UNETR (ViT-B, 12 layers), 96^3 crops at 2 mm: the paper's scale.
        Preset(
            name="vit-b",
            model=dict(img_size=(96, 96, 96)),
            preprocess=PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi_size=(96, 96, 96)),
            pretrain_epochs=300,
            adapt_epochs=100,
            batch_size=2,
            pretrain_lr=1e-4,
        ),
        # Seconds per command: for tests and smoke runs, not for results.
        Preset(
            name="tiny",
            model=dict(img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4, num_layers=3),
            preprocess=PreprocessConfig(spacing=(6.0, 6.0, 6.0), crop_mm=(192.0, 192.0, 192.0), roi_size=(32, 32, 32)),
            pretrain_epochs=2,
            adapt_epochs=2,
            batch_size=2,
            pretrain_lr=3e-3,
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def register_preset(preset: Preset) -> Preset:
    """Add a preset (e.g. a benchmark's candidate) so that runs can name it; a taken name is an error
    unless it names this very preset."""
    if PRESETS.get(preset.name, preset) != preset:
        raise ValueError(f"a different preset named {preset.name!r} is already registered.")
    PRESETS[preset.name] = preset
    return preset
