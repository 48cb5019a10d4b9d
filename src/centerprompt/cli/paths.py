"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def out_path(text: str) -> Path:
    """``--out``: an empty value would become the working directory (``Path("")`` is "."), so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give the file or folder to write")
    return Path(text)
