"""``centerprompt export``: one center's model as a MONAI Bundle that runs without centerprompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from centerprompt.cli.paths import out_path

from centerprompt.cli.runs import base_arguments, base_spec  # import-light, like the registry

FORMATS = ("torchscript", "onnx")  # centerprompt.deploy.bundle.FORMATS, named here to keep --help instant


def _cmd_export(args: argparse.Namespace) -> int:
    from centerprompt.deploy.bundle import bank_adapters, export_bundle

    if args.bank is not None and args.adapter is not None:
        raise ValueError("give --adapter or --bank with --center, not both.")
    if (args.bank is None) != (args.center is None):
        raise ValueError("--bank and --center go together: the center's prompts come from the bank.")
    adapter = bank_adapters(args.bank, [args.center])[args.center] if args.bank is not None else args.adapter
    out = export_bundle(base_spec(args), args.out, adapter=adapter, center=args.center, fmt=args.format,
                        version=args.version)  # fmt: skip
    print(f"bundle written to {out}; run it with: python -m monai.bundle run --config_file configs/inference.json "
          f"--input_dir CASES --output_dir OUT (from {out})")  # fmt: skip
    return 0


def add_format_arguments(p: argparse.ArgumentParser) -> None:
    """``--format`` and ``--version`` of a bundle (shared with ``bank export``)."""
    p.add_argument("--format", default="torchscript", choices=FORMATS,
                   help="torchscript: models/model.ts (default); onnx: also models/model.onnx (needs onnx, "
                        "onnxscript)")  # fmt: skip
    p.add_argument("--version", default="0.1.0", help="the bundle's version in metadata.json (default 0.1.0)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a center's model as a MONAI Bundle (runs with MONAI and PyTorch only)")
    base_arguments(p)
    p.add_argument("--adapter", type=Path, help="adapter.safetensors of the center (omit: the base model alone)")
    p.add_argument("--bank", type=Path, help="prompt bank folder: take the center's prompts from it (with --center)")
    p.add_argument("--center", help="with --bank: the banked center to export")
    add_format_arguments(p)
    p.add_argument("--out", required=True, type=out_path, help="new (or empty) folder for the bundle")
    p.set_defaults(func=_cmd_export)
