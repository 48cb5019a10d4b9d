"""Every command end to end on a few generated cases, with the tiny preset (seconds each)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from centerprompt.cli import main
from centerprompt.training.presets import PRESETS


@pytest.fixture(scope="module")
def data(two_centers: Path) -> Path:
    return two_centers


@pytest.fixture(scope="module")
def base(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrain")
    args = ["pretrain", "--data", str(data), "--exclude-center", "MDA", "--out", str(run), "--preset", "tiny"]
    assert main(args) == 0
    return run / "model.safetensors"


def test_pretrain_writes_a_complete_run_folder(base: Path) -> None:
    run = base.parent
    for name in ("config.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["exclude_center"] == "MDA"
    assert all(not c.startswith("MDA") for c in config["train_cases"] + config["val_cases"])
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == PRESETS["tiny"].pretrain_epochs


def test_resume_of_a_finished_run_and_of_a_changed_configuration(data: Path, base: Path) -> None:
    args = ["pretrain", "--data", str(data), "--exclude-center", "MDA", "--out", str(base.parent), "--preset", "tiny"]
    assert main([*args, "--resume"]) == 0  # nothing left to do
    assert len((base.parent / "metrics.jsonl").read_text().splitlines()) == PRESETS["tiny"].pretrain_epochs
    assert main([*args, "--resume", "--epochs", "5", "--lr", "0.1"]) == 2  # refuses, names what changed


@pytest.mark.parametrize("strategy", ["deep", "lora"])
def test_adapt_then_evaluate_with_the_adapter(data: Path, base: Path, tmp_path: Path, strategy: str) -> None:
    run = tmp_path / strategy
    args = ["adapt", "--data", str(data), "--center", "MDA", "--base", str(base), "--strategy", strategy,
            "--num-prompts", "4", "--shots", "2", "--epochs", "2", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["artifact_bytes"] == (run / "adapter.safetensors").stat().st_size
    assert 0 < summary["trainable_params"] < 0.05 * summary["total_params"]

    out = tmp_path / "eval.json"
    args = ["evaluate", "--data", str(data), "--base", str(base), "--adapter", str(run / "adapter.safetensors"),
            "--centers", "MDA", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["per_center"]) == {"MDA"}
    assert result["per_case"] and all(c["center"] == "MDA" for c in result["per_case"])
    assert {"dsc_agg", "dice_mean", "hd95_median", "n_cases"} <= set(result["overall"])


def test_predict_writes_labels_on_the_ct_grid(data: Path, base: Path, tmp_path: Path) -> None:
    ct, pet = data / "imagesTr" / "MDA-001__CT.nii.gz", data / "imagesTr" / "MDA-001__PT.nii.gz"
    out = tmp_path / "MDA-001.nii.gz"
    assert main(["predict", "--base", str(base), "--ct", str(ct), "--pet", str(pet), "--out", str(out)]) == 0
    pred, reference = nib.load(out), nib.load(ct)
    assert pred.shape == reference.shape
    assert np.allclose(pred.affine, reference.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}

    folder = tmp_path / "all"
    assert main(["predict", "--base", str(base), "--input", str(data), "--out", str(folder)]) == 0
    assert len(list(folder.glob("*.nii.gz"))) == 12


def test_bad_input_gives_one_clear_error(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.safetensors"
    args = ["adapt", "--data", str(data), "--center", "MDA", "--base", str(missing), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_experiment_results_schema(data: Path, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    args = ["experiment", "--data", str(data), "--new-center", "MDA", "--strategies", "none,deep,full,deep+head,oracle",
            "--base", str(base), "--shots", "2", "--num-prompts", "4", "--adapt-epochs", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    reliance = results["base"]["transformer_reliance"]
    assert reliance["drop"] == pytest.approx(reliance["intact_dsc_agg"] - reliance["ablated_dsc_agg"])
    assert sorted(reliance["cases"]) == sorted(results["old_center_test_cases"])
    # The oracle is the base model's preset retrained with the 2 adaptation cases; never a test case.
    oracle_config = json.loads((out / "oracle" / "config.json").read_text())
    assert set(results["adapt_train_cases"]) <= set(oracle_config["train_cases"])
    assert not set(oracle_config["train_cases"]) & set(results["new_center_test_cases"])
    assert oracle_config["preset"] == "tiny" and oracle_config["oracle_shots"] == 2
    oracle = results["strategies"]["oracle"]
    assert results["oracle_gap"] == pytest.approx(
        oracle["new_center"]["dsc_agg"]["mean"] - results["strategies"]["none"]["new_center"]["dsc_agg"]["mean"]
    )
    assert "Transformer reliance of the base model" in (out / "results.md").read_text()
    for key in ("new_center", "data_dir", "base_checkpoint", "new_center_test_cases", "strategies"):
        assert key in results, key
    assert results["new_center"] == "MDA" and results["base_checkpoint"] == str(base)
    assert results["new_center_test_cases"] and all(c.startswith("MDA") for c in results["new_center_test_cases"])
    assert set(results["strategies"]) == {"none", "deep", "full", "deep+head", "deep+head:no-prompts", "oracle"}
    # Attribution: deep+head's own adapter without its prompts; a prompt-only adapter has no such row.
    stripped = results["strategies"]["deep+head:no-prompts"]
    assert stripped["attribution_of"] == "deep+head" and stripped["artifact"] == results["strategies"]["deep+head"]["artifact"]
    for name, s in results["strategies"].items():  # every row's gain and old-center change carry an interval
        lo, hi = s["gain_ci"]
        assert lo <= s["gain"] + 1e-9 and s["gain"] - 1e-9 <= hi, name
        lo, hi = s["old_change_ci"]
        assert lo <= s["old_change"] + 1e-9 and s["old_change"] - 1e-9 <= hi, name
    from centerprompt.study.intervals import MIN_GAIN

    full_gain = results["strategies"]["full"]["gain"]  # a fraction of full's gain only where full gained something
    assert ("fraction_of_full" in results["strategies"]["deep"]) == (abs(full_gain) >= MIN_GAIN)
    assert (out / "gains.png").stat().st_size > 0
    # Served from a bank: each test scan gets the adapter or the base by its acquisition fingerprint.
    served, deep_row = results["strategies"]["deep"]["served"], results["strategies"]["deep"]
    assert "served" in results["strategies"]["full"] and "served" not in results["strategies"]["none"]
    assert 0 <= served["new_center_routed"] <= 1 and 0 <= served["old_centers_routed"] <= 1
    if served["new_center_routed"] == 1:
        assert served["gain"] == pytest.approx(deep_row["gain"])
    if served["old_centers_routed"] == 0:
        assert served["old_change"] == 0 and served["old_change_ci"] == [0, 0]
    for name, s in results["strategies"].items():
        for key in ("trainable_params", "total_params", "artifact_bytes", "train_seconds", "peak_memory_mb", "artifact"):
            assert key in s, (name, key)
        for part in ("new_center", "old_centers", "old_centers_base"):
            assert set(s[part]["dsc_agg"]) == {"gtvp", "gtvn", "mean"}, (name, part)
    deep = results["strategies"]["deep"]
    assert Path(deep["artifact"]).exists() and deep["artifact_bytes"] < 0.05 * results["strategies"]["full"]["artifact_bytes"]
    # Old-center figures (and so the forgetting delta) agree with the same models scored independently.
    old_scores = {}
    for name, adapter in (("none", None), ("deep", deep["artifact"])):
        path = tmp_path / f"old_{name}.json"
        extra = ["--adapter", adapter] if adapter else []
        assert main(["evaluate", "--data", str(data), "--base", str(base), "--centers", "CHUM", *extra,
                     "--out", str(path)]) == 0  # fmt: skip
        scored = json.loads(path.read_text())
        assert sorted(c["case_id"] for c in scored["per_case"]) == sorted(results["old_center_test_cases"])
        old_scores[name] = scored["overall"]["dsc_agg"]["mean"]
    assert results["strategies"]["none"]["old_centers"]["dsc_agg"]["mean"] == pytest.approx(old_scores["none"])
    assert deep["old_centers"]["dsc_agg"]["mean"] - deep["old_centers_base"]["dsc_agg"]["mean"] == pytest.approx(
        old_scores["deep"] - old_scores["none"]
    )
    for name in ("results.md", "dice_per_strategy.png", "params_vs_dice.png", "case_slices.png"):
        assert (out / name).exists(), name
    assert "| deep |" in (out / "results.md").read_text()
    # A user reproduces the table's new-center figure: exactly the experiment's new-center test set.
    path = tmp_path / "new_deep.json"
    assert main(["evaluate", "--data", str(data), "--base", str(base), "--adapter", deep["artifact"],
                 "--cases", str(out / "results.json"), "--out", str(path)]) == 0  # fmt: skip
    scored = json.loads(path.read_text())
    assert sorted(c["case_id"] for c in scored["per_case"]) == sorted(results["new_center_test_cases"])
    assert scored["overall"]["dsc_agg"]["mean"] == pytest.approx(deep["new_center"]["dsc_agg"]["mean"], nan_ok=True)


def test_inspect_reports_the_transformer_reliance(data: Path, base: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "reliance.json"
    assert main(["inspect", "--base", str(base), "--data", str(data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["centers"] == ["CHUM"]  # what the base model was trained on (MDA was held out)
    assert result["cases"] and all(c.startswith("CHUM") for c in result["cases"])
    assert result["token_grid"] == [2, 2, 2]
    assert "transformer reliance" in capsys.readouterr().out
    assert main(["inspect", "--base", str(base), "--data", str(data), "--centers", "USZ"]) == 2


@pytest.mark.parametrize("verbose", [False, True])
def test_bad_input_traceback_only_with_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str], verbose: bool) -> None:
    args = ["predict", "--base", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "out")]  # no --ct/--pet
    assert main(["-v", *args] if verbose else args) == 2
    err = capsys.readouterr().err
    assert "centerprompt predict: error: give --ct and --pet" in err
    assert ("Traceback (most recent call last)" in err) == verbose
    assert ("raise ValueError" in err) == verbose


@pytest.mark.parametrize(("command", "old", "new", "dest"), [
    (["adapt", "--data", "d", "--center", "MDA", "--base", "b", "--out", "o"], "--prompts", "--num-prompts", "num_prompts"),
    (["predict", "--base", "b", "--bank", "k", "--input", "i", "--out", "o"], "--center", "--route", "route"),
])  # fmt: skip
def test_renamed_flags_keep_their_old_spelling_with_a_warning(
    command: list[str], old: str, new: str, dest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from centerprompt.cli import build_parser

    args = build_parser().parse_args([*command, old, "4"])
    assert getattr(args, dest) in (4, "4") and f"{old} is deprecated; use {new}" in capsys.readouterr().err
    args = build_parser().parse_args([*command, new, "4"])
    assert getattr(args, dest) in (4, "4") and capsys.readouterr().err == ""


def test_score_of_predict_agrees_with_evaluate(data: Path, base: Path, tmp_path: Path) -> None:
    """The same label maps scored two ways: ``evaluate`` (the model, predictions mapped onto each CT
    grid) and ``score`` (the files ``predict`` wrote, as the HECKTOR organisers read them) agree to
    1e-6, per case and pooled in mm³; a pooling in voxels or another voxel volume would differ
    (CHUM and MDA scans have different voxel sizes)."""
    preds, labels = tmp_path / "pred", tmp_path / "labels"
    assert main(["evaluate", "--data", str(data), "--base", str(base), "--out", str(tmp_path / "eval.json")]) == 0
    test_cases = [c["case_id"] for c in json.loads((tmp_path / "eval.json").read_text())["per_case"]]
    labels.mkdir()
    for case in test_cases:  # the test split's label maps, and predict's files for exactly those cases
        (labels / f"{case}.nii.gz").symlink_to(data / "labelsTr" / f"{case}.nii.gz")
        images = data / "imagesTr"
        assert main(["predict", "--base", str(base), "--ct", str(images / f"{case}__CT.nii.gz"), "--pet",
                     str(images / f"{case}__PT.nii.gz"), "--out", str(preds / f"{case}.nii.gz")]) == 0  # fmt: skip
    assert main(["score", "--predictions", str(preds), "--labels", str(labels), "--out", str(tmp_path / "score.json")]) == 0
    evaluated, scored = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eval", "score"))
    assert len(scored["per_case"]) == len(evaluated["per_case"]) == len(test_cases) >= 2
    by_case = {c["case_id"]: c for c in evaluated["per_case"]}
    for case in scored["per_case"]:
        for name in ("gtvp", "gtvn"):
            for key in ("intersection", "pred_volume", "label_volume"):
                assert case[name][key] == pytest.approx(by_case[case["case_id"]][name][key], rel=1e-6)
    assert any(c["gtvp"]["pred_volume"] > 0 for c in scored["per_case"])  # the base predicts something
    spacings = {tuple(nib.load(p).header.get_zooms()[:3]) for p in labels.glob("*.nii.gz")}
    assert len(spacings) > 1  # the pooling in mm³ matters here
    for summary in ("overall", *[("per_center", c) for c in ("CHUM", "MDA")]):
        e = evaluated[summary] if isinstance(summary, str) else evaluated[summary[0]][summary[1]]
        s = scored[summary] if isinstance(summary, str) else scored[summary[0]][summary[1]]
        assert s["dsc_agg"]["mean"] == pytest.approx(e["dsc_agg"]["mean"], abs=1e-6, nan_ok=True)


def test_quiet_shows_results_only(tmp_path: Path) -> None:
    """In a process of its own, as a user runs it: the same files and output, no info lines or bars."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    runs = {}
    for name, flags in (("loud", []), ("quiet", ["--quiet"])):
        args = [sys.executable, "-m", "centerprompt", *flags, "synth", "--out", str(tmp_path / name), "--centers",
                "CHUM", "--cases-per-center", "1"]  # fmt: skip
        runs[name] = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    assert (tmp_path / "quiet" / "imagesTr" / "CHUM-001__CT.nii.gz").is_file()
    same = [re.sub(r"[\d.]+ s$", "", runs[n].stdout.strip()).replace(str(tmp_path / n), "") for n in runs]
    assert same[0] == same[1] and same[0].startswith("synth:")  # the same result line, its time aside
    assert "INFO" in runs["loud"].stderr and runs["quiet"].stderr == ""


