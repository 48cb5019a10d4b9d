"""A finished stage is reused only when it was made for exactly what is asked (issue 10's reproduction).

An experiment re-run with another P, shot count or seed must score freshly trained adapters, never
the stale ones in its folder (with another seed the stale adapter was trained on cases that are now
new-center test cases); a run folder re-used without --resume must never keep an earlier run's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from centerprompt.artifacts import read_adapter_metadata
from centerprompt.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from centerprompt.data.synthetic.writer import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, centers=["CHUM", "CHUP", "MDA"], cases_per_center=4, seed=3, progress=False)
    return out


def _experiment(data: Path, out: Path, *extra: str, strategies: str = "none,deep") -> int:
    # Scored in the preprocessed crop: what is retrained is the question here, not the CT-grid metrics
    # (test_cli.py scores an experiment on the CT grid).
    return main(["experiment", "--data", str(data), "--new-center", "MDA", "--preset", "tiny", "--pretrain-epochs", "1",
                 "--adapt-epochs", "1", "--strategies", strategies, "--score-at", "preprocessed", "--out", str(out),
                 *extra])  # fmt: skip


def _deep_adapter(out: Path) -> tuple[dict, dict, dict]:
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "adapt" / "deep" / "config.json").read_text())
    return results, config, read_adapter_metadata(results["strategies"]["deep"]["artifact"])


def test_changed_prompts_shots_and_seed_retrain_what_they_change(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    assert _experiment(data, out, "--shots", "1", "--num-prompts", "4", strategies="none,deep,full") == 0
    results, config, adapter = _deep_adapter(out)
    assert adapter["num_prompts"] == 4 and config["adapt_train"] == results["adapt_train_cases"]
    first = results["stages"]

    assert _experiment(data, out, "--shots", "1", "--num-prompts", "16", strategies="none,deep,full") == 0
    results, config, adapter = _deep_adapter(out)
    assert results["prompts"] == 16 and adapter["num_prompts"] == 16  # not the P=4 adapter
    assert results["stages"]["deep"]["config_hash"] != first["deep"]["config_hash"]
    assert results["stages"]["full"] == first["full"]  # full fine-tuning has no prompts: P does not retrain it
    assert results["stages"]["pretrain"] == first["pretrain"]  # nor the base model

    assert _experiment(data, out, "--shots", "2", "--num-prompts", "16") == 0
    results, config, adapter = _deep_adapter(out)
    assert len(results["adapt_train_cases"]) == 2 and config["adapt_train"] == results["adapt_train_cases"]
    assert adapter["extra"]["shots"] == 2

    assert _experiment(data, out, "--shots", "2", "--num-prompts", "16", "--seed", "1") == 0
    results, config, adapter = _deep_adapter(out)
    assert config["seed"] == 1 and config["adapt_train"] == results["adapt_train_cases"]
    assert not set(config["adapt_train"]) & set(results["new_center_test_cases"])
    # Another seed, another base model; the adapter was retrained on it (scoring a stale one would have
    # failed the backbone fingerprint check on load, and the command with it).
    assert results["stages"]["pretrain"] != first["pretrain"]


def test_on_change_refuse_stops_instead_of_retraining(data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "exp"
    assert _experiment(data, out, "--shots", "1", "--num-prompts", "4") == 0
    before = (out / "adapt" / "deep" / "adapter.safetensors").read_bytes()
    assert _experiment(data, out, "--shots", "1", "--num-prompts", "8", "--on-change", "refuse") == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "num_prompts" in err
    assert (out / "adapt" / "deep" / "adapter.safetensors").read_bytes() == before


def test_a_rerun_without_resume_never_leaves_the_old_runs_files(data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    base_run = tmp_path / "base"
    assert main(["pretrain", "--data", str(data), "--exclude-center", "MDA", "--preset", "tiny", "--epochs", "1",
                 "--out", str(base_run)]) == 0  # fmt: skip
    run = tmp_path / "adapt"
    args = ["adapt", "--data", str(data), "--center", "MDA", "--base", str(base_run / "model.safetensors"),
            "--num-prompts", "4", "--shots", "1", "--epochs", "1", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    assert (run / "adapter.safetensors").exists() and (run / "summary.json").exists()

    import centerprompt.runs.adapt

    def killed(*_, **__):
        raise KeyboardInterrupt  # the user stops the new run during training

    monkeypatch.setattr(centerprompt.runs.adapt, "fit_cases", killed)
    assert main([*args[:-2], "--num-prompts", "8", "--out", str(run)]) == 130  # interrupted: one line, exit 130
    assert not (run / "adapter.safetensors").exists() and not (run / "summary.json").exists()
    assert json.loads((run / "config.json").read_text())["num_prompts"] == 8  # the folder describes the new run only


def test_zero_budgets_are_refused_not_replaced_by_defaults(data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    common = ["--data", str(data), "--out", str(tmp_path / "r")]
    assert main(["pretrain", *common, "--preset", "tiny", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    base = tmp_path / "missing.safetensors"
    for flag in ("--shots", "--batch-size", "--num-prompts"):
        assert main(["adapt", *common, "--center", "MDA", "--base", str(base), flag, "0"]) == 2
        assert f"{flag} must be at least 1" in capsys.readouterr().err
    assert main(["experiment", *common, "--new-center", "MDA", "--shots", "0"]) == 2
    assert "--shots must be at least 1" in capsys.readouterr().err


def test_pooled_centers_are_named_each_once(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(data), "--out", str(tmp_path / "r"), "--base", str(tmp_path / "missing.safetensors")]
    for bad in ("MDA,,CHUM", "MDA,MDA", ","):
        assert main(["adapt", *common, "--center", bad]) == 2
        assert "--center: a center, or several separated by commas, each once" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
