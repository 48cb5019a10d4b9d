"""Acquisition fingerprint of a PET/CT scan: header geometry and intensity statistics, before resampling.

Centers differ in how they acquire and reconstruct (voxel spacing, field of view, CT noise and
kernel, HU calibration, PET voxel size, noise and SUV calibration; see ``docs/centers.md``), and
resampling to the model's grid hides much of it. So the routing key reads the original files:
their headers, a block of CT slices a quarter of the way in and the (small) PET volume, with
statistics taken on every second row and slice (:data:`STRIDE`; rows stay whole, so neighbour
differences still measure noise): a few percent of a prediction's time. No voxel data leaves this module,
only the numbers in :data:`FEATURES`.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# Multiplicative quantities are taken as natural logs, so a floor of 0.02 means "2 %".
FEATURES: tuple[str, ...] = (
    "log_ct_spacing_xy", "log_ct_slice", "log_ct_extent_xy", "log_ct_extent_z",
    "log_pet_spacing_xy", "log_pet_slice", "log_pet_extent_xy", "log_pet_extent_z",
    "ct_air_hu", "ct_soft_hu", "log_ct_air_noise", "log_ct_soft_noise", "log_ct_soft_diff_noise",
    "log_pet_background", "log_pet_spread", "log_pet_diff_noise",
)  # fmt: skip
# Smallest within-center spread each feature is credited with (same units): header values are
# exact, so without a floor a center whose scans share one spacing would have zero variance.
FLOORS = np.array([0.02] * 8 + [3.0, 3.0] + [0.05] * 3 + [0.05] * 3)
CT_SLAB = 16  # CT slices read: enough voxels for robust statistics, a fraction of the file
STRIDE = 2  # statistics on every STRIDE-th row and slice: medians of a quarter of the voxels agree to well
# within the floors, at a quarter of the cost
BODY = 0.05  # PET voxels above this fraction of the 99th percentile are the patient (not the empty field)
AIR_HU, SOFT_HU = -800.0, (-100.0, 200.0)  # CT classes by HU (offsets of +-50 HU stay inside)
_MAD = 1.4826  # MAD -> standard deviation for Gaussian noise


def _robust_std(values: np.ndarray) -> float:
    if values.size < 10:
        return float("nan")
    return float(_MAD * np.median(np.abs(values - np.median(values))))


def _diff_noise(block: np.ndarray, mask: np.ndarray) -> float:
    """Noise from differences of in-plane neighbours that are both in ``mask``: anatomy cancels,
    noise after the reconstruction kernel remains (a smooth kernel correlates neighbours, so this
    falls below the plain spread and their ratio tells kernels apart)."""
    pair = mask[1:] & mask[:-1]
    return _robust_std((block[1:] - block[:-1])[pair]) / np.sqrt(2.0)


def _log(value: float, floor: float = 1e-3) -> float:
    return float(np.log(max(value, floor))) if np.isfinite(value) else float(np.log(floor))


def _geometry(img: nib.Nifti1Image) -> list[float]:
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    shape = np.asarray(img.shape[:3], dtype=float)
    return [_log(zooms[:2].mean()), _log(zooms[2]), _log((shape[:2] * zooms[:2]).mean()), _log(shape[2] * zooms[2])]


def acquisition_features(ct: str | Path, pet: str | Path) -> np.ndarray:
    """The scan's fingerprint (len(FEATURES),) from its original CT and PET files (NIfTI)."""
    ct_img, pet_img = nib.load(str(ct)), nib.load(str(pet))
    if len(ct_img.shape) < 3 or len(pet_img.shape) < 3:
        raise ValueError(f"{ct} / {pet}: need 3-D CT and PET volumes.")
    lo = max(ct_img.shape[2] // 4 - CT_SLAB // 2, 0)  # a quarter in: inside the body, and a gzipped file
    # is decompressed only up to the slab's end
    block = np.asarray(ct_img.dataobj[:, :, lo : lo + CT_SLAB], dtype=np.float32)[:, ::STRIDE, ::STRIDE]
    air, soft = block < AIR_HU, (block > SOFT_HU[0]) & (block < SOFT_HU[1])
    air_hu = float(np.median(block[air])) if air.any() else AIR_HU
    soft_hu = float(np.median(block[soft])) if soft.any() else 0.0
    suv = np.asarray(pet_img.dataobj, dtype=np.float32)[:, ::STRIDE, ::STRIDE]
    # The patient: above a small fraction of the hottest uptake (brain, bladder, a lesion), so the
    # empty field is left out and the median is soft tissue's, however large the hot structures.
    body = suv > BODY * float(np.percentile(suv, 99))
    background = float(np.median(suv[body])) if body.any() else 0.0
    return np.array([
        *_geometry(ct_img), *_geometry(pet_img), air_hu, soft_hu,
        _log(_robust_std(block[air])), _log(_robust_std(block[soft])), _log(_diff_noise(block, soft)),
        _log(background), _log(_robust_std(suv[body]) / max(background, 1e-3)),
        _log(_diff_noise(suv, body) / max(background, 1e-3)),
    ])  # fmt: skip