def test_pooled_centers_are_written_one_way(data: Path, base: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """One separator from flag to summary to adapter file, and the bank takes a pooled adapter under
    one of its centers without a warning (before: "MDA,CHUM" beside "MDA+CHUM", a warning on every add)."""
    import logging

    from centerprompt.artifacts import read_adapter_metadata

    run = tmp_path / "pooled"
    assert main(["adapt", "--data", str(data), "--center", "MDA, CHUM", "--base", str(base), "--num-prompts", "2",
                 "--shots", "1", "--epochs", "1", "--out", str(run)]) == 0  # fmt: skip
    adapter = run / "adapter.safetensors"
    assert json.loads((run / "summary.json").read_text())["center"] == "MDA,CHUM"
    assert read_adapter_metadata(adapter)["extra"]["center"] == "MDA,CHUM"
    with caplog.at_level(logging.WARNING):
        assert main(["bank", "add", "--bank", str(tmp_path / "bank"), "--center", "MDA", "--adapter", str(adapter)]) == 0
        assert main(["bank", "add", "--bank", str(tmp_path / "bank"), "--center", "HGJ", "--adapter", str(adapter)]) == 0
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.name.startswith("centerprompt.bank")]  # fmt: skip
    assert len(warned) == 1 and "adapted to MDA,CHUM, banked as HGJ" in warned[0]
