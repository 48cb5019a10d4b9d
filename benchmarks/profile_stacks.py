"""Sum py-spy's collapsed stacks (``py-spy record --format raw``) into the phases of a training run.

Each sample is charged to the first phase whose marker appears in its stack, in the order below, so
a validation pass inside the epoch loop counts as validation, not as training.
Usage: python benchmarks/profile_stacks.py STACKS.txt [...]  -> a markdown table per file.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

# (phase, markers): a marker is a function name as py-spy writes it ("name (file.py:line)").
PHASES = (
    ("data generation", ("generate_dataset",)),
    ("data checks", ("validate_cases", "check_case")),
    ("caching (deterministic preprocessing)", ("CacheDataset", "_fill_cache", "make_dataset")),
    ("validation", ("validate (", "score_predictions")),
    ("checkpoints", ("_save (",)),
    ("training step: backward", ("backward (",)),
    ("training step: forward and loss", ("forward (", "_call_impl")),
    ("training step: optimizer", ("step (", "clip_grad_norm_")),
    ("loading and augmenting crops", ("__next__", "_next_data", "__getitem__")),
)


def phase_of(stack: str) -> str:
    for name, markers in PHASES:
        if any(m in stack for m in markers):
            return name
    return "other (imports, start-up, logging)"


def table(path: Path) -> str:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[phase_of(stack)] += int(n)
    total = sum(counts.values()) or 1
    rows = [f"| {name} | {n} | {n / total:.1%} |" for name, n in counts.most_common()]
    return "\n".join([f"{path.name} ({total} samples)", "", "| phase | samples | share |", "|---|---:|---:|", *rows])


if __name__ == "__main__":
    print("\n\n".join(table(Path(p)) for p in sys.argv[1:]))
