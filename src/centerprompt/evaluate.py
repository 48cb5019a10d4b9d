"""Scoring: sliding-window inference, per-case Dice/HD95 and HECKTOR aggregated Dice.

Metrics come from MONAI (``compute_dice``, ``compute_hausdorff_distance``); this module only
decides what an empty structure means and how cases are pooled:

* per-case Dice is NaN when a class is absent from both prediction and ground truth (nothing to
  score), and 0 when the ground truth is empty but the model predicts it (a false positive);
* HD95 is NaN when either mask is empty (a distance to nothing is undefined);
* the HECKTOR headline, DSCagg = 2·Σ|A∩B| / Σ(|A|+|B|) pooled over the cases of a set, is
  computed from the volumes kept per case, in mm³ (voxel count × voxel volume), as the HECKTOR
  2022 organisers pool them, so it never averages per-case ratios and a case with fine voxels
  weighs by its volume, not its voxel count. (Results written before 2026-12-06 pooled voxel
  counts; where every case has the same voxel size the two agree.)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from centerprompt.data.labels import CLASSES, LABEL_VALUES, NUM_LABELS
from centerprompt.models.cpu_conv import onednn_conv3d

logger = logging.getLogger(__name__)


def sliding_window_predict(
    model: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | int,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Softmax probabilities (B, C, *spatial) of ``model`` over ``image`` (B, in_channels, *spatial).

    Uses MONAI ``sliding_window_inference`` with constant blending; ``model_kwargs`` (e.g.
    ``prompts=...``) are forwarded to every window call. UNETR's position embedding has a fixed
    length, so ``roi_size`` must equal the model's ``img_size``; this is checked when the model
    exposes ``feat_size`` and ``patch_size`` (MONAI UNETR and PromptedUNETR do). Images smaller than
    ``roi_size`` need no padding here: MONAI pads them and crops the output back to the input size.

    The model is scored in eval mode (dropout, including prompt dropout, off) and each submodule's
    train/eval flag is restored afterwards, so frozen parts kept in eval mode during training stay so.
    Runs under ``torch.no_grad``; calling it inside ``torch.inference_mode`` works as well.

    Args:
        model: network mapping (B, in_channels, *roi_size) to logits (B, C, *roi_size).
        image: input batch, on the device the windows should run on.
        roi_size: window size; an int is used for every spatial dimension.
        sw_batch_size: windows per forward pass. Default 1.
        overlap: fraction of overlap between neighbouring windows. Default 0.25.
    """
    if image.ndim < 3:
        raise ValueError(f"image must be (B, C, *spatial), got shape {tuple(image.shape)}.")
    spatial_dims = image.ndim - 2
    roi = (roi_size,) * spatial_dims if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims:
        raise ValueError(f"roi_size {roi} does not match the {spatial_dims} spatial dims of the image.")
    feat_size, patch_size = getattr(model, "feat_size", None), getattr(model, "patch_size", None)
    if feat_size is not None and patch_size is not None:
        img_size = tuple(int(f) * int(p) for f, p in zip(feat_size, patch_size))
        if img_size != roi:
            raise ValueError(f"roi_size {roi} must equal the model's img_size {img_size} (fixed position embedding).")

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), onednn_conv3d():  # a window is one volume: keep 3D convolutions on oneDNN
            logits = sliding_window_inference(
                image, roi, sw_batch_size, model, overlap=overlap, mode="constant", **model_kwargs
            )
    finally:
        for module, training in modes.items():
            module.train(training)
    return torch.softmax(logits, dim=1)


# nnU-Net's test-time mirroring: every subset of the three spatial axes, the identity included.
MIRROR_AXES: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


def mirrored_predict(
    model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int] | int, sw_batch_size: int = 1,
    **model_kwargs: Any,
) -> torch.Tensor:  # fmt: skip
    """Test-time augmentation by mirroring (nnU-Net's): the mean of the softmax of
    :func:`sliding_window_predict` over the 8 mirrorings of ``image``'s spatial axes, each flipped
    back before averaging. Costs 8 predictions."""
    total = torch.zeros(())
    for axes in MIRROR_AXES:
        dims = [a + 2 for a in axes]  # (B, C, *spatial)
        flipped = image.flip(dims) if dims else image
        probs = sliding_window_predict(model, flipped, roi_size, sw_batch_size, **model_kwargs)
        total = total + (probs.flip(dims) if dims else probs)
    return total / len(MIRROR_AXES)


def _as_label_map(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.ndim != 3:
        raise ValueError(f"{name} must be a (D, H, W) label map, got shape {tuple(t.shape)}.")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"{name} must hold integer labels, got non-integer values.")
    t = t.long()
    if t.numel() and (t.min() < min(LABEL_VALUES) or t.max() > max(LABEL_VALUES)):
        raise ValueError(f"{name} labels must lie in {min(LABEL_VALUES)}..{max(LABEL_VALUES)}, got {t.min()}..{t.max()}.")
    return t


