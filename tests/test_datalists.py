"""The layouts users arrive with: an nnU-Net v2 raw dataset and a MONAI datalist JSON, read as the
HECKTOR folder they hold (same cases, centers and files), checked and adapted to (tiny preset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from centerprompt.cli import main
from centerprompt.data.cases import DataError
from centerprompt.data.hecktor import find_cases


def _as_nnunet(hecktor: Path, root: Path, *, swap: bool = False) -> Path:
    """The HECKTOR folder's cases linked under nnU-Net v2 names (``swap``: PET as channel 0)."""
    ct_ch, pet_ch = ("0001", "0000") if swap else ("0000", "0001")
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in find_cases(hecktor):
        (root / "imagesTr" / f"{case.case_id}_{ct_ch}.nii.gz").symlink_to(case.ct)
        (root / "imagesTr" / f"{case.case_id}_{pet_ch}.nii.gz").symlink_to(case.pet)
        (root / "labelsTr" / f"{case.case_id}.nii.gz").symlink_to(case.label)
    channels = {ct_ch.lstrip("0") or "0": "CT", pet_ch.lstrip("0") or "0": "PET"}
    (root / "dataset.json").write_text(json.dumps({
        "name": "HNC", "channel_names": channels, "labels": {"background": 0, "GTVp": 1, "GTVn": 2},
        "numTraining": 12, "file_ending": ".nii.gz"}))  # fmt: skip
    return root


def _as_datalist(hecktor: Path, path: Path) -> Path:
    items = [{"ct": str(c.ct), "pet": str(c.pet), "label": str(c.label), "center": c.center}
             for c in find_cases(hecktor)]  # fmt: skip
    path.write_text(json.dumps({"training": items}))
    return path


@pytest.mark.parametrize("swap", [False, True])
def test_an_nnunet_dataset_holds_the_same_cases(two_centers: Path, tmp_path: Path, swap: bool) -> None:
    ours = {c.case_id: c for c in find_cases(two_centers)}
    theirs = find_cases(_as_nnunet(two_centers, tmp_path / "Dataset501_HNC", swap=swap))
    assert {c.case_id for c in theirs} == set(ours)
    for case in theirs:  # CT is CT whichever channel it is
        mine = ours[case.case_id]
        assert (case.center, case.ct.resolve(), case.pet.resolve(), case.label.resolve()) == (
            mine.center, mine.ct, mine.pet, mine.label)  # fmt: skip


def test_a_datalist_holds_the_same_cases(two_centers: Path, tmp_path: Path) -> None:
    theirs = find_cases(_as_datalist(two_centers, tmp_path / "datalist.json"))
    assert [(c.case_id, c.center, c.ct, c.pet, c.label) for c in theirs] == [
        (c.case_id, c.center, c.ct, c.pet, c.label) for c in find_cases(two_centers)]  # fmt: skip


def test_bad_nnunet_datasets_are_named(two_centers: Path, tmp_path: Path) -> None:
    root = _as_nnunet(two_centers, tmp_path / "d")
    dataset = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**dataset, "channel_names": {"0": "CT", "1": "MRI"}}))
    with pytest.raises(DataError, match="must name one CT and one PET channel"):
        find_cases(root)
    (root / "dataset.json").write_text(json.dumps({**dataset, "labels": {"background": 0, "GTVn": 1, "GTVp": 2}}))
    with pytest.raises(DataError, match="label 1 is called 'gtvn'"):
        find_cases(root)


def test_check_data_and_adapt_read_both_layouts(two_centers: Path, tmp_path: Path, capsys) -> None:
    nnunet = _as_nnunet(two_centers, tmp_path / "Dataset501_HNC")
    datalist = _as_datalist(two_centers, tmp_path / "datalist.json")
    assert main(["check-data", str(nnunet)]) == 0
    out = capsys.readouterr().out
    assert "an nnU-Net v2 raw dataset (HNC): CT is channel _0000, PET channel _0001" in out and "12 cases" in out
    assert main(["check-data", str(datalist)]) == 0
    assert "a MONAI datalist JSON" in capsys.readouterr().out
    base = tmp_path / "base"
    assert main(["pretrain", "--data", str(nnunet), "--exclude-center", "MDA", "--preset", "tiny", "--epochs", "1",
                 "--out", str(base)]) == 0  # fmt: skip
    assert main(["adapt", "--data", str(datalist), "--center", "MDA", "--base", str(base / "model.safetensors"),
                 "--strategy", "deep", "--num-prompts", "2", "--shots", "2", "--epochs", "1",
                 "--out", str(tmp_path / "mda")]) == 0  # fmt: skip
    assert (tmp_path / "mda" / "adapter.safetensors").is_file()


def test_predict_reads_a_folder_of_nnunet_named_cases(two_centers: Path, tmp_path: Path) -> None:
    """PET as channel 0 (dataset.json says so): predict pairs the files as dataset.json names them."""
    from centerprompt.runs.predict import folder_pairs

    root = _as_nnunet(two_centers, tmp_path / "d", swap=True)
    pairs = folder_pairs(root, tmp_path / "out")
    ours = {c.case_id: c for c in find_cases(two_centers)}
    assert len(pairs) == 12
    for ct, pet, out in pairs:
        case = ours[out.name.removesuffix(".nii.gz")]
        assert (ct.resolve(), pet.resolve()) == (case.ct, case.pet)
