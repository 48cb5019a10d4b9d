"""Where an adapter's change goes inside the UNETR, and how much of it reaches the segmentation.

Prompt tokens can move the ViT's token grids a lot and the output not at all (shared/REFERENCE.md:
grids 22-61%, logits 0.85%): a change that is the same at every position of a feature map is what
the decoder's affine-free instance norms remove. This runs the base model and the adapted model on
the same windows and measures, per transformer layer, the attention share of the patch tokens on
the prompt tokens; per stage of the convolutional path (the token grids it reads, each encoder
and decoder block's output), the relative change of the feature map and the share of that change
which is spatially uniform per channel; the relative change of the logits; and the share of
voxels whose label changes. It works on any adapter and any base :func:`build_adapted_model` reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop
from torch import nn

from centerprompt.models.prompted_unetr import PromptedUNETR


def stage_modules(model: PromptedUNETR) -> dict[str, nn.Module]:
    """The convolutional path's blocks in the order data flows: encoders, then decoders."""
    names = [n for n, _ in model.named_children() if n.startswith("encoder")]
    names += sorted((n for n, _ in model.named_children() if n.startswith("decoder")), reverse=True)
    return {n: getattr(model, n) for n in names}


@contextlib.contextmanager
def _recording(model: PromptedUNETR, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record each stage's output and the token grid each token consumer reads."""
    handles = []
    consumers = {id(m): n for n, m in stage_modules(model).items() if m in model.token_consumers()}
    for name, module in stage_modules(model).items():
        handles.append(module.register_forward_hook(lambda m, a, out, n=name: store.__setitem__(n, out.detach())))
        if id(module) in consumers:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, n=name: store.__setitem__(f"tokens->{n}", a[0].detach())))  # fmt: skip
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _saving_attention(model: PromptedUNETR) -> Iterator[None]:
    """MONAI's own attention maps (``save_attn``), which the fused attention path does not keep."""
    saved = [(b.attn, b.attn.use_flash_attention, b.attn.save_attn) for b in model.vit.blocks]
    for attn, _, _ in saved:
        attn.use_flash_attention, attn.save_attn = False, True
    try:
        yield
    finally:
        for attn, flash, save in saved:
            attn.use_flash_attention, attn.save_attn = flash, save


def _change(base: torch.Tensor, adapted: torch.Tensor) -> tuple[float, float]:
    """(||adapted - base|| / ||base||, share of ||adapted - base||^2 that is uniform over positions per channel)."""
    d = (adapted - base).double()
    spatial = tuple(range(2, d.ndim))
    uniform = d.mean(dim=spatial, keepdim=True).expand_as(d)
    total = float((d**2).sum())
    rel = float(d.norm() / base.double().norm().clamp_min(1e-12))
    return rel, float((uniform**2).sum()) / total if total > 0 else 0.0  # no change: nothing of it is uniform


def _prompt_share(att: torch.Tensor, prompts: int, kv: int) -> float:
    """Mean attention of the patch-token queries on prompt keys: the ``prompts`` tokens in front and
    the ``kv`` key-value prompts appended at the end (whose own query rows, last, are not tokens).

    ``att`` is MONAI's ``att_mat`` (B, heads, queries, keys).
    """
    n = att.shape[2] - kv  # the queries of real tokens (prompt tokens first, then patches)
    return float((att[:, :, prompts:n, :prompts].sum(-1) + att[:, :, prompts:n, n:].sum(-1)).mean())


