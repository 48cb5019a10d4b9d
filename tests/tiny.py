"""Tiny model configurations shared by the tests (hidden 48, 32^3 volumes: seconds on a CPU)."""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = dict(
    in_channels=2, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4
)


def tiny_model(num_layers: int = 4, **kwargs: Any):
    from centerprompt import PromptedUNETR

    return PromptedUNETR(**{**TINY, "num_layers": num_layers, **kwargs})
