"""Atomic writes: the file appears whole or not at all, and no temporary file is left behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from centerprompt.files import atomic_path, write_json


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".a.txt.") and tmp.suffix == ".tmp"
        tmp.write_text("one")
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_a_full_disk_is_named_once_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """torch.save on a full disk raises a RuntimeError from its zip writer ("unexpected pos"), which
    escaped as chained tracebacks; it is now one line naming the file, from any command."""
    import shutil

    import torch

    from centerprompt import files
    from centerprompt.training.loop import _save

    full = shutil.disk_usage(tmp_path)._replace(free=4096)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda folder: full)

    def no_room(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 226")

    monkeypatch.setattr(torch, "save", no_room)
    with pytest.raises(OSError, match=f"^no space left on device: {tmp_path / 'last.pt'}$"):
        _save({"x": torch.zeros(1)}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary
    monkeypatch.setattr(files.shutil, "disk_usage", lambda folder: full._replace(free=10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # not a full disk: the writer's own error stays
        _save({"x": torch.zeros(1)}, tmp_path / "last.pt")


def test_atomic_path_can_keep_the_suffix(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "pred.nii.gz", keep_suffix=True) as tmp:
        assert tmp.name.endswith(".tmp.nii.gz")
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["pred.nii.gz"]


def test_write_json_is_strict_json(tmp_path: Path) -> None:
    path = write_json({"a": math.nan, "b": np.float32(0.5), "c": (1, np.int64(2)), "d": tmp_path}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5, "c": [1, 2], "d": str(tmp_path)}
    assert path.read_text().endswith("}\n")


def test_models_adapters_and_json_are_readable_by_group_and_others_under_umask_022(tmp_path) -> None:
    """safetensors' save_file creates 0600 files; a colleague on a shared server must be able to read them."""
    import os
    import stat

    import torch
    from tiny import tiny_model

    from centerprompt.artifacts import load_model, save_adapter, save_model
    from centerprompt.files import write_json
    from centerprompt.strategies import apply_strategy

    old = os.umask(0o022)
    try:
        model = save_model(tiny_model(), tmp_path / "model.safetensors")
        adapted = load_model(model, prompt_mode="deep", num_prompts=2)
        apply_strategy(adapted, "deep")
        adapter = save_adapter(adapted, tmp_path / "adapter.safetensors", "deep")
        write_json({"a": 1}, tmp_path / "x.json")
        torch.save({"a": 1}, tmp_path / "plain.pt")  # a file written without atomic_path: the reference mode
    finally:
        os.umask(old)
    for path in (model, adapter, tmp_path / "x.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 == stat.S_IMODE((tmp_path / "plain.pt").stat().st_mode), path


def test_version_and_python_dash_m() -> None:
    import subprocess
    import sys

    from importlib.metadata import version as installed

    for argv in (["-m", "centerprompt", "--version"], ["-m", "centerprompt", "--help"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: centerprompt")
    version = subprocess.run([sys.executable, "-m", "centerprompt", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"centerprompt {installed('centerprompt')}"


def test_progress_bars_only_on_a_terminal(tmp_path, capsys) -> None:
    """A log or CI output is not a terminal: no bar updates there (a demo log was three quarters bars)."""
    from centerprompt.cli import main
    from centerprompt.files import bars

    assert bars(False) is True and bars(True) is None  # None: tqdm shows the bar only on a terminal
    assert main(["synth", "--out", str(tmp_path / "d"), "--cases-per-center", "1", "--centers", "CHUM"]) == 0
    assert "case/s" not in capsys.readouterr().err
