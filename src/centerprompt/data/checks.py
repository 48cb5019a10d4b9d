"""Content checks for HECKTOR cases, shared by ``check-data`` and the training commands.

Headers are read first (cheap: shape, affine, spacing); voxel arrays are loaded only for the
checks that need them (NaN/inf voxels, label values) and only when ``deep=True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from centerprompt.data.hecktor import Case, DataError, format_problems

logger = logging.getLogger(__name__)

LABEL_VALUES = (0, 1, 2)  # background, GTVp, GTVn
# Labels are exported on the CT grid, but some tools round the affine; differences below this
# (mm, per affine element) are treated as the same grid.
GRID_ATOL_MM = 1e-2
_PROGRESS_MIN_CASES = 5


def _bounds(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS mm) axis-aligned bounding box of the image's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in img.shape[:3]], indexing="ij")).reshape(3, -1)
    world = nib.affines.apply_affine(img.affine, corners.T)
    return world.min(0), world.max(0)


def check_case(case: Case, *, deep: bool = True) -> list[str]:
    """Problems of one case, one line each naming the case and the file; empty when the case is fine.

    Header checks: readable, 3D, label on the CT grid (shape and affine), PET overlapping the CT.
    With ``deep=True`` also NaN/inf voxels in CT/PET and label values outside {0, 1, 2}.
    """
    problems: list[str] = []
    images: dict[str, nib.Nifti1Image] = {}
    files = {"CT": case.ct, "PET": case.pet, "label": case.label}
    for what, path in files.items():
        if path is None:
            continue
        try:
            img = nib.load(path)
        except Exception as err:  # any failure to parse is a data problem, reported not raised
            problems.append(f"{case.case_id}: cannot read {what} file {path}: {type(err).__name__}: {err}")
            continue
        if len(img.shape) != 3:
            problems.append(f"{case.case_id}: {what} file {path} is not 3D (shape {img.shape})")
            continue
        images[what] = img

    ct, pet, label = images.get("CT"), images.get("PET"), images.get("label")
    if ct is not None and label is not None:
        if label.shape != ct.shape:
            problems.append(
                f"{case.case_id}: label {case.label} has shape {label.shape}, CT {case.ct} has {ct.shape}; "
                "the label must be on the CT grid"
            )
        elif not np.allclose(label.affine, ct.affine, atol=GRID_ATOL_MM, rtol=0):
            diff = np.abs(label.affine - ct.affine).max()
            problems.append(
                f"{case.case_id}: label {case.label} affine differs from CT {case.ct} by up to {diff:.3g} mm; "
                "the label must be on the CT grid"
            )
    if ct is not None and pet is not None:
        (ct_lo, ct_hi), (pet_lo, pet_hi) = _bounds(ct), _bounds(pet)
        if np.any(np.maximum(ct_lo, pet_lo) > np.minimum(ct_hi, pet_hi)):
            problems.append(f"{case.case_id}: PET {case.pet} does not overlap CT {case.ct} in world space")

    if deep:
        problems += _check_voxels(case, images, files)
    return problems


def _check_voxels(case: Case, images: dict[str, nib.Nifti1Image], files: dict) -> list[str]:
    problems = []
    for what, img in images.items():
        try:
            data = np.asanyarray(img.dataobj)
        except Exception as err:  # truncated or corrupt data block behind a valid header
            problems.append(f"{case.case_id}: cannot read {what} file {files[what]}: {type(err).__name__}: {err}")
            continue
        if what == "label":
            values = np.unique(data)
            extra = values[~np.isin(values, LABEL_VALUES)]
            if extra.size:
                shown = ", ".join(f"{v:g}" for v in extra[:5]) + (", ..." if extra.size > 5 else "")
                problems.append(f"{case.case_id}: label {files[what]} has values outside {{0, 1, 2}}: {shown}")
        elif np.issubdtype(data.dtype, np.floating):
            n_bad = data.size - int(np.count_nonzero(np.isfinite(data)))
            if n_bad:
                problems.append(f"{case.case_id}: {what} file {files[what]} has {n_bad} NaN or infinite voxels")
    return problems


def _progress(cases: list[Case], desc: str) -> Iterable[Case]:
    return tqdm(cases, desc=desc, unit="case", disable=len(cases) <= _PROGRESS_MIN_CASES, leave=False)


def check_cases(cases: Iterable[Case], *, deep: bool = True) -> dict[str, list[str]]:
    """``{case_id: problems}`` for the cases that have problems."""
    cases = list(cases)
    found = {}
    for case in _progress(cases, "checking cases"):
        problems = check_case(case, deep=deep)
        if problems:
            found[case.case_id] = problems
    return found


def validate_cases(cases: Iterable[Case], skip_bad_cases: bool = False, *, deep: bool = True) -> list[Case]:
    """The cases that pass :func:`check_case`.

    Raises :class:`DataError` listing the problems, or with ``skip_bad_cases`` logs a WARNING per
    bad case and drops it (never silently).
    """
    cases = list(cases)
    found = check_cases(cases, deep=deep)
    if found and not skip_bad_cases:
        raise DataError(format_problems([p for ps in found.values() for p in ps], f"{len(cases)} cases"))
    for problems in found.values():
        for problem in problems:
            logger.warning("skipping bad case: %s", problem)
    good = [c for c in cases if c.case_id not in found]
    if not good:
        raise DataError("no usable cases left after skipping bad cases")
    return good


@dataclass
class CenterSummary:
    """Ranges over the cases of one center; spacings in mm, sizes in voxels, volumes in ml."""

    cases: int = 0
    labelled: int = 0
    ct_spacing: list[list[float]] = field(default_factory=list)  # [min per axis, max per axis]
    ct_size: list[list[int]] = field(default_factory=list)
    pet_spacing: list[list[float]] = field(default_factory=list)
    pet_size: list[list[int]] = field(default_factory=list)
    gtvp_ml: list[float] = field(default_factory=list)  # one per labelled case
    gtvn_ml: list[float] = field(default_factory=list)


def _range(values: list) -> list[list]:
    arr = np.asarray(values)
    return [arr.min(0).tolist(), arr.max(0).tolist()]


def summarize(cases: Iterable[Case]) -> dict[str, CenterSummary]:
    """Per-center summary (spacings, sizes, label volumes): the first thing to compare across centers.

    Expects readable cases (run :func:`check_case` first); loads label arrays for the volumes.
    """
    cases = list(cases)
    raw: dict[str, dict[str, list]] = {}
    for case in _progress(cases, "summarizing"):
        r = raw.setdefault(case.center, {k: [] for k in ("ct_spacing", "ct_size", "pet_spacing", "pet_size", "gtvp", "gtvn")})
        for key, path in (("ct", case.ct), ("pet", case.pet)):
            header = nib.load(path).header
            r[f"{key}_spacing"].append([float(z) for z in header.get_zooms()[:3]])
            r[f"{key}_size"].append([int(s) for s in header.get_data_shape()[:3]])
        if case.label is not None:
            img = nib.load(case.label)
            voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
            data = np.asanyarray(img.dataobj)
            r["gtvp"].append(float(np.count_nonzero(data == 1)) * voxel_ml)
            r["gtvn"].append(float(np.count_nonzero(data == 2)) * voxel_ml)
    return {
        center: CenterSummary(
            cases=len(r["ct_size"]),
            labelled=len(r["gtvp"]),
            ct_spacing=_range(r["ct_spacing"]),
            ct_size=_range(r["ct_size"]),
            pet_spacing=_range(r["pet_spacing"]),
            pet_size=_range(r["pet_size"]),
            gtvp_ml=r["gtvp"],
            gtvn_ml=r["gtvn"],
        )
        for center, r in sorted(raw.items())
    }
