"""Which cases a job reads: the data folder's index (checked), the split (chosen once, in one
order of sources), and the case IDs of each job's part of it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from centerprompt.checkpoints import BaseCheckpoint
from centerprompt.data.checks import CHECKS_FILE, validate_cases
from centerprompt.data.cases import Case
from centerprompt.data.hecktor import SPLITS_FILE, Splits, find_cases, leave_one_center_out, resolve_splits
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.runs.base import base_splits, check_base_split
from centerprompt.scoring import SCORE_AT, Scorer

logger = logging.getLogger(__name__)


SPLIT_NAMES = ("train", "val", "test", "all")  # "all": the three parts together


def load_index(
    data_dir: str | Path, *, skip_bad_cases: bool = False, check: bool = True, seed: int = 0,
    cache_dir: str | Path | None = None, splits_file: str | Path | None = None,
    split_defaults: Sequence[Path | Splits | None] = (),
) -> tuple[dict[str, Case], Splits]:  # fmt: skip
    """Cases by ID (checked like ``check-data``) and the split to use; nothing is written into ``data_dir``.

    The split is :func:`centerprompt.data.hecktor.resolve_splits`'s: ``splits_file`` (``--splits``;
    written there when it does not exist yet), ``DIR/splits.json``, ``split_defaults``
    (:func:`split_defaults`), or made from the cases with ``seed``. A listed case that is no longer
    usable is an error naming it, or with ``skip_bad_cases`` left out of its split (``Splits.skipped``)
    without moving any other case.

    The checks read every voxel, so a case is checked once per process while its files keep their
    path, size and mtime; with ``cache_dir`` (a run folder, never the data folder) the results are
    also kept in ``cache_dir/data_checks.json`` for later processes of the same run.
    """
    found = find_cases(data_dir, skip_bad_cases=skip_bad_cases)
    cache_file = Path(cache_dir) / CHECKS_FILE if cache_dir is not None else None
    cases = validate_cases(found, skip_bad_cases=skip_bad_cases, cache_file=cache_file) if check else found
    splits = resolve_splits(data_dir, cases, path=splits_file, defaults=split_defaults, seed=seed,
                            skip_bad_cases=skip_bad_cases)  # fmt: skip
    # Recorded in summary.json: the cases the checks left out, whether or not a split listed them.
    failed = {c.case_id for c in found} - {c.case_id for c in cases}
    splits.skipped = tuple(sorted(set(splits.skipped) | failed))
    return {c.case_id: c for c in cases}, splits


def split_defaults(base: BaseCheckpoint | None, run_dir: Path | None) -> list[Path | Splits | None]:
    """Where a job's split comes from when neither ``--splits`` nor ``DIR/splits.json`` gives it:
    the split its base model was pretrained with (adaptation and evaluation then test on cases the
    base never trained on), then the one its run folder used before (a rerun keeps its split)."""
    return [base_splits(base), run_dir / SPLITS_FILE if run_dir is not None else None]


def pretrain_case_ids(
    splits: dict[str, dict[str, list[str]]], exclude_center: str | None, *, oracle_shots: int = 0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, validation) case IDs of a base model, or of the in-domain oracle for ``exclude_center``.

    The oracle adds the excluded center's ``oracle_shots`` adaptation cases to the training set
    and its adaptation validation cases to the validation set, exactly those that ``adapt`` with
    ``shots=oracle_shots`` and this seed uses; the center's test cases never enter.
    """
    if exclude_center is None:
        if oracle_shots:
            raise ValueError("an oracle needs the center it stands for: give exclude_center.")
        return sorted(i for s in splits.values() for i in s["train"]), sorted(i for s in splits.values() for i in s["val"])
    loco = leave_one_center_out(splits, exclude_center, shots=oracle_shots, seed=seed)
    if not oracle_shots:
        return loco.pretrain_train, loco.pretrain_val
    return sorted(loco.pretrain_train + loco.adapt_train), sorted(loco.pretrain_val + loco.adapt_val)


