"""Layout reading, splits and the leave-one-center-out protocol."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import write_case

from centerprompt.data.cases import DataError
from centerprompt.data.hecktor import Splits, find_cases, leave_one_center_out, make_splits, resolve_splits


def test_both_label_naming_styles(hecktor_dir: Path) -> None:
    cases = find_cases(hecktor_dir)
    assert [c.case_id for c in cases] == ["CHUM-001", "CHUM-002", "CHUM-003", "MDA-001", "MDA-002", "MDA-003"]
    assert {c.center for c in cases} == {"CHUM", "MDA"}
    mda = next(c for c in cases if c.case_id == "MDA-001")
    assert mda.label is not None and mda.label.name == "MDA_001.nii.gz"
    assert mda.ct.name == "MDA-001__CT.nii.gz" and mda.pet.name == "MDA-001__PT.nii.gz"


def test_case_without_label_is_prediction_only(hecktor_dir: Path) -> None:
    write_case(hecktor_dir, "CHUV-001", label_sep=None)
    cases = {c.case_id: c for c in find_cases(hecktor_dir)}
    assert cases["CHUV-001"].label is None and not cases["CHUV-001"].labelled
    assert "CHUV" not in make_splits(cases.values())


def test_missing_modality_names_case_and_file(hecktor_dir: Path) -> None:
    (hecktor_dir / "imagesTr" / "CHUM-002__PT.nii.gz").unlink()
    with pytest.raises(DataError, match=r"CHUM-002: missing PET image .*CHUM-002__PT\.nii\.gz"):
        find_cases(hecktor_dir)


def test_label_without_images_is_missing_modality(hecktor_dir: Path) -> None:
    shutil.copy(hecktor_dir / "labelsTr" / "CHUM-001.nii.gz", hecktor_dir / "labelsTr" / "CHUM-009.nii.gz")
    with pytest.raises(DataError, match=r"CHUM-009: missing CT image .*found .*CHUM-009\.nii\.gz"):
        find_cases(hecktor_dir)


def test_empty_or_wrong_folder(tmp_path: Path, hecktor_dir: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_cases(tmp_path / "nope")
    with pytest.raises(DataError, match="has no imagesTr folder"):
        find_cases(tmp_path)
    with pytest.raises(DataError, match="not imagesTr itself"):
        find_cases(hecktor_dir / "imagesTr")
    (tmp_path / "empty" / "imagesTr").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no NIfTI images"):
        find_cases(tmp_path / "empty")


def test_duplicate_label_in_both_styles(hecktor_dir: Path) -> None:
    shutil.copy(hecktor_dir / "labelsTr" / "CHUM-001.nii.gz", hecktor_dir / "labelsTr" / "CHUM_001.nii.gz")
    with pytest.raises(DataError, match=r"CHUM-001: duplicate label files .*CHUM-001\.nii\.gz and .*CHUM_001\.nii\.gz"):
        find_cases(hecktor_dir)


def test_same_case_under_two_names(hecktor_dir: Path) -> None:
    images = hecktor_dir / "imagesTr"
    shutil.copy(images / "MDA-002__CT.nii.gz", images / "MDA_002__CT.nii.gz")
    with pytest.raises(DataError, match=r"MDA-002: duplicate ct files"):
        find_cases(hecktor_dir)


def test_any_center_prefix_is_a_center(hecktor_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_case(hecktor_dir, "XYZ-001")
    with caplog.at_level(logging.INFO, logger="centerprompt.data.hecktor"):
        cases = find_cases(hecktor_dir)
    assert {c.center for c in cases if c.case_id == "XYZ-001"} == {"XYZ"}
    assert any("new site" in r.getMessage() and "XYZ" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="centerprompt.data.hecktor"):
        find_cases(hecktor_dir, allowed_centers=["XYZ"])  # expected: not reported as new
    assert not any("new site" in r.getMessage() for r in caplog.records)


def test_badly_named_file_is_reported(hecktor_dir: Path) -> None:
    shutil.copy(hecktor_dir / "imagesTr" / "MDA-001__CT.nii.gz", hecktor_dir / "imagesTr" / "MDA-001_ct.nii.gz")
    with pytest.raises(DataError, match=r"MDA-001_ct\.nii\.gz: image file .* does not match"):
        find_cases(hecktor_dir)


def test_skip_bad_cases_warns(hecktor_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (hecktor_dir / "imagesTr" / "CHUM-002__CT.nii.gz").unlink()
    (hecktor_dir / "imagesTr" / "MDA-003__PT.nii.gz").unlink()
    with caplog.at_level(logging.WARNING, logger="centerprompt.data.hecktor"):
        cases = find_cases(hecktor_dir, skip_bad_cases=True)
    ids = [c.case_id for c in cases]
    assert "CHUM-002" not in ids and "MDA-003" not in ids and len(ids) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CHUM-002" in w and "CHUM-002__CT.nii.gz" in w for w in warnings)
    assert any("MDA-003" in w for w in warnings)


def _many_cases(tmp_path: Path) -> list:
    """Layout-only cases (empty files): splits never read voxels."""
    root = tmp_path / "many"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for center, n in (("CHUM", 20), ("HMR", 18), ("MDA", 40), ("CHUV", 2)):
        for i in range(n):
            for name in (f"imagesTr/{center}-{i:03d}__CT.nii.gz", f"imagesTr/{center}-{i:03d}__PT.nii.gz", f"labelsTr/{center}-{i:03d}.nii.gz"):
                (root / name).touch()
    return find_cases(root)


def test_splits_deterministic_and_disjoint(tmp_path: Path) -> None:
    cases = _many_cases(tmp_path)
    a, b, c = make_splits(cases, seed=0), make_splits(cases, seed=0), make_splits(cases, seed=1)
    assert a == b and a != c
    for center, parts in a.items():
        ids = parts["train"] + parts["val"] + parts["test"]
        assert len(ids) == len(set(ids)) == sum(x.center == center for x in cases)
    assert all(len(a[c]["val"]) >= 1 and len(a[c]["test"]) >= 1 for c in ("CHUM", "HMR", "MDA"))
    assert len(a["CHUV"]["train"]) == 1 and len(a["CHUV"]["test"]) == 1  # tiny center: still trains and tests


def test_split_file_written_once_and_reused(tmp_path: Path) -> None:
    cases, data = _many_cases(tmp_path), tmp_path / "many"
    path = tmp_path / "run" / "splits.json"
    first = resolve_splits(data, cases, path=path, seed=0)
    assert path.exists() and json.loads(path.read_text())["centers"] == first and first.sha256
    assert not (data / "splits.json").exists()  # never written into the data folder
    mtime = path.stat().st_mtime_ns
    assert resolve_splits(data, cases, path=path, seed=5) == first  # reused, not remade
    assert path.stat().st_mtime_ns == mtime
    assert not list(path.parent.glob(".splits.json.*tmp*"))
    assert resolve_splits(data, cases, seed=0) == first and resolve_splits(data, cases, seed=5) != first  # no file
    (data / "splits.json").write_text(path.read_text())  # a data folder's own split comes before a made one
    assert resolve_splits(data, cases, seed=5) == first
    bad = tmp_path / "bad.json"
    bad.write_text('{"seed": 0, "centers": {"HMR": {"train": []}}}')
    with pytest.raises(DataError, match=r"bad\.json is not a valid splits JSON"):
        resolve_splits(data, cases, path=bad)
    with pytest.raises(DataError, match=r"splits\.json lists 1 case.*HMR-000.*--skip-bad-cases") as err:
        resolve_splits(data, [c for c in cases if c.case_id != "HMR-000"])
    assert "delete" not in str(err.value)


def test_a_recorded_split_is_kept_for_its_centers_and_made_for_new_ones(tmp_path: Path) -> None:
    cases, data = _many_cases(tmp_path), tmp_path / "many"
    recorded = make_splits([c for c in cases if c.center in ("CHUM", "HMR", "MDA")], seed=7)  # a base's, without CHUV
    recorded = Splits({**recorded, "CHUP": {"train": ["CHUP-000"], "val": [], "test": []}}, source="base", seed=7)
    got = resolve_splits(data, cases, defaults=[recorded], seed=0)
    assert {c: got[c] for c in ("CHUM", "HMR", "MDA")} == {c: recorded[c] for c in ("CHUM", "HMR", "MDA")}
    assert got["CHUV"] == make_splits(cases, seed=0)["CHUV"]  # the new site: as a split of the folder gives it
    assert "CHUP" not in got and "CHUP" in got.assignment  # listed, absent from this folder: left out, still recorded
    with pytest.raises(DataError, match=r"lists 1 case.*MDA-000"):  # a center present in part is still an error
        resolve_splits(data, [c for c in cases if c.case_id != "MDA-000"], defaults=[recorded], seed=0)


def test_leave_one_center_out_disjoint(tmp_path: Path) -> None:
    splits = make_splits(_many_cases(tmp_path), seed=0)
    loco = leave_one_center_out(splits, "HMR", shots=5, seed=0)
    assert len(loco.adapt_train) == 5 and loco.adapt_val
    adapt, test = set(loco.adapt_train), set(loco.new_test)
    assert not adapt & set(loco.adapt_val) and not adapt & test and not set(loco.adapt_val) & test
    # The rest of the new center is its test set: every labelled case not used for adaptation.
    everything = {i for part in splits["HMR"].values() for i in part}
    assert test == everything - adapt - set(loco.adapt_val) and set(splits["HMR"]["test"]) <= test
    assert all(i.startswith("HMR-") for i in adapt | test | set(loco.adapt_val))
    pretrain = loco.pretrain_train + loco.pretrain_val + loco.old_test
    assert pretrain and not any(i.startswith("HMR-") for i in pretrain)
    assert not set(loco.pretrain_train) & set(loco.old_test)
    assert set(loco.old_test) == {i for c in ("CHUM", "CHUV", "MDA") for i in splits[c]["test"]}
    # Same seed -> same split; more shots -> a superset, with the same validation cases.
    assert leave_one_center_out(splits, "HMR", shots=5, seed=0) == loco
    more = leave_one_center_out(splits, "HMR", shots=8, seed=0)
    assert adapt < set(more.adapt_train) and more.adapt_val == loco.adapt_val


def test_leave_one_center_out_too_few_cases(tmp_path: Path) -> None:
    splits = make_splits(_many_cases(tmp_path), seed=0)
    n_pool = len(splits["HMR"]["train"]) + len(splits["HMR"]["val"])
    with pytest.raises(ValueError, match=r"center HMR has \d+ labelled train\+val cases, too few for 50 shots"):
        leave_one_center_out(splits, "HMR", shots=50)
    leave_one_center_out(splits, "HMR", shots=n_pool - len(splits["HMR"]["val"]))
    with pytest.raises(ValueError, match="no labelled cases"):
        leave_one_center_out(splits, "USZ", shots=1)
