"""Sum py-spy's collapsed stacks (``py-spy record --format raw``) into the phases of a training run.

Each sample is charged to the first phase whose marker appears in its stack, in the order below, so
a validation pass inside the epoch loop counts as validation, not as training.
Usage: python benchmarks/profile_stacks.py STACKS.txt[.gz] [...]  -> a markdown table per file.
"""

from __future__ import annotations

import gzip
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


# Helper threads that sleep beside the work (tqdm's monitor, the peak-memory sampler, a pool's
# result handlers): py-spy samples them too, but they use no CPU, so they are left out of the totals.
IDLE = ("Event.wait", "Condition.wait", "_handle_results", "_handle_tasks", "_wait_for_updates")


def phase_of(stack: str) -> str:
    for name, markers in PHASES:
        if any(m in stack for m in markers):
            return name
    return "other (imports, start-up, logging)"


def table(path: Path) -> str:
    counts: Counter[str] = Counter()
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit() and not any(marker in stack for marker in IDLE):
            counts[phase_of(stack)] += int(n)
    total = sum(counts.values()) or 1
    rows = [f"| {name} | {n} | {n / total:.1%} |" for name, n in counts.most_common()]
    head = f"{path.name} ({total} samples of the main thread's work at 100 Hz: {total / 100:.0f} s)"
    return "\n".join([head, "", "| phase | samples | share |", "|---|---:|---:|", *rows])


if __name__ == "__main__":
    print("\n\n".join(table(Path(p)) for p in sys.argv[1:]))
