"""Scoring against hand-computable volumes: Dice, HD95, empty classes, DSCagg, sliding windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from centerprompt.evaluate import aggregate, case_metrics, sliding_window_predict


def _cube(shape=(16, 16, 16), lo=(2, 2, 2), size=4, value=1) -> np.ndarray:
    vol = np.zeros(shape, dtype=np.int64)
    vol[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = value
    return vol


def test_dice_two_cubes_with_known_overlap():
    label = _cube(lo=(2, 2, 2))
    pred = _cube(lo=(4, 2, 2))  # overlap 2 x 4 x 4 = 32 of 64 voxels each
    m = case_metrics(pred, label)["gtvp"]
    assert (m["intersection"], m["pred_volume"], m["label_volume"]) == (32, 64, 64)
    assert m["dice"] == pytest.approx(2 * 32 / 128)


def test_identical_masks_score_one_and_zero_distance():
    label = _cube() + _cube(lo=(9, 9, 9), value=2)
    m = case_metrics(torch.as_tensor(label), label)
    for name in ("gtvp", "gtvn"):
        assert m[name]["dice"] == pytest.approx(1.0)
        assert m[name]["hd95"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("axis", "spacing", "expected"),
    [(0, (3.0, 1.0, 0.5), 15.0), (2, (3.0, 1.0, 0.5), 2.5), (1, (1.0, 2.0, 1.0), 10.0)],
)
def test_hd95_of_disjoint_shifted_cubes_uses_spacing(axis, spacing, expected):
    # A 4^3 cube shifted by 5 voxels: the far face (16 of 56 surface voxels, > 5%) lies
    # exactly 5 voxels from the other cube's near face, so HD95 = HD = 5 * spacing[axis].
    lo = [2, 2, 2]
    shifted = list(lo)
    shifted[axis] += 5
    m = case_metrics(_cube(lo=tuple(shifted)), _cube(lo=tuple(lo)), spacing=spacing)["gtvp"]
    assert m["dice"] == 0.0
    assert m["hd95"] == pytest.approx(expected)


def test_hd95_on_the_cropped_box_equals_monai_on_the_whole_volume():
    """case_metrics crops to the objects before the distance maps; the result must not change,
    also for objects that touch the volume's border or lie far apart."""
    from monai.metrics import compute_hausdorff_distance

    gen = np.random.default_rng(0)
    for _ in range(4):
        pred, label = np.zeros((40, 36, 30), np.int64), np.zeros((40, 36, 30), np.int64)
        for volume, shift in ((pred, 0), (label, 3)):
            for _ in range(3):
                lo = gen.integers(0, 30, size=3)
                hi = lo + gen.integers(2, 10, size=3)
                volume[lo[0] + shift : hi[0] + shift, lo[1] : hi[1], lo[2] : hi[2]] = gen.integers(1, 3)
        label[0:4, 0:5, 0:3] = 1  # on the border
        spacing = (1.5, 1.0, 3.0)
        ours = case_metrics(pred, label, spacing)
        for name, c in (("gtvp", 1), ("gtvn", 2)):
            p = torch.from_numpy(pred == c)[None, None].float()
            g = torch.from_numpy(label == c)[None, None].float()
            if p.sum() and g.sum():
                full = float(compute_hausdorff_distance(p, g, percentile=95, spacing=list(spacing))[0, 0])
                assert ours[name]["hd95"] == pytest.approx(full), name


def test_empty_class_semantics():
    label = _cube()  # no GTVn in the ground truth
    both_empty = case_metrics(label, label)["gtvn"]
    assert math.isnan(both_empty["dice"]) and math.isnan(both_empty["hd95"])
    false_positive = case_metrics(label + _cube(lo=(9, 9, 9), value=2), label)["gtvn"]
    assert false_positive["dice"] == 0.0 and math.isnan(false_positive["hd95"])
    missed = case_metrics(label, label + _cube(lo=(9, 9, 9), value=2))["gtvn"]
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95"])


@pytest.mark.parametrize(
    ("pred", "label", "spacing"),
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1)),
        (np.zeros((4, 4)), np.zeros((4, 4)), (1, 1, 1)),
        (np.full((4, 4, 4), 3), np.zeros((4, 4, 4)), (1, 1, 1)),
        (np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4)), (1, 1, 1)),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1)),
    ],
)
def test_case_metrics_rejects_bad_input(pred, label, spacing):
    with pytest.raises(ValueError):
        case_metrics(pred, label, spacing=spacing)


def _case(case_id: str, center: str, pred: np.ndarray, label: np.ndarray) -> dict:
    return {"case_id": case_id, "center": center, **case_metrics(pred, label)}


