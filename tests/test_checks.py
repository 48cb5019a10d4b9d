"""Content checks (grid, values, NaN, corrupt files), the summary, and the check-data command."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CT_AFFINE, CT_SHAPE, GTVP_RADIUS, phantom_arrays, write_nifti

from centerprompt.cli import data as data_cli
from centerprompt.data.checks import check_case, summarize, validate_cases
from centerprompt.data.cases import DataError
from centerprompt.data.hecktor import find_cases


def _case(root: Path, case_id: str):
    return next(c for c in find_cases(root) if c.case_id == case_id)


def test_good_cases_have_no_problems(hecktor_dir: Path) -> None:
    cases = find_cases(hecktor_dir)
    assert all(check_case(c) == [] for c in cases)
    assert validate_cases(cases) == cases


def test_label_grid_differs_from_ct(hecktor_dir: Path) -> None:
    _, _, label = phantom_arrays()
    case = _case(hecktor_dir, "CHUM-001")
    shifted = CT_AFFINE.copy()
    shifted[:3, 3] += 1.5
    write_nifti(case.label, label, shifted)
    (problem,) = check_case(case, deep=False)
    assert "CHUM-001" in problem and str(case.label) in problem and "affine differs" in problem
    write_nifti(case.label, label[:, :, :-2], CT_AFFINE)
    (problem,) = check_case(case, deep=False)
    assert "CHUM-001" in problem and "shape (40, 40, 28)" in problem


def test_tiny_affine_rounding_is_tolerated(hecktor_dir: Path) -> None:
    _, _, label = phantom_arrays()
    case = _case(hecktor_dir, "CHUM-001")
    write_nifti(case.label, label, CT_AFFINE + 1e-4)
    assert check_case(case) == []


def test_label_values_outside_range(hecktor_dir: Path) -> None:
    _, _, label = phantom_arrays()
    label[0, 0, 0] = 3
    case = _case(hecktor_dir, "MDA-002")
    write_nifti(case.label, label, CT_AFFINE)
    (problem,) = check_case(case)
    assert problem.startswith("MDA-002: label") and "MDA_002.nii.gz" in problem and "outside {0, 1, 2}: 3" in problem
    assert check_case(case, deep=False) == []  # header-only checks do not load voxels


@pytest.mark.parametrize("modality, value", [("ct", np.nan), ("pet", np.inf)])
def test_nan_or_inf_voxels(hecktor_dir: Path, modality: str, value: float) -> None:
    ct, pet, _ = phantom_arrays()
    case = _case(hecktor_dir, "CHUM-003")
    array = (ct if modality == "ct" else pet).astype(np.float32)
    array[5, 5, 5] = value
    path = case.ct if modality == "ct" else case.pet
    write_nifti(path, array, nib.load(path).affine)
    (problem,) = check_case(case)
    assert "CHUM-003" in problem and str(path) in problem and "1 NaN or infinite voxels" in problem


def test_non_3d_and_corrupt_files(hecktor_dir: Path) -> None:
    case = _case(hecktor_dir, "CHUM-002")
    write_nifti(case.pet, np.zeros((4, 4, 4, 2), np.float32), np.eye(4))
    case.ct.write_bytes(b"not a nifti file")
    problems = check_case(case)
    assert any("cannot read CT file" in p and str(case.ct) in p for p in problems)
    assert any("PET file" in p and "is not 3D" in p for p in problems)
    assert all(p.startswith("CHUM-002: ") for p in problems)


def test_truncated_data_is_corrupt(hecktor_dir: Path) -> None:
    case = _case(hecktor_dir, "CHUM-002")
    data = case.pet.read_bytes()
    case.pet.write_bytes(data[: len(data) // 2])
    problems = check_case(case)
    assert problems and "cannot read PET file" in problems[0] and str(case.pet) in problems[0]


def test_pet_not_overlapping_ct(hecktor_dir: Path) -> None:
    case = _case(hecktor_dir, "MDA-001")
    _, pet, _ = phantom_arrays()
    far = np.diag([4.0, 4.0, 4.0, 1.0])
    far[:3, 3] = 1000.0
    write_nifti(case.pet, pet, far)
    (problem,) = check_case(case, deep=False)
    assert "MDA-001" in problem and "does not overlap" in problem


def test_validate_cases_raises_or_skips(hecktor_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, label = phantom_arrays()
    cases = find_cases(hecktor_dir)
    label[1, 1, 1] = 7
    write_nifti(cases[1].label, label, CT_AFFINE)
    with pytest.raises(DataError, match=r"1 problem\(s\).*\n  CHUM-002: label .*CHUM-002\.nii\.gz has values outside"):
        validate_cases(cases)
    with caplog.at_level(logging.WARNING, logger="centerprompt.data.checks"):
        good = validate_cases(cases, skip_bad_cases=True)
    assert [c.case_id for c in good] == [c.case_id for c in cases if c.case_id != "CHUM-002"]
    assert any("CHUM-002" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_summarize(hecktor_dir: Path) -> None:
    summary = summarize(find_cases(hecktor_dir))
    assert set(summary) == {"CHUM", "MDA"}
    s = summary["CHUM"]
    assert s.cases == s.labelled == 3
    assert s.ct_spacing == [[2.5, 2.5, 3.0], [2.5, 2.5, 3.0]] and s.ct_size == [list(CT_SHAPE)] * 2
    assert s.pet_spacing[0] == [4.0, 4.0, 4.0]
    sphere_ml = 4 / 3 * np.pi * GTVP_RADIUS**3 / 1000
    assert s.gtvp_ml[0] == pytest.approx(sphere_ml, rel=0.1)
    assert 0 < s.gtvn_ml[0] < s.gtvp_ml[0]


def _check_data(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["check-data", *argv])
    return args.func(args)


def test_check_data_cli_good(hecktor_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert _check_data(str(hecktor_dir)) == 0
    out = capsys.readouterr().out
    assert "CT spacing" in out and "GTVp ml" in out
    assert "CHUM" in out and "2.5x2.5x3" in out and "40x40x30" in out and "no problems" in out


def test_check_data_cli_bad(hecktor_dir: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, label = phantom_arrays()
    label[0, 0, 0] = 5
    write_nifti(hecktor_dir / "labelsTr" / "MDA_003.nii.gz", label, CT_AFFINE)
    (hecktor_dir / "imagesTr" / "CHUM-001__PT.nii.gz").unlink()
    assert _check_data(str(hecktor_dir)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("MDA-003: label") and "MDA_003.nii.gz" in line for line in lines)
    assert any(line.startswith("CHUM-001: missing PET image") for line in lines)
    assert _check_data(str(hecktor_dir), "--skip-bad-cases") == 0


def test_check_data_cli_new_sites(hecktor_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import write_case

    write_case(hecktor_dir, "XYZ-001")
    with caplog.at_level(logging.INFO, logger="centerprompt.data.hecktor"):
        assert _check_data(str(hecktor_dir)) == 0  # any prefix is a center; a new one is only noted
    assert any("new site" in r.getMessage() and "XYZ" in r.getMessage() for r in caplog.records)
    assert _check_data(str(hecktor_dir), "--centers", "XYZ,ABC") == 0


def _backdate(root: Path, seconds: float = 60.0) -> None:
    """Move every file's mtime into the past: a file changed just before its check is checked again."""
    past = time.time_ns() - int(seconds * 1e9)
    for path in root.rglob("*.nii.gz"):
        os.utime(path, ns=(past, past))


