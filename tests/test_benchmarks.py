"""Benchmarks: the cost code path on a tiny model, the quality bookkeeping, and the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cost  # noqa: E402
import quality  # noqa: E402
import render  # noqa: E402

from tiny import TINY  # noqa: E402

TINY_MODEL = {k: v for k, v in TINY.items() if k not in ("in_channels", "out_channels")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy CI runner spinning OpenMP threads make tiny steps 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_cost_structure_and_ratios():
    result = cost.measure_training(
        {**TINY_MODEL, "num_layers": 4}, 1, ("full", "partial", "deep"), levers=("deep+ckpt",),
        warmup=1, repeats=1, progress=False,
    )  # fmt: skip
    rows = result["strategies"]
    assert list(rows) == ["full", "partial", "deep", "deep+ckpt"]
    for row in rows.values():
        assert row["step_s"] > 0 and row["time_ratio"] > 0 and row["memory_ratio"] > 0
        assert len(row["steps_s"]) == 1
    assert rows["full"]["time_ratio"] == 1.0 and rows["full"]["memory_ratio"] == 1.0
    full, deep = rows["full"]["memory"], rows["deep"]["memory"]
    # A frozen backbone keeps no gradients and no optimizer state for the backbone.
    assert deep["gradients_mb"] < 0.01 * full["gradients_mb"]
    assert deep["optimizer_mb"] < 0.01 * full["optimizer_mb"] and full["optimizer_mb"] > 0
    assert deep["activations_mb"] <= full["activations_mb"]
    # Prompts sit at the input of every layer: backward reaches the ViT but never encoder1.
    assert "vit" in rows["deep"]["backward_reaches"] and "encoder1" not in rows["deep"]["backward_reaches"]
    assert rows["partial"]["backward_reaches"] == ["decoder2", "out"]
    assert rows["deep+ckpt"]["memory"]["activations_mb"] < deep["activations_mb"]


def test_inference_against_monai_and_storage():
    result = cost.measure_inference({**TINY_MODEL, "num_layers": 12}, (32, 32, 32), warmup=0, repeats=1)
    assert result["baseline"] == "monai" and result["ratio"] > 0
    assert result["max_abs_diff_plain_vs_monai"] < 1e-4  # same weights, no prompts: MONAI's UNETR
    storage = cost.measure_storage({**TINY_MODEL, "num_layers": 4})
    assert 0 < storage["adapter_bytes"] < storage["checkpoint_bytes"]


def test_bad_repeats():
    with pytest.raises(ValueError, match="warmup and repeats"):
        cost.measure_training(TINY_MODEL, 1, ("full",), warmup=0, repeats=1)


def test_time_to_fraction(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 1, "loss": 1.0, "seconds": 10.0, "val_dice": 0.2},
            {"epoch": 2, "loss": 0.8, "seconds": 20.0},
            {"epoch": 3, "loss": 0.7, "seconds": 30.0, "val_dice": 0.58},
            {"epoch": 4, "loss": 0.6, "seconds": 40.0, "val_dice": 0.6},
            {"epoch": 5, "loss": 0.5, "seconds": 50.0, "val_dice": 0.5}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert quality.time_to_fraction(path) == 30.0  # 0.58 >= 0.95 * 0.6
    assert quality.time_to_fraction(tmp_path / "missing.jsonl") is None
    path.write_text(json.dumps({"epoch": 1, "seconds": 1.0, "val_dice": 0.0}) + "\n")
    assert quality.time_to_fraction(path) is None


def test_summaries_over_seeds_and_sweeps():
    def row(new: float) -> dict:
        return {"new": new, "old": 0.5, "old_base": 0.6, "trainable_params": 10, "train_s": 5.0,
                "epochs": 3, "time_to_95_s": 2.0}  # fmt: skip

    runs = [{"seed": s, "center": c, "kind": "headline", "value": None, "strategies": {"deep": row(0.1 * s + i)}}
            for s in (0, 1) for i, c in enumerate(("A", "B"))]  # fmt: skip
    runs += [{"seed": 0, "center": "A", "kind": "shots", "value": v, "strategies": {"deep": row(v / 10)}} for v in (2, 4)]
    summary = quality.summarize_headline(runs)["deep"]
    assert summary["new"]["min"] == pytest.approx(0.5) and summary["new"]["max"] == pytest.approx(0.6)
    assert summary["old_delta"] == pytest.approx(-0.1) and summary["runs"] == 4
    assert quality.sweep_table(runs, "shots") == {"deep": {"2": 0.2, "4": 0.4}}


def test_gap_closed_is_the_mean_gain_over_the_mean_oracle_gap():
    def run(center: str, gain: float, gap: float) -> dict:
        deep = {"new": 0.5 + gain, "old": 0.5, "old_base": 0.5, "trainable_params": 10, "train_s": 1.0,
                "epochs": 3, "time_to_95_s": 1.0, "gain": gain}  # fmt: skip
        return {"seed": 0, "center": center, "kind": "headline", "value": None, "strategies": {"deep": deep},
                "oracle_gap": gap}  # fmt: skip

    summary = quality.summarize_headline([run("A", 0.02, 0.10), run("B", 0.06, 0.30)])["deep"]
    assert summary["gain"] == pytest.approx(0.04) and summary["gap_closed"] == pytest.approx(0.04 / 0.20)
    assert quality.summarize_headline([run("A", 0.02, 0.005)])["deep"]["gap_closed"] is None  # no gap to close


def _fake_results(deep_time: float) -> dict:
    machine = {"cpu": "Test CPU", "cores": 2, "device": "CPU only", "torch": "2.x", "monai": "1.x"}
    memory = {"weights_mb": 10.0, "activations_mb": 5.0, "gradients_mb": 10.0, "optimizer_mb": 20.0,
              "training_mb": 45.0, "peak_sampled_mb": 50.0}  # fmt: skip

    def row(time_ratio: float, memory_ratio: float) -> dict:
        return {"step_s": time_ratio, "min_step_s": time_ratio, "steps_s": [time_ratio], "memory": memory,
                "activations_by_module_mb": {"vit": 1.0}, "backward_reaches": ["vit"], "trainable_params": 5,
                "trainable_fraction": 0.01, "time_ratio": time_ratio, "min_time_ratio": time_ratio,
                "memory_ratio": memory_ratio, "peak_sampled_ratio": 1.0}  # fmt: skip

    training = {"model": {"img_size": [32, 32, 32], "hidden_size": 48, "num_layers": 4}, "batch": 1, "warmup": 1,
                "repeats": 1, "strategies": {"full": row(1.0, 1.0), "deep": row(deep_time, 0.4)}}  # fmt: skip
    return {"cost": {
        "date": "2024-01-01", "command": "python benchmarks/run.py --quick", "machine": machine, "wall_s": 1.0,
        "quick": True, "training": {"vit-b": training},
        "inference": {"vit-b": {"volume": [96, 96, 96], "seconds": {"deep": 1.05, "plain": 1.0, "monai": 1.0},
                                "ratio": 1.05, "baseline": "monai", "voxels_per_s": {"deep": 1e5}}},
        "storage": {"num_prompts": 10, "adapter_bytes": 100, "checkpoint_bytes": 100_000, "ratio": 0.001},
        "data": {"strategy": "deep", "cases": 4, "crops_per_batch": 2, "steps": 3, "wait_s": 0.01, "step_s": 0.2,
                 "fraction": 0.05},
        "levers": {"compile": {"skipped": "full mode only"}},
    }}  # fmt: skip


def test_render_targets(tmp_path):
    text = render.render(_fake_results(deep_time=0.7))
    assert "Test CPU" in text and "`python benchmarks/run.py --quick`" in text
    assert "- **not met**: deep step time vs full (vit-b): 0.70× (target ≤ 0.60×)" in text
    assert "- **met**: deep training memory vs full (vit-b): 0.40× (target ≤ 0.50×)" in text
    assert "- **met**: deep P=10 inference time vs MONAI UNETR (vit-b, sliding window): 1.05×" in text
    assert "- **met**: deep P=10 adapter bytes vs full checkpoint (vit-b): 0.1000% (target ≤ 0.2%)" in text
    assert "- **met**: time waiting for data" in text
    assert "Why deep prompts do not make a step free" in text
    assert "- **met**: deep step time vs full (vit-b): 0.55×" in render.render(_fake_results(deep_time=0.55))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_fake_results(0.5)))
    assert render.write_markdown(path, tmp_path / "RESULTS.md").read_text().startswith("# Benchmarks")


def test_render_gpu_section_keeps_its_own_figures(tmp_path):
    """The GPU run is summarised after the CPU parts with its own targets, not the CPU's."""
    cpu, gpu = _fake_results(deep_time=0.7), _fake_results(deep_time=0.5)
    gpu["cost"]["machine"] = {**gpu["cost"]["machine"], "device": "Test GPU"}
    (tmp_path / "results.json").write_text(json.dumps(cpu))
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    text = render.write_markdown(tmp_path / "results.json", tmp_path / "RESULTS.md", tmp_path / "gpu.json").read_text()
    cpu_part, gpu_part = text.split("## Paper scale on a GPU")
    assert "0.70×" in cpu_part and "Test GPU" not in cpu_part
    assert "Test GPU" in gpu_part and "- **met**: deep step time vs full (vit-b): 0.50×" in gpu_part
    missing = render.write_markdown(tmp_path / "results.json", tmp_path / "R2.md", tmp_path / "absent.json")
    assert "Paper scale" not in missing.read_text()


