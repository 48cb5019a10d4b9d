"""MONAI preprocessing for PET/CT head-and-neck cases: training and inference pipelines.

Both pipelines share one deterministic part, so a model sees the same geometry and intensities
in training and at inference:

1. load CT, PET (and label) with nibabel, channel first, RAS orientation;
2. resample PET onto the CT grid in world coordinates (PET is coarser and has another extent);
3. resample everything to ``spacing`` (labels with nearest neighbour);
4. head-and-neck crop (see :func:`head_neck_mask`): bounding box of the body (CT above
   ``body_hu``) within the top ``crop_mm[2]`` mm of the body, then a centred in-plane crop of
   ``crop_mm[0] x crop_mm[1]`` mm;
5. CT window ``ct_window`` HU -> [0, 1] and PET SUV [0, ``suv_max``] -> [0, 1], both clipped;
6. pad to at least ``roi_size`` (value 0: air / no uptake) and stack CT, PET into a 2-channel "image".

Training adds balanced tumour/background crops and mild augmentation; the inference pipeline keeps
MetaTensor metadata so a prediction can be inverted onto the original CT grid.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResampleToMatchd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from centerprompt.data.cases import Case, DataError
from centerprompt.files import atomic_path, terminal_bars

logger = logging.getLogger(__name__)

ROI_DIVISOR = 8  # smallest ViT patch size (PromptedUNETR: 8 or 16); the model checks its own


@dataclass(frozen=True)
class PreprocessConfig:
    """How cases are turned into network input; saved with every model so inference matches training.

    Args:
        spacing: target voxel spacing in mm (RAS axes). Default (2.0, 2.0, 2.0).
        ct_window: CT window in HU mapped to [0, 1] and clipped. Default (-250, 250), soft tissue.
        suv_max: PET SUV clipped to [0, suv_max] and divided by suv_max. Default 15. Not per-case
            z-scoring: the absolute SUV scale carries the center's calibration and is diagnostic
            (tumours are hot in absolute terms), so it is kept comparable across cases.
        body_hu: CT threshold in HU for the body mask used by the crop. Default -500 (air is -1000).
        crop_mm: head-and-neck crop in mm (left-right, posterior-anterior, inferior-superior), or
            None for no crop. Default (200, 200, 240): the axial extent reaches from the vertex
            down to the lower neck nodes.
        roi_size: training crop and sliding-window size in voxels; divisible by the patch size. Default 96^3.
        num_samples: training crops drawn per volume per epoch. Default 2.
        pos, neg: ratio of crops centred on tumour vs background voxels. Default 1:1 (balanced).
        flip_prob: probability of a left-right flip. Default 0.5.
        affine_prob: probability of a mild random rotation (+-rotate_deg) and scaling (+-scale).
        rotate_deg, scale: affine ranges. Defaults 10 degrees, 0.1.
        intensity_prob, intensity: probability and range of random intensity scale and shift
            (applied to the normalised image). Defaults 0.5, 0.1.
    """

    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    ct_window: tuple[float, float] = (-250.0, 250.0)
    suv_max: float = 15.0
    body_hu: float = -500.0
    crop_mm: tuple[float, float, float] | None = (200.0, 200.0, 240.0)
    roi_size: tuple[int, int, int] = (96, 96, 96)
    num_samples: int = 2
    pos: float = 1.0
    neg: float = 1.0
    flip_prob: float = 0.5
    affine_prob: float = 0.2
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity_prob: float = 0.5
    intensity: float = 0.1

    def __post_init__(self) -> None:
        # Every field is numbers (a --preprocess file may say anything): NaN would crop and scale to
        # nothing without an error, a string would fail far from here.
        for f in fields(self):
            value = getattr(self, f.name)
            items = value if isinstance(value, (list, tuple)) else (value,)
            if value is None and f.name == "crop_mm":
                continue
            if not items or not all(_finite_number(v) for v in items):
                raise ValueError(f"preprocessing field {f.name} must be finite numbers, got {value!r}")
        # JSON gives lists; store tuples so the config stays hashable and comparable.
        for name in ("spacing", "ct_window", "crop_mm", "roi_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers in mm, got {self.spacing}")
        if len(self.roi_size) != 3 or any(s <= 0 or s % ROI_DIVISOR for s in self.roi_size):
            raise ValueError(f"roi_size must be 3 positive multiples of {ROI_DIVISOR}, got {self.roi_size}")
        if len(self.ct_window) != 2 or self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
        if self.suv_max <= 0:
            raise ValueError(f"suv_max must be positive, got {self.suv_max}")
        if self.crop_mm is not None and (len(self.crop_mm) != 3 or min(self.crop_mm) <= 0):
            raise ValueError(f"crop_mm must be 3 positive sizes in mm or None, got {self.crop_mm}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg == 0:
            raise ValueError(f"pos and neg must be >= 0 and not both 0, got {self.pos}, {self.neg}")

    @property
    def crop_voxels(self) -> tuple[int, int, int] | None:
        """Crop size in voxels at the target spacing."""
        if self.crop_mm is None:
            return None
        return tuple(max(1, round(mm / sp)) for mm, sp in zip(self.crop_mm, self.spacing))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocessing option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def head_neck_mask(img: torch.Tensor, threshold: float, depth: int | None) -> torch.Tensor:
    """Foreground for :class:`CropForegroundd`: body voxels (CT > threshold) in the top ``depth`` slices.

    Expects RAS orientation, where the last axis runs inferior -> superior, so the head is at the
    end. With no body voxel at all (an empty or odd CT) the whole image is kept.
    """
    mask = img > threshold
    if not bool(mask.any()):
        logger.warning("no CT voxel above %s HU: keeping the whole image instead of cropping", threshold)
        return torch.ones_like(mask)
    if depth is not None:
        top = int(torch.nonzero(mask.flatten(0, -2).any(0)).max())  # most superior body slice
        mask[..., : max(0, top + 1 - depth)] = False
    return mask


def case_to_dict(case: Case) -> dict[str, str]:
    """MONAI dictionary item of a case: file paths under "ct", "pet" ("label" if labelled), plus IDs."""
    item = {"ct": str(case.ct), "pet": str(case.pet), "case_id": case.case_id, "center": case.center}
    if case.label is not None:
        item["label"] = str(case.label)
    return item


def _deterministic(cfg: PreprocessConfig, with_label: bool) -> list:
    keys = ["ct", "pet", "label"] if with_label else ["ct", "pet"]
    modes = ["bilinear", "bilinear", "nearest"][: len(keys)]
    crop = cfg.crop_voxels
    window_low, window_high = cfg.ct_window
    return [
        LoadImaged(keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        # PET outside its field of view has no uptake: pad with zeros, not the border value.
        ResampleToMatchd("pet", key_dst="ct", mode="bilinear", padding_mode="zeros"),
        Spacingd(keys, pixdim=cfg.spacing, mode=modes),
        CropForegroundd(
            keys,
            source_key="ct",
            select_fn=functools.partial(head_neck_mask, threshold=cfg.body_hu, depth=crop[2] if crop else None),
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        CenterSpatialCropd(keys, roi_size=(crop[0], crop[1], -1) if crop else -1),
        ScaleIntensityRanged("ct", a_min=window_low, a_max=window_high, b_min=0.0, b_max=1.0, clip=True),
        ScaleIntensityRanged("pet", a_min=0.0, a_max=cfg.suv_max, b_min=0.0, b_max=1.0, clip=True),
        SpatialPadd(keys, spatial_size=cfg.roi_size),
        # ConcatItemsd copies the first item's metadata, so "image" carries the CT's geometry and
        # applied operations, which is what inverting a prediction needs.
        ConcatItemsd(["ct", "pet"], name="image"),
        DeleteItemsd(["ct", "pet"]),
    ]


def train_transforms(cfg: PreprocessConfig) -> Compose:
    """Deterministic preprocessing, then ``num_samples`` random ``roi_size`` crops with augmentation.

    Items become lists of ``num_samples`` dicts with "image" (2, *roi) and "label" (1, *roi) float
    tensors; MONAI's DataLoader flattens them into batches of B * num_samples.
    """
    keys = ["image", "label"]
    angle = math.radians(cfg.rotate_deg)
    return Compose(
        _deterministic(cfg, with_label=True)
        + [
            # Negative crops only where the image is non-zero (inside the body or PET uptake).
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=cfg.roi_size, pos=cfg.pos, neg=cfg.neg,
                num_samples=cfg.num_samples, image_key="image", image_threshold=0.0,
            ),
            RandFlipd(keys, spatial_axis=0, prob=cfg.flip_prob),  # left-right only: H&N is roughly symmetric
            RandAffined(
                keys, prob=cfg.affine_prob, rotate_range=(angle,) * 3, scale_range=(cfg.scale,) * 3,
                mode=("bilinear", "nearest"), padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=cfg.intensity, prob=cfg.intensity_prob),
            RandShiftIntensityd("image", offsets=cfg.intensity, prob=cfg.intensity_prob),
            EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ]
    )


def inference_transforms(cfg: PreprocessConfig, with_label: bool) -> Compose:
    """Deterministic preprocessing only; "image" (2, D, H, W) and optional "label" (1, D, H, W) MetaTensors.

    Keep the returned Compose: :func:`invert_prediction` needs it to map predictions back.
    """
    keys = ["image", "label"] if with_label else ["image"]
    return Compose(_deterministic(cfg, with_label=with_label) + [EnsureTyped(keys, dtype=torch.float32)])


def make_dataset(
    cases: Sequence[Case], transform: Compose, cache: str | Path | None = "memory", *, num_workers: int | None = None
) -> Dataset:
    """Dataset of cases whose deterministic preprocessing is done once, so epochs are bound by the model.

    ``cache="memory"``: :class:`CacheDataset` (all cases in RAM, with a progress bar on a terminal).
    A path: :class:`PersistentDataset` on disk, keyed by the case and the deterministic transforms
    (changing the preprocessing gives new cache files); it stores plain tensors, since reloading
    pickled MetaTensors needs unsafe unpickling, so predictions from it cannot be inverted: use
    "memory" or ``None`` for data passed to :func:`save_prediction`. ``None``: no caching.
    Both caches stop at the first random transform, so training crops stay random.
    """
    items = [case_to_dict(c) for c in cases]
    if cache is None:
        return Dataset(items, transform)
    if cache == "memory":
        return CacheDataset(items, transform, progress=terminal_bars(), num_workers=num_workers)
    cache_dir = Path(cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return PersistentDataset(items, transform, cache_dir=cache_dir, hash_transform=pickle_hashing)


def invert_prediction(pred: torch.Tensor | np.ndarray, data: dict, transform: Compose) -> MetaTensor:
    """Map a label map (1, D, H, W) in preprocessed space back onto the original CT grid.

    ``data`` is the (unbatched) item from ``transform`` (an :func:`inference_transforms` pipeline)
    that produced the prediction; its "image" holds the CT's applied operations. Nearest-neighbour
    interpolation keeps label values.
    """
    image = data["image"]
    pred = torch.as_tensor(pred)
    if pred.ndim == 3:
        pred = pred[None]
    if not isinstance(image, MetaTensor) or tuple(pred.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} does not match the preprocessed image "
            f"{tuple(getattr(image, 'shape', ()))} of {data.get('case_id')}, or the item has no metadata "
            "(items from an on-disk cache cannot be inverted)"
        )
    inverter = Invertd("pred", transform=transform, orig_keys="ct", nearest_interp=True)
    # Invertd takes the geometry from "ct" only when the prediction is a MetaTensor itself.
    return inverter({"pred": MetaTensor(pred.float()), "ct": image})["pred"]


def save_prediction(pred: torch.Tensor | np.ndarray, data: dict, out_path: str | Path, transform: Compose) -> Path:
    """Write a predicted label map as a uint8 NIfTI on the original CT grid (shape and affine), atomically.

    The header (affine, qform/sform) is copied from the CT file, so the output overlays the CT
    exactly in any viewer and is scored at CT resolution.
    """
    inverted = invert_prediction(pred, data, transform)
    ct_path = Path(data["image"].meta["filename_or_obj"])
    ct = nib.load(ct_path)
    labels = np.rint(inverted[0].detach().cpu().numpy()).astype(np.uint8)
    assert labels.shape == ct.shape[:3], f"inverted shape {labels.shape} != CT {ct.shape}"
    out = nib.Nifti1Image(labels, ct.affine, header=ct.header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    out_path = Path(out_path)
    with atomic_path(out_path, keep_suffix=True) as tmp:  # same suffix: nibabel picks gzip by name
        nib.save(out, tmp)
    return out_path


PROBABILITIES_SUFFIX = "_probabilities"  # CASE.nii.gz's softmax: CASE_probabilities.nii.gz beside it


def probabilities_path(label_path: str | Path) -> Path:
    """Where :func:`save_probabilities` writes the softmax of a label map written to ``label_path``."""
    path = Path(label_path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(path.name[: -len(suffix)] + PROBABILITIES_SUFFIX + suffix)


def save_probabilities(probs: torch.Tensor, data: dict, out_path: str | Path, transform: Compose) -> Path:
    """Write softmax probabilities (1, C, D, H, W) in preprocessed space as a float32 NIfTI
    (X, Y, Z, C) on the original CT grid (its affine), atomically.

    The foreground classes are mapped back with linear interpolation (:class:`~monai.transforms.Invertd`
    with the image's own modes); background is 1 minus their sum, so every voxel sums to 1,
    including those outside the preprocessing crop (background there, as in the label map).
    """
    inverter = Invertd("pred", transform=transform, orig_keys="ct", nearest_interp=False)
    foreground = inverter({"pred": MetaTensor(probs[0, 1:].float().cpu()), "ct": data["image"]})["pred"]
    foreground = torch.as_tensor(foreground).clamp(0.0, 1.0)
    background = (1.0 - foreground.sum(0, keepdim=True)).clamp(min=0.0)
    stacked = torch.cat([background, foreground]) / torch.cat([background, foreground]).sum(0, keepdim=True)
    ct = nib.load(Path(data["image"].meta["filename_or_obj"]))
    array = np.moveaxis(stacked.numpy().astype(np.float32), 0, -1)  # (X, Y, Z, C)
    if array.shape[:3] != ct.shape[:3]:
        raise ValueError(f"inverted probabilities {array.shape[:3]} do not fit the CT grid {ct.shape[:3]}.")
    out_path = Path(out_path)
    with atomic_path(out_path, keep_suffix=True) as tmp:
        nib.save(nib.Nifti1Image(array, ct.affine), tmp)
    return out_path


def load_label_on_ct_grid(case: Case) -> np.ndarray:
    """The case's label as uint8 in the CT file's voxel order, for scoring at CT resolution."""
    if case.label is None:
        raise DataError(f"{case.case_id}: no label file")
    label, ct_shape = nib.load(case.label), nib.load(case.ct).shape
    if label.shape != ct_shape:
        raise DataError(f"{case.case_id}: label {case.label} shape {label.shape} differs from CT {case.ct} {ct_shape}")
    return np.asanyarray(label.dataobj).astype(np.uint8)
