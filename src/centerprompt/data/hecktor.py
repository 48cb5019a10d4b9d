"""HECKTOR 2022 folder layout: find cases, choose per-center splits, leave-one-center-out.

Layout (as released by the challenge)::

    DIR/imagesTr/<CENTER>-<ID>__CT.nii.gz
    DIR/imagesTr/<CENTER>-<ID>__PT.nii.gz
    DIR/labelsTr/<CENTER>-<ID>.nii.gz        (or <CENTER>_<ID>.nii.gz)

The center is the prefix of the case ID; any prefix is a center (a hospital's own site is the
normal new center), the HECKTOR 2022 names only tell a new site from a known one in the log.
Only the layout is checked here (names, pairs); file contents are checked in
:mod:`centerprompt.data.checks`. Nothing here writes into ``DIR``, which may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from centerprompt.data.cases import Case, DataError
from centerprompt.files import read_text, write_json

logger = logging.getLogger(__name__)

TRAIN_CENTERS = ("CHUM", "CHUP", "CHUS", "CHUV", "HGJ", "HMR", "MDA")
TEST_CENTERS = ("USZ", "CHB")
KNOWN_CENTERS = TRAIN_CENTERS + TEST_CENTERS
SPLITS_FILE = "splits.json"  # the split a data folder may hold (read only) and the one each run keeps
CENTER_SEPARATOR = ","  # pooled centers, from --center to summary.json and the adapter file: "USZ,CHB"


def join_centers(centers: Sequence[str]) -> str:
    return CENTER_SEPARATOR.join(centers)


def split_centers(text: str) -> list[str]:
    """Pooled centers as :func:`join_centers` writes them (adapters written before 2026-12-06 joined them with "+")."""
    return [c.strip() for c in text.replace("+", CENTER_SEPARATOR).split(CENTER_SEPARATOR)]
_PARTS = ("train", "val", "test")

# Separator between center and number is "-" in the release and "_" on the website; both map
# to the canonical "<CENTER>-<ID>" case ID.
_IMAGE_RE = re.compile(r"^(?P<center>[A-Za-z0-9]+)[-_](?P<num>[A-Za-z0-9]+)__(?P<mod>CT|PT)\.nii(\.gz)?$")
# A label map <CENTER>-<ID>.nii.gz (or _): the reader and `score` name cases by it.
LABEL_FILE_RE = re.compile(r"^(?P<case>(?P<center>[A-Za-z0-9]+)[-_](?P<num>[A-Za-z0-9]+))\.nii(\.gz)?$")
_MODALITY = {"CT": "ct", "PT": "pet"}
_MAX_LISTED = 20


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
    raise :class:`DataError` because nothing can be read at all. Every center prefix is accepted;
    one that is neither a HECKTOR 2022 center nor in ``allowed_centers`` is logged as a new site.
    """
    root = Path(data_dir)
    from centerprompt.data.datalists import detect_layout, scan_datalist, scan_nnunet  # the other layouts

    layout = detect_layout(root)
    if layout != "hecktor":
        cases, problems = scan_datalist(root) if layout == "datalist" else scan_nnunet(root)
        logger.info("%s: read as %s", root, "a MONAI datalist" if layout == "datalist" else "an nnU-Net v2 raw dataset")
        return cases, problems
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        hint = " (pass the folder that contains imagesTr, not imagesTr itself)" if root.name == "imagesTr" else ""
        raise DataError(f"{root} has no imagesTr folder; expected the HECKTOR 2022 layout{hint}")
    expected = set(KNOWN_CENTERS) | {c.strip() for c in (allowed_centers or ()) if c.strip()}

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
            m = LABEL_FILE_RE.match(path.name)
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
        for key, suffix in (("ct", "__CT.nii.gz"), ("pet", "__PT.nii.gz")):
            if key not in files:
                bad.setdefault(case_id, []).append(
                    f"{case_id}: missing {key.upper()} image {images_dir / (case_id + suffix)} (found {some_file})"
                )
        if case_id not in bad:
            cases.append(Case(case_id, center, files["ct"], files["pet"], files.get("label")))
    problems = [(case_id, msg) for case_id, msgs in sorted(bad.items()) for msg in msgs]
    if new_sites := sorted({c.center for c in cases} - expected):
        logger.info("new site(s), not among the HECKTOR 2022 centers: %s", ", ".join(new_sites))
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

    Missing modality, duplicate case IDs and badly named files raise :class:`DataError`; with
    ``skip_bad_cases=True`` each bad case is skipped with a WARNING instead. ``allowed_centers``:
    sites expected besides HECKTOR's, not logged as new (every prefix is accepted).
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


