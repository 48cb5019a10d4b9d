"""Content checks for HECKTOR cases, shared by ``check-data`` and the training commands.

Headers are read first (cheap: shape, affine, spacing); voxel arrays are loaded only for the
checks that need them (NaN/inf voxels, label values) and only when ``deep=True``. Results are
reused while a case's files keep their path, size and mtime (:func:`check_cases`), so a run that
loads the data several times reads every voxel once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from centerprompt.data.cases import Case, DataError
from centerprompt.data.hecktor import format_problems
from centerprompt.data.labels import GTVN, GTVP, LABEL_VALUES
from centerprompt.files import bars, link_problem, write_json

logger = logging.getLogger(__name__)

# Labels are exported on the CT grid, but some tools round the affine; differences below this
# (mm, per affine element) are treated as the same grid.
GRID_ATOL_MM = 1e-2
# A CT in Hounsfield units holds air (-1000 HU) around the body; one without a voxel below this is
# something else (a PET, or raw stored values without the rescale slope). Same as the crop's body_hu.
CT_AIR_HU = -500.0
# A PET in SUV stays within this range (tumours reach tens, reconstruction noise a little below 0);
# Bq/ml reach thousands and a CT goes down to -1000, so either is named.
PET_SUV_RANGE = (-50.0, 1000.0)
# A PET spans at least this many SUV between its coldest and hottest voxel (air ~0, body ~1, brain
# 5-10); an all-zero or constant PET (a failed reconstruction or export) segments as background.
PET_MIN_SPREAD = 0.5
_PROGRESS_MIN_CASES = 5
#: Name of the file in a run folder that keeps check results across processes.
CHECKS_FILE = "data_checks.json"
_CHECKS_FORMAT = "centerprompt-checks/4"  # /2: intensity ranges; /3: a PET without uptake; /4: data size
# Deflate cannot compress more than 1032:1, so a .nii.gz of n bytes holds less than this many times n.
GZIP_MAX_RATIO = 1100
# A file changed within the file system's timestamp granularity of its check may keep its (size,
# mtime) although its content changed; such a result is not reused (git's "racy clean" rule).
_RACY_NS = 2_000_000_000

_Stats = tuple[tuple[str, int, int], ...]  # (path, size, mtime_ns) of each file of a case
# Check results of this process: (case ID, deep, file stats) -> (check start in ns, problems).
_MEMO: dict[tuple[str, bool, _Stats], tuple[int, list[str]]] = {}


def _bounds(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS mm) axis-aligned bounding box of the image's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in img.shape[:3]], indexing="ij")).reshape(3, -1)
    world = nib.affines.apply_affine(img.affine, corners.T)
    return world.min(0), world.max(0)


def check_pair(ct: str | Path, pet: str | Path, *, deep: bool = True, case_id: str | None = None) -> list[str]:
    """Problems of a CT/PET pair, one line each naming the case and the file; empty when the pair is fine.

    What ``check-data`` checks of any case, labelled or not, and ``predict`` of its inputs: both
    files readable and 3D, the PET overlapping the CT in world space and, with ``deep=True``, no
    NaN/inf voxels, the CT in HU and the PET in SUV (:func:`_intensity_problems`), so that swapped
    or wrongly scaled files are named before a model turns them into an empty mask.
    ``case_id`` (default: the CT file name before ``__CT``) starts each line.
    """
    files = {"CT": Path(ct), "PET": Path(pet)}
    case_id = case_id or files["CT"].name.split("__CT")[0].removesuffix(".gz").removesuffix(".nii")
    images, problems = _open(case_id, files)
    problems += _overlap(case_id, files, images)
    return problems + (_pair_voxels(case_id, files, images) if deep else [])


def check_case(case: Case, *, deep: bool = True) -> list[str]:
    """Problems of one case, one line each naming the case and the file; empty when the case is fine.

    The CT/PET checks of :func:`check_pair`, and for a labelled case: label readable, 3D, on the CT
    grid (shape and affine) and, with ``deep=True``, its values in {0, 1, 2}.
    """
    files = {"CT": case.ct, "PET": case.pet, **({"label": case.label} if case.label is not None else {})}
    images, problems = _open(case.case_id, files)
    ct, label = images.get("CT"), images.get("label")
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
    problems += _overlap(case.case_id, files, images)
    return problems + (_check_voxels(case, images, files) if deep else [])


def _open(case_id: str, files: dict[str, Path]) -> tuple[dict[str, nib.Nifti1Image], list[str]]:
    """The 3D images among ``files`` (headers only) and a problem for each file that is not one."""
    images, problems = {}, []
    for what, path in files.items():
        try:
            img = nib.load(path)
        except Exception as err:  # any failure to parse is a data problem, reported not raised
            why = link_problem(path) or f"{type(err).__name__}: {err}"
            problems.append(f"{case_id}: cannot read {what} file {path}: {why}")
            continue
        if len(img.shape) != 3:
            problems.append(f"{case_id}: {what} file {path} is not 3D (shape {img.shape})")
            continue
        too_large = _declared_beyond_file(path, img)
        if too_large:
            problems.append(f"{case_id}: {what} file {path}: {too_large}")
            continue
        images[what] = img
    return images, problems


def _declared_beyond_file(path: Path, img: nib.Nifti1Image) -> str | None:
    """Why the voxels the header declares cannot be in the file (a truncated file or a wrong
    header, which would otherwise end in a bare MemoryError or a short read); None if they can be."""
    header = img.header
    declared = int(np.prod(img.shape, dtype=np.float64)) * header.get_data_dtype().itemsize
    size = Path(path).stat().st_size
    compressed = str(path).endswith(".gz")
    room = size * GZIP_MAX_RATIO if compressed else size - int(header.get_data_offset())
    if declared <= room:
        return None
    shape = "x".join(map(str, img.shape))
    held = f"{size:,} bytes, compressed: at most {room:,} bytes of data" if compressed else f"{max(room, 0):,} bytes of data"
    return (f"its header declares {shape} voxels of {header.get_data_dtype()} ({declared:,} bytes), but the file "
            f"holds {held}: a truncated file or a wrong header")


def _overlap(case_id: str, files: dict[str, Path], images: dict[str, nib.Nifti1Image]) -> list[str]:
    """A problem when the PET and CT fields of view share no point in world space."""
    ct, pet = images.get("CT"), images.get("PET")
    if ct is None or pet is None:
        return []
    (ct_lo, ct_hi), (pet_lo, pet_hi) = _bounds(ct), _bounds(pet)
    if np.any(np.maximum(ct_lo, pet_lo) > np.minimum(ct_hi, pet_hi)):
        return [f"{case_id}: PET {files['PET']} does not overlap CT {files['CT']} in world space"]
    return []


def _check_voxels(case: Case, images: dict[str, nib.Nifti1Image], files: dict[str, Path]) -> list[str]:
    """Voxel checks of a case (the only part that reads voxels): its CT/PET pair's, then its label's."""
    problems = _pair_voxels(case.case_id, files, images)
    if "label" in images:
        problems += _label_values(case.case_id, files["label"], images["label"])
    return problems


def _pair_voxels(case_id: str, files: dict[str, Path], images: dict[str, nib.Nifti1Image]) -> list[str]:
    """NaN/inf voxels in CT and PET, then their intensity ranges (of the files that are finite)."""
    problems = []
    ranges = {}
    for what in ("CT", "PET"):
        if what not in images:
            continue
        try:
            data = np.asanyarray(images[what].dataobj)
        except Exception as err:  # truncated or corrupt data block behind a valid header
            problems.append(f"{case_id}: cannot read {what} file {files[what]}: {type(err).__name__}: {err}")
            continue
        n_bad = data.size - int(np.count_nonzero(np.isfinite(data))) if np.issubdtype(data.dtype, np.floating) else 0
        if n_bad:
            problems.append(f"{case_id}: {what} file {files[what]} has {n_bad} NaN or infinite voxels")
        elif data.size:
            ranges[what] = (float(data.min()), float(data.max()))
    return problems + _intensity_problems(case_id, files, ranges)


def _looks_hu(lo_hi: tuple[float, float]) -> bool:
    return lo_hi[0] < CT_AIR_HU


def _looks_suv(lo_hi: tuple[float, float]) -> bool:
    return PET_SUV_RANGE[0] <= lo_hi[0] and lo_hi[1] <= PET_SUV_RANGE[1]


def _intensity_problems(case_id: str, files: dict[str, Path], ranges: dict[str, tuple[float, float]]) -> list[str]:
    """A CT must hold air (HU below :data:`CT_AIR_HU`), a PET SUVs within :data:`PET_SUV_RANGE`;
    a CT that looks like SUVs beside a PET that looks like HU is named as a swap.

    ``ranges``: (min, max) of the CT and PET files whose voxels could be read and are finite.
    """
    ct, pet = ranges.get("CT"), ranges.get("PET")
    if ct is not None and pet is not None and _looks_suv(ct) and _looks_hu(pet):
        return [f"{case_id}: CT and PET look swapped: CT file {files['CT']} holds SUV-like values ({ct[0]:.4g} "
                f"to {ct[1]:.4g}), PET file {files['PET']} HU-like ones ({pet[0]:.4g} to {pet[1]:.4g})"]  # fmt: skip
    problems = []
    if ct is not None and not _looks_hu(ct):
        problems.append(f"{case_id}: CT file {files['CT']} has no voxel below {CT_AIR_HU:g} HU (values {ct[0]:.4g} "
                        f"to {ct[1]:.4g}): not a CT in Hounsfield units")  # fmt: skip
    if pet is not None and not _looks_suv(pet):
        problems.append(f"{case_id}: PET file {files['PET']} has values {pet[0]:.4g} to {pet[1]:.4g}, outside "
                        f"{PET_SUV_RANGE[0]:g} to {PET_SUV_RANGE[1]:g}: not a PET in SUV")  # fmt: skip
    elif pet is not None and pet[1] - pet[0] < PET_MIN_SPREAD:
        problems.append(f"{case_id}: PET file {files['PET']} has no uptake (values {pet[0]:.4g} to {pet[1]:.4g}, "
                        f"less than {PET_MIN_SPREAD:g} SUV apart): an empty or failed reconstruction")  # fmt: skip
    return problems


def _label_values(case_id: str, path: Path, label: nib.Nifti1Image) -> list[str]:
    try:
        data = np.asanyarray(label.dataobj)
    except Exception as err:  # truncated or corrupt data block behind a valid header
        return [f"{case_id}: cannot read label file {path}: {type(err).__name__}: {err}"]
    values = np.unique(data)
    extra = values[~np.isin(values, LABEL_VALUES)]
    if not extra.size:
        return []
    shown = ", ".join(f"{v:g}" for v in extra[:5]) + (", ..." if extra.size > 5 else "")
    allowed = ", ".join(map(str, LABEL_VALUES))
    return [f"{case_id}: label {path} has values outside {{{allowed}}}: {shown}"]


def _progress(cases: list[Case], desc: str) -> Iterable[Case]:
    return tqdm(cases, desc=desc, unit="case", disable=bars(len(cases) > _PROGRESS_MIN_CASES), leave=False)


def _file_stats(case: Case) -> _Stats | None:
    """(path, size, mtime_ns) of each file of ``case``; None when one cannot be stat'ed."""
    stats = []
    for path in (case.ct, case.pet, case.label):
        if path is not None:
            try:
                st = os.stat(path)
            except OSError:
                return None  # never reused: the check itself reports the missing or unreadable file
            stats.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(stats)


