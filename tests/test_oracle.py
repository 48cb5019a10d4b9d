"""The in-domain oracle: what it trains on and how its gap is reported (its reuse: test_provenance.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_hecktor import _many_cases
from test_report import fake_results

from centerprompt.data.hecktor import leave_one_center_out, make_splits
from centerprompt.study.experiment import MIN_GAP, add_gap_closed
from centerprompt.runs.selection import pretrain_case_ids
from centerprompt.study.report import results_markdown
from centerprompt.strategies import ORACLE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_split_never_holds_a_new_center_test_case(tmp_path: Path, seed: int) -> None:
    splits = make_splits(_many_cases(tmp_path), seed=seed)
    for center in ("CHUM", "HMR", "MDA"):
        base_train, base_val = pretrain_case_ids(splits, center, seed=seed)
        pool = len(splits[center]["train"]) + len(splits[center]["val"])
        for shots in range(1, pool - len(splits[center]["val"]) + 1):
            loco = leave_one_center_out(splits, center, shots=shots, seed=seed)
            train, val = pretrain_case_ids(splits, center, oracle_shots=shots, seed=seed)
            assert not (set(train) | set(val)) & set(loco.new_test), (center, shots)
            assert not set(train) & set(loco.old_test)
            assert set(train) == set(base_train) | set(loco.adapt_train)  # the same cases adapt gets
            assert set(val) == set(base_val) | set(loco.adapt_val)
            assert not set(train) & set(val)


def test_oracle_needs_its_center(tmp_path: Path) -> None:
    splits = make_splits(_many_cases(tmp_path), seed=0)
    with pytest.raises(ValueError, match="oracle needs the center"):
        pretrain_case_ids(splits, None, oracle_shots=2)


def _with_oracle(new_mean: float) -> dict:
    results = fake_results()
    oracle = json.loads(json.dumps(results["strategies"]["full"]))
    oracle["new_center"]["dsc_agg"]["mean"] = new_mean
    results["strategies"][ORACLE] = oracle
    return results


def test_gap_closed_is_gain_over_the_oracle_gap() -> None:
    results = _with_oracle(0.80)
    add_gap_closed(results)
    rows = results["strategies"]
    base = rows["none"]["new_center"]["dsc_agg"]["mean"]
    assert results["oracle_gap"] == pytest.approx(0.80 - base)
    for name, row in rows.items():
        gain = row["new_center"]["dsc_agg"]["mean"] - base
        assert row["gain"] == pytest.approx(gain)
        assert row["gap_closed"] == pytest.approx(gain / (0.80 - base)), name
    assert rows[ORACLE]["gap_closed"] == pytest.approx(1.0)
    assert rows["none"]["gap_closed"] == 0.0
    text = results_markdown(results)
    assert "Oracle gap on the new center" in text and "| oracle |" in text
    deep = rows["deep"]
    assert f"{deep['gap_closed']:.0%}" in text.split("| deep |")[1].split("\n")[0]


def test_no_fraction_of_a_gap_that_is_not_there() -> None:
    results = fake_results()
    base = results["strategies"]["none"]["new_center"]["dsc_agg"]["mean"]
    results = _with_oracle(base + MIN_GAP / 2)
    add_gap_closed(results)
    assert all(row["gap_closed"] is None for row in results["strategies"].values())
    without = fake_results()
    add_gap_closed(without)
    assert without["oracle_gap"] is None and without["strategies"]["deep"]["gain"] > 0
