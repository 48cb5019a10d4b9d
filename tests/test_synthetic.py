"""Synthetic multi-center generator: layout, determinism, world-space agreement, center profiles, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from centerprompt.data.synthetic.scanner import case_rng, make_case
from centerprompt.data.synthetic.writer import generate_dataset
from centerprompt.data.synthetic.anatomy import sample_patient
from centerprompt.data.synthetic.profiles import DEFAULT_PROFILES, CenterProfile, load_profiles, profiles_markdown_table

CENTERS = ["CHUM", "MDA"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return generate_dataset(root, centers=CENTERS, cases_per_center=2, seed=3, progress=False)


def _case_ids(root: Path) -> list[str]:
    return json.loads((root / "dataset.json").read_text())["cases"]


def _world_centroid(mask: np.ndarray, affine: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    vox = np.argwhere(mask)
    w = np.ones(len(vox)) if weights is None else weights[mask]
    return (affine @ np.r_[(vox * w[:, None]).sum(0) / w.sum(), 1.0])[:3]


def test_layout_names_and_metadata(dataset: Path) -> None:
    ids = [f"{c}-{i:03d}" for c in CENTERS for i in (1, 2)]
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == sorted(
        f"{i}__{m}.nii.gz" for i in ids for m in ("CT", "PT"))
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == sorted(f"{i}.nii.gz" for i in ids)
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["seed"] == 3 and meta["num_training"] == 4 and meta["cases"] == ids
    assert meta["num_cases"] == {"CHUM": 2, "MDA": 2} and meta["labels"] == {"background": 0, "GTVp": 1, "GTVn": 2}
    profiles = json.loads((dataset / "profiles.json").read_text())
    assert CenterProfile(**profiles["MDA"]) == DEFAULT_PROFILES["MDA"]


def test_volumes_dtypes_grids_and_labels(dataset: Path) -> None:
    for case_id in _case_ids(dataset):
        ct = nib.load(dataset / "imagesTr" / f"{case_id}__CT.nii.gz")
        pet = nib.load(dataset / "imagesTr" / f"{case_id}__PT.nii.gz")
        lab = nib.load(dataset / "labelsTr" / f"{case_id}.nii.gz")
        assert ct.get_data_dtype() == np.int16 and pet.get_data_dtype() == np.float32
        assert lab.get_data_dtype() == np.uint8
        assert lab.shape == ct.shape and np.allclose(lab.affine, ct.affine)
        assert pet.shape != ct.shape and not np.allclose(pet.affine, ct.affine)  # own grid, as in real data
        ct_data, pet_data, lab_data = (np.asarray(img.dataobj) for img in (ct, pet, lab))
        assert set(np.unique(lab_data)) <= {0, 1, 2} and (lab_data == 1).any()
        assert np.isfinite(pet_data).all() and pet_data.min() >= 0
        assert -1024 <= ct_data.min() and ct_data.max() <= 3071
        body = ct_data > -300
        assert 0.1 < body.mean() < 0.9 and (ct_data > 700).any()  # a body with bone in it
        brain_or_tumour = pet_data > 4
        assert brain_or_tumour.any() and np.median(pet_data[pet_data > 0.3]) < 2  # background SUV about 1


def test_pet_hot_spot_matches_label_in_world_space(dataset: Path) -> None:
    for case_id in _case_ids(dataset):
        profile = DEFAULT_PROFILES[case_id.split("-")[0]]
        ct = nib.load(dataset / "imagesTr" / f"{case_id}__CT.nii.gz")
        pet = nib.load(dataset / "imagesTr" / f"{case_id}__PT.nii.gz")
        lab = np.asarray(nib.load(dataset / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        centre = _world_centroid(lab == 1, ct.affine)
        r_eq = ((lab == 1).sum() * np.prod(ct.header.get_zooms()) * 3 / (4 * np.pi)) ** (1 / 3)
        values = np.asarray(pet.dataobj)
        idx = np.indices(values.shape).reshape(3, -1).T
        world = idx @ pet.affine[:3, :3].T + pet.affine[:3, 3]
        near = (np.linalg.norm(world - centre, axis=1) < r_eq + 8).reshape(values.shape)
        hot = near & (values >= 0.5 * values[near].max())
        hot_centre = _world_centroid(hot, pet.affine, values)
        assert np.linalg.norm(hot_centre - centre) < profile.misregistration_mm + 3.0
        assert values[hot].mean() > 4 * np.median(values[values > 0.3])


def test_same_seed_same_bytes_other_seed_differs_and_reruns_skip(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", centers=["HMR"], cases_per_center=1, seed=5, progress=False)
    b = generate_dataset(tmp_path / "b", centers=["HMR"], cases_per_center=1, seed=5, progress=False)
    files = ["imagesTr/HMR-001__CT.nii.gz", "imagesTr/HMR-001__PT.nii.gz", "labelsTr/HMR-001.nii.gz", "dataset.json"]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    stamp = (a / files[0]).stat().st_mtime_ns
    generate_dataset(a, centers=["HMR"], cases_per_center=1, seed=5, progress=False)
    assert (a / files[0]).stat().st_mtime_ns == stamp  # finished case kept
    generate_dataset(a, centers=["HMR"], cases_per_center=1, seed=6, progress=False)
    assert all((a / f).read_bytes() != (b / f).read_bytes() for f in files)
    assert not [p for p in a.rglob(".*") if p.is_file()]  # no temp files left behind


def test_cases_written_by_several_processes_equal_those_written_by_one(tmp_path: Path) -> None:
    kw = dict(centers=["HMR", "MDA"], cases_per_center=1, seed=3, progress=False)
    one, two = generate_dataset(tmp_path / "one", workers=1, **kw), generate_dataset(tmp_path / "two", workers=2, **kw)
    files = sorted(p.relative_to(one) for p in one.rglob("*.nii.gz"))
    assert len(files) == 6 and files == sorted(p.relative_to(two) for p in two.rglob("*.nii.gz"))
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_case_depends_only_on_seed_center_index() -> None:
    one, again = make_case(DEFAULT_PROFILES["HMR"], 0, 2), make_case(DEFAULT_PROFILES["HMR"], 0, 2)
    assert np.array_equal(one.ct, again.ct) and np.array_equal(one.pet, again.pet)
    assert np.array_equal(one.label, again.label)
    other = make_case(DEFAULT_PROFILES["HMR"], 0, 3)
    assert one.ct.shape == other.ct.shape and not np.array_equal(one.ct, other.ct)


def test_contouring_style_changes_only_the_label() -> None:
    base = DEFAULT_PROFILES["HMR"]
    tight = make_case(dataclasses.replace(base, label_margin_mm=-1.5, node_min_suv=0.0), 1, 1)
    wide = make_case(dataclasses.replace(base, label_margin_mm=2.5, node_min_suv=0.0), 1, 1)
    none = make_case(dataclasses.replace(base, node_min_suv=30.0), 1, 1)
    assert np.array_equal(tight.ct, wide.ct) and np.array_equal(tight.pet, wide.pet)
    assert (wide.label == 1).sum() > 1.3 * (tight.label == 1).sum()
    assert not (none.label == 2).any() and (none.label == 1).any()


def test_phantom_statistics_over_many_patients() -> None:
    patients = [sample_patient(case_rng(0, "ANY", i)) for i in range(80)]
    counts = np.array([len(p.nodes) for p in patients])
    assert counts.max() <= 4 and 0.08 < (counts == 0).mean() < 0.4
    radii = [p.gtvp.shape.lobes[0][1] for p in patients]
    assert 6 <= min(radii) and max(radii) <= 25
    suv = [n.suv for p in patients for n in p.nodes]
    assert min(suv) < 3 < max(suv)  # some faint nodes, some avid ones


def test_centers_differ_as_their_profiles_say(dataset: Path) -> None:
    for center in CENTERS:
        p = DEFAULT_PROFILES[center]
        ct = nib.load(dataset / "imagesTr" / f"{center}-001__CT.nii.gz")
        pet = nib.load(dataset / "imagesTr" / f"{center}-001__PT.nii.gz")
        assert np.allclose(ct.header.get_zooms(), (p.ct_spacing_xy_mm, p.ct_spacing_xy_mm, p.ct_slice_mm))
        assert np.allclose(pet.header.get_zooms(), (p.pet_spacing_xy_mm, p.pet_spacing_xy_mm, p.pet_slice_mm))
    profiles = list(DEFAULT_PROFILES.values())
    assert set(DEFAULT_PROFILES) == {"CHUM", "CHUP", "CHUS", "CHUV", "HGJ", "HMR", "MDA"}
    assert len({(p.ct_spacing_xy_mm, p.ct_slice_mm) for p in profiles}) == 7
    assert len({p.pet_fwhm_mm for p in profiles}) >= 6 and len({p.label_margin_mm for p in profiles}) >= 6
    assert {p.ct_contrast for p in profiles} == {True, False} and {p.ct_kernel for p in profiles} == {"smooth", "sharp"}


@pytest.mark.parametrize(("key", "value"), [("ct_slice_mm", 9.0), ("pet_fwhm_mm", float("nan")), ("ct_kernel", "bone"),
                                            ("ct_z_range_mm", (100.0, -100.0)), ("suv_calibration", "1"),
                                            ("name", "CH-UM")])
def test_profile_validation_names_the_field(key: str, value: object) -> None:
    with pytest.raises(ValueError, match="name" if key == "name" else key):
        dataclasses.replace(DEFAULT_PROFILES["CHUM"], **{key: value})


def test_load_profiles_json_yaml_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "new.json"
    full = DEFAULT_PROFILES["CHUS"].to_dict() | {"pet_fwhm_mm": 9.0}
    full.pop("name")
    path.write_text(json.dumps({"NEW": {"base": "MDA", "ct_contrast": False}, "FULL": full}))
    loaded = load_profiles(path)
    assert loaded["NEW"] == dataclasses.replace(DEFAULT_PROFILES["MDA"], name="NEW", ct_contrast=False)
    assert loaded["FULL"].pet_fwhm_mm == 9.0 and loaded["FULL"].ct_z_range_mm == DEFAULT_PROFILES["CHUS"].ct_z_range_mm
    yaml_path = tmp_path / "new.yaml"
    yaml_path.write_text("NEW:\n  base: CHUM\n  suv_calibration: 1.1\n")
    assert load_profiles(yaml_path)["NEW"].suv_calibration == 1.1
    for bad, match in [({"X": {"base": "CHUM", "pet_fwhm": 5}}, "new.json.*'pet_fwhm'"),
                       ({"X": {"pet_fwhm_mm": 5}}, "missing"), ({"X": {"base": "CHUM", "pet_noise": 3}}, "pet_noise"),
                       ({"X": {"base": "ZZZ"}}, "ZZZ")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_profiles(path)


def test_markdown_table_lists_every_center_and_parameter() -> None:
    table = profiles_markdown_table(DEFAULT_PROFILES)
    assert all(name in table.splitlines()[0] for name in DEFAULT_PROFILES)
    assert all(f"`{f.name}`" in table for f in dataclasses.fields(CenterProfile) if f.name != "name")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="XYZ"):
        generate_dataset(tmp_path, centers=["XYZ"], progress=False)
    with pytest.raises(ValueError, match="cases_per_center"):
        generate_dataset(tmp_path, cases_per_center=0, progress=False)


def test_cli_synth_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from centerprompt.cli import main

    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--cases-per-center", "1", "--centers", "CHUM,MDA"]) == 0
    assert len(list((out / "labelsTr").glob("*.nii.gz"))) == 2
    assert "2 cases" in capsys.readouterr().out
    # A new center with more patients than the others (its test set needs them), from the factorial benchmark's file.
    factorial = Path(__file__).resolve().parents[1] / "benchmarks" / "factorial_centers.yaml"
    assert main(["synth", "--out", str(out), "--cases-per-center", "1", "--centers", "CHUM,POL",
                 "--profiles", str(factorial), "--cases", "POL=2"]) == 0  # fmt: skip
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_cases"] == {"CHUM": 1, "POL": 2} and (out / "labelsTr" / "POL-002.nii.gz").exists()
    assert main(["synth", "--out", str(out), "--cases", "MDA=2", "--centers", "CHUM"]) == 2  # not generated
    assert main(["synth", "--out", str(out), "--cases", "CHUM:2"]) == 2
    assert "NAME=N" in capsys.readouterr().err
    profile_file = tmp_path / "p.yaml"
    profile_file.write_text("NEW:\n  base: CHUM\n  bogus: 1\n")
    assert main(["synth", "--out", str(out), "--centers", "NEW", "--profiles", str(profile_file)]) == 2
    assert "bogus" in capsys.readouterr().err