def split_hash(centers: Mapping[str, Mapping[str, Sequence[str]]]) -> str:
    """SHA-256 of a split's assignment (canonical JSON of its sorted IDs), so the same split hashes
    the same wherever its file lives and however it is formatted."""
    canon = {c: {k: sorted(parts[k]) for k in _PARTS} for c, parts in centers.items()}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


class Splits(dict):
    """Per-center ``{"train", "val", "test"}`` case IDs, and where they came from.

    A dict, so code that only needs the IDs takes it as one. ``source``: the file it was read
    from, or how it was made; ``seed``: the seed that made it (None when not recorded);
    ``assignment``: the split as made or stored, including ``skipped`` (listed cases this command
    leaves out because they are no longer usable); ``sha256``: :func:`split_hash` of the
    assignment, which names the split whatever was skipped.
    """

    def __init__(self, centers: Mapping[str, Mapping[str, Sequence[str]]], *, source: str, seed: int | None,
                 assignment: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                 skipped: Sequence[str] = ()) -> None:  # fmt: skip
        super().__init__({c: {k: sorted(parts[k]) for k in _PARTS} for c, parts in centers.items()})
        self.source, self.seed, self.skipped = source, seed, tuple(skipped)
        self.assignment = {c: {k: list(v) for k, v in parts.items()} for c, parts in (assignment or self).items()}
        self.sha256 = split_hash(self.assignment)

    def to_json(self) -> dict[str, Any]:
        """The split as a splits file holds it (the whole assignment: skipping a case never edits a split)."""
        return {"seed": self.seed, "source": self.source, "centers": self.assignment}

    def record(self) -> dict[str, Any]:
        """What a run records of the split it used (summary, results)."""
        return {"source": self.source, "sha256": self.sha256, "seed": self.seed, "skipped_cases": list(self.skipped)}


