"""Every command checks --out before any work, and file-system refusals are one line, not a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from centerprompt.cli import main
from centerprompt.files import check_output, remove_stale_temporaries
from centerprompt.runs.folder import open_run

DEAD_PID = 4_194_305  # above Linux's largest pid_max: no process has it

# Each command with the arguments it requires; the data and base ("absent...", under the test's
# folder) need not exist, since --out is checked first (a command that read them first would fail
# on them instead, or, like demo, make them).
FOLDER_COMMANDS = {
    "synth": [],
    "pretrain": ["--data", "absent"],
    "adapt": ["--data", "absent", "--center", "MDA", "--base", "absent.safetensors"],
    "experiment": ["--data", "absent", "--new-center", "MDA"],
    "demo": ["--data", "absent"],
    "bank evaluate": ["--bank", "absent", "--base", "absent.safetensors", "--data", "absent"],
}


def _run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    code = main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_run_folder_that_is_a_file_is_refused_first(tmp_path, capsys, command):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for out in (taken, taken / "run"):  # the folder itself, or a folder under a file
        args = [str(tmp_path / a) if a.startswith("absent") else a for a in FOLDER_COMMANDS[command]]
        code, lines = _run(capsys, [*command.split(), *args, "--out", str(out)])
        assert code == 2 and len(lines) == 1 and str(out) in lines[0], lines
        assert "absent" not in lines[0]  # refused before the data or base were looked at
    assert taken.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_evaluate_refuses_a_folder_as_its_json_before_scoring(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    code, lines = _run(capsys, ["evaluate", "--data", str(tmp_path / "absent"), "--base",
                                str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "results")])  # fmt: skip
    assert code == 2 and len(lines) == 1 and "is a folder" in lines[0] and "absent" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_a_file_system_refusal_is_one_line(tmp_path, capsys):
    # /proc accepts no new folders, whoever runs the test (root included), though every permission
    # test passes: the --out check finds it by trying, before the command starts.
    out = Path("/proc/centerprompt-test")
    with pytest.raises(ValueError, match="nothing can be created in /proc"):
        check_output(out, "folder")
    code, lines = _run(capsys, ["synth", "--out", str(out), "--cases-per-center", "1", "--centers", "CHUM"])
    assert code == 2 and len(lines) == 1 and "Traceback" not in lines[0] and str(out) in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="no permission"):
            check_output(tmp_path / "run", "folder")
    finally:
        tmp_path.chmod(0o755)


def test_temporaries_of_killed_writers_are_removed_when_a_run_starts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".best.pt.{DEAD_PID}-0badcafe.tmp"
    live = run / f".last.pt.{os.getpid()}-0badcafe.tmp"  # a writer still running: not ours to delete
    mine = run / "notes.tmp"  # not a temporary name atomic_path makes
    for p in (stale, live, mine):
        p.write_bytes(b"x" * 10)
    assert open_run(run, {"job": "test"}, resume=False) is None
    assert not stale.exists() and live.exists() and mine.exists()
    assert remove_stale_temporaries(run) == []


@pytest.mark.parametrize(("recorded", "reused"), [
    ({}, True),  # from before patience_from existed: trained as patience_from=0 does
    ({"min_epochs": 0}, True),  # the retired field at its neutral value
    ({"min_epochs": 10}, False),  # it changed how that run stopped: not the same run
    ({"patience_from": 5}, False),
])  # fmt: skip
def test_a_run_recorded_before_a_training_setting_existed_is_reused_when_it_trained_the_same(
    tmp_path: Path, recorded: dict, reused: bool
) -> None:
    from centerprompt.training.loop import TrainConfig

    train = {k: v for k, v in TrainConfig(epochs=3).__dict__.items() if k != "patience_from"}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"job": "pretrain", "train": {**train, **recorded}}))
    (run / "summary.json").write_text(json.dumps({"best_metric": 0.5}))
    today = {"job": "pretrain", "train": TrainConfig(epochs=3).__dict__}
    if reused:
        assert open_run(run, today, resume=True) == {"best_metric": 0.5}
    else:
        with pytest.raises(ValueError, match="another configuration"):
            open_run(run, today, resume=True)


@pytest.mark.parametrize(("asked", "reused"), [(0, True), (4, False)])
def test_a_base_recorded_before_a_run_field_existed_is_reused_only_at_its_default(
    tmp_path: Path, asked: int, reused: bool
) -> None:
    """The demo's base was recorded before center_prompts existed: pretraining it again took 14 min."""
    from centerprompt.training.config import PretrainRun

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"job": "pretrain", "preset": "cpu"}))
    (run / "summary.json").write_text(json.dumps({"best_metric": 0.5}))
    today = {"job": "pretrain", "preset": "cpu", "center_prompts": asked}
    if reused:
        assert open_run(run, today, resume=True, predates=PretrainRun.defaults()) == {"best_metric": 0.5}
    else:
        with pytest.raises(ValueError, match=r"another configuration \(center_prompts\)"):
            open_run(run, today, resume=True, predates=PretrainRun.defaults())
