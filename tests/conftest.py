"""Tiny HECKTOR-like folders written on the fly.

Each case is a phantom defined in world coordinates (mm): a body cylinder, a primary tumour
(GTVp, label 1) and a node (GTVn, label 2). CT is 40x40x30 voxels at 2.5x2.5x3 mm in LPS-like
orientation (flipped x and y axes, as DICOM converters write); PET is on a coarser 4 mm RAS grid
with another origin and a larger extent, like a real PET/CT pair. ``two_centers`` is the synthetic
dataset (``centerprompt.data.synthetic``) that the end-to-end command tests share.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

CT_SHAPE = (40, 40, 30)
CT_AFFINE = np.array(
    [[-2.5, 0, 0, 48.75], [0, -2.5, 0, 48.75], [0, 0, 3.0, -43.5], [0, 0, 0, 1]], dtype=float
)
PET_SHAPE = (28, 28, 26)
PET_AFFINE = np.array([[4.0, 0, 0, -55.0], [0, 4.0, 0, -52.0], [0, 0, 4.0, -50.0], [0, 0, 0, 1]])
GTVP_CENTER, GTVP_RADIUS = np.array([6.0, 10.0, 5.0]), 15.0
GTVN_CENTER, GTVN_RADIUS = np.array([-20.0, -8.0, -12.0]), 10.0
SUV_BODY, SUV_GTVP, SUV_GTVN = 1.0, 12.0, 5.0


def world_grid(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (…, 3) of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return nib.affines.apply_affine(affine, ijk)


def phantom(world: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of body, GTVp and GTVn at the given world points."""
    body = (world[..., 0] / 45.0) ** 2 + (world[..., 1] / 40.0) ** 2 < 1.0
    gtvp = np.linalg.norm(world - GTVP_CENTER, axis=-1) < GTVP_RADIUS
    gtvn = np.linalg.norm(world - GTVN_CENTER, axis=-1) < GTVN_RADIUS
    return {"body": body, "gtvp": gtvp, "gtvn": gtvn}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def phantom_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT in HU int16, PET in SUV float32, label uint8) of the phantom."""
    m = phantom(world_grid(CT_SHAPE, CT_AFFINE))
    ct = np.where(m["body"], 40, -1000).astype(np.int16)
    ct[m["gtvp"]] = 60
    label = np.zeros(CT_SHAPE, np.uint8)
    label[m["gtvp"]] = 1
    label[m["gtvn"]] = 2
    p = phantom(world_grid(PET_SHAPE, PET_AFFINE))
    pet = np.where(p["body"], SUV_BODY, 0.0).astype(np.float32)
    pet[p["gtvn"]] = SUV_GTVN
    pet[p["gtvp"]] = SUV_GTVP
    return ct, pet, label


def write_case(root: Path, case_id: str, *, label_sep: str | None = "-") -> dict[str, Path]:
    """Write one case; ``label_sep`` "-" or "_" picks the label naming style, None writes no label."""
    ct, pet, label = phantom_arrays()
    paths = {
        "ct": write_nifti(root / "imagesTr" / f"{case_id}__CT.nii.gz", ct, CT_AFFINE),
        "pet": write_nifti(root / "imagesTr" / f"{case_id}__PT.nii.gz", pet, PET_AFFINE),
    }
    if label_sep is not None:
        name = case_id.replace("-", label_sep)
        paths["label"] = write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, CT_AFFINE)
    return paths


@pytest.fixture
def hecktor_dir(tmp_path: Path) -> Path:
    """2 centers x 3 labelled cases; CHUM labels named CHUM-00x, MDA labels named MDA_00x."""
    root = tmp_path / "hecktor"
    for i in range(1, 4):
        write_case(root, f"CHUM-00{i}", label_sep="-")
        write_case(root, f"MDA-00{i}", label_sep="_")
    return root


@pytest.fixture(scope="session")
def two_centers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic CHUM and MDA, six cases each (seed 1), generated once for the end-to-end command tests
    (test_cli.py, test_byo_checkpoint.py); read-only for them (commands add splits.json with seed 0)."""
    from centerprompt.data.synthetic.writer import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, centers=["CHUM", "MDA"], cases_per_center=6, seed=1, progress=False)
    return out


# ----------------------------------------------------------------------------- hostile-input tests


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root``: what a refused command must leave as it was."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    """Exit status of one command and its error lines on stderr."""
    from centerprompt.cli import main

    status = main(list(args))
    return status, [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A data folder with two labelled cases and a tiny base run folder (config and checkpoints beside the model)."""
    import torch
    from tiny import TINY, tiny_model

    from centerprompt.artifacts import save_model
    from centerprompt.training.presets import PRESETS

    for case in ("MDA-001", "MDA-002"):
        write_case(tmp_path / "data", case)
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    model = tiny_model(**{**preset.model, **{k: TINY[k] for k in ("in_channels", "out_channels")}})
    run = tmp_path / "runs" / "b"
    save_model(model, run / "model.safetensors", extra={"preprocess": preset.preprocess.to_dict(), "preset": "tiny"})
    for name in ("config.json", "summary.json", "best.pt", "last.pt"):
        (run / name).write_text("{}")
    return tmp_path
