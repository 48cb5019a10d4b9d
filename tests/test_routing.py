"""Routing by acquisition fingerprint: features from files, per-center keys, calibrated abstention, storage."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from safetensors import safe_open
from test_bank import _adapter, _base

from centerprompt.bank import (
    FALLBACK,
    FEATURES,
    KEY_FORMAT,
    BankModel,
    PromptBank,
    RoutingKey,
    acquisition_features,
    false_fallback_threshold,
    route_features,
)
from centerprompt.bank.evaluation import abstention_auc
from centerprompt.bank.routing import Route

F = {name: i for i, name in enumerate(FEATURES)}


def _scan(folder: Path, name: str, ct_spacing: tuple[float, float, float], pet_spacing: tuple[float, float, float],
          noise: float, rng: np.random.Generator, hu_offset: float = 0.0,
          suv: float = 1.0) -> tuple[Path, Path]:  # fmt: skip
    """A box of soft tissue (40 HU) in air, CT noise ``noise`` HU; PET uptake ``suv`` in the box, 10 % noise."""
    ct = np.full((48, 48, 20), -1000.0 + hu_offset)
    ct[12:36, 12:36] = 40.0 + hu_offset
    ct += rng.normal(0, noise, ct.shape)
    pet = np.abs(rng.normal(0, 0.01, (24, 24, 12)))
    pet[6:18, 6:18, 2:10] = suv * (1 + 0.1 * rng.standard_normal((12, 12, 8)))
    paths = folder / f"{name}__CT.nii.gz", folder / f"{name}__PT.nii.gz"
    for data, spacing, path in ((ct, ct_spacing, paths[0]), (pet, pet_spacing, paths[1])):
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return paths


# Three toy centers that differ as scanners do: grid, CT noise, HU calibration, SUV calibration.
CENTERS = {
    "A": {"ct_spacing": (0.8, 0.8, 2.5), "pet_spacing": (4.0, 4.0, 3.0), "noise": 10.0, "hu_offset": 0.0},
    "B": {"ct_spacing": (1.0, 1.0, 3.0), "pet_spacing": (5.0, 5.0, 3.0), "noise": 30.0, "hu_offset": 20.0},
    "C": {"ct_spacing": (0.8, 0.8, 2.5), "pet_spacing": (4.0, 4.0, 3.0), "noise": 20.0, "hu_offset": -30.0,
          "suv": 1.6},  # withheld: A's grid, but other noise, HU and SUV calibration
}  # fmt: skip


def _fingerprints(folder: Path, center: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([acquisition_features(*_scan(folder, f"{center}{seed}-{i}", rng=rng, **CENTERS[center]))
                     for i in range(n)])  # fmt: skip


def test_fingerprint_recovers_spacing_extent_and_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    quiet = acquisition_features(*_scan(tmp_path, "quiet", (0.8, 0.9, 2.5), (4.0, 4.0, 3.0), 10.0, rng))
    noisy = acquisition_features(*_scan(tmp_path, "noisy", (0.8, 0.9, 2.5), (4.0, 4.0, 3.0), 30.0, rng))
    assert quiet.shape == (len(FEATURES),)
    assert np.exp(quiet[F["log_ct_spacing_xy"]]) == pytest.approx(0.85)
    assert np.exp(quiet[F["log_ct_slice"]]) == pytest.approx(2.5)
    assert np.exp(quiet[F["log_pet_spacing_xy"]]) == pytest.approx(4.0)
    assert np.exp(quiet[F["log_pet_slice"]]) == pytest.approx(3.0)
    assert np.exp(quiet[F["log_ct_extent_z"]]) == pytest.approx(20 * 2.5)
    assert np.exp(quiet[F["log_pet_extent_xy"]]) == pytest.approx(24 * 4.0)
    assert quiet[F["ct_air_hu"]] == pytest.approx(-1000, abs=2) and quiet[F["ct_soft_hu"]] == pytest.approx(40, abs=2)
    assert np.exp(quiet[F["log_ct_soft_noise"]]) == pytest.approx(10, rel=0.1)
    assert np.exp(noisy[F["log_ct_soft_noise"]]) == pytest.approx(30, rel=0.1)
    for name in ("log_ct_air_noise", "log_ct_soft_noise", "log_ct_soft_diff_noise"):
        assert noisy[F[name]] > quiet[F[name]] + np.log(2), name
    assert np.exp(quiet[F["log_pet_background"]]) == pytest.approx(1.0, rel=0.05)


def test_two_centers_route_home_and_a_withheld_one_falls_back(tmp_path: Path) -> None:
    keys = {c: RoutingKey.from_features(_fingerprints(tmp_path, c, 6, seed=i)) for i, c in enumerate("AB")}
    for center in ("A", "B"):
        for x in _fingerprints(tmp_path, center, 3, seed=10):
            route = route_features(x, keys)
            assert route.center == center and route.reason is None, route
            assert route.distance <= route.threshold < route.runner_up_distance
    for x in _fingerprints(tmp_path, "C", 3, seed=11):  # A's grid: only intensities tell it apart
        route = route_features(x, keys)
        assert route.fallback and route.nearest == "A" and route.distance > route.threshold
        assert route.reason and "A" in route.reason


def test_threshold_calibration_hits_the_false_fallback_rate() -> None:
    """Keys from 40 Gaussian cases (5 draws); of 800 new scans of each key's center the target share
    falls back, on average over the draws (a single key is itself a sample and misses by more)."""
    f, rates, fell_back = len(FEATURES), (0.05, 0.2), []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        sd = rng.uniform(0.5, 2.0, f)
        key = RoutingKey.from_features(rng.normal(0, sd, (40, f)), floors=np.full(f, 1e-3))
        d = np.array([key.distance(x) for x in rng.normal(0, sd, (800, f))])
        fell_back.append([np.mean(d > false_fallback_threshold(rate)) for rate in rates])
        x = rng.normal(0, sd)
        assert route_features(x, {"A": key}).fallback == (key.distance(x) > false_fallback_threshold(0.05))
    for rate, observed in zip(rates, np.mean(fell_back, axis=0)):
        assert abs(observed - rate) < 0.3 * rate, (rate, observed)


def test_unseen_spacing_falls_back_with_the_reason_and_one_center_abstains(tmp_path: Path) -> None:
    key = RoutingKey.from_features(_fingerprints(tmp_path, "A", 4, seed=0))
    (home,) = _fingerprints(tmp_path, "A", 1, seed=5)
    assert route_features(home, {"A": key}).center == "A"  # a one-center bank routes...
    thick = home.copy()
    thick[F["log_ct_slice"]] = np.log(5.0)  # ...and refuses a 5 mm CT it has never seen
    route = route_features(thick, {"A": key})
    assert route.fallback and route.runner_up is None
    assert "log_ct_slice" in route.reason and "outside every banked center's range" in route.reason
    assert route.to_dict()["reason"] == route.reason
    broken = home.copy()
    broken[F["ct_soft_hu"]] = np.nan  # NaN voxels: a NaN distance must not count as near
    route = route_features(broken, {"A": key})
    assert route.fallback and "ct_soft_hu" in route.reason


def test_bank_stores_summary_statistics_only(tmp_path: Path) -> None:
    """A key file holds a mean, a variance and a scale (F numbers each at most), no case names."""
    base = _base(tmp_path / "model.safetensors")
    folder = tmp_path / "scans"
    folder.mkdir()
    key = RoutingKey.from_features(_fingerprints(folder, "A", 5, seed=0))
    bank = PromptBank(tmp_path / "bank")
    bank.add("A", _adapter(base, tmp_path / "a.safetensors"), key=key)
    key_file = tmp_path / "bank" / "A.key.safetensors"
    with safe_open(str(key_file), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        assert f.metadata()["format"] == KEY_FORMAT
    assert shapes == {"mean": (len(FEATURES),), "var": (len(FEATURES),), "scale": (1,)}
    assert key_file.stat().st_size < 2048
    written = key_file.read_bytes() + (tmp_path / "bank" / "bank.json").read_bytes()
    assert b"A0-" not in written and b"scans" not in written  # no case names, no paths
    row = json.loads((tmp_path / "bank" / "bank.json").read_text())["entries"][0]["routing"]
    assert set(row) == {"n_cases", "features", "scale", "false_fallback", "threshold", "loo_fallback_rate"}

    model = BankModel.from_files(base, tmp_path / "bank")  # reloaded key routes as the one built here
    ct, pet = _scan(folder, "new", rng=np.random.default_rng(9), **CENTERS["A"])
    route = model.route(ct, pet)
    assert route.center == "A" and route.distance == pytest.approx(route_features(acquisition_features(ct, pet),
                                                                                  {"A": key}).distance)  # fmt: skip


def test_old_bank_format_gives_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "bank.json").write_text(json.dumps({"format": "centerprompt-bank/1", "entries": []}))
    with pytest.raises(ValueError, match="centerprompt-bank/1.*rebuild it with `centerprompt bank add`"):
        PromptBank(tmp_path / "bank").entries()


def test_abstention_auc_counts_by_hand() -> None:
    def route(d: float) -> Route:
        return Route(center=FALLBACK, nearest="A", distance=d, runner_up=None, runner_up_distance=None, threshold=1.0)

    truth = ["A", "A", "C", "C"]  # C is not in the bank: its distances should be the larger ones
    assert abstention_auc(truth, [route(d) for d in (1, 2, 3, 4)], ["A"]) == 1.0
    assert abstention_auc(truth, [route(d) for d in (1, 3, 2, 3)], ["A"]) == pytest.approx(0.625)
    assert abstention_auc(["A"], [route(1)], ["A"]) is None


def test_leave_one_center_out_counts_claims_by_the_other_keys(tmp_path: Path) -> None:
    """Removing A leaves B, which must not claim A's scan; a one-key bank has nothing left to claim it;
    a twin of A's key does claim it, and the report counts that as wrong."""
    from centerprompt.bank.evaluation import leave_one_center_out

    fingerprints = {c: _fingerprints(tmp_path, c, 5, seed=i) for i, c in enumerate("AB")}
    keys = {c: RoutingKey.from_features(fingerprints[c][:4]) for c in "AB"}
    truth = ["A", "B"]
    loco = leave_one_center_out(truth, [fingerprints["A"][4], fingerprints["B"][4]], keys, 0.05)
    assert loco == {c: {"n": 1, "fallback": 1, "wrong_center": 0, "fallback_rate": 1.0} for c in "AB"}
    alone = leave_one_center_out(["A"], [fingerprints["A"][4]], {"A": keys["A"]}, 0.05)
    assert alone["A"]["fallback"] == 1  # nothing left to claim it
    claimed = leave_one_center_out(["A"], [fingerprints["A"][4]], {"A": keys["A"], "A2": keys["A"]}, 0.05)
    assert claimed["A"]["wrong_center"] == 1
