"""``centerprompt synth``: write the synthetic multi-center HECKTOR-like dataset."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from centerprompt.cli.paths import out_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic multi-center PET/CT dataset (HECKTOR layout)",
        description="Generate synthetic head-and-neck PET/CT cases, one acquisition profile per center, "
        "in the HECKTOR 2022 layout (imagesTr/, labelsTr/, dataset.json, profiles.json).",
    )
    p.add_argument("--out", required=True, type=out_path, help="output folder (created; finished cases are kept)")
    p.add_argument("--cases-per-center", type=int, default=16, help="patients per center (default 16)")
    p.add_argument("--cases", default=None, metavar="NAME=N,...",
                   help="patients of some centers where they differ from --cases-per-center (e.g. a new center's 40)")
    p.add_argument("--centers", default=None, help="comma-separated centers (default: all profiles)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--profiles", type=Path, default=None,
                   help="JSON/YAML file of extra or replacing center profiles (see docs/centers.md)")
    p.set_defaults(func=run, out_kind="folder")


def run(args: argparse.Namespace) -> int:
    from centerprompt.data.synthetic.profiles import DEFAULT_PROFILES, load_profiles
    from centerprompt.data.synthetic.writer import generate_dataset

    profiles = dict(DEFAULT_PROFILES)
    if args.profiles is not None:
        profiles.update(load_profiles(args.profiles))
    centers = [c.strip() for c in args.centers.split(",") if c.strip()] if args.centers else None
    start = time.perf_counter()
    out = generate_dataset(args.out, centers=centers, cases_per_center=args.cases_per_center, seed=args.seed,
                           profiles=profiles, cases=_counts(args.cases))
    seconds = time.perf_counter() - start
    n_cases = json.loads((out / "dataset.json").read_text())["num_training"]
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"synth: {out}: {n_cases} cases, {size_mb:.1f} MB, {seconds:.1f} s")
    return 0


def _counts(text: str | None) -> dict[str, int] | None:
    """``--cases CHUM=4,NEW=40`` as {center: patients}."""
    if not text:
        return None
    counts = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--cases: expected NAME=N items separated by commas, got {item!r}.")
        counts[name.strip()] = int(n)
    return counts
