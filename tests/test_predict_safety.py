"""``predict`` refuses bad inputs, outputs and damaged checkpoints with one line instead of garbage or a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CT_AFFINE, PET_AFFINE, phantom_arrays, write_case, write_nifti
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import TINY, tiny_model

from centerprompt import apply_strategy
from centerprompt.runs import predict as prediction
from centerprompt.artifacts import read_adapter_metadata, save_adapter, save_model
from centerprompt.checkpoints import resolve_base
from centerprompt.weights import CONTENT_HASH_KEY
from centerprompt.cli import main
from centerprompt.data.checks import check_case
from centerprompt.data.hecktor import find_cases
from centerprompt.training.presets import PRESETS


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny base model with the tiny preset's preprocessing: predictions in a second."""
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    model = tiny_model(**{**preset.model, **{k: TINY[k] for k in ("in_channels", "out_channels")}})
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    return save_model(model, path, extra={"preprocess": preset.preprocess.to_dict()})


@pytest.fixture
def pair(tmp_path: Path) -> dict[str, Path]:
    return write_case(tmp_path / "in", "MDA-001", label_sep=None)


def _predict(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str], str]:
    """Exit status, the error lines on stderr, and the whole of stderr of one ``predict``."""
    status = main(["predict", *args])
    err = capsys.readouterr().err
    return status, [ln for ln in err.splitlines() if "error:" in ln], err


def _nan_block(p: dict[str, Path]) -> tuple[Path, Path]:
    ct = phantom_arrays()[0].astype(np.float32)
    ct[10:20, 10:20, 10:20] = np.nan
    write_nifti(p["ct"], ct, CT_AFFINE)
    return p["ct"], p["pet"]


def _pet_5_m_away(p: dict[str, Path]) -> tuple[Path, Path]:
    far = PET_AFFINE.copy()
    far[0, 3] += 5000.0
    write_nifti(p["pet"], phantom_arrays()[1], far)
    return p["ct"], p["pet"]


def _truncated(p: dict[str, Path]) -> tuple[Path, Path]:
    data = p["ct"].read_bytes()
    p["ct"].write_bytes(data[: len(data) // 2])
    return p["ct"], p["pet"]


def _flat(p: dict[str, Path]) -> tuple[Path, Path]:
    write_nifti(p["ct"], phantom_arrays()[0][:, :, 15], CT_AFFINE)
    return p["ct"], p["pet"]


def _pet_constant(value: float) -> Callable[[dict[str, Path]], tuple[Path, Path]]:
    def damage(p: dict[str, Path]) -> tuple[Path, Path]:
        write_nifti(p["pet"], np.full_like(phantom_arrays()[1], value), PET_AFFINE)
        return p["ct"], p["pet"]

    return damage


def _four_d(p: dict[str, Path]) -> tuple[Path, Path]:
    write_nifti(p["ct"], np.stack([phantom_arrays()[0]] * 2, axis=-1), CT_AFFINE)
    return p["ct"], p["pet"]


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_nan_block, ["1000 NaN or infinite voxels", "CT"]),
        (_pet_5_m_away, ["does not overlap", "CT", "PET"]),
        (lambda p: (p["pet"], p["ct"]), ["look swapped", "CT", "PET"]),  # given as --ct PET --pet CT
        (_truncated, ["cannot read CT file", "CT"]),
        (_flat, ["is not 3D", "CT"]),
        (_four_d, ["is not 3D", "CT"]),
        (_pet_constant(0.0), ["has no uptake", "PET"]),
        (_pet_constant(1.3), ["has no uptake", "PET"]),
    ],
    ids=["nan-block", "pet-5m-away", "swapped", "truncated", "2d", "4d", "pet-all-zero", "pet-constant"],
)
def test_a_bad_pair_is_refused_in_one_line_and_nothing_is_written(
    base: Path, pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
    damage: Callable[[dict[str, Path]], tuple[Path, Path]], expected: list[str],
) -> None:  # fmt: skip
    ct, pet = damage(pair)
    out = tmp_path / "out" / "pred.nii.gz"
    status, errors, err = _predict(capsys, "--base", str(base), "--ct", str(ct), "--pet", str(pet), "--out", str(out))
    assert status == 2 and "Traceback" not in err
    (line,) = errors
    named = {"CT": str(ct), "PET": str(pet)}
    assert all(named.get(e, e) in line for e in expected), line
    assert not out.parent.exists()  # not even the folder