def adaptation_case_ids(splits: Splits, centers: Sequence[str], *, shots: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) case IDs of an adaptation: each center's ``shots`` cases and validation
    cases as :func:`leave_one_center_out` picks them (so they never overlap its test cases), pooled."""
    parts = [leave_one_center_out(splits, c, shots=shots, seed=seed) for c in centers]
    return sorted(i for p in parts for i in p.adapt_train), sorted(i for p in parts for i in p.adapt_val)


def split_case_ids(splits: Splits, centers: Sequence[str], split: str, data_dir: str | Path) -> list[str]:
    """Case IDs of ``centers`` in ``split`` (train, val, test or all); unknown centers are an error."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be train, val, test or all, got {split!r}.")
    unknown = sorted(set(centers) - set(splits))
    if unknown or not centers:
        raise ValueError(f"no labelled cases for center(s) {unknown or '(none)'} in {data_dir}.")
    parts = ("train", "val", "test") if split == "all" else (split,)
    return sorted(i for c in centers for part in parts for i in splits[c][part])




@dataclass(frozen=True)
class CaseSelection:
    """The cases a scoring command reads (evaluate, inspect, bank evaluate): ``split`` of ``centers``
    (default: the base model's own centers where the command says so, else every labelled one) in
    ``data_dir``, the split read from ``splits_file`` or chosen as :func:`load_index` does, scored
    on the CT grid or the preprocessed one (``score_at``)."""

    data_dir: Path
    centers: tuple[str, ...] = ()
    split: str = "test"
    score_at: str = "ct"
    skip_bad_cases: bool = False
    splits_file: Path | None = None
    case_ids: tuple[str, ...] = ()  # exactly these cases instead of a split's (an experiment's test set)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "centers", tuple(self.centers or ()))
        object.__setattr__(self, "case_ids", tuple(self.case_ids or ()))
        if self.split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {self.split!r}.")
        if self.score_at not in SCORE_AT:
            raise ValueError(f"--score-at must be one of {', '.join(SCORE_AT)}, got {self.score_at!r}.")

    def open(self, base: BaseCheckpoint | None, default_centers: Sequence[str] | None = None) -> SelectedCases:
        """Read the index and the split (``base``'s own split among its sources, and checked
        against it: its test cases must not be ones it trained on) and pick the case IDs."""
        cases, splits = load_index(self.data_dir, skip_bad_cases=self.skip_bad_cases, splits_file=self.splits_file,
                                   split_defaults=split_defaults(base, None))  # fmt: skip
        if base is not None:
            check_base_split(base, splits)
        if self.case_ids:
            unknown = sorted(set(self.case_ids) - set(cases))
            if unknown:
                raise ValueError(f"{self.data_dir}: no usable labelled case {unknown[0]} (of {len(unknown)} listed "
                                 "cases not found).")  # fmt: skip
            ids = sorted(self.case_ids)
            return SelectedCases(self, cases, splits, sorted({cases[i].center for i in ids}), ids)
        centers = list(self.centers) or [c for c in (default_centers or sorted(splits)) if c in splits]
        ids = split_case_ids(splits, centers, self.split, self.data_dir)
        return SelectedCases(self, cases, splits, centers, ids)


@dataclass
class SelectedCases:
    """An opened :class:`CaseSelection`: the index, the split, the centers and the chosen case IDs."""

    selection: CaseSelection
    cases: dict[str, Case]
    splits: Splits
    centers: list[str]
    ids: list[str] = field(default_factory=list)

    def scorer(self, preprocess: PreprocessConfig) -> Scorer:
        return Scorer([self.cases[i] for i in self.ids], preprocess, score_at=self.selection.score_at)

    def record(self) -> dict[str, Any]:
        """What a result records about the cases it scored."""
        split = "listed cases" if self.selection.case_ids else self.selection.split
        return {"data_dir": str(self.selection.data_dir), "split": split, "splits": self.splits.record(),
                "score_at": self.selection.score_at}  # fmt: skip