def test_render_bank_targets_from_a_bank_evaluation():
    """Each routing target is judged in its own direction (coverage at least, gap and time at most)."""
    per_center = lambda a, b: {"A": {"dsc_agg": {"mean": a}}, "B": {"dsc_agg": {"mean": b}}}  # noqa: E731
    bank = {"bank_centers": ["A"], "distance": "d", "threshold_rule": "r",
            "routing": {"accuracy": 0.96, "abstention_auc": 0.9,
                        "unknown_centers": {"B": {"n": 4, "fallback": 3, "wrong_center": 1}}},
            "modes": {"oracle": {"per_center": per_center(0.50, 0.40)}, "auto": {"per_center": per_center(0.48, 0.40)}}}  # fmt: skip
    timing = {"ratio": 0.04, "command": "python benchmarks/routing_time.py", "date": "2026-01-01", "scans": 3,
              "fingerprint_s": 0.04, "predict_s": 1.0}  # fmt: skip
    text = render.render(_fake_results(0.5), bank=(bank, timing))
    assert "- **met**: scans of banked centers routed to their own center: 96%" in text
    assert "- **not met**: scans of centers not in the bank falling back to the base model: 75%" in text
    assert "- **not met**: largest per-center DSCagg gap, automatic vs oracle routing: 0.020" in text
    assert "- **met**: time routing adds to a prediction: 4.0%" in text
    assert "not measured" in render.render(_fake_results(0.5), bank=(bank, None))
    rates = {rate: {"threshold": t, "home": h, "home_routings": 12, "home_scans": 4, "fallback": 1.0, "fallback_scans": 8,
                    "home_largest_distance": 30.0, "unbanked_nearest_distance": 90.0}
             for rate, t, h in (("0.05", 26.3, 0.75), ("0.0001", 45.9, 1.0))}  # fmt: skip
    calibration = {"default_false_fallback": 0.0001, "command": "python benchmarks/routing_calibration.py", "date": "d",
                   "studies": [{"data": "data/synth", "rates": rates}]}  # fmt: skip
    text = render.render(_fake_results(0.5), bank=(bank, timing, calibration))
    assert "| data/synth | 0.0001 (default) | 45.9 | 100.0% (12 / 4) | 100.0% (8) | 30.0 | 90.0 |" in text
    assert "| data/synth | 0.05 | 26.3 | 75.0% (12 / 4) |" in text


