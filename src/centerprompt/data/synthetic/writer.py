"""Writing a synthetic dataset in the HECKTOR 2022 layout: resumable, reproducible, in parallel.

Every file of a case is tagged with the generator version, seed and profile, so a rerun keeps
finished cases; gzip settings and headers are fixed, so the same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from centerprompt.data.labels import LABELS
from centerprompt.data.synthetic.profiles import DEFAULT_PROFILES, CenterProfile
from centerprompt.data.synthetic.scanner import make_case
from centerprompt.files import atomic_path, bars

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"


def _case_descrip(seed: int, profile: CenterProfile, index: int) -> str:
    """Tag stored in every file of a case, so a rerun can skip cases made with the same inputs."""
    blob = json.dumps([GENERATOR_VERSION, seed, index, profile.to_dict()], sort_keys=True)
    return f"centerprompt-synth {hashlib.sha1(blob.encode()).hexdigest()[:16]}"


def _write_atomic(path: Path, data: bytes, compress: bool = False) -> None:
    """Write atomically, so an interrupted run never leaves a partial file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if compress:  # level 3: as small as 6 on noisy CT, 3x faster; mtime=0 and no name: same bytes
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=3, mtime=0) as gz:
                gz.write(data)
        else:
            f.write(data)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, descrip: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = descrip.encode()
    _write_atomic(path, img.to_bytes(), compress=True)


def _is_done(paths: list[Path], descrip: str) -> bool:
    import nibabel as nib

    try:
        return all(p.is_file() and nib.load(p).header["descrip"].item().decode() == descrip for p in paths)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError):  # unreadable: regenerate it
        return False


PARALLEL_FROM = 12  # cases per worker process below which generate_dataset writes in its own process


def _write_case(job: tuple[Path, CenterProfile, int, int]) -> bool:
    """Write one case of :func:`generate_dataset` unless it is already there; True if it was."""
    out, profile, seed, index = job
    case_id = f"{profile.name}-{index:03d}"
    paths = [out / "imagesTr" / f"{case_id}__CT.nii.gz", out / "imagesTr" / f"{case_id}__PT.nii.gz",
             out / "labelsTr" / f"{case_id}.nii.gz"]  # fmt: skip
    descrip = _case_descrip(seed, profile, index)
    if _is_done(paths, descrip):
        return True
    case = make_case(profile, seed, index)
    _write_nifti(paths[0], case.ct, case.ct_affine, descrip)
    _write_nifti(paths[1], case.pet, case.pet_affine, descrip)
    _write_nifti(paths[2], case.label, case.ct_affine, descrip)  # last: its tag marks the case complete
    return False


def generate_dataset(out_dir: str | Path, centers: list[str] | None = None, cases_per_center: int = 16, seed: int = 0,
                     profiles: dict[str, CenterProfile] | None = None, progress: bool = True,
                     workers: int | None = None, cases: Mapping[str, int] | None = None) -> Path:
    """Write a synthetic multi-center dataset in the HECKTOR 2022 layout and return its folder.

    Args:
        out_dir: folder to write (created); cases already there from the same seed and
            profile are kept, so an interrupted run resumes.
        centers: center names to generate, default all of ``profiles``.
        cases_per_center: patients per center, default 16.
        cases: patients of named centers, where they differ from ``cases_per_center`` (a new center
            with enough test cases for intervals beside small pretraining centers).
        seed: dataset seed, default 0; case ``i`` of center ``C`` depends only on (seed, C, i).
        profiles: center profiles, default :data:`DEFAULT_PROFILES`.
        progress: show a progress bar.
        workers: processes writing cases; default one per CPU core when there are at least 12 cases
            for each (1: in this process).
    """
    from tqdm.auto import tqdm

    profiles = dict(DEFAULT_PROFILES if profiles is None else profiles)
    centers = list(profiles) if centers is None else list(centers)
    unknown = [c for c in centers if c not in profiles]
    if unknown or not centers:
        raise ValueError(f"centers must be among {', '.join(profiles)}, got {', '.join(unknown) or 'none'}")
    counts = {c: cases_per_center for c in centers} | dict(cases or {})
    for name, n in counts.items():
        if name not in centers:
            raise ValueError(f"cases: {name} is not one of the centers generated ({', '.join(centers)})")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 999:
            raise ValueError(f"cases_per_center must be in 1..999, got {n!r} for {name}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    renamed = [f"{key} (named {profiles[key].name})" for key in centers if profiles[key].name != key]
    if renamed:
        raise ValueError(f"profiles must be keyed by their own name: {', '.join(renamed)}")
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    jobs = [(out, profiles[c], seed, i) for c in centers for i in range(1, counts[c] + 1)]
    case_ids = [f"{p.name}-{i:03d}" for _, p, _, i in jobs]
    if workers is None:  # a started process costs about a second (imports): worth it from a dozen cases
        workers = min(os.cpu_count() or 1, len(jobs) // PARALLEL_FROM) or 1
    # Cases are independent (each depends on (seed, center, index) only) and generation is one core's
    # numpy and gzip work, so a process per core divides the time (2 cores, 112 cases: 52 s -> 33 s).
    # spawn, not fork: the caller may hold torch's OpenMP threads, which a forked child can deadlock on.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1 else contextlib.nullcontext() as pool:
        done = pool.map(_write_case, jobs, chunksize=4) if pool is not None else map(_write_case, jobs)
        skipped = sum(tqdm(done, total=len(jobs), desc="synth", unit="case", disable=bars(progress)))
    stale = sorted({p.name.split("__")[0].removesuffix(".nii.gz") for p in out.glob("*Tr/*.nii.gz")} - set(case_ids))
    if stale:
        logger.warning("%s holds %d cases from an earlier run that are not part of this dataset (e.g. %s)",
                       out, len(stale), stale[0])
    used = {c: profiles[c].to_dict() for c in centers}
    _write_atomic(out / "profiles.json", (json.dumps(used, indent=2) + "\n").encode())
    meta = {"name": "centerprompt synthetic HECKTOR-like PET/CT", "generator_version": GENERATOR_VERSION,
            "seed": seed, "cases_per_center": cases_per_center, "centers": centers,
            "num_cases": counts, "num_training": len(case_ids),
            "labels": LABELS, "modalities": {"CT": "HU", "PT": "SUV times the center's suv_calibration"},
            "file_ending": ".nii.gz", "cases": case_ids}
    _write_atomic(out / "dataset.json", (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("synthetic dataset in %s: %d cases (%d kept from an earlier run)", out, len(case_ids), skipped)
    return out