def make_splits(
    cases: Iterable[Case], seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> Splits:
    """Per-center train/val/test case IDs of the labelled cases, deterministic for a seed.

    Splitting inside each center keeps every center in every split, which the leave-one-center-out
    protocol needs. A center with 3+ cases gets at least one val and one test case.
    Returns ``{center: {"train": [...], "val": [...], "test": [...]}}`` with sorted IDs. A pure
    function of (labelled case IDs, seed, fractions): a changed case list reshuffles, which is why
    a split, once used, is kept in a file (:func:`resolve_splits`).
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
    return Splits(splits, source=f"made from the labelled cases with seed {seed}", seed=seed)


def splits_from_json(stored: Any, source: str) -> Splits:
    """A split as a splits file (or a model's metadata) holds it: ``{"seed": ..., "centers": {...}}``."""
    try:
        centers = {str(c): {k: [str(i) for i in parts[k]] for k in _PARTS} for c, parts in stored["centers"].items()}
        seed = stored.get("seed")
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{source} is not a valid splits JSON (missing or malformed {err}); fix it, or give "
                        "another --splits FILE (every run folder keeps the split it used in splits.json)") from err  # fmt: skip
    _check_split(centers, source)
    return Splits(centers, source=source, seed=seed if isinstance(seed, int) else None)


def _check_split(centers: Mapping[str, Mapping[str, Sequence[str]]], source: str) -> None:
    """A split read back must be one: every case under its own center, in one part only (a case both
    in train and test would score a model on what it trained on)."""
    seen: dict[str, str] = {}
    for center, parts in centers.items():
        for part in _PARTS:
            for case_id in parts[part]:
                if case_id.split("-", 1)[0] != center:
                    raise DataError(f"{source}: case {case_id} is listed under center {center}; each case belongs "
                                    "under its own center (the prefix of its ID)")  # fmt: skip
                if case_id in seen:
                    raise DataError(f"{source}: case {case_id} is in both {seen[case_id]} and {center} {part}; "
                                    "train, val and test must not share a case")  # fmt: skip
                seen[case_id] = f"{center} {part}"


def read_splits(path: str | Path) -> Splits:
    """The split in a splits file."""
    try:
        stored = json.loads(read_text(path, "a splits JSON"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8 (named by read_text), not JSON
        raise DataError(f"split file {path} cannot be read ({err}); fix it, or give another --splits FILE") from err
    return splits_from_json(stored, str(path))


def write_splits(splits: Splits, path: str | Path) -> Path:
    """Write ``splits`` (its whole assignment) to ``path`` atomically."""
    path = write_json(splits.to_json(), path)
    logger.info("wrote the split (%d centers, sha256 %s) to %s", len(splits), splits.sha256[:12], path)
    return path


def resolve_splits(
    data_dir: str | Path, cases: Iterable[Case], *, path: str | Path | None = None,
    defaults: Sequence[Path | Splits | None] = (), seed: int = 0, skip_bad_cases: bool = False,
) -> Splits:  # fmt: skip
    """The split a command uses: the first of ``path`` (if the file exists), ``DIR/splits.json``
    (if it exists: older versions wrote it there, and a user may provide one), each of
    ``defaults`` (a split file that exists, or a split already read, e.g. the one a base model was
    pretrained with), or :func:`make_splits` of the labelled ``cases`` with ``seed``.

    A labelled center the chosen split does not list (a new site) gets a split made with ``seed``;
    listed centers with no case in ``DIR`` (another site's folder) are left out.
    A ``path`` that does not exist yet is written with the split chosen, so the runs given it share
    one split; nothing else is written, and never ``DIR``. Listed cases of the centers present that
    are not usable labelled ``cases`` (failed their checks, removed) are an error naming them, or
    with ``skip_bad_cases`` left out with a WARNING while every other case keeps its split.
    """
    cases = list(cases)
    chosen = None
    for candidate in (path, Path(data_dir) / SPLITS_FILE, *defaults):
        if isinstance(candidate, Splits):
            chosen = candidate
        elif candidate is not None and Path(candidate).exists():
            chosen = read_splits(candidate)
        if chosen is not None:
            break
    else:
        chosen = make_splits(cases, seed=seed)
    if chosen.seed is not None and chosen.seed != seed:
        logger.info("using the split in %s (made with seed %s)", chosen.source, chosen.seed)
    chosen = _with_new_centers(chosen, cases, seed)
    if path is not None and not Path(path).exists():
        write_splits(chosen, path)
    usable = {c.case_id for c in cases if c.labelled}
    present = {c.center for c in cases}
    if absent := sorted(set(chosen.assignment) - present):
        logger.info("the split in %s also lists %s, which %s holds no case of", chosen.source, ", ".join(absent), data_dir)
    listed = {i for c, parts in chosen.assignment.items() if c in present for ids in parts.values() for i in ids}
    if missing := sorted(listed - usable):
        if not skip_bad_cases:
            raise DataError(
                f"the split in {chosen.source} lists {len(missing)} case(s) that are not usable labelled cases in "
                f"{data_dir}: {', '.join(missing[:10])}; restore them, or pass --skip-bad-cases to leave them out "
                "(every other case keeps its split)"
            )  # fmt: skip
        logger.warning("skipping %d case(s) of the split in %s that are not usable labelled cases: %s",
                       len(missing), chosen.source, ", ".join(missing))  # fmt: skip
    if unlisted := usable - listed:
        logger.warning("%d labelled case(s) are not in the split in %s and are unused", len(unlisted), chosen.source)
    kept = {c: {k: [i for i in ids if i in usable] for k, ids in parts.items()}
            for c, parts in chosen.assignment.items() if c in present}  # fmt: skip
    return Splits(kept, source=chosen.source, seed=chosen.seed, assignment=chosen.assignment, skipped=missing)


def _with_new_centers(chosen: Splits, cases: Sequence[Case], seed: int) -> Splits:
    """``chosen`` plus a split made with ``seed`` for each labelled center it does not list (a new
    site, e.g. a new center's folder adapted with a base model whose recorded split predates it).
    Splits are made per center, so that center's part is what a split of its own folder would be."""
    new = sorted({c.center for c in cases if c.labelled} - set(chosen.assignment))
    if not new:
        return chosen
    made = make_splits([c for c in cases if c.center in new], seed=seed)
    logger.info("%s %s not in the split in %s: split with seed %d", ", ".join(new), "is" if len(new) == 1 else "are",
                chosen.source, seed)  # fmt: skip
    return Splits({**chosen.assignment, **made}, source=f"{chosen.source}, and for {', '.join(new)} made with seed {seed}",
                  seed=seed if chosen.seed == seed else None)  # fmt: skip


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
