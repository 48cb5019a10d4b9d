"""Transformer reliance: the mean-token ablation tells a decoder that uses the ViT from one that does not."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny import tiny_model
from torch import nn

from centerprompt.evaluate import case_metrics
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.study.reliance import mean_token_ablation, transformer_reliance


class WindowScorer:
    """Stands in for ``jobs.Scorer``: whole-window predictions on fixed inputs, scored with the project's metrics."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    @torch.no_grad()
    def score(self, model: nn.Module, desc: str = "", progress: bool = False) -> list[dict[str, Any]]:
        model.eval()
        preds = model(self.images).argmax(1)
        return [
            {"case_id": f"X-{i:03d}", "center": "X", **case_metrics(p, y, (4.0, 4.0, 4.0))}
            for i, (p, y) in enumerate(zip(preds, self.labels))
        ]


def _zero(conv_owner: nn.Module) -> None:
    conv = conv_owner.conv
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _first_layer(module: nn.Module) -> nn.Module:
    return module.transp_conv_init if hasattr(module, "transp_conv_init") else module.transp_conv


def _labelled_windows(model: PromptedUNETR, n: int = 3) -> WindowScorer:
    """Random inputs labelled with the intact model's own prediction: the drop is then all the ablation's.

    The output head's bias is first shifted so that each class has the same mean logit, so a
    random model predicts all three classes.
    """
    torch.manual_seed(1)
    images = 4 * torch.rand(n, 2, 32, 32, 32)
    with torch.no_grad():
        model.eval()
        model.out.conv.conv.bias -= model(images).mean(dim=(0, 2, 3, 4))
        labels = model(images).argmax(1)
    assert all(set(y.unique().tolist()) == {0, 1, 2} for y in labels), "every window must hold both classes"
    return WindowScorer(images, labels)


@pytest.mark.parametrize("patch_size", [16, 8])
def test_a_decoder_that_ignores_the_tokens_shows_no_reliance(patch_size: int) -> None:
    torch.manual_seed(0)
    model = tiny_model(patch_size=patch_size)
    for consumer in model.token_consumers():  # every path from the ViT to the decoder now outputs zeros
        _zero(_first_layer(consumer))
    reliance = transformer_reliance(model, _labelled_windows(model))
    assert reliance["drop"] == pytest.approx(0.0, abs=1e-6)
    assert reliance["intact_dsc_agg"] > 0.5


@pytest.mark.parametrize("patch_size", [16, 8])
def test_a_decoder_that_needs_the_tokens_loses_dice_when_they_are_averaged(patch_size: int) -> None:
    torch.manual_seed(0)
    model = tiny_model(patch_size=patch_size)
    _zero(model.encoder1.layer.conv1)  # the full-resolution skip path from the raw image carries nothing
    _zero(model.encoder1.layer.conv2)
    _zero(model.encoder1.layer.conv3)
    reliance = transformer_reliance(model, _labelled_windows(model))
    assert reliance["drop"] > 0.2, reliance
    assert reliance["ablated_dsc_agg"] < reliance["intact_dsc_agg"]


def test_ablation_replaces_every_token_grid_by_its_mean_and_is_undone_on_exit() -> None:
    torch.manual_seed(0)
    model = tiny_model(patch_size=8).eval()
    x = torch.rand(1, 2, 32, 32, 32)
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(a[0])) for m in model.token_consumers()]
    with torch.no_grad():
        ref = model(x)
        with mean_token_ablation(model):
            ablated = model(x)
        again = model(x)
    for h in hooks:
        h.remove()
    n = len(model.token_consumers())
    assert n == len(model.skip_layers) + 1
    intact_grids, ablated_grids = seen[:n], seen[n : 2 * n]
    for grid, mean_grid in zip(intact_grids, ablated_grids):
        assert grid.shape == mean_grid.shape == (1, 48, 4, 4, 4)
        assert grid.std(dim=(2, 3, 4)).min() > 0  # the intact grid varies over tokens
        assert torch.allclose(mean_grid, grid.mean(dim=(2, 3, 4), keepdim=True).expand_as(grid))
    assert not torch.allclose(ref, ablated)
    assert torch.equal(ref, again)
