"""The ``centerprompt`` command line: thin wrappers over the library.

Each module in this package contributes sub-commands through ``register(subparsers)``;
heavy imports (torch, monai) happen inside the command functions so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys
import traceback
from pathlib import Path

# Modules that register sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "centerprompt.cli.synth",
    "centerprompt.cli.data",
    "centerprompt.cli.runs",
    "centerprompt.cli.scoring",
    "centerprompt.cli.bank",
    "centerprompt.cli.export",
    "centerprompt.cli.federated",
)


# Arguments that name what a command reads; its --out may not be, hold or lie inside any of them.
INPUT_ARGUMENTS = ("data", "base", "adapter", "bank", "ct", "pet", "input", "splits", "model_config", "preprocess", "cases",
                   "profiles", "predictions", "labels")  # fmt: skip
IMAGE_FOLDERS = ("imagesTr", "imagesTs", "labelsTr")  # HECKTOR layout: such a folder's parent is the data folder


def command_inputs(args: argparse.Namespace) -> dict[str, Path]:
    """What ``args`` name as inputs, by flag; a HECKTOR ``imagesTr`` folder brings its data folder
    (so that ``predict --input DATA/imagesTr --out DATA/labelsTr`` is refused)."""
    found = {}
    for name in INPUT_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, (str, Path)) and str(value):
            flag = "--" + name.replace("_", "-")
            found[flag] = Path(value)
            if Path(value).name in IMAGE_FOLDERS:
                found[f"{flag} (its data folder)"] = Path(value).resolve().parent
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="centerprompt",
        description="Prompt tuning of a frozen UNETR for a new PET/CT center (HECKTOR layout).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; show the traceback of errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and results: no progress "
                        "bars, no info lines (run folders' log.txt still records everything)")
    parser.add_argument("--version", action="version", version=f"centerprompt {importlib.metadata.version('centerprompt')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from centerprompt.strategies import load_plugins

    load_plugins()  # strategies other packages register: before the sub-commands list the choices
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm's own switch: MONAI's caching bars obey it too
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)  # run logs may record DEBUG lines; the console shows INFO
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "out", None) is not None:  # before any work: an output it may not write is known now
            from centerprompt.files import check_not_input, check_output

            check_not_input(args.out, command_inputs(args))
            if getattr(args, "out_kind", None):
                check_output(args.out, args.out_kind)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Every file is written by rename, so nothing is half-written; training keeps last.pt per epoch.
        hint = "; run the same command with --resume to continue from the last finished epoch" if hasattr(args, "resume") else ""
        print(f"centerprompt {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        # Bad user input or a file system refusal (permissions, a file where a folder should be, a
        # full disk): one clear line naming the path; the traceback only with -v, to find where it was raised.
        if args.verbose:
            traceback.print_exc()
        print(f"centerprompt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
