"""Sub-commands that use a model: evaluate, score, inspect and predict."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from centerprompt.cli.paths import DeprecatedAlias, out_path
from centerprompt.cli.runs import base_arguments, base_spec, splits_argument


def _bank_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank", type=Path, help="prompt bank folder: serve every center from one backbone")
    p.add_argument("--route", metavar="auto|base|CENTER",
                   help="with --bank: 'auto' routes each scan by its acquisition (default), a banked center's name "
                        "serves every scan with its prompts, 'base' with none")  # fmt: skip
    p.add_argument("--center", dest="route", action=DeprecatedAlias, help=argparse.SUPPRESS)  # before --route
    p.add_argument("--false-fallback", type=float, metavar="RATE",
                   help="with --bank and auto routing: share of a banked center's own scans allowed to fall back to "
                        "the base model under the key's chi-square model; sets the distance threshold (default 0.0001: "
                        "measured to send every held-out scan home, benchmarks/RESULTS.md)")  # fmt: skip


def case_selection(args: argparse.Namespace, **fixed: Any) -> Any:
    """The :class:`~centerprompt.runs.selection.CaseSelection` a scoring command's flags describe
    (``--data``, ``--centers``, ``--split``, ``--score-at``, ``--skip-bad-cases``, ``--splits``)."""
    from centerprompt.runs.selection import CaseSelection

    given = {"data_dir": args.data, "centers": tuple(args.centers.split(",")) if getattr(args, "centers", None) else (),
             "split": getattr(args, "split", "test"), "score_at": getattr(args, "score_at", "ct"),
             "skip_bad_cases": args.skip_bad_cases, "splits_file": args.splits,
             "case_ids": read_case_list(args.cases) if getattr(args, "cases", None) else ()}  # fmt: skip
    return CaseSelection(**{**given, **fixed})


EXPERIMENT_TEST_SET = "new_center_test_cases"  # in an experiment's results.json


def read_case_list(path: Path) -> tuple[str, ...]:
    """``--cases``: a JSON list of case IDs, or an experiment's results.json (its new center's test
    cases: the cases its table's new-center column was scored on)."""
    import json

    from centerprompt.files import read_text

    try:
        data = json.loads(read_text(path, "case list"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg}); give a list of case IDs or an experiment's results.json.") from err
    ids = data.get(EXPERIMENT_TEST_SET) if isinstance(data, dict) else data
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path}: neither a list of case IDs nor an experiment's results.json ({EXPERIMENT_TEST_SET}).")
    return tuple(ids)


def model_source(args: argparse.Namespace) -> Any:
    """What serves predict's and evaluate's scans: ``--bank`` (``--route`` among its centers), else
    ``--base`` with ``--adapter`` if given; on ``--device`` where the command has it."""
    device = chosen_device(getattr(args, "device", None))
    if args.bank:
        from centerprompt.bank.serving import BankSource

        return BankSource(base_spec(args), args.bank, args.route or "auto", device=device, **false_fallback_option(args))
    if args.route is not None:
        raise ValueError("--route chooses among a bank's centers: give --bank.")
    from centerprompt.runs.predict import AdaptedModel

    return AdaptedModel(base_spec(args), args.adapter, device)