def test_render_profile_section_sums_each_demos_phases():
    phases = [{"phase": "pretraining", "seconds": 90.0, "detail": {"step": 80.0, "val": 6.0}},
              {"phase": "scoring none", "seconds": 10.0, "detail": {}}]  # fmt: skip
    profile = {"provenance": "measured here", "units": [{"what": "step", "before": "0.85 s", "after": "0.77 s", "how": "x"}],
               "pyspy": {"text": "py-spy", "columns": ["before", "after"], "rows": [["backward", "26 s", "22 s"]]},
               "demos": [{"text": "the demo", "phases": phases}],
               "recipes": {"text": "recipes", "rows": [{"recipe": "lr 2e-3", "epochs": "20 (11)", "val": "0.746",
                                                        "old": "0.649", "reliance": "0.436", "note": "below 0.70"}]},
               "conclusion": "not met"}  # fmt: skip
    text = render.render(_fake_results(0.5), profile=profile)
    assert "## Where the demo's time goes" in text
    assert "| pretraining | 90 | 90% | step 80 s, val 6 s |" in text and "| total | 100 | 100% | |" in text
    assert "| step | 0.85 s | 0.77 s | x |" in text and "| backward | 26 s | 22 s |" in text
    assert "| lr 2e-3 | 20 (11) | 0.746 | 0.649 | 0.436 | below 0.70 |" in text