def test_load_index_checks_each_case_once(hecktor_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from centerprompt.runs import selection
    from centerprompt.data import checks

    read: list[str] = []
    real = checks._check_voxels
    monkeypatch.setattr(checks, "_check_voxels", lambda case, *a: read.append(case.case_id) or real(case, *a))
    monkeypatch.setattr(checks, "_MEMO", {})
    _backdate(hecktor_dir)
    run = tmp_path / "run"
    cases, _ = selection.load_index(hecktor_dir, cache_dir=run)
    assert sorted(read) == sorted(cases) and (run / checks.CHECKS_FILE).exists()
    assert not list(hecktor_dir.glob("*checks*"))  # never written into the data folder
    read.clear()
    assert selection.load_index(hecktor_dir, cache_dir=run)[0] == cases and read == []  # same process
    monkeypatch.setattr(checks, "_MEMO", {})  # a new process of the same run: the run folder's file answers
    assert selection.load_index(hecktor_dir, cache_dir=run)[0] == cases and read == []

    touched = cases["MDA-002"].pet
    mtime = touched.stat().st_mtime_ns
    os.utime(touched, ns=(mtime, mtime + 10**9))  # a new mtime, still well in the past
    selection.load_index(hecktor_dir, cache_dir=run)
    assert read == ["MDA-002"]
    read.clear()
    selection.load_index(hecktor_dir)
    assert read == []

    label = cases["CHUM-001"].label  # new content and size, old mtime: only the size tells
    size, mtime = label.stat().st_size, label.stat().st_mtime_ns
    write_nifti(label, phantom_arrays()[2][:, :, :-2], CT_AFFINE)
    os.utime(label, ns=(mtime, mtime))
    assert label.stat().st_size != size
    for _ in range(2):  # the bad case stays bad when its result is reused
        with pytest.raises(DataError, match=r"CHUM-001: label .* has shape"):
            selection.load_index(hecktor_dir, cache_dir=run)
    assert read == ["CHUM-001"]
    monkeypatch.setattr(checks, "_MEMO", {})
    good = validate_cases(find_cases(hecktor_dir), skip_bad_cases=True, cache_file=run / checks.CHECKS_FILE)
    assert sorted(c.case_id for c in good) == sorted(set(cases) - {"CHUM-001"}) and read == ["CHUM-001"]