def chosen_device(name: str | None) -> Any:
    """``--device`` (cpu, cuda, cuda:1, mps) as a torch device, refused in one line when absent here; None: the default."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N, mps).") from err
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here.")
    return device


def false_fallback_option(args: argparse.Namespace) -> dict[str, float]:
    """``false_fallback`` for the bank's functions when given (their default otherwise)."""
    return {} if args.false_fallback is None else {"false_fallback": args.false_fallback}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from centerprompt.runs.score import evaluate
    from centerprompt.files import write_json

    result = evaluate(case_selection(args), model_source(args))
    write_json(result, args.out)
    _print_table(result)
    print(f"per-case results: {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from centerprompt.study.reliance import inspect_base
    from centerprompt.files import write_json

    if args.adapter:
        return _inspect_adapter(args)
    r = inspect_base(base_spec(args), case_selection(args))
    if args.out:
        write_json(r, args.out)
    grid = "x".join(map(str, r["token_grid"]))
    print(f"{args.base}: {grid} tokens per window; {len(r['cases'])} {args.split} cases of {', '.join(r['centers'])}")
    print(f"DSCagg intact {r['intact_dsc_agg']:.3f}, with mean tokens {r['ablated_dsc_agg']:.3f}: "
          f"transformer reliance {r['drop']:.3f}"
          + ("  (the decoder barely uses the transformer: prompts have little to steer)" if r["drop"] < 0.05 else ""))
    for name, d in r.get("prompt_reading", {}).get("minus_own", {}).items():
        print(f"read with {name} instead of each center's own prompt set: DSCagg {d['difference']:+.3f} "
              f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")  # fmt: skip
    return 0


def _inspect_adapter(args: argparse.Namespace) -> int:
    from centerprompt.study.diagnostic import inspect_adapter, plot_effect
    from centerprompt.files import write_json

    r = inspect_adapter(base_spec(args), args.adapter, case_selection(args))
    if args.out:
        write_json(r, args.out)
        plot_effect(r, Path(args.out).with_suffix(".png"), title=f"{r['strategy']} adapter on {', '.join(r['centers'])}")
    share = r["prompt_attention_share"]
    print(f"{args.adapter} ({r['strategy']}) on {len(r['cases'])} {args.split} cases of {', '.join(r['centers'])}")
    if share:
        print("attention of patch tokens on prompts, per layer: " + " ".join(f"{v:.3f}" for v in share))
    print(f"{'stage':>20} {'rel. change':>12} {'uniform share':>14}")
    for name, s in {**r["stages"], "logits": r["logits"]}.items():
        print(f"{name:>20} {s['relative_change']:>12.4f} {s['uniform_share']:>14.3f}")
    print(f"voxels whose label changes: {100 * r['label_change_share']:.3f}%")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from centerprompt.runs.predict import check_prediction_out, folder_pairs, predict

    if not args.input and not (args.ct and args.pet):
        raise ValueError("give --ct and --pet (one case) or --input DIR (a folder of cases).")
    check_prediction_out(args.out, folder=bool(args.input))  # before reading anything
    source = model_source(args)  # the device is checked here; the model is read when the first scan needs it
    pairs = folder_pairs(args.input, args.out) if args.input else [(args.ct, args.pet, args.out)]
    # A folder goes on past a bad case and reports it below; one case stops with its problem (exit 2).
    skipped: list[str] = []
    on_bad_case = skipped.append if args.input else None
    records = predict(source, pairs, on_bad_case=on_bad_case, overwrite=args.overwrite, tta=args.tta,
                      save_probabilities=args.save_probabilities)  # fmt: skip
    routed = [r for r in records if r.get("center") is not None]
    for r in routed:
        route = r.get("route") or {}
        why = f"; {route['reason']}" if route.get("reason") else ""
        print(f"{r['ct']}: prompts of {r['center']}" + (f" (distance {route['distance']:.2f}, threshold "
                                                         f"{route['threshold']:.2f}{why})" if route else ""))  # fmt: skip
    if routed:
        from centerprompt.files import write_json

        one_case = Path(str(args.out).removesuffix(".gz")).with_suffix(".routing.json")  # CASE.routing.json
        where = Path(args.out) / "routing.json" if args.input else one_case
        write_json({**source.describe(), "scans": routed}, where)
        print(f"routing decisions: {where}")
    print(f"wrote {len(records)} prediction(s) on the CT grid" + (f" to {args.out}" if args.input else f": {args.out}"))
    if skipped:
        print(f"skipped {len(skipped)} of {len(pairs)} case(s) that failed the input checks:", file=sys.stderr)
        for problem in skipped:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from centerprompt.files import write_json
    from centerprompt.runs.score import score_folders

    result = score_folders(args.predictions, args.labels)
    if args.out:
        write_json(result, args.out)
    _print_table(result)
    print(f"DSCagg pooled in mm³ over {result['overall']['n_cases']} cases" + (f"; per case: {args.out}" if args.out else ""))
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f"{'center':8} {'cases':>5} {'DSCagg GTVp':>12} {'DSCagg GTVn':>12} {'mean':>6}")
    for center, s in {**result["per_center"], "all": result["overall"]}.items():
        d = s["dsc_agg"]
        print(f"{center:8} {s['n_cases']:>5} {d['gtvp']:>12.3f} {d['gtvn']:>12.3f} {d['mean']:>6.3f}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice and HD95 per case and per center")
    p.add_argument("--data", required=True, type=Path)
    base_arguments(p)
    p.add_argument("--adapter", type=Path, help="per-center adapter file")
    p.add_argument("--centers", help="comma-separated centers (default: all)")
    p.add_argument("--cases", type=Path, help="exactly these cases (instead of --centers and --split): a JSON list of "
                   "case IDs, or an experiment's results.json, whose new-center test set its table was scored on")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--score-at", default="ct", choices=("ct", "preprocessed"), help="grid the scores are computed on")
    p.add_argument("--skip-bad-cases", action="store_true", help="skip (with a warning) cases that fail the checks")
    splits_argument(p)
    _bank_options(p)
    p.add_argument("--out", required=True, type=out_path, help="JSON file")
    p.set_defaults(func=_cmd_evaluate, out_kind="file")

    p = sub.add_parser("inspect", help="transformer reliance of a base model (Dice intact vs ViT tokens ablated); "
                       "with --adapter, where the adapter's change goes and how much reaches the logits")
    base_arguments(p)
    p.add_argument("--adapter", type=Path, help="an adapter file: measure its effect inside the model instead "
                   "(per layer prompt attention, per stage change and uniform share, logits, labels changed)")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--centers", help="comma-separated centers (default: those the base was trained on)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--score-at", default="ct", choices=("ct", "preprocessed"))
    p.add_argument("--skip-bad-cases", action="store_true")
    splits_argument(p)
    p.add_argument("--out", type=out_path, help="also write the result as JSON (with --adapter, and a figure "
                   "beside it, same name, .png)")
    p.set_defaults(func=_cmd_inspect, out_kind="file")

    p = sub.add_parser("predict", help="segment CT/PET pairs; the label map is written on the CT grid",
                       description="Segment CT/PET pairs. Each pair is first checked as check-data checks a case "
                                   "(readable, 3D, finite, CT and PET overlapping, CT in HU, PET in SUV): one bad "
                                   "case stops with its problem (exit 2); with --input the other cases are still "
                                   "predicted and the bad ones listed at the end (exit 1).")  # fmt: skip
    base_arguments(p)
    p.add_argument("--adapter", type=Path)
    p.add_argument("--ct", type=Path, help="CT NIfTI of one case (HU)")
    p.add_argument("--pet", type=Path, help="PET NIfTI of the same case (SUV)")
    p.add_argument("--input", "-i", type=Path, help="a folder of cases (<ID>__CT.nii.gz, <ID>__PT.nii.gz) instead")
    _bank_options(p)
    p.add_argument("--out", "-o", required=True, type=out_path,
                   help="output file ending in .nii.gz or .nii (one case), or folder (--input); never an input, "
                        "never inside the data folder")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace predictions that already exist (refused without)")
    p.add_argument("--device", help="where the network runs: cpu, cuda, cuda:N (default: the GPU if there is one)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: the mean of the 8 mirrorings of the volume (8 times the time)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write the softmax on the CT grid (float32, X x Y x Z x 3) as CASE_probabilities.nii.gz")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("score", help="score label maps made by any tool against ground truth, as HECKTOR 2022 does",
                       description="Per-case Dice and HD95, per-center and overall DSCagg pooled in mm³, as the "
                                   "HECKTOR 2022 organisers compute them: a prediction whose values are not 0, 1, 2 "
                                   "or whose voxel spacing differs from its label's is refused; one on another grid "
                                   "is resampled (nearest neighbour) onto the label's.")  # fmt: skip
    p.add_argument("--predictions", "-i", required=True, type=Path, help="folder of CASE.nii.gz label maps")
    p.add_argument("--labels", required=True, type=Path,
                   help="folder of ground-truth <CENTER>-<ID>.nii.gz (or a HECKTOR folder: its labelsTr)")
    p.add_argument("--out", "-o", type=out_path, help="also write per-case and per-center results as JSON")
    p.set_defaults(func=_cmd_score, out_kind="file")
