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


def test_atomic_path_can_keep_the_suffix(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "pred.nii.gz", keep_suffix=True) as tmp:
        assert tmp.name.endswith(".tmp.nii.gz")
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["pred.nii.gz"]


def test_write_json_is_strict_json(tmp_path: Path) -> None:
    path = write_json({"a": math.nan, "b": np.float32(0.5), "c": (1, np.int64(2)), "d": tmp_path}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5, "c": [1, 2], "d": str(tmp_path)}
    assert path.read_text().endswith("}\n")
