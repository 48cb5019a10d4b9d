"""Nothing broken passes silently: non-finite arguments and losses, splits that are not splits, an
adapter for another base, a second writer in a run folder, Ctrl-C (issue 29). Each case asserts
what the user sees: the exit status, one line naming the argument or file, and untouched files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CT_AFFINE, file_hashes, phantom_arrays, run_cli, write_case, write_nifti
from tiny import tiny_model

from centerprompt import apply_strategy
from centerprompt.artifacts import save_adapter
from centerprompt.checkpoints import resolve_base
from centerprompt.cli import main
from centerprompt.data.cases import DataError
from centerprompt.data.hecktor import read_splits
from centerprompt.files import folder_lock
from centerprompt.training.loop import LAST_CHECKPOINT, NonFiniteLoss, TrainConfig, Trainer, fit


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--lr", "inf", "--lr must be a finite number"), ("--lr", "nan", "--lr must be a finite number"),
    ("--num-prompts", "100000", "--num-prompts must be at most 1000"),
    ("--seed", "99999999999999999999999", "--seed must be at most"),
])  # fmt: skip
def test_unusable_numbers_are_refused_before_any_work(
    world: Path, capsys: pytest.CaptureFixture, flag: str, value: str, says: str
) -> None:  # fmt: skip
    before = file_hashes(world)
    status, errors = run_cli(capsys, "adapt", "--data", str(world / "data"), "--center", "MDA", "--base",
                             str(world / "runs/b/model.safetensors"), "--out", str(world / "runs/a"), flag, value)  # fmt: skip
    assert status == 2 and len(errors) == 1 and says in errors[0]
    assert file_hashes(world) == before and not (world / "runs/a").exists()


class _Poisoned(torch.utils.data.Dataset):
    """Learnable cubes; once ``poisoned`` is set, images hold inf (the loss becomes NaN)."""

    def __init__(self) -> None:
        self.poisoned = False

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, label = torch.zeros(2, 32, 32, 32), torch.zeros(1, 32, 32, 32)
        image[:, 8:16, 8:16, 8:16], label[:, 8:16, 8:16, 8:16] = 1.0, 1
        if self.poisoned:
            image[0, 0, 0, 0] = float("inf")
        return {"image": image, "label": label}


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, data = tiny_model(), _Poisoned()
    params = apply_strategy(model, "full")

    def poison(epoch: int) -> None:
        data.poisoned = epoch == 1

    cfg = TrainConfig(epochs=3, lr=1e-3, batch_size=2, warmup_epochs=0, patience=0)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at epoch 2, step 1.*keeps epoch 1.*lower --lr"):
        fit(Trainer(model, params, data, cfg), tmp_path, progress=False, on_epoch_end=poison)
    kept = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert kept["state"]["epoch"] == 1 and all(torch.isfinite(t).all() for t in kept["trainable"].values())
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_skipped_case_is_recorded_in_the_summary(world: Path) -> None:
    ct = phantom_arrays()[0].astype(np.float32)
    ct[5:10, 5:10, 5:10] = np.nan
    write_case(world / "data", "MDA-003")
    write_nifti(world / "data/imagesTr/MDA-003__CT.nii.gz", ct, CT_AFFINE)
    for case in ("CHUM-001", "CHUM-002", "CHUM-003"):
        write_case(world / "data", case)
    out = world / "runs/p"
    assert main(["pretrain", "--data", str(world / "data"), "--preset", "tiny", "--epochs", "1", "--skip-bad-cases",
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["splits"]["skipped_cases"] == ["MDA-003"]


@pytest.mark.parametrize(("centers", "says"), [
    ({"MDA": {"train": ["MDA-001"], "val": [], "test": ["MDA-001"]}}, "MDA-001 is in both MDA train and MDA test"),
    ({"MDA": {"train": ["MDA-001", "CHUM-002"], "val": [], "test": []}}, "CHUM-002 is listed under center MDA"),
])  # fmt: skip
def test_a_split_file_that_is_not_a_split_is_refused(tmp_path: Path, centers: dict, says: str) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"seed": 0, "centers": centers}))
    with pytest.raises(DataError, match=says) as err:
        read_splits(path)
    assert str(path) in str(err.value)


def test_bank_add_checks_the_adapter_against_the_given_base(world: Path, capsys: pytest.CaptureFixture) -> None:
    base = world / "runs/b/model.safetensors"
    model = resolve_base(base).build(prompt_mode="deep", num_prompts=2)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("vit.")).add_(1.0)  # another backbone
    apply_strategy(model, "deep")
    adapter = save_adapter(model, world / "other.safetensors", "deep")
    status, errors = run_cli(capsys, "bank", "add", "--bank", str(world / "bank"), "--center", "MDA", "--adapter",
                             str(adapter), "--base", str(base), "--data", str(world / "data"))  # fmt: skip
    assert status == 2 and len(errors) == 1 and "backbone" in errors[0]
    assert not (world / "bank" / "bank.json").exists()


def test_a_second_writer_of_a_run_folder_is_refused_with_the_holders_pid(world: Path, capsys: pytest.CaptureFixture) -> None:
    out = world / "runs/p"
    with folder_lock(out):
        before = file_hashes(world)
        status, errors = run_cli(capsys, "pretrain", "--data", str(world / "data"), "--preset", "tiny", "--out", str(out))
        assert status == 2 and len(errors) == 1 and f"pid {os.getpid()}" in errors[0] and str(out) in errors[0]
        assert file_hashes(world) == before
    with folder_lock(out):  # released by the first holder
        pass


def test_ctrl_c_ends_with_one_line_and_status_130(world: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import centerprompt.runs.pretrain

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(centerprompt.runs.pretrain, "pretrain", interrupted)
    status = main(["pretrain", "--data", str(world / "data"), "--preset", "tiny", "--out", str(world / "runs/p")])
    err = capsys.readouterr().err.strip()
    assert status == 130 and "\n" not in err and "interrupted" in err and "--resume" in err


@pytest.mark.parametrize("flag", ["--splits", "--profiles", "--preprocess"])
def test_a_binary_file_where_text_belongs_is_named(world: Path, capsys: pytest.CaptureFixture, flag: str) -> None:
    blob = world / "blob.json"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    if flag == "--profiles":
        args = ["synth", "--out", str(world / "new"), "--centers", "NEW", "--profiles", str(blob)]
    else:
        args = ["evaluate", "--data", str(world / "data"), "--base", str(world / "runs/b/model.safetensors"), flag,
                str(blob), "--out", str(world / "eval.json")]  # fmt: skip
    status, errors = run_cli(capsys, *args)
    assert status == 2 and len(errors) == 1 and f"{blob}: not a text file" in errors[0]


def test_weights_with_nan_are_refused_on_save_and_on_load(world: Path, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file, save_file

    from centerprompt.artifacts import save_model

    base = world / "runs/b/model.safetensors"
    model = resolve_base(base).build()
    with torch.no_grad():
        model.out.conv.conv.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hold NaN or infinite values"):
        save_model(model, world / "nan.safetensors")
    assert not (world / "nan.safetensors").exists()
    # A file written by another tool (no content hash): refused when read, naming it.
    tensors = load_file(str(base))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, str(world / "inf.safetensors"))
    ct, pet = world / "data/imagesTr/MDA-001__CT.nii.gz", world / "data/imagesTr/MDA-001__PT.nii.gz"
    status, errors = run_cli(capsys, "predict", "--base", str(world / "inf.safetensors"), "--ct", str(ct), "--pet",
                             str(pet), "--out", str(world / "p.nii.gz"))  # fmt: skip
    assert status == 2 and len(errors) == 1 and "inf.safetensors" in errors[0] and "NaN or infinite" in errors[0]
    assert not (world / "p.nii.gz").exists()


@pytest.mark.parametrize(("field", "value"), [("suv_max", float("nan")), ("spacing", "abc"), ("ct_window", [0, None])])
def test_preprocessing_fields_must_be_finite_numbers(field: str, value: object) -> None:
    from centerprompt.data.transforms import PreprocessConfig

    with pytest.raises(ValueError, match=f"preprocessing field {field} must be finite numbers"):
        PreprocessConfig.from_dict({field: value})


@pytest.mark.parametrize("name", ["-x", "_x", "BASE", "Auto", "Oracle"])
def test_center_names_that_read_as_options_or_modes_are_refused(name: str) -> None:
    from centerprompt.bank.storage import validate_center

    with pytest.raises(ValueError, match=f"center name {name!r}"):
        validate_center(name)
    assert validate_center("USZ") == "USZ" and validate_center("site_1") == "site_1"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_header_larger_than_its_file_is_named_not_a_memory_error(world: Path, capsys: pytest.CaptureFixture,
                                                                   suffix: str) -> None:  # fmt: skip
    """A header declaring 10000^3 voxels over a few kB: the sizes in one line, before any voxel is read."""
    import gzip
    import io

    import nibabel as nib

    data = world / "data"
    pet = data / "imagesTr" / f"MDA-001__PT{suffix}"
    real = nib.load(data / "imagesTr" / "MDA-001__PT.nii.gz")
    header = real.header.copy()
    header.set_data_shape((10000, 10000, 10000))
    raw = io.BytesIO()
    header.write_to(raw)
    blob = raw.getvalue().ljust(int(header.get_data_offset()), b"\0") + np.asanyarray(real.dataobj).tobytes()
    (data / "imagesTr" / "MDA-001__PT.nii.gz").unlink()
    pet.write_bytes(gzip.compress(blob) if suffix == ".nii.gz" else blob)
    before = file_hashes(data)
    status, errors = run_cli(capsys, "predict", "--base", str(world / "runs/b/model.safetensors"), "--ct",
                             str(data / "imagesTr/MDA-001__CT.nii.gz"), "--pet", str(pet), "--out",
                             str(world / "p.nii.gz"))  # fmt: skip
    assert status == 2 and len(errors) == 1
    assert str(pet) in errors[0] and "declares 10000x10000x10000 voxels" in errors[0] and "MemoryError" not in errors[0]
    assert not (world / "p.nii.gz").exists() and file_hashes(data) == before


def test_a_symbolic_link_loop_or_a_dangling_link_is_named(world: Path, capsys: pytest.CaptureFixture) -> None:
    """Not "No such file" (check-data) or a RuntimeError traceback (predict): what the link is."""
    images = world / "data" / "imagesTr"
    loop, dangling = images / "MDA-001__PT.nii.gz", images / "MDA-002__PT.nii.gz"
    loop.unlink()
    loop.symlink_to(loop.name)
    dangling.unlink()
    dangling.symlink_to("gone.nii.gz")
    assert main(["check-data", str(world / "data")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(str(loop) in line and "symbolic link loop" in line for line in out)
    assert any(str(dangling) in line and "symbolic link to a missing file (gone.nii.gz)" in line for line in out)
    status, errors = run_cli(capsys, "predict", "--base", str(world / "runs/b/model.safetensors"), "--ct",
                             str(images / "MDA-001__CT.nii.gz"), "--pet", str(loop), "--out", str(world / "p.nii.gz"))  # fmt: skip
    assert status == 2 and len(errors) == 1 and f"{loop} (given as --pet): is a symbolic link loop" in errors[0]
    assert not (world / "p.nii.gz").exists()



def test_a_wrong_model_config_is_named_not_the_checkpoint(world: Path, capsys: pytest.CaptureFixture) -> None:
    """The arguments the user gave are named as the suspect; no advice to give --model-config again."""
    config = world / "model.json"
    config.write_text(json.dumps({"feature_size": 8}))
    status, errors = run_cli(capsys, "predict", "--base", str(world / "runs/b/model.safetensors"), "--model-config",
                             str(config), "--ct", str(world / "data/imagesTr/MDA-001__CT.nii.gz"), "--pet",
                             str(world / "data/imagesTr/MDA-001__PT.nii.gz"), "--out", str(world / "p.nii.gz"))  # fmt: skip
    assert status == 2 and len(errors) == 1
    assert "does not fit the network --model-config describes (feature_size=8)" in errors[0]
    assert "give --model-config" not in errors[0] and not (world / "p.nii.gz").exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["adapt", "predict"])
def test_an_out_where_nothing_can_be_created_is_refused_before_work(world: Path, capsys: pytest.CaptureFixture,
                                                                    command: str) -> None:  # fmt: skip
    """/proc passes every permission test, even for root, yet holds no new file: found by trying, up front."""
    base, data = str(world / "runs/b/model.safetensors"), world / "data"
    args = (["adapt", "--data", str(data), "--center", "MDA", "--shots", "1", "--base", base, "--out", "/proc/x"]
            if command == "adapt" else
            ["predict", "--base", base, "--ct", str(data / "imagesTr/MDA-001__CT.nii.gz"), "--pet",
             str(data / "imagesTr/MDA-001__PT.nii.gz"), "--out", "/proc/x/p.nii.gz"])  # fmt: skip
    before = file_hashes(world)
    status, errors = run_cli(capsys, *args)
    assert status == 2 and len(errors) == 1 and "cannot be written: nothing can be created in /proc" in errors[0]
    assert file_hashes(world) == before