@torch.no_grad()
def adapter_effect(base: PromptedUNETR, adapted: PromptedUNETR, windows: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The measurements for ``adapted`` against ``base`` on ``windows`` (each (1, C, *roi)), averaged
    over the windows: per-layer prompt attention share, per-stage change and uniform share, logits."""
    base.eval(), adapted.eval()
    layers: list[list[float]] = []
    stages: dict[str, list[tuple[float, float]]] = {}
    logits_rel, flipped = [], []
    p = adapted.num_prompts
    kv = 0 if adapted.kv_prompts is None else adapted.kv_prompts.num_prompts
    for x in windows:
        rec_b: dict[str, torch.Tensor] = {}
        rec_a: dict[str, torch.Tensor] = {}
        with _recording(base, rec_b), _saving_attention(base):  # the same attention arithmetic for both
            out_b = base(x)
        with _recording(adapted, rec_a), _saving_attention(adapted):
            out_a = adapted(x)
        if p or kv:
            layers.append([_prompt_share(b.attn.att_mat, p, kv) for b in adapted.vit.blocks])
        for name in rec_b:
            stages.setdefault(name, []).append(_change(rec_b[name], rec_a[name]))
        logits_rel.append(_change(out_b, out_a))
        flipped.append(float((out_b.argmax(1) != out_a.argmax(1)).double().mean()))
    mean = lambda rows, i: float(np.mean([r[i] for r in rows]))  # noqa: E731
    return {
        "windows": len(windows),
        "prompt_attention_share": [float(v) for v in np.mean(layers, axis=0)] if layers else None,
        "stages": {n: {"relative_change": mean(rows, 0), "uniform_share": mean(rows, 1)} for n, rows in stages.items()},
        "logits": {"relative_change": mean(logits_rel, 0), "uniform_share": mean(logits_rel, 1)},
        "label_change_share": float(np.mean(flipped)),
    }


def windows_of(dataset: Any, roi_size: Sequence[int], limit: int | None = None) -> list[torch.Tensor]:
    """One network window per preprocessed case: the centre of its crop, padded where smaller."""
    crop = ResizeWithPadOrCrop(spatial_size=tuple(roi_size))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [torch.as_tensor(crop(dataset[i]["image"])).float()[None] for i in range(n)]


def plot_effect(effect: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Left: attention share on prompts per layer; right: relative change and its uniform share per stage."""
    from matplotlib.figure import Figure

    from centerprompt.study.report import NEW_COLOR, OLD_COLOR, _save_figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 2])
    share = effect.get("prompt_attention_share")
    if share:
        left.bar(np.arange(1, len(share) + 1), share, color=NEW_COLOR)
        left.set_ylim(0, 1)
    else:
        left.text(0.5, 0.5, "no prompt tokens", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel("transformer layer")
    left.set_ylabel("attention of patch tokens on prompts")
    names = [*effect["stages"], "logits"]
    rows = [*effect["stages"].values(), effect["logits"]]
    x = np.arange(len(names))
    right.bar(x - 0.2, [r["relative_change"] for r in rows], 0.4, color=NEW_COLOR, label="relative change")
    right.bar(x + 0.2, [r["uniform_share"] for r in rows], 0.4, color=OLD_COLOR, label="uniform share of the change")
    right.set_yscale("symlog", linthresh=0.01)
    right.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    right.legend(fontsize=8)
    right.set_title(f"labels changed: {100 * effect['label_change_share']:.2f}% of voxels", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


def inspect_adapter(base: Any, adapter: str | Path, selection: Any, *, limit: int | None = 8) -> dict[str, Any]:
    """:func:`adapter_effect` of ``adapter`` on the first ``limit`` cases of ``selection`` (a
    :class:`~centerprompt.runs.selection.CaseSelection`, centers by default the adapter's own)."""
    from centerprompt.artifacts import build_adapted_model, read_adapter_metadata
    from centerprompt.data.hecktor import split_centers
    from centerprompt.runs.base import open_base
    from centerprompt.scoring import Scorer

    base = open_base(base, adapter)
    meta = read_adapter_metadata(adapter)
    own = split_centers(str(meta["extra"].get("center", "")))  # the adapter's center(s)
    selected = selection.open(base, own)
    ids = selected.ids[:limit]
    plain, adapted = build_adapted_model(base), build_adapted_model(base, adapter)
    dataset = Scorer([selected.cases[i] for i in ids], base.preprocess, score_at="preprocessed").dataset
    effect = adapter_effect(plain, adapted, windows_of(dataset, plain.config["img_size"]))
    return {"base": str(base.path), "adapter": str(adapter), "strategy": meta["strategy"], "centers": selected.centers,
            "split": selection.split, "cases": ids, **effect}  # fmt: skip
