"""predict's options a user of nnU-Net or TotalSegmentator expects: probabilities on the CT grid,
mirroring test-time augmentation, a device choice, -i/-o, and the routing decisions on file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from centerprompt.cli import main
from centerprompt.evaluate import MIRROR_AXES, mirrored_predict, sliding_window_predict
from tiny import tiny_model


@pytest.fixture(scope="module")
def base(two_centers: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--data", str(two_centers), "--exclude-center", "MDA", "--out", str(run), "--preset",
                 "tiny", "--epochs", "1"]) == 0  # fmt: skip
    return run / "model.safetensors"


def test_tta_is_the_mean_of_the_mirrored_passes() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    image = torch.randn(1, 2, 32, 32, 32)
    by_hand = torch.stack([
        sliding_window_predict(model, image.flip([a + 2 for a in axes]), 32).flip([a + 2 for a in axes])
        for axes in MIRROR_AXES
    ]).mean(0)  # fmt: skip
    assert len(MIRROR_AXES) == 8 and len(set(MIRROR_AXES)) == 8
    tta = mirrored_predict(model, image, 32)
    assert torch.allclose(tta, by_hand, atol=1e-6)
    assert not torch.allclose(tta, sliding_window_predict(model, image, 32), atol=1e-4)  # mirroring changes something


def test_probabilities_sum_to_one_on_the_ct_grid(two_centers: Path, base: Path, tmp_path: Path) -> None:
    ct = two_centers / "imagesTr" / "MDA-001__CT.nii.gz"
    pet = ct.with_name("MDA-001__PT.nii.gz")
    out = tmp_path / "MDA-001.nii.gz"
    assert main(["predict", "--base", str(base), "--ct", str(ct), "--pet", str(pet), "-o", str(out),
                 "--save-probabilities", "--tta", "--device", "cpu"]) == 0  # fmt: skip
    probs, reference = nib.load(tmp_path / "MDA-001_probabilities.nii.gz"), nib.load(ct)
    data = np.asarray(probs.dataobj)
    assert data.shape == (*reference.shape, 3) and data.dtype == np.float32
    assert np.allclose(probs.affine, reference.affine)
    assert np.allclose(data.sum(-1), 1.0, atol=1e-5) and data.min() >= 0.0
    labels = np.asarray(nib.load(out).dataobj)
    sure = data.max(-1) > 0.9  # the same prediction where it is sure (near ties interpolate to either side)
    assert sure.mean() > 0.5 and (data.argmax(-1)[sure] == labels[sure]).mean() > 0.99
    # Written again only with --overwrite, the probabilities included.
    assert main(["predict", "--base", str(base), "--ct", str(ct), "--pet", str(pet), "-o", str(out),
                 "--save-probabilities"]) == 2  # fmt: skip


def test_a_device_this_machine_lacks_is_one_line(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "in").mkdir()
    args = ["predict", "--base", str(base), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--device"]
    assert main([*args, "cuda"]) == 2
    assert "--device cuda: this machine has 0 CUDA device(s)" in capsys.readouterr().err
    assert main([*args, "gpu0"]) == 2
    assert "not a device name" in capsys.readouterr().err


def test_routing_decisions_are_written_beside_the_predictions(two_centers: Path, base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "chum"
    assert main(["adapt", "--data", str(two_centers), "--center", "CHUM", "--base", str(base), "--strategy", "deep",
                 "--num-prompts", "2", "--shots", "2", "--epochs", "1", "--out", str(adapter)]) == 0  # fmt: skip
    bank = tmp_path / "bank"
    assert main(["bank", "add", "--bank", str(bank), "--center", "CHUM", "--adapter", str(adapter / "adapter.safetensors"),
                 "--data", str(two_centers), "--base", str(base)]) == 0  # fmt: skip
    out = tmp_path / "pred"
    assert main(["predict", "--base", str(base), "--bank", str(bank), "-i", str(two_centers), "-o", str(out)]) == 0
    routing = json.loads((out / "routing.json").read_text())
    assert routing["bank"] == str(bank) and routing["center"] == "auto"
    assert len(routing["scans"]) == 12 and {s["center"] for s in routing["scans"]} <= {"CHUM", "base"}
    fallen = [s for s in routing["scans"] if s["center"] == "base"]
    assert fallen and all(s["route"]["reason"] and s["route"]["threshold"] > 0 for s in fallen)  # MDA's scanner
