"""``centerprompt bank``: keep per-center prompts beside one frozen backbone and route scans to them."""

from __future__ import annotations

import argparse
from pathlib import Path

from centerprompt.cli.paths import out_path

from centerprompt.cli.export import add_format_arguments
from centerprompt.cli.runs import base_arguments, base_spec, splits_argument  # import-light, like the registry
from centerprompt.cli.scoring import case_selection, false_fallback_option
from centerprompt.strategies import bankable_names  # import-light: no torch until a command runs


def _cmd_add(args: argparse.Namespace) -> int:
    from centerprompt.bank import PromptBank, routing_key_from_data

    if (args.data is None) != (args.base is None):
        raise ValueError("give both --data and --base to compute the routing key, or neither.")
    base = base_spec(args)
    bank, key = PromptBank(args.bank), None
    bank.check(args.center, args.adapter)  # refuse before the slow key computation
    if args.base is not None:  # the backbone check predict and evaluate run: the adapter must fit this base
        from centerprompt.artifacts import build_adapted_model
        from centerprompt.runs.base import open_base

        build_adapted_model(open_base(base, args.adapter), args.adapter)
    if args.data is not None:
        key = routing_key_from_data(case_selection(args, centers=(args.center,), split="train"), base)
    entry = bank.add(args.center, args.adapter, key=key)
    routing = "no key"
    if entry.routing:
        r = entry.routing
        routing = f"key from {r['n_cases']} cases, leave-one-out scale {r['scale']:.2f}, threshold {r['threshold']:.1f}"
    print(f"added {entry.center} to {args.bank} ({entry.strategy}, {entry.bytes:,} bytes, {routing})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from centerprompt.bank import PromptBank

    entries = PromptBank(args.bank).entries()
    if not entries:
        print(f"bank {args.bank} is empty")
        return 0
    print(f"{'center':12} {'strategy':8} {'bytes':>9} {'key cases':>9} {'threshold':>9}  created")
    for e in entries:
        n, t = (e.routing["n_cases"], f"{e.routing['threshold']:.4f}") if e.routing else ("–", "–")
        print(f"{e.center:12} {e.strategy:8} {e.bytes:>9,} {n:>9} {t:>9}  {e.created}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from centerprompt.bank import PromptBank

    PromptBank(args.bank).remove(args.center)
    print(f"removed {args.center} from {args.bank}")
    return 0


def _cmd_route(args: argparse.Namespace) -> int:
    from centerprompt.bank.evaluation import run_bank, write_routing_report
    from centerprompt.bank.routing import FALLBACK

    modes: tuple[str, ...] = ()
    if args.command_name == "evaluate":
        modes = (FALLBACK, "oracle", "auto") + ((args.single_center,) if args.single_center else ())
    result = run_bank(case_selection(args), base_spec(args), args.bank, modes=modes, **false_fallback_option(args))
    paths = write_routing_report(result, args.out)
    print(paths["markdown"].read_text())
    print(f"report: {paths['markdown']}, {paths['json']}, {paths['png']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from centerprompt.deploy.bundle import export_bank

    centers = args.centers.split(",") if args.centers else None
    paths = export_bank(base_spec(args), args.bank, args.out, centers=centers, fmt=args.format, version=args.version)
    for path in paths:
        print(f"bundle of {path.name}: {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    bank = sub.add_parser("bank", help="serve every center's prompts from one frozen backbone, with routing")
    actions = bank.add_subparsers(dest="bank_command", metavar="ACTION", required=True)

    p = actions.add_parser("add", help=f"copy a prompt-only adapter ({' or '.join(bankable_names())}) into a bank")
    p.add_argument("--bank", required=True, type=Path, help="bank folder (created if absent)")
    p.add_argument("--center", required=True, help="center name: letters, digits, - and _ (1-32)")
    p.add_argument("--adapter", required=True, type=Path, help="adapter.safetensors from `centerprompt adapt`")
    p.add_argument("--data", type=Path, help="HECKTOR-layout folder: routing key from the center's training cases")
    base_arguments(p, required=False, text="base model the adapter was trained on (with --data)")
    p.add_argument("--skip-bad-cases", action="store_true")
    splits_argument(p)
    p.set_defaults(func=_cmd_add)

    p = actions.add_parser("list", help="the centers in a bank")
    p.add_argument("--bank", required=True, type=Path)
    p.set_defaults(func=_cmd_list)

    p = actions.add_parser("remove", help="delete a center from a bank")
    p.add_argument("--bank", required=True, type=Path)
    p.add_argument("--center", required=True)
    p.set_defaults(func=_cmd_remove)

    for name, text in (("route", "route every scan of a split; confusion matrix and routing accuracy"),
                       ("evaluate", "routing plus Dice per center: base, oracle and automatic routing")):  # fmt: skip
        p = actions.add_parser(name, help=text)
        p.add_argument("--bank", required=True, type=Path)
        base_arguments(p, text="the base model the bank was built on (as given to bank add)")
        p.add_argument("--data", required=True, type=Path, help="HECKTOR-layout folder with every center to test")
        p.add_argument("--false-fallback", type=float, metavar="RATE",
                       help="share of a banked center's own scans allowed to fall back to the base model; sets "
                       "the distance threshold under the key's chi-square model (default 0.0001: measured to send every "
                       "held-out scan home, benchmarks/RESULTS.md)")  # fmt: skip
        p.add_argument("--centers", help="comma-separated centers to test (default: all)")
        p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
        p.add_argument("--score-at", default="ct", choices=("ct", "preprocessed"))
        p.add_argument("--skip-bad-cases", action="store_true")
        splits_argument(p)
        if name == "evaluate":
            p.add_argument("--single-center", help="also score every scan with this bank center's prompts")
        p.add_argument("--out", required=True, type=out_path, help="folder for bank_eval.json, bank_eval.md, confusion.png")
        p.set_defaults(func=_cmd_route, command_name=name, out_kind="folder")

    p = actions.add_parser("export", help="one MONAI Bundle per banked center (OUT/CENTER), runs without centerprompt")
    p.add_argument("--bank", required=True, type=Path)
    base_arguments(p, text="the base model the bank was built on (as given to bank add)")
    p.add_argument("--centers", help="comma-separated centers to export (default: all)")
    add_format_arguments(p)
    p.add_argument("--out", required=True, type=out_path, help="new (or empty) folder; one bundle per center inside")
    p.set_defaults(func=_cmd_export)
