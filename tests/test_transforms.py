"""MONAI pipelines: PET/CT alignment in world space, crops, training batches, inverting predictions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CT_AFFINE, GTVP_CENTER, SUV_GTVP, write_case
from monai.data import DataLoader

from centerprompt.data.cases import Case, DataError
from centerprompt.data.hecktor import find_cases
from centerprompt.data.transforms import (
    PreprocessConfig,
    case_to_dict,
    inference_transforms,
    invert_prediction,
    load_label_on_ct_grid,
    make_dataset,
    save_prediction,
    train_transforms,
)

SMALL = PreprocessConfig(spacing=(3.0, 3.0, 3.0), roi_size=(32, 32, 32), num_samples=2)


@pytest.fixture
def cases(hecktor_dir: Path) -> list[Case]:
    return find_cases(hecktor_dir)


def _world(affine: torch.Tensor, ijk: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(np.asarray(affine, dtype=float), ijk)


def test_config_validates_and_round_trips() -> None:
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 2.0), roi_size=(64, 64, 48))
    again = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.roi_size == (64, 64, 48)
    assert PreprocessConfig().crop_voxels == (100, 100, 120)
    with pytest.raises(ValueError, match="roi_size must be 3 positive multiples of 8"):
        PreprocessConfig(roi_size=(96, 96, 36))
    with pytest.raises(ValueError, match="ct_window"):
        PreprocessConfig(ct_window=(250, -250))
    with pytest.raises(ValueError, match="unknown preprocessing option"):
        PreprocessConfig.from_dict({"spacing": [2, 2, 2], "zscore": True})


def test_case_to_dict(cases: list[Case]) -> None:
    item = case_to_dict(cases[0])
    assert item == {"ct": str(cases[0].ct), "pet": str(cases[0].pet), "label": str(cases[0].label), "case_id": "CHUM-001", "center": "CHUM"}
    assert "label" not in case_to_dict(Case("X-1", "X", Path("a"), Path("b")))


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (2.0, 2.0, 2.0)])
def test_pet_lands_on_ct_in_world_space(cases: list[Case], spacing: tuple) -> None:
    """PET sits on a coarser grid with another origin; after resampling its hot spot is where the sphere is."""
    cfg = PreprocessConfig(spacing=spacing, roi_size=(32, 32, 32))
    data = inference_transforms(cfg, with_label=True)(case_to_dict(cases[0]))
    image, label = data["image"], data["label"]
    assert image.shape[0] == 2 and label.shape[1:] == image.shape[1:]
    assert np.allclose(np.diag(image.affine)[:3], spacing)  # RAS at the target spacing
    pet = image[1].numpy()
    hot = np.argwhere(pet > 0.75 * SUV_GTVP / cfg.suv_max)  # GTVp only, not the cooler node
    assert np.linalg.norm(_world(image.affine, hot.mean(0)) - GTVP_CENTER) < max(spacing)
    gtvp = np.argwhere(label[0].numpy() == 1)
    assert np.linalg.norm(_world(label.affine, gtvp.mean(0)) - GTVP_CENTER) < max(spacing)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0  # window and SUV scaling clip


def test_crop_keeps_superior_part(cases: list[Case]) -> None:
    cfg = PreprocessConfig(spacing=(3.0, 3.0, 3.0), roi_size=(16, 16, 16), crop_mm=(60.0, 60.0, 30.0))
    image = inference_transforms(cfg, with_label=False)(case_to_dict(cases[0]))["image"]
    body = np.argwhere(image[0].numpy() > 0)  # CT above the window floor: inside the body
    z = _world(image.affine, body)[:, 2]
    ct_top = CT_AFFINE[2, 3] + CT_AFFINE[2, 2] * 29
    assert z.max() == pytest.approx(ct_top, abs=3.0)
    assert z.max() - z.min() <= 30.0
    assert image.shape[1:3] == (20, 20)  # 60 mm / 3 mm in plane


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_training_batch_shapes(cases: list[Case], tmp_path: Path, cache: str) -> None:
    dataset = make_dataset(cases, train_transforms(SMALL), cache="memory" if cache == "memory" else tmp_path)
    for _ in range(2 if cache == "disk" else 1):  # second pass reads the disk cache
        batch = next(iter(DataLoader(dataset, batch_size=2, shuffle=False)))
    n = 2 * SMALL.num_samples
    assert batch["image"].shape == (n, 2, 32, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (n, 1, 32, 32, 32)
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0, 2.0}
    assert (batch["label"] > 0).flatten(1).any(1).any()  # positive crops contain tumour
    assert len(batch["case_id"]) == n


def test_persistent_cache_is_reused(cases: list[Case], tmp_path: Path) -> None:
    transform = inference_transforms(SMALL, with_label=True)
    first = make_dataset(cases[:2], transform, cache=tmp_path / "cache")
    a = first[0]
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 1
    b = make_dataset(cases[:2], inference_transforms(SMALL, with_label=True), cache=tmp_path / "cache")[0]
    assert sorted((tmp_path / "cache").iterdir()) == files and torch.equal(a["image"], b["image"])
    other = PreprocessConfig(spacing=(2.5, 2.5, 2.5), roi_size=(32, 32, 32))
    make_dataset(cases[:1], inference_transforms(other, with_label=True), cache=tmp_path / "cache")[0]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # new preprocessing, new cache entry
    with pytest.raises(ValueError, match="on-disk cache cannot be inverted"):
        invert_prediction(b["label"], b, transform)  # b came from the disk cache


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("cache", [None, "memory"])
def test_prediction_back_on_ct_grid(cases: list[Case], tmp_path: Path, cache: str | None) -> None:
    transform = inference_transforms(SMALL, with_label=True)
    data = make_dataset(cases[:1], transform, cache=cache)[0]
    out = save_prediction(data["label"], data, tmp_path / "pred" / "CHUM-001.nii.gz", transform)
    written, ct = nib.load(out), nib.load(cases[0].ct)
    assert written.shape == ct.shape and np.array_equal(written.affine, ct.affine)
    assert written.get_data_dtype() == np.uint8
    assert sorted(p.name for p in out.parent.iterdir()) == ["CHUM-001.nii.gz"]  # no temp file left
    pred, truth = np.asanyarray(written.dataobj), load_label_on_ct_grid(cases[0])
    for cls in (1, 2):
        assert _dice(pred == cls, truth == cls) > 0.9


def test_prediction_for_unlabelled_case(hecktor_dir: Path, tmp_path: Path) -> None:
    write_case(hecktor_dir, "CHUV-001", label_sep=None)
    case = next(c for c in find_cases(hecktor_dir) if c.case_id == "CHUV-001")
    transform = inference_transforms(SMALL, with_label=False)
    data = transform(case_to_dict(case))
    assert set(data) == {"image", "case_id", "center"}
    pred = (data["image"][1:] > 0.5).float()  # "segment" the hot PET
    out = save_prediction(pred, data, tmp_path / "CHUV-001.nii.gz", transform)
    assert nib.load(out).shape == nib.load(case.ct).shape
    with pytest.raises(ValueError, match="does not match the preprocessed image"):
        invert_prediction(torch.zeros(1, 8, 8, 8), data, transform)
    with pytest.raises(DataError, match="no label"):
        load_label_on_ct_grid(case)