def test_aggregated_dice_pools_voxels_unlike_mean_dice():
    shape = (24, 24, 24)
    small_label = _cube(shape, lo=(1, 1, 1), size=2)  # 8 voxels, missed entirely
    small_pred = _cube(shape, lo=(5, 5, 5), size=2)
    big = _cube(shape, lo=(10, 10, 10), size=10)  # 1000 voxels, found exactly
    cases = [_case("A-001", "A", small_pred, small_label), _case("A-002", "A", big, big)]
    overall = aggregate(cases)["overall"]
    expected = 2 * (0 + 1000) / ((8 + 8) + (1000 + 1000))
    assert overall["dsc_agg"]["gtvp"] == pytest.approx(expected)
    assert overall["dice_mean"]["gtvp"] == pytest.approx(0.5)
    assert overall["dsc_agg"]["gtvp"] > overall["dice_mean"]["gtvp"] + 0.4


def test_class_absent_everywhere_gives_nan_and_mean_over_the_rest():
    label = _cube()
    pred = _cube(lo=(4, 2, 2))
    overall = aggregate([_case("A-001", "A", pred, label), _case("A-002", "A", label, label)])["overall"]
    assert math.isnan(overall["dsc_agg"]["gtvn"])
    assert math.isnan(overall["dice_mean"]["gtvn"])
    assert math.isnan(overall["hd95_median"]["gtvn"])
    assert overall["dsc_agg"]["mean"] == pytest.approx(overall["dsc_agg"]["gtvp"])
    assert overall["dsc_agg"]["gtvp"] == pytest.approx(2 * (32 + 64) / (128 + 128))
    assert overall["dice_mean"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert overall["hd95_median"]["gtvp"] == pytest.approx(np.median([case_metrics(pred, label)["gtvp"]["hd95"], 0.0]))


def test_no_class_anywhere_gives_nan_mean():
    empty = np.zeros((4, 4, 4))
    summary = aggregate([_case("A-001", "A", empty, empty)])["overall"]
    assert math.isnan(summary["dsc_agg"]["mean"]) and math.isnan(summary["dice_mean"]["mean"])


def test_aggregate_groups_by_center():
    label = _cube() + _cube(lo=(9, 9, 9), value=2)
    half = _cube(lo=(4, 2, 2)) + _cube(lo=(9, 9, 9), value=2)
    cases = [
        _case("B-001", "B", half, label),
        _case("A-001", "A", label, label),
        _case("A-002", "A", label, label),
    ]
    result = aggregate(cases)
    assert list(result["per_center"]) == ["A", "B"]
    assert result["per_center"]["A"]["n_cases"] == 2 and result["overall"]["n_cases"] == 3
    assert result["per_center"]["A"]["dsc_agg"]["mean"] == pytest.approx(1.0)
    assert result["per_center"]["B"]["dsc_agg"]["gtvp"] == pytest.approx(0.5)
    assert result["per_center"]["B"]["dsc_agg"]["mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        aggregate([{"case_id": "X", "gtvp": {}}])


class _Scaled(nn.Module):
    """1x1x1 conv whose logits a keyword argument scales, to check kwargs reach the model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, kernel_size=1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.drop(self.conv(x)) * scale


def test_sliding_window_predict_shape_probabilities_and_kwargs():
    torch.manual_seed(0)
    model = _Scaled().train()
    model.conv.eval()
    image = torch.randn(1, 2, 20, 12, 40)  # smaller than the window on one axis, larger on another
    probs = sliding_window_predict(model, image, roi_size=16, overlap=0.5)
    assert probs.shape == (1, 3, 20, 12, 40) and not probs.requires_grad
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 20, 12, 40), atol=1e-5)
    model.eval()
    expected = torch.softmax(model(image, scale=2.0), dim=1)
    assert torch.allclose(sliding_window_predict(model, image, (16, 16, 16), scale=2.0), expected)
    with torch.inference_mode():
        assert torch.allclose(sliding_window_predict(model, image, 16, scale=2.0), expected)
    model.train()
    model.conv.eval()
    sliding_window_predict(model, image, 16)
    assert model.training and model.drop.training and not model.conv.training  # modes restored


def test_sliding_window_predict_checks_roi_against_model_img_size():
    model = _Scaled()
    model.feat_size, model.patch_size = (2, 2, 2), (16, 16, 16)
    with pytest.raises(ValueError, match="img_size"):
        sliding_window_predict(model, torch.randn(1, 2, 32, 32, 32), roi_size=16)
    assert sliding_window_predict(model, torch.randn(1, 2, 32, 32, 32), roi_size=32).shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError):
        sliding_window_predict(model, torch.randn(1, 2, 32, 32, 32), roi_size=(32, 32))
