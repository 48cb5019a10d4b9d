"""Report: markdown rows and numbers, PNG figures, results.json round trip with NaN -> null."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from centerprompt.study.report import (
    human_bytes,
    human_count,
    plot_case_slices,
    plot_dice_per_strategy,
    plot_params_vs_dice,
    results_markdown,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OLD_CENTERS = ("CHUM", "CHUP", "CHUS", "HGJ", "HMR", "MDA")
TOTAL = 95_900_000
# name: (trainable params, artifact bytes, new gtvp, new gtvn, old mean, seconds)
ROWS = {
    "none": (0, 0, 0.612, 0.548, 0.701, 0.0),
    "full": (TOTAL, 383_600_000, 0.774, 0.702, 0.655, 1834.2),
    "partial": (4_400_000, 17_600_000, 0.741, 0.671, 0.688, 912.0),
    "shallow": (7_680, 31_000, 0.703, 0.640, 0.699, 640.5),
    "deep": (92_160, 369_000, 0.768, 0.697, 0.694, 702.3),
    "deep+head": (92_160 + 51, 372_000, 0.771, 0.699, 0.690, 710.0),
    "lora": (442_368, 1_770_000, 0.760, 0.690, 0.692, 8.4),
    "bitfit": (102_000, 410_000, 0.720, float("nan"), 0.697, 600.0),
}


def fake_results() -> dict:
    base_old = ROWS["none"][4]
    strategies = {}
    for i, (name, (params, size, gtvp, gtvn, old, seconds)) in enumerate(ROWS.items()):
        new_mean = np.nanmean([gtvp, gtvn])
        strategies[name] = {
            "trainable_params": params,
            "total_params": TOTAL,
            "trainable_fraction": params / TOTAL,
            "artifact_bytes": size,
            "train_seconds": seconds,
            "peak_memory_mb": 2048.0 + 100 * i,
            "epochs": 0 if name == "none" else 50,
            "new_center": {
                "dsc_agg": {"gtvp": gtvp, "gtvn": gtvn, "mean": float(new_mean)},
                "dice_mean": {"gtvp": gtvp - 0.05, "gtvn": gtvn - 0.1, "mean": float(new_mean) - 0.075},
                "hd95_median": {"gtvp": 6.5, "gtvn": float("nan")},
                "per_case": [{"case_id": "CHUV-003", "center": "CHUV", "gtvp": {"dice": gtvp}}],
            },
            "old_centers": {
                "dsc_agg": {"gtvp": old + 0.03, "gtvn": old - 0.03, "mean": old},
                "per_center": {c: {"dsc_agg": {"mean": old + 0.01 * (j - 3)}} for j, c in enumerate(OLD_CENTERS)},
            },
            "old_centers_base": {"dsc_agg": {"gtvp": base_old + 0.03, "gtvn": base_old - 0.03, "mean": base_old}},
            "artifact": f"runs/CHUV/{name}.safetensors",
        }
    return {
        "new_center": "CHUV",
        "data_dir": "/data/hecktor2022",
        "base_checkpoint": "runs/base/model.safetensors",
        "new_center_test_cases": [f"CHUV-{i:03d}" for i in range(3, 19)],
        "machine": {"device": "NVIDIA H100", "torch": "2.13"},
        "date": "2025-01-31",
        "command": "centerprompt experiment --new-center CHUV",
        "strategies": strategies,
    }


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_human_units():
    assert human_count(92_160) == "92.2k" and human_count(TOTAL) == "95.9M" and human_count(0) == "0"
    assert human_bytes(368_640) == "368.6 kB" and human_bytes(383_600_000) == "383.6 MB" and human_bytes(0) == "–"


def test_markdown_has_every_strategy_and_its_numbers():
    md = results_markdown(fake_results())
    assert "CHUV" in md and "16 test cases" in md and "2025-01-31" in md and "NVIDIA H100" in md
    rows: dict[str, str] = {}
    for line in md.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)  # first table wins
    for name, (params, _, gtvp, gtvn, old, _) in ROWS.items():
        row = rows[name]
        assert f"{gtvp:.3f}" in row and f"{old:.3f}" in row
        assert f"{old - ROWS['none'][4]:+.3f}" in row
        if not math.isnan(gtvn):
            assert f"{gtvn:.3f}" in row
    assert "92.2k / 95.9M" in rows["deep"] and "0.0961%" in rows["deep"] and "369.0 kB" in rows["deep"]
    assert "-0.046" in rows["full"] and "+0.000" in rows["none"]
    assert "| 8.4 |" in rows["lora"] and "| 1834 |" in rows["full"]
    assert "–" in rows["bitfit"]  # NaN GTVn is shown as a dash, not "nan"
    assert "nan" not in md.lower()
    # second table: one column per old center, one row per strategy
    header = next(line for line in md.splitlines() if line.startswith("| Strategy | CHUM"))
    assert all(c in header for c in OLD_CENTERS)
    assert sum(1 for line in md.splitlines() if line.startswith("| deep+head |")) == 2


def test_markdown_tolerates_missing_sections():
    md = results_markdown({"new_center": "HMR", "strategies": {"none": {"trainable_params": 0}}})
    assert "| none |" in md and "per old center" not in md


def test_summary_figures_are_pngs(tmp_path):
    results = fake_results()
    _assert_png(plot_dice_per_strategy(results, tmp_path / "bars.png"))
    _assert_png(plot_params_vs_dice(results, tmp_path / "sub" / "params.png"))
    assert not list(tmp_path.rglob("*.tmp"))


def test_case_slices_figure(tmp_path):
    rng = np.random.default_rng(0)
    shape = (24, 32, 32)
    ct, pet = rng.normal(size=shape), rng.gamma(2.0, size=shape)
    gt = np.zeros(shape, dtype=np.int64)
    gt[8:16, 10:18, 10:18] = 1
    gt[10:13, 20:25, 5:9] = 2
    preds = {"none": np.roll(gt, 2, axis=1), "deep": gt}
    _assert_png(plot_case_slices(ct, pet[None], gt, preds, tmp_path / "case.png"))
    _assert_png(plot_case_slices(ct, pet, np.zeros(shape), {}, tmp_path / "empty.png", n_slices=2))
    with pytest.raises(ValueError):
        plot_case_slices(ct, pet, gt, {"bad": gt[:-1]}, tmp_path / "bad.png")


def test_write_report_round_trips_json_with_nan_as_null(tmp_path):
    results = fake_results()
    results["strategies"]["none"]["peak_memory_mb"] = np.float32(123.5)
    paths = write_report(results, tmp_path / "report")
    assert set(paths) == {"json", "markdown", "dice_per_strategy", "params_vs_dice", "gains"}
    loaded = json.loads(paths["json"].read_text())
    assert loaded["strategies"]["bitfit"]["new_center"]["dsc_agg"]["gtvn"] is None
    assert loaded["strategies"]["deep"]["new_center"]["hd95_median"]["gtvn"] is None
    assert loaded["strategies"]["none"]["peak_memory_mb"] == 123.5
    assert loaded["strategies"]["deep"]["new_center"]["dsc_agg"]["gtvp"] == ROWS["deep"][2]
    assert loaded["new_center_test_cases"] == results["new_center_test_cases"]
    assert paths["markdown"].read_text() == results_markdown(results)
    _assert_png(paths["dice_per_strategy"])
    _assert_png(paths["params_vs_dice"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_phase_table_shares_details_and_reuse() -> None:
    from centerprompt.study.experiment import PhaseClock
    from centerprompt.study.report import phase_table

    clock = PhaseClock()
    with clock("pretraining") as trained:
        pass
    trained["seconds"] = 30.0  # as if it had run 30 s, of which the run folder recorded this much
    clock.trained(trained, {"train_seconds": 25.0, "cache_seconds": 4.0,
                            "phase_seconds": {"data_s": 1.0, "step_s": 20.0, "val_s": 3.5, "save_s": 0.5}})
    with clock("training deep") as reused:
        pass
    clock.trained(reused, {"train_seconds": 40.0, "phase_seconds": {"step_s": 39.0}})  # a finished folder: no time now
    reused["seconds"] = 10.0
    lines = phase_table(clock.rows)
    assert lines[2] == "| pretraining | 30 | 75% | caching 4 s, data 1 s, step 20 s, val 4 s, save 0 s |"
    assert lines[3] == "| training deep | 10 | 25% | reused: a finished run of the same configuration |"
    assert lines[-1] == "| total | 40 | 100% | |"


def test_figures_read_without_the_code(tmp_path, monkeypatch):
    """Anchored DSCagg axis (a few thousandths of noise must not look like a difference), a named
    case, and the smoke run's report saying it is one."""
    import centerprompt.study.report as report

    drawn = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: drawn.append(fig) or path)
    results = fake_results()
    for s in results["strategies"].values():  # every strategy within 0.003 of each other
        s["new_center"]["dsc_agg"]["mean"] = 0.5 + 0.001 * len(drawn)
    report.plot_params_vs_dice(results, tmp_path / "p.png")
    assert drawn[-1].axes[0].get_ylim() == (0.0, 1.0)
    gt = np.zeros((8, 8, 8), dtype=np.int64)
    report.plot_case_slices(gt, gt, gt, {}, tmp_path / "c.png", title="MDA-003 (MDA): axial slices")
    assert drawn[-1]._suptitle.get_text() == "MDA-003 (MDA): axial slices"
    assert "Smoke run" in results_markdown({**results, "smoke_run": True})
    assert "Smoke run" not in results_markdown(results)
