"""Atomic file writes: the one place that writes a temporary file and renames it into place.

Every file centerprompt writes (checkpoints, adapters, splits, synthetic volumes, predictions,
reports) goes through :func:`atomic_path`, so an interrupted run never leaves a half-written file
under the final name. This module is the lowest layer: it imports nothing from centerprompt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The block creates the file (``open(tmp, "wb")``, ``torch.save``, ``nib.save``, ...); it is
    created with the usual permissions (umask), not the private ones of ``tempfile.mkstemp``. The
    temporary name is ``.NAME.<pid>-<random>.tmp``, hidden and unique per process and call; with
    ``keep_suffix=True`` it also ends in ``path``'s suffixes (``.nii.gz``), for writers that pick
    the format from the name (nibabel). On any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + ("".join(path.suffixes) if keep_suffix else "")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def jsonable(obj: Any) -> Any:
    """Plain JSON values, as :func:`write_json` writes them: NaN/inf -> None, numpy -> Python,
    tuples -> lists, paths -> str (so a value compares equal to what was read back from its file)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(obj: Any, path: str | Path) -> Path:
    """Atomic JSON file (indent 2) with NaN/inf as null: strict JSON that other tools can read."""
    path = Path(path)
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return path