def _read_checks_file(path: Path) -> dict[tuple[str, bool], tuple[_Stats, int, list[str]]]:
    """Results kept in ``path`` by (case ID, deep); empty when the file is missing or unreadable."""
    try:
        stored = json.loads(path.read_text())
        if stored.get("format") != _CHECKS_FORMAT:
            raise ValueError(f"format is {stored.get('format')!r}")
        return {
            (e["case_id"], bool(e["deep"])): (tuple((str(p), int(s), int(m)) for p, s, m in e["files"]),
                                              int(e["checked_ns"]), [str(x) for x in e["problems"]])
            for e in stored["cases"]
        }  # fmt: skip
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        logger.warning("ignoring check results in %s (%s); checking again", path, err)
        return {}


def check_cases(
    cases: Iterable[Case], *, deep: bool = True, cache_file: str | Path | None = None
) -> dict[str, list[str]]:
    """``{case_id: problems}`` for the cases that have problems.

    A case is checked once per process: its result is reused while each of its files keeps its
    (path, size, mtime_ns), and not for files changed within 2 s of their check. With
    ``cache_file`` (in a run folder, never in the data folder, which may be read-only) results
    are also read from and written (atomically) to that JSON file, so they outlive the process.
    """
    cases = list(cases)
    stored = _read_checks_file(Path(cache_file)) if cache_file is not None else {}
    results: dict[str, list[str]] = {}
    todo: list[tuple[Case, _Stats | None]] = []
    for case in cases:
        stats, hit = _file_stats(case), None
        if stats is not None:
            on_disk = stored.get((case.case_id, deep))
            hit = _MEMO.get((case.case_id, deep, stats)) or (on_disk[1:] if on_disk and on_disk[0] == stats else None)
        if hit is not None and all(mtime < hit[0] - _RACY_NS for _, _, mtime in stats):
            _MEMO[(case.case_id, deep, stats)] = hit
            results[case.case_id] = list(hit[1])
        else:
            todo.append((case, stats))
    for case, stats in zip(_progress([c for c, _ in todo], "checking cases"), [s for _, s in todo]):
        checked_ns = time.time_ns()
        results[case.case_id] = check_case(case, deep=deep)
        if stats is not None:
            _MEMO[(case.case_id, deep, stats)] = (checked_ns, list(results[case.case_id]))
    if todo:
        logger.debug("checked %d case(s), reused the checks of %d", len(todo), len(cases) - len(todo))
    if cache_file is not None:
        _write_checks_file(Path(cache_file), stored, cases, deep)
    return {c.case_id: results[c.case_id] for c in cases if results[c.case_id]}


