"""HECKTOR 2022 folder layout: find cases, make per-center splits, leave-one-center-out.

Layout (as released by the challenge)::

    DIR/imagesTr/<CENTER>-<ID>__CT.nii.gz
    DIR/imagesTr/<CENTER>-<ID>__PT.nii.gz
    DIR/labelsTr/<CENTER>-<ID>.nii.gz        (or <CENTER>_<ID>.nii.gz)

The center is the prefix of the case ID. Only the layout is checked here (names, pairs, centers);
file contents are checked in :mod:`centerprompt.data.checks`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from centerprompt.files import write_json

logger = logging.getLogger(__name__)

TRAIN_CENTERS = ("CHUM", "CHUP", "CHUS", "CHUV", "HGJ", "HMR", "MDA")
TEST_CENTERS = ("USZ", "CHB")
KNOWN_CENTERS = TRAIN_CENTERS + TEST_CENTERS

# Separator between center and number is "-" in the release and "_" on the website; both map
# to the canonical "<CENTER>-<ID>" case ID.
_IMAGE_RE = re.compile(r"^(?P<center>[A-Za-z0-9]+)[-_](?P<num>[A-Za-z0-9]+)__(?P<mod>CT|PT)\.nii(\.gz)?$")
_LABEL_RE = re.compile(r"^(?P<center>[A-Za-z0-9]+)[-_](?P<num>[A-Za-z0-9]+)\.nii(\.gz)?$")
_MODALITY = {"CT": "ct", "PT": "pet"}
_MAX_LISTED = 20


class DataError(ValueError):
    """Bad input data; the message names the case and the file so the user can fix it."""


@dataclass(frozen=True)
class Case:
    """One patient: CT and PET images, and the label if the case is annotated."""

    case_id: str
    center: str
    ct: Path
    pet: Path
    label: Path | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None


def _nifti_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith((".nii", ".nii.gz")) and not path.name.startswith("."):
            files.append(path)
        else:
            logger.debug("ignoring %s (not a NIfTI file)", path)
    return files


def scan_cases(
    data_dir: str | Path, *, allowed_centers: Iterable[str] | None = None
) -> tuple[list[Case], list[tuple[str, str]]]:
    """Read the layout and return (good cases, problems) without raising for per-case problems.

    Each problem is ``(case_id, message)`` with the message naming the case and the file, so
    ``check-data`` can list all of them. Folder-level problems (missing or empty ``imagesTr``)
    raise :class:`DataError` because nothing can be read at all.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        hint = " (pass the folder that contains imagesTr, not imagesTr itself)" if root.name == "imagesTr" else ""
        raise DataError(f"{root} has no imagesTr folder; expected the HECKTOR 2022 layout{hint}")
    centers = set(KNOWN_CENTERS) | {c.strip() for c in (allowed_centers or ()) if c.strip()}

    found: dict[str, dict[str, Path]] = {}
    bad: dict[str, list[str]] = {}

    def add(case_id: str, key: str, path: Path) -> None:
        files = found.setdefault(case_id, {})
        if key in files:
            bad.setdefault(case_id, []).append(
                f"{case_id}: duplicate {key} files {files[key]} and {path} (one case under two names)"
            )
        else:
            files[key] = path

    for path in _nifti_files(images_dir):
        m = _IMAGE_RE.match(path.name)
        if not m:
            bad.setdefault(path.name, []).append(
                f"{path.name}: image file {path} does not match <CENTER>-<ID>__CT.nii.gz or __PT.nii.gz"
            )
            continue
        add(f"{m['center']}-{m['num']}", _MODALITY[m["mod"]], path)
    if labels_dir.is_dir():
        for path in _nifti_files(labels_dir):
            m = _LABEL_RE.match(path.name)
            if not m:
                bad.setdefault(path.name, []).append(
                    f"{path.name}: label file {path} does not match <CENTER>-<ID>.nii.gz or <CENTER>_<ID>.nii.gz"
                )
                continue
            add(f"{m['center']}-{m['num']}", "label", path)
    else:
        logger.info("%s has no labelsTr folder: all cases are usable for prediction only", root)
    if not found and not bad:
        raise DataError(f"{images_dir} contains no NIfTI images; expected <CENTER>-<ID>__CT.nii.gz files")

    cases = []
    for case_id, files in sorted(found.items()):
        center = case_id.split("-", 1)[0]
        some_file = next(iter(files.values()))
        if center not in centers:
            bad.setdefault(case_id, []).append(
                f"{case_id}: unknown center {center!r} in {some_file} (known: {', '.join(sorted(centers))}; "
                "pass extra centers with --centers)"
            )
        for key, suffix in (("ct", "__CT.nii.gz"), ("pet", "__PT.nii.gz")):
            if key not in files:
                bad.setdefault(case_id, []).append(
                    f"{case_id}: missing {key.upper()} image {images_dir / (case_id + suffix)} (found {some_file})"
                )
        if case_id not in bad:
            cases.append(Case(case_id, center, files["ct"], files["pet"], files.get("label")))
    problems = [(case_id, msg) for case_id, msgs in sorted(bad.items()) for msg in msgs]
    return cases, problems