def test_a_folder_goes_on_past_a_bad_case_and_reports_it(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "cases"
    for case_id in ("MDA-001", "MDA-003"):
        write_case(data, case_id, label_sep=None)
    bad, _ = _nan_block(write_case(data, "MDA-002", label_sep=None))  # between the good ones
    out = tmp_path / "preds"
    status, errors, err = _predict(capsys, "--base", str(base), "--input", str(data), "--out", str(out))
    assert status == 1 and errors == [] and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["MDA-001.nii.gz", "MDA-003.nii.gz"]
    summary = err[err.index("skipped 1 of 3 case(s)"):].splitlines()
    assert len(summary) == 2 and str(bad) in summary[1] and "NaN" in summary[1]


def test_a_pair_monai_cannot_read_is_one_line_too(
    base: Path, pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def transform(item: dict) -> dict:  # how MONAI's Compose reports a failing transform
        try:
            raise ValueError("odd geometry\nin two lines")
        except ValueError as err:
            raise RuntimeError("applying transform <LoadImaged>") from err

    monkeypatch.setattr(prediction, "inference_transforms", lambda *a, **k: transform)
    out = tmp_path / "pred.nii.gz"
    args = ["--base", str(base), "--ct", str(pair["ct"]), "--pet", str(pair["pet"]), "--out", str(out)]
    status, errors, err = _predict(capsys, *args)
    assert status == 2 and "Traceback" not in err and not out.exists()
    (line,) = errors
    assert str(pair["ct"]) in line and "ValueError: odd geometry in two lines" in line


@pytest.mark.parametrize("name", ["existing-folder", "pred", "pred.hdr", "file/pred.nii.gz"])
def test_a_bad_out_is_refused_before_any_work(
    base: Path, pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    place = tmp_path / "place"
    (place / "existing-folder").mkdir(parents=True)
    (place / "file").write_text("a file, not a folder")
    before = sorted(place.rglob("*"))
    out = place / name
    args = ["--base", str(base), "--ct", str(pair["ct"]), "--pet", str(pair["pet"]), "--out", str(out)]
    status, errors, err = _predict(capsys, *args)
    assert status == 2 and len(errors) == 1 and str(out) in errors[0] and "Traceback" not in err
    assert sorted(place.rglob("*")) == before  # no prediction, no temporary file (.hdr used to leave a 1 MB .img)

    status, errors, _ = _predict(capsys, "--base", str(base), "--input", str(pair["ct"].parents[1]),
                                 "--out", str(place / "file"))  # fmt: skip
    assert status == 2 and len(errors) == 1 and "not a folder" in errors[0]


def _flip(path: Path, offset_in_data: int) -> Path:
    """A copy of a safetensors file with one bit flipped ``offset_in_data`` bytes into its tensor data."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # 8-byte header length, JSON header, then the data
    raw[start + offset_in_data] ^= 0x10
    damaged = path.with_name(f"damaged-{path.name}")
    damaged.write_bytes(bytes(raw))
    return damaged


def test_a_damaged_checkpoint_is_refused_naming_the_file(
    base: Path, pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    damaged = _flip(base, base.stat().st_size // 3)
    with pytest.raises(ValueError, match=rf"^{damaged}: damaged: .*{CONTENT_HASH_KEY}"):
        resolve_base(damaged)
    out = tmp_path / "pred.nii.gz"
    args = ["--base", str(damaged), "--ct", str(pair["ct"]), "--pet", str(pair["pet"]), "--out", str(out)]
    status, errors, err = _predict(capsys, *args)
    assert status == 2 and len(errors) == 1 and str(damaged) in errors[0] and not out.exists()

    header = bytearray(base.read_bytes())
    header[header.index(b'"F32"') + 3] ^= 0x01  # a dtype safetensors does not know: its own error, one line
    damaged.write_bytes(bytes(header))
    status, errors, err = _predict(capsys, *args)
    assert status == 2 and len(errors) == 1 and str(damaged) in errors[0] and "Traceback" not in err


def test_a_damaged_adapter_is_refused(tmp_path: Path) -> None:
    model = tiny_model(prompt_mode="deep", num_prompts=3)
    apply_strategy(model, "deep")
    adapter = save_adapter(model, tmp_path / "adapter.safetensors", "deep")
    assert read_adapter_metadata(adapter)["tensors"] == ["prompts.tokens"]
    damaged = _flip(adapter, 5)
    with pytest.raises(ValueError, match=rf"^{damaged}: damaged"):
        read_adapter_metadata(damaged)


def test_a_checkpoint_written_before_the_hash_still_loads(base: Path, tmp_path: Path) -> None:
    with safe_open(str(base), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={k: v for k, v in meta.items() if k != CONTENT_HASH_KEY})
    loaded = resolve_base(old)
    assert loaded.config == resolve_base(base).config
    assert all(torch.equal(loaded.state[k], tensors[k]) for k in tensors)


def test_a_batch_norm_model_saves_and_loads_verified(tmp_path: Path) -> None:
    """0-dim tensors (BatchNorm's num_batches_tracked) are hashed too."""
    path = save_model(tiny_model(norm_name="batch"), tmp_path / "model.safetensors")
    assert "encoder1.layer.norm1.num_batches_tracked" in resolve_base(path).state


def test_check_data_names_swapped_modalities_too(hecktor_dir: Path) -> None:
    case = next(c for c in find_cases(hecktor_dir) if c.case_id == "CHUM-001")
    ct, pet = case.ct.read_bytes(), case.pet.read_bytes()
    case.ct.write_bytes(pet)
    case.pet.write_bytes(ct)
    problems = check_case(case)
    assert any("look swapped" in p for p in problems), problems
    assert nib.load(case.label).shape != nib.load(case.ct).shape  # the label check still runs beside it


def test_check_data_names_a_pet_without_uptake(hecktor_dir: Path, capsys: pytest.CaptureFixture) -> None:
    case = next(c for c in find_cases(hecktor_dir) if c.case_id == "CHUM-001")
    write_nifti(case.pet, np.zeros_like(phantom_arrays()[1]), PET_AFFINE)
    assert main(["check-data", str(hecktor_dir)]) == 1
    out = capsys.readouterr().out
    assert f"CHUM-001: PET file {case.pet} has no uptake" in out and "no problems found" not in out