def _bounding_box(mask: torch.Tensor, margin: int = 2) -> tuple[slice, ...]:
    """Slices of the box around ``mask``'s non-zero voxels, widened by ``margin`` (clipped to the volume).

    Surface distances inside it equal those in the whole volume: both surfaces lie inside, with at
    least one background voxel around them, so edge detection and nearest-edge distances are unchanged.
    """
    nz = torch.nonzero(mask)
    lo, hi = nz.min(0).values - margin, nz.max(0).values + margin + 1
    return tuple(slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(lo, hi, mask.shape))


def case_metrics(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    distances: bool = True,
) -> dict[str, dict[str, float | int]]:
    """Per-class scores of one case, keyed by class name ("gtvp", "gtvn").

    Each entry holds ``dice`` (NaN when both masks are empty), ``hd95`` in mm (NaN when either is
    empty), and the volumes ``intersection``, ``pred_volume``, ``label_volume`` in mm³ (voxels
    times the voxel volume ``spacing`` gives) that :func:`aggregate` pools into DSCagg, as the
    HECKTOR 2022 evaluation pools them.

    Dice comes from MONAI ``compute_dice(ignore_empty=False)`` with the both-empty case then set to
    NaN: MONAI's ``ignore_empty=True`` would also return NaN for a false positive on an empty ground
    truth (common for GTVn) and so hide it from the mean per-case Dice.

    Args:
        pred: predicted label map (D, H, W), torch or numpy, values in 0..2.
        label: ground-truth label map of the same shape.
        spacing: voxel size in mm along (D, H, W), for HD95 and the volumes. Default (1, 1, 1).
        distances: compute HD95 (the costly part); False leaves it NaN, for validation that needs
            only the overlaps. Default True.
    """
    p, g = _as_label_map(pred, "pred"), _as_label_map(label, "label")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} differs from label shape {tuple(g.shape)}.")
    if len(spacing) != 3:
        raise ValueError(f"spacing must give 3 values (D, H, W), got {tuple(spacing)}.")
    p1h = one_hot(p[None, None], NUM_LABELS)  # (1, C, D, H, W)
    g1h = one_hot(g[None, None], NUM_LABELS)
    dice = compute_dice(p1h, g1h, include_background=True, ignore_empty=False)[0]  # (C,)

    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    out: dict[str, dict[str, float | int]] = {}
    for name, c in CLASSES.items():
        pc, gc = p1h[:, c : c + 1], g1h[:, c : c + 1]
        n_pred, n_label = int(pc.sum()), int(gc.sum())
        hd95 = math.nan
        if n_pred and n_label and distances:
            with warnings.catch_warnings():  # MONAI 1.6 calls its own deprecated argument internally
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
                box = _bounding_box(pc[0, 0] + gc[0, 0])  # the distance maps are the costly part: crop first
                hd95 = float(
                    compute_hausdorff_distance(
                        pc[(..., *box)], gc[(..., *box)], include_background=True, percentile=95,
                        spacing=[float(s) for s in spacing],
                    )[0, 0]
                )
        out[name] = {
            "dice": math.nan if n_pred == 0 and n_label == 0 else float(dice[c]),
            "hd95": hd95,
            "intersection": int((pc * gc).sum()) * voxel_mm3,
            "pred_volume": n_pred * voxel_mm3,
            "label_volume": n_label * voxel_mm3,
        }
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _nanmedian(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.median(kept)) if kept else math.nan


def _summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """DSCagg, mean Dice and median HD95 over ``cases``; NaN entries are skipped, all-NaN gives NaN."""
    dsc_agg: dict[str, float] = {}
    dice_mean: dict[str, float] = {}
    hd95_median: dict[str, float] = {}
    for name in CLASSES:
        inter = sum(c[name]["intersection"] for c in cases)
        denom = sum(c[name]["pred_volume"] + c[name]["label_volume"] for c in cases)
        # A class absent from every prediction and label of the set has no DSCagg.
        dsc_agg[name] = 2.0 * inter / denom if denom else math.nan
        dice_mean[name] = _nanmean([c[name]["dice"] for c in cases])
        hd95_median[name] = _nanmedian([c[name]["hd95"] for c in cases])
    dsc_agg["mean"] = _nanmean([dsc_agg[n] for n in CLASSES])
    dice_mean["mean"] = _nanmean([dice_mean[n] for n in CLASSES])
    return {"n_cases": len(cases), "dsc_agg": dsc_agg, "dice_mean": dice_mean, "hd95_median": hd95_median}


def aggregate(case_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool per-case results into per-center and overall summaries.

    Each item is ``{"case_id", "center", **case_metrics(...)}``. A summary holds ``n_cases``,
    ``dsc_agg`` and ``dice_mean`` (per class and ``mean`` of the two), and ``hd95_median`` per class.
    DSCagg of a class is NaN when the class is absent from every prediction and label of the set;
    ``mean`` is then taken over the classes that are defined (NaN if none is).
    """
    by_center: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for case in case_results:
        missing = [k for k in ("case_id", "center", *CLASSES) if k not in case]
        if missing:
            raise ValueError(f"case result {case.get('case_id', '?')} lacks keys {missing}.")
        by_center[case["center"]].append(case)
    per_center = {center: _summary(cases) for center, cases in sorted(by_center.items())}
    logger.debug("aggregated %d cases over centers %s", len(case_results), list(per_center))
    return {"per_center": per_center, "overall": _summary(list(case_results))}
