"""Per-center parts that reach the segmentation where prompt tokens cannot: the decoder's
normalisation and the image itself.

Why: every convolutional block of MONAI's UNETR ends in an affine-free ``InstanceNorm3d``, which
removes any per-channel offset or scale that prompt tokens put on the token grids (measured:
logits move 0.85% when the token grids move 22-61%; shared/REFERENCE.md). A per-channel scale and
shift after each of those norms (FiLM, Perez et al., arXiv 1709.07871; per-domain norms as in
MS-Net, arXiv 2002.03366) expresses exactly what the norm erases; a learned low-resolution map
added to and multiplying each input channel (image-space prompts, as VPTTA, arXiv 2311.18363,
and ProSFDA do for medical networks) also reaches the first skip connection, which bypasses the
transformer. Both start at the identity, so an untrained adapter gives the base model's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEER_SUFFIXES = ("steer_scale", "steer_shift")
IMAGE_PROMPT = "image_prompt"


class SteeredNorm(nn.Module):
    """An affine-free normalisation followed by a learned per-channel ``x * (1 + scale) + shift``.

    The wrapped norm has no parameters, so the backbone's state-dict names do not change; the two
    added tensors are ``<norm path>.steer_scale`` and ``.steer_shift``, zero (the identity) at first.
    """

    def __init__(self, norm: nn.Module, channels: int) -> None:
        super().__init__()
        self.norm = norm
        self.steer_scale = nn.Parameter(torch.zeros(channels))
        self.steer_shift = nn.Parameter(torch.zeros(channels))
        self.values: dict[str, torch.Tensor] = {}  # per-sample values for one forward (see PromptedUNETR.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = (_per_sample(self.values.get(k, getattr(self, k)), 1, x.dim()) for k in STEER_SUFFIXES)
        return self.norm(x) * (1 + scale) + shift


def add_norm_steering(module: nn.Module) -> int:
    """Wrap every affine-free instance norm under ``module`` in a :class:`SteeredNorm`; return how many.

    A norm with its own affine parameters is left alone: it can already scale and shift.
    """
    targets = [(name, m) for name, m in module.named_modules()
               if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.affine]  # fmt: skip
    for name, norm in targets:
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, SteeredNorm(norm, norm.num_features))
    return len(targets)


def _per_sample(value: torch.Tensor, param_dim: int, x_dim: int) -> torch.Tensor:
    """A parameter's value, or one per sample (B, *shape), as a (B or 1, C, 1...) tensor for ``x``."""
    if value.dim() == param_dim:
        value = value.unsqueeze(0)
    return value.reshape(*value.shape, *(1,) * (x_dim - value.dim()))


class ImagePrompt(nn.Module):
    """A learned ``grid^3`` map per input channel, up-sampled to the window: ``x * (1 + scale) + shift``.

    Low resolution on purpose: a few hundred numbers express a center's smooth intensity and
    contrast differences (calibration, attenuation, PET/CT misregistration of uptake), not anatomy.
    """

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"image prompt grid must be at least 1, got {grid}.")
        self.scale = nn.Parameter(torch.zeros(channels, grid, grid, grid))
        self.shift = nn.Parameter(torch.zeros(channels, grid, grid, grid))
        self.values: dict[str, torch.Tensor] = {}  # per-sample values for one forward (see PromptedUNETR.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        scale, shift = (F.interpolate(_per_sample(self.values.get(k, getattr(self, k)), 4, 5), size=size,
                                      mode="trilinear", align_corners=False) for k in ("scale", "shift"))  # fmt: skip
        return x * (1 + scale) + shift


def is_steering(name: str) -> bool:
    """Whether a state-dict name is a tensor of a :class:`SteeredNorm` or the :class:`ImagePrompt`."""
    return name.endswith(STEER_SUFFIXES) or name.startswith(IMAGE_PROMPT + ".")
