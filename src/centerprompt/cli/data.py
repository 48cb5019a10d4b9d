"""``centerprompt check-data DIR``: what layout DIR is, a per-center summary and every problem of its cases."""

from __future__ import annotations

import argparse
from typing import Sequence


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-data",
        help="check a HECKTOR 2022 folder (or an nnU-Net v2 raw dataset, a MONAI datalist) and summarize it per center",
        description=(
            "Check every case of a HECKTOR 2022 folder (names, pairs, centers, label grid and values, "
            "NaN/inf voxels), print a per-center summary, then one line per problem. "
            "Exit status 1 when a problem is found."
        ),
    )
    p.add_argument("data_dir", metavar="DIR", help="folder containing imagesTr/ and labelsTr/ (HECKTOR names, or "
                   "nnU-Net's with its dataset.json), or a MONAI datalist JSON file")
    p.add_argument(
        "--skip-bad-cases",
        action="store_true",
        help="still list problems, but exit 0 when usable cases remain (what training with --skip-bad-cases would use)",
    )
    p.add_argument("--centers", default="", metavar="EXTRA,...",
                   help="sites expected besides the HECKTOR 2022 centers, comma-separated: not reported as new "
                        "(every center prefix is accepted, by every command)")
    p.set_defaults(func=check_data)


def _span(lo: Sequence[float], hi: Sequence[float], fmt: str) -> str:
    """'2.5x2.5x3' or '0.98-1.4x0.98-1.4x3' for per-axis ranges."""
    return "x".join(format(a, fmt) if a == b else f"{a:{fmt}}-{b:{fmt}}" for a, b in zip(lo, hi))


def _volumes(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def format_summary(summary: dict) -> str:
    """Per-center table: cases, CT/PET spacing (mm) and size (voxels), mean (range) label volumes (ml)."""
    header = ("center", "cases", "CT spacing", "CT size", "PET spacing", "PET size", "GTVp ml", "GTVn ml")
    rows = [header]
    for center, s in summary.items():
        rows.append((
            center,
            f"{s.cases} ({s.labelled} lab.)",
            _span(*s.ct_spacing, ".3g"),
            _span(*s.ct_size, "d"),
            _span(*s.pet_spacing, ".3g"),
            _span(*s.pet_size, "d"),
            _volumes(s.gtvp_ml),
            _volumes(s.gtvn_ml),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def check_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from centerprompt.data.checks import check_cases, summarize
    from centerprompt.data.datalists import describe_layout
    from centerprompt.data.hecktor import scan_cases

    print(describe_layout(Path(args.data_dir)))
    extra = [c.strip() for c in args.centers.split(",") if c.strip()]
    cases, layout_problems = scan_cases(args.data_dir, allowed_centers=extra)
    content_problems = check_cases(cases)
    problems = [msg for _, msg in layout_problems] + [p for ps in content_problems.values() for p in ps]
    good = [c for c in cases if c.case_id not in content_problems]

    if good:
        print(format_summary(summarize(good)))
    n_bad = len({case_id for case_id, _ in layout_problems} | set(content_problems))
    if not problems:
        print(f"\n{len(good)} cases, no problems found")
        return 0
    print(f"\n{len(problems)} problem(s) in {n_bad} case(s):")
    for problem in problems:
        print(problem)
    if args.skip_bad_cases and good:
        print(f"\n--skip-bad-cases: {len(good)} usable case(s) remain")
        return 0
    return 1
