"""Paired bootstrap intervals of DSCagg differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from centerprompt.evaluate import aggregate, case_metrics
from centerprompt.study.intervals import add_intervals, paired_difference, pool_experiments, pooled_difference


def _case(case_id: str, rng: np.random.Generator, hit: float) -> dict:
    """A case whose prediction covers a share ``hit`` of a random lesion of each class."""
    label = np.zeros((12, 12, 12), dtype=np.int64)
    pred = np.zeros_like(label)
    for cls, z in ((1, 2), (2, 7)):
        size = int(rng.integers(2, 5))
        label[z : z + size, 2:8, 2:8] = cls
        kept = max(1, round(hit * size))
        pred[z : z + kept, 2:8, 2:8] = cls
    return {"case_id": case_id, "center": "X", **case_metrics(pred, label, distances=False)}


def _cases(hits: list[float], seed: int = 0) -> list[dict]:
    return [_case(f"X-{i:03d}", np.random.default_rng(seed + i), h) for i, h in enumerate(hits)]


def test_the_point_difference_is_the_difference_of_pooled_dscagg() -> None:
    a, b = _cases([0.5] * 10), _cases([1.0] * 10)
    result = paired_difference(a, b, resamples=200)
    expected = aggregate(b)["overall"]["dsc_agg"]["mean"] - aggregate(a)["overall"]["dsc_agg"]["mean"]
    assert math.isclose(result["difference"], expected, rel_tol=1e-12)
    assert result["ci"][0] <= result["difference"] <= result["ci"][1]


def test_a_model_equal_to_the_reference_has_a_zero_interval() -> None:
    a = _cases([0.3, 0.6, 1.0, 0.5])
    result = paired_difference(a, a, resamples=200)
    assert result["difference"] == 0.0 and result["ci"] == [0.0, 0.0]


def test_a_gain_on_every_case_excludes_zero_and_a_mixed_one_does_not() -> None:
    rng = np.random.default_rng(1)
    hits = list(rng.uniform(0.3, 0.6, 24))
    ref = _cases(hits)
    better = _cases([h + 0.3 for h in hits])
    mixed = _cases([h + (0.3 if i % 2 else -0.3) for i, h in enumerate(hits)])
    assert paired_difference(ref, better)["ci"][0] > 0
    lo, hi = paired_difference(ref, mixed)["ci"]
    assert lo < 0 < hi


def test_pairing_requires_the_same_cases() -> None:
    with pytest.raises(ValueError, match="same cases"):
        paired_difference(_cases([0.5, 0.5]), _cases([0.5]))


def test_pooling_averages_the_experiments_and_narrows_with_more_cases() -> None:
    ref1, new1 = _cases([0.4] * 8), _cases([0.8] * 8)
    ref2, new2 = _cases([0.5] * 8, seed=50), _cases([0.5] * 8, seed=50)
    pooled = pooled_difference([(ref1, new1), (ref2, new2)], resamples=300)
    single = paired_difference(ref1, new1, resamples=300)["difference"]
    assert math.isclose(pooled["difference"], single / 2, rel_tol=1e-9)
    assert pooled["n_experiments"] == 2 and pooled["n_cases"] == 16


def _results(ref: list[dict], rows: dict[str, list[dict]], old: list[dict]) -> dict:
    def row(cases: list[dict]) -> dict:
        return {"new_center": {"per_case": cases, **aggregate(cases)["overall"]},
                "old_centers": {"per_case": old, **aggregate(old)["overall"]},
                "trainable_params": 1, "trainable_fraction": 0.001}  # fmt: skip

    return {"strategies": {"none": row(ref), **{n: row(c) for n, c in rows.items()}}}


def test_rows_get_intervals_and_their_fraction_of_full_fine_tunings_gain() -> None:
    hits = list(np.random.default_rng(2).uniform(0.3, 0.5, 12))
    ref, old = _cases(hits), _cases([0.7] * 6, seed=99)
    results = _results(ref, {"full": _cases([h + 0.4 for h in hits]), "half": _cases([h + 0.2 for h in hits])}, old)
    add_intervals(results)
    full, half = results["strategies"]["full"], results["strategies"]["half"]
    assert full["fraction_of_full"] == pytest.approx(1.0)
    assert 0.3 < half["fraction_of_full"] < 0.7
    lo, hi = half["fraction_of_full_ci"]
    assert lo <= half["fraction_of_full"] <= hi
    assert half["old_change"] == 0.0  # both scored the same old cases the same way
    pooled = pool_experiments({"a": results, "b": results})
    assert pooled["strategies"]["half"]["gain"]["difference"] == pytest.approx(
        paired_difference(ref, results["strategies"]["half"]["new_center"]["per_case"])["difference"])


def test_no_fraction_of_full_when_full_fine_tuning_gains_nothing() -> None:
    hits = list(np.random.default_rng(3).uniform(0.3, 0.5, 8))
    ref, old = _cases(hits), _cases([0.7] * 4, seed=99)
    results = _results(ref, {"full": _cases(hits), "other": _cases([h + 0.2 for h in hits])}, old)
    add_intervals(results)
    assert "fraction_of_full" not in results["strategies"]["other"]  # a ratio to a zero gain is no figure
    assert "fraction_of_full" not in pool_experiments({"a": results})["strategies"]["other"]


def test_served_scores_the_row_only_where_a_scan_was_routed_to_it() -> None:
    from centerprompt.study.intervals import served_from_bank

    hits = [0.3, 0.4, 0.5, 0.6]
    ref, old = _cases(hits), _cases([0.5] * 3, seed=99)
    better, old_worse = _cases([h + 0.3 for h in hits]), _cases([0.2] * 3, seed=99)
    results = _results(ref, {"adapted": better}, old)
    results["strategies"]["adapted"]["old_centers"]["per_case"] = old_worse
    results["routing"] = {"new_center": {c["case_id"]: i < 2 for i, c in enumerate(ref)},  # two of four routed
                          "old_centers": {c["case_id"]: False for c in old}}  # no old scan routed
    served = served_from_bank(results, "adapted")
    by_hand = better[:2] + ref[2:]  # the adapted model's cases where routed, the base's elsewhere
    assert served["gain"] == pytest.approx(paired_difference(ref, by_hand)["difference"])
    assert 0 < served["gain"] < paired_difference(ref, better)["difference"]
    assert served["old_change"] == 0 and served["new_center_routed"] == 0.5 and served["old_centers_routed"] == 0
