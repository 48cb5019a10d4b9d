"""``score``: anyone's label maps scored as the HECKTOR 2022 organisers score them (volumes in mm³,
refusals, nearest-neighbour resampling onto the ground truth's grid)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from centerprompt.cli import main
from centerprompt.runs.score import score_folders


def _write(path: Path, data: np.ndarray, spacing: float, origin: float = 0.0) -> Path:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), path)
    return path


def _cube(shape: tuple[int, int, int], box: tuple[slice, ...], value: int = 1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[box] = value
    return a


@pytest.fixture
def two_spacings(tmp_path: Path) -> tuple[Path, Path]:
    """AAA-001 at 1 mm: GTVp 8 voxels, prediction 8 voxels of which 4 overlap.
    BBB-001 at 2 mm (8 mm³ voxels): GTVp 8 voxels, prediction 4 voxels, all overlapping."""
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    shape = (6, 6, 6)
    _write(labels / "AAA-001.nii.gz", _cube(shape, np.s_[1:3, 1:3, 1:3]), 1.0)
    _write(preds / "AAA-001.nii.gz", _cube(shape, np.s_[1:3, 1:3, 2:4]), 1.0)
    _write(labels / "BBB-001.nii.gz", _cube(shape, np.s_[1:3, 1:3, 1:3]), 2.0)
    _write(preds / "BBB-001.nii.gz", _cube(shape, np.s_[1:3, 1:3, 1:2]), 2.0)
    return preds, labels


def test_dscagg_pools_volumes_in_mm3_by_hand(two_spacings: tuple[Path, Path]) -> None:
    result = score_folders(*two_spacings, progress=False)
    tp = 4 * 1 + 4 * 8  # mm³
    volumes = (8 + 8) * 1 + (8 + 4) * 8
    assert result["overall"]["dsc_agg"]["gtvp"] == pytest.approx(2 * tp / volumes)  # 0.643; in voxels 0.571
    assert 2 * (4 + 4) / (16 + 12) != pytest.approx(2 * tp / volumes)
    assert math.isnan(result["overall"]["dsc_agg"]["gtvn"])  # no GTVn anywhere: undefined, not 0
    assert result["overall"]["dsc_agg"]["mean"] == pytest.approx(2 * tp / volumes)
    cases = {c["case_id"]: c for c in result["per_case"]}
    assert cases["AAA-001"]["gtvp"]["dice"] == pytest.approx(0.5) and cases["BBB-001"]["gtvp"]["dice"] == pytest.approx(2 / 3)
    assert set(result["per_center"]) == {"AAA", "BBB"}


def test_a_prediction_on_another_grid_is_resampled_onto_the_labels(two_spacings: tuple[Path, Path]) -> None:
    """The same voxels written as a crop of the volume (another size and origin, same spacing) score the same."""
    preds, labels = two_spacings
    before = score_folders(preds, labels, progress=False)
    full = np.asarray(nib.load(preds / "AAA-001.nii.gz").dataobj)
    _write(preds / "AAA-001.nii.gz", full[1:5, 1:5, 1:5], 1.0, origin=1.0)
    after = score_folders(preds, labels, progress=False)
    assert after["overall"]["dsc_agg"] == before["overall"]["dsc_agg"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: _write(p, _cube((6, 6, 6), np.s_[1:3, 1:3, 1:3], 3), 1.0), r"label values \[3\] outside \{0, 1, 2\}"),
    (lambda p: _write(p, _cube((6, 6, 6), np.s_[1:3, 1:3, 1:3]), 1.5), r"voxel spacing \(1.5, 1.5, 1.5\) mm differs"),
    (lambda p: p.unlink(), r"no prediction for 1 of the 2 labelled cases \(e.g. AAA-001.nii.gz\)"),
])  # fmt: skip
def test_refusals_name_the_file_in_one_line(
    two_spacings: tuple[Path, Path], change, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    preds, labels = two_spacings
    change(preds / "AAA-001.nii.gz")
    assert main(["score", "--predictions", str(preds), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "AAA-001" in err and re.search(message, err), err