def format_problems(problems: list[str], what: str) -> str:
    """One message listing up to the first ``_MAX_LISTED`` problems (all of them when fewer)."""
    lines = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"{len(problems)} problem(s) in {what} (use --skip-bad-cases to skip bad cases):\n  " + "\n  ".join(lines) + more


def find_cases(
    data_dir: str | Path, *, allowed_centers: Iterable[str] | None = None, skip_bad_cases: bool = False
) -> list[Case]:
    """List the cases of a HECKTOR-layout folder, sorted by case ID.

    Missing modality, duplicate case IDs, unknown centers and badly named files raise
    :class:`DataError`; with ``skip_bad_cases=True`` each bad case is skipped with a WARNING instead.
    """
    cases, problems = scan_cases(data_dir, allowed_centers=allowed_centers)
    if problems and not skip_bad_cases:
        raise DataError(format_problems([msg for _, msg in problems], str(data_dir)))
    for _, msg in problems:
        logger.warning("skipping bad case: %s", msg)
    if not cases:
        raise DataError(f"no usable cases in {data_dir}")
    n_labelled = sum(c.labelled for c in cases)
    logger.info("found %d cases in %s (%d labelled)", len(cases), data_dir, n_labelled)
    return cases


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) with at least one train case, and one val/test case once a center has 3+ cases."""
    if n < 3:
        return 0, n - 1  # 1 case: train only; 2 cases: 1 train, 1 test
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    while n_test + n_val > n - 1:  # keep at least one training case
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def make_splits(
    cases: Iterable[Case], seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> dict[str, dict[str, list[str]]]:
    """Per-center train/val/test case IDs of the labelled cases, deterministic for a seed.

    Splitting inside each center keeps every center in every split, which the leave-one-center-out
    protocol needs. A center with 3+ cases gets at least one val and one test case.
    Returns ``{center: {"train": [...], "val": [...], "test": [...]}}`` with sorted IDs.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1")
    by_center: dict[str, list[str]] = {}
    for case in cases:
        if case.labelled:
            by_center.setdefault(case.center, []).append(case.case_id)
    if not by_center:
        raise DataError("no labelled cases to split (labelsTr is missing or empty)")
    splits = {}
    for center, ids in sorted(by_center.items()):
        ids = sorted(ids)
        random.Random(f"{seed}-{center}").shuffle(ids)  # str seeds are stable across runs
        n_val, n_test = _split_sizes(len(ids), val_fraction, test_fraction)
        splits[center] = {
            "train": sorted(ids[n_val + n_test :]),
            "val": sorted(ids[:n_val]),
            "test": sorted(ids[n_val : n_val + n_test]),
        }
    return splits


