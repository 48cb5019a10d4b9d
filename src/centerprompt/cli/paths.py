"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def out_path(text: str) -> Path:
    """``--out``: an empty value would become the working directory (``Path("")`` is "."), so it is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give the file or folder to write")
    return Path(text)


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores the value under the new name and says so on stderr."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:  # fmt: skip
        print(f"centerprompt: {option_string} is deprecated; use --{self.dest.replace('_', '-')}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_num_prompts(parser: argparse.ArgumentParser, help: str = "prompt tokens per set (P, 1 to 1000; default 10)") -> None:
    """``--num-prompts`` (the model's and the adapter file's ``num_prompts``), with ``--prompts``
    kept as a deprecated alias for commands written before the rename."""
    parser.add_argument("--num-prompts", type=int, default=10, metavar="P", help=help)
    parser.add_argument("--prompts", dest="num_prompts", type=int, action=DeprecatedAlias, help=argparse.SUPPRESS)