def _write_checks_file(
    path: Path, stored: dict[tuple[str, bool], tuple[_Stats, int, list[str]]], cases: list[Case], deep: bool
) -> None:
    """Keep the reusable results of ``cases`` in ``path``, beside those of other cases it holds."""
    kept = dict(stored)
    for case in cases:
        stats = _file_stats(case)
        hit = _MEMO.get((case.case_id, deep, stats)) if stats is not None else None
        if hit is not None:
            kept[(case.case_id, deep)] = (stats, *hit)
    if kept != stored:
        entries = [{"case_id": cid, "deep": d, "files": stats, "checked_ns": ns, "problems": problems}
                   for (cid, d), (stats, ns, problems) in sorted(kept.items())]  # fmt: skip
        write_json({"format": _CHECKS_FORMAT, "cases": entries}, path)


def validate_cases(
    cases: Iterable[Case], skip_bad_cases: bool = False, *, deep: bool = True, cache_file: str | Path | None = None
) -> list[Case]:
    """The cases that pass :func:`check_case` (results reused as in :func:`check_cases`).

    Raises :class:`DataError` listing the problems, or with ``skip_bad_cases`` logs a WARNING per
    bad case and drops it (never silently).
    """
    cases = list(cases)
    found = check_cases(cases, deep=deep, cache_file=cache_file)
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
            r["gtvp"].append(float(np.count_nonzero(data == GTVP)) * voxel_ml)
            r["gtvn"].append(float(np.count_nonzero(data == GTVN)) * voxel_ml)
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
