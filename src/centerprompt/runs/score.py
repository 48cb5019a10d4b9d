"""Scoring: a model source (a base, an adapter, a bank) on a split of a data folder, and label maps
made by any tool against a folder of ground truth, both per case, per center and pooled in mm³ as
the HECKTOR 2022 organisers pool them (so the two agree on the same predictions)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to
from tqdm.auto import tqdm

from centerprompt.data.cases import DataError
from centerprompt.data.hecktor import LABEL_FILE_RE
from centerprompt.data.labels import LABEL_VALUES
from centerprompt.evaluate import aggregate, case_metrics
from centerprompt.files import bars
from centerprompt.runs.predict import ModelSource
from centerprompt.runs.selection import CaseSelection

logger = logging.getLogger(__name__)


def evaluate(selection: CaseSelection, source: ModelSource, *, progress: bool = True) -> dict[str, Any]:
    """Per-case and per-center scores of ``source`` (a base with or without an adapter; a bank
    serving each scan) on ``selection``; served from a bank, each case also records the center used
    and its route.

    The split is the selection's file, ``DATA/splits.json``, the one the base was pretrained with,
    or made with seed 0 (:func:`~centerprompt.runs.selection.load_index`); the result records its
    source, hash and skipped cases.
    """
    selected = selection.open(source.base)
    scorer = selected.scorer(source.base.preprocess)
    served = [source.serve(c.ct, c.pet) for c in scorer.cases]
    per_case = scorer.score_predictions(lambda i: scorer.predict(served[i].net, i, **served[i].kwargs),
                                        desc="evaluate", progress=progress)  # fmt: skip
    per_case = [{**scores, **s.record()} for scores, s in zip(per_case, served)]
    return {**selected.record(), **source.describe(), **aggregate(per_case), "per_case": per_case}


SPACING_TOLERANCE = 1e-6  # mm: the HECKTOR 2022 organisers' tolerance between a prediction's and its label's voxels


def _label_maps(folder: Path) -> dict[str, Path]:
    """Case ID -> label map of a folder of ``<CENTER>-<ID>.nii.gz`` files (its ``labelsTr`` if it has one)."""
    folder = folder / "labelsTr" if (folder / "labelsTr").is_dir() else folder
    found = {m["case"]: path for path in sorted(folder.glob("*.nii*")) if (m := LABEL_FILE_RE.match(path.name))}
    if not found:
        raise FileNotFoundError(f"{folder}: no label maps named <CENTER>-<ID>.nii.gz.")
    return found


def _label_array(image: nib.Nifti1Image, path: Path, what: str) -> np.ndarray:
    """The voxels of a 3D label map whose values are all in {0, 1, 2}; one line naming the file if not."""
    if len(image.shape) != 3:
        raise DataError(f"{path}: {what} has shape {image.shape}, not a 3D label map.")
    data = np.asanyarray(image.dataobj)
    values = np.unique(data)
    wrong = [v for v in values.tolist() if not (math.isfinite(v) and v in LABEL_VALUES)]
    if wrong:
        raise DataError(f"{path}: {what} holds label values {wrong[:5]} outside {{0, 1, 2}} (background, GTVp, GTVn).")
    return data.astype(np.int64)


def score_case(prediction: Path, label: Path) -> dict[str, Any]:
    """One case as the HECKTOR 2022 organisers score it: the prediction refused unless its values
    are in {0, 1, 2} and its voxel spacing is the label's (to 1e-6 mm), then resampled with nearest
    neighbour onto the label's grid (size, origin, direction) where it is on another; Dice, HD95
    and volumes in mm³ (:func:`~centerprompt.evaluate.case_metrics`)."""
    truth, pred = nib.load(label), nib.load(prediction)
    spacing = tuple(float(z) for z in truth.header.get_zooms()[:3])
    given = tuple(float(z) for z in pred.header.get_zooms()[:3])
    if len(given) != 3 or any(abs(a - b) > SPACING_TOLERANCE for a, b in zip(given, spacing)):
        raise DataError(f"{prediction}: voxel spacing {given} mm differs from the ground truth's {spacing} ({label}); "
                        "predict on the CT grid (centerprompt predict does) or resample it first.")  # fmt: skip
    p = _label_array(pred, prediction, "the prediction")
    if pred.shape != truth.shape or not np.allclose(pred.affine, truth.affine, atol=SPACING_TOLERANCE):
        p = np.rint(resample_from_to(nib.Nifti1Image(p.astype(np.float32), pred.affine), truth, order=0).get_fdata())
        p = p.astype(np.int64)
    return case_metrics(p, _label_array(truth, label, "the ground truth"), spacing)


def score_folders(predictions: str | Path, labels: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Score label maps made by any tool (``CASE.nii.gz``, one per case) against a folder of ground
    truth (``<CENTER>-<ID>.nii.gz``, or a HECKTOR folder's ``labelsTr``) as the HECKTOR 2022
    organisers do (:func:`score_case`): per-case Dice and HD95, per-center and overall DSCagg pooled
    in mm³. Every labelled case needs its prediction (a missing one is named); predictions of
    cases without a label are left out with a warning."""
    predictions = Path(predictions)
    truth = _label_maps(Path(labels))
    made = {m["case"]: p for p in sorted(predictions.glob("*.nii*")) if (m := LABEL_FILE_RE.match(p.name))}
    missing = sorted(set(truth) - set(made))
    if missing:
        raise FileNotFoundError(f"{predictions}: no prediction for {len(missing)} of the {len(truth)} labelled cases "
                                f"(e.g. {missing[0]}.nii.gz).")  # fmt: skip
    extra = sorted(set(made) - set(truth))
    if extra:
        logger.warning("%d prediction(s) have no ground truth in %s and are not scored (e.g. %s)", len(extra), labels,
                       made[extra[0]])  # fmt: skip
    per_case = []
    for case in tqdm(sorted(truth), desc="score", unit="case", disable=bars(progress)):
        center = LABEL_FILE_RE.match(truth[case].name)["center"]  # type: ignore[index]
        per_case.append({"case_id": case, "center": center, **score_case(made[case], truth[case])})
    return {"predictions": str(predictions), "labels": str(labels), "pooling": "mm3", **aggregate(per_case),
            "per_case": per_case}  # fmt: skip