def load_or_create_splits(
    data_dir: str | Path, cases: Iterable[Case], path: str | Path | None = None, seed: int = 0
) -> dict[str, dict[str, list[str]]]:
    """Splits written once to ``path`` (default ``DIR/splits.json``) and reused afterwards.

    Reusing the file keeps the test cases fixed across runs and machines, even if the split rule or
    the seed changes later. An existing file is checked: every case ID in it must exist.
    """
    cases = list(cases)
    path = Path(path) if path is not None else Path(data_dir) / "splits.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            splits = {c: {k: list(parts[k]) for k in ("train", "val", "test")} for c, parts in stored["centers"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"split file {path} is not a valid splits JSON ({err}); delete it to recreate") from err
        known = {c.case_id for c in cases if c.labelled}
        listed = {i for parts in splits.values() for ids in parts.values() for i in ids}
        missing = sorted(listed - known)
        if missing:
            raise DataError(
                f"split file {path} lists {len(missing)} case(s) that are not labelled cases in {data_dir}: "
                f"{', '.join(missing[:10])}; restore them or delete the file to recreate the splits"
            )
        if sorted(known - listed):
            logger.warning("%d labelled case(s) are not in %s and are unused", len(known - listed), path)
        if stored.get("seed") != seed:
            logger.info("reusing %s (made with seed %s)", path, stored.get("seed"))
        return splits
    splits = make_splits(cases, seed=seed)
    write_json({"seed": seed, "centers": splits}, path)
    logger.info("wrote splits for %d centers to %s", len(splits), path)
    return splits


@dataclass(frozen=True)
class LocoSplit:
    """Leave-one-center-out: pretrain on the other centers, adapt with ``shots`` cases of the new one."""

    new_center: str
    shots: int
    pretrain_train: list[str] = field(default_factory=list)
    pretrain_val: list[str] = field(default_factory=list)
    adapt_train: list[str] = field(default_factory=list)
    adapt_val: list[str] = field(default_factory=list)
    new_test: list[str] = field(default_factory=list)
    old_test: list[str] = field(default_factory=list)


def leave_one_center_out(
    splits: dict[str, dict[str, list[str]]], new_center: str, shots: int, seed: int = 0, n_val: int | None = None
) -> LocoSplit:
    """Split for adapting to ``new_center`` with ``shots`` labelled cases.

    The new center's train+val pool is shuffled once per seed: ``adapt_val`` (``n_val`` cases,
    default the size of its val split, at least 1) comes first, so it is the same for every
    ``shots``; ``adapt_train`` are the next ``shots`` cases, so smaller shot sets are nested in
    larger ones. ``new_test`` is the rest of the center (its test split plus the pool cases not
    used for adaptation), as in the paper's protocol; it never overlaps the adaptation cases.
    """
    if new_center not in splits:
        raise ValueError(f"new center {new_center!r} has no labelled cases (centers: {', '.join(sorted(splits))})")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    own = splits[new_center]
    n_val = max(1, len(own["val"])) if n_val is None else n_val
    val_pool, train_pool = sorted(own["val"]), sorted(own["train"])
    rng = random.Random(f"loco-{seed}-{new_center}")
    rng.shuffle(val_pool)
    rng.shuffle(train_pool)
    pool = val_pool + train_pool
    if n_val + shots > len(pool):
        raise ValueError(
            f"center {new_center} has {len(pool)} labelled train+val cases, too few for {shots} shots "
            f"plus {n_val} validation case(s); use at most {max(len(pool) - n_val, 0)} shots"
        )
    others = [c for c in sorted(splits) if c != new_center]
    return LocoSplit(
        new_center=new_center,
        shots=shots,
        pretrain_train=sorted(i for c in others for i in splits[c]["train"]),
        pretrain_val=sorted(i for c in others for i in splits[c]["val"]),
        adapt_train=sorted(pool[n_val : n_val + shots]),
        adapt_val=sorted(pool[:n_val]),
        new_test=sorted(own["test"] + pool[n_val + shots :]),
        old_test=sorted(i for c in others for i in splits[c]["test"]),
    )
