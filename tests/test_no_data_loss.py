"""Nothing a user types may destroy data: an output that is, holds or lies inside an input is refused
before any work, and every file outside the output is left as it was (hashes before and after)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import file_hashes as _hashes
from conftest import run_cli as _run

from centerprompt.cli import main


def test_predict_refuses_to_write_onto_its_input_ct(world: Path, capsys: pytest.CaptureFixture) -> None:
    before = _hashes(world)
    ct, pet = world / "data/imagesTr/MDA-001__CT.nii.gz", world / "data/imagesTr/MDA-001__PT.nii.gz"
    status, errors = _run(capsys, "predict", "--base", str(world / "runs/b/model.safetensors"), "--ct", str(ct),
                          "--pet", str(pet), "--out", str(ct))  # fmt: skip
    assert status == 2 and len(errors) == 1
    assert str(ct) in errors[0] and "--ct" in errors[0]
    assert _hashes(world) == before


def test_predict_into_the_label_folder_is_refused(world: Path, capsys: pytest.CaptureFixture) -> None:
    before = _hashes(world)
    status, errors = _run(capsys, "predict", "--base", str(world / "runs/b/model.safetensors"), "--input",
                          str(world / "data/imagesTr"), "--out", str(world / "data/labelsTr"))  # fmt: skip
    assert status == 2 and len(errors) == 1
    assert "labelsTr" in errors[0] and "inside the input folder" in errors[0]
    assert _hashes(world) == before


def test_predict_does_not_overwrite_existing_predictions_without_overwrite(world: Path, capsys: pytest.CaptureFixture) -> None:
    out = world / "preds"
    out.mkdir()
    (out / "MDA-002.nii.gz").write_bytes(b"someone's work")
    before = _hashes(world)
    base = str(world / "runs/b/model.safetensors")
    status, errors = _run(capsys, "predict", "--base", base, "--input", str(world / "data"), "--out", str(out))
    assert status == 2 and len(errors) == 1
    assert "MDA-002.nii.gz" in errors[0] and "--overwrite" in errors[0] and "1 of the 2" in errors[0]
    assert _hashes(world) == before  # refused before any work: not even MDA-001 was written
    assert main(["predict", "--base", base, "--input", str(world / "data"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "MDA-002.nii.gz").read_bytes() != b"someone's work"
    assert (out / "MDA-001.nii.gz").exists()


def test_adapt_into_the_base_models_folder_is_refused(world: Path, capsys: pytest.CaptureFixture) -> None:
    before = _hashes(world)
    status, errors = _run(capsys, "adapt", "--data", str(world / "data"), "--center", "MDA", "--base",
                          str(world / "runs/b/model.safetensors"), "--out", str(world / "runs/b"))  # fmt: skip
    assert status == 2 and len(errors) == 1
    assert "holds the input given as --base" in errors[0]
    assert _hashes(world) == before  # config.json, summary.json, best.pt, last.pt and the model all kept


@pytest.mark.parametrize("out", ["data", "data/runs/x"])
def test_a_run_inside_the_data_folder_is_refused(world: Path, capsys: pytest.CaptureFixture, out: str) -> None:
    before = _hashes(world)
    status, errors = _run(capsys, "pretrain", "--data", str(world / "data"), "--preset", "tiny", "--out", str(world / out))
    assert status == 2 and len(errors) == 1 and "--data" in errors[0]
    assert _hashes(world) == before


def test_empty_out_is_refused(world: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world)  # where an empty --out would have written the run
    before = _hashes(world)
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--data", str(world / "data"), "--preset", "tiny", "--out", ""])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert stop.value.code == 2 and len(errors) == 1 and "--out: is empty" in errors[0]
    assert _hashes(world) == before


@pytest.mark.parametrize("name", ["../../X", "/tmp/X", "base", "a b"])
def test_a_crafted_bank_json_cannot_name_a_center_outside_its_folder(tmp_path: Path, name: str) -> None:
    from centerprompt.bank import PromptBank
    from centerprompt.bank.storage import BANK_FILE, BANK_FORMAT

    bank = tmp_path / "bank"
    bank.mkdir()
    entry = {"center": name, "file": "MDA.safetensors", "key_file": None}
    entry |= {k: None for k in _entry_fields() if k not in entry}
    (bank / BANK_FILE).write_text(json.dumps({"format": BANK_FORMAT, "entries": [entry]}))
    with pytest.raises(ValueError, match=r"bank\.json: entry 0: center name"):
        PromptBank(bank).entries()


def _entry_fields() -> set[str]:
    from centerprompt.bank.storage import _ENTRY_FIELDS

    return set(_ENTRY_FIELDS)


def test_bank_export_refuses_a_bank_json_center_that_escapes(world: Path, capsys: pytest.CaptureFixture) -> None:
    from centerprompt.bank.storage import BANK_FILE, BANK_FORMAT

    bank = world / "bank"
    bank.mkdir()
    entry = {k: None for k in _entry_fields()} | {"center": "../../X", "file": "X.safetensors"}
    (bank / "X.safetensors").write_bytes(b"")
    (bank / BANK_FILE).write_text(json.dumps({"format": BANK_FORMAT, "entries": [entry]}))
    before = _hashes(world)
    status, errors = _run(capsys, "bank", "export", "--bank", str(bank), "--base", str(world / "runs/b/model.safetensors"),
                          "--out", str(world / "bundles"))  # fmt: skip
    assert status == 2 and len(errors) == 1 and "'../../X'" in errors[0] and "bank.json" in errors[0]
    assert _hashes(world) == before and not (world / "bundles").exists() and not (world.parent / "X").exists()
