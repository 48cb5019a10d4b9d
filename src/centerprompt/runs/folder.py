"""A run folder: its lock and log while a job runs, the configuration that decides whether a
finished run is reused, resumed or refused, and the split it used.

A run folder holds the resolved configuration (``config.json``), a log, per-epoch metrics,
checkpoints and a ``summary.json`` written last, whose presence marks the run as finished."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from centerprompt.data.cases import DataError
from centerprompt.data.hecktor import SPLITS_FILE, Splits, read_splits, write_splits
from centerprompt.files import folder_lock, jsonable, remove_stale_temporaries, write_json
from centerprompt.training.devices import rank
from centerprompt.training.loop import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE, TrainConfig

logger = logging.getLogger(__name__)


SUMMARY = "summary.json"


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """While a job runs (rank 0 only): hold the run folder's lock (a second writer is refused,
    :func:`folder_lock`) and copy the package's log records into ``run_dir/log.txt``."""
    if rank() != 0:
        yield
        return
    with folder_lock(run_dir), _logged(run_dir):
        yield


@contextlib.contextmanager
def _logged(run_dir: Path) -> Iterator[None]:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("centerprompt")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def keep_splits(splits: Splits, run_dir: Path) -> Path:
    """Record the split a run used in ``run_dir/splits.json`` (rank 0; unchanged when it already holds it)."""
    path = run_dir / SPLITS_FILE
    with contextlib.suppress(DataError):  # an unreadable record is replaced
        if path.exists() and read_splits(path).sha256 == splits.sha256:
            return path
    if rank() == 0:
        write_splits(splits, path)
    return path


RUN_FILES = ("config.json", SUMMARY, METRICS_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT, "model.safetensors",
             "adapter.safetensors")  # fmt: skip


def _clear(run_dir: Path) -> None:
    """Remove what an earlier run left in ``run_dir`` (only the files a run writes; the log is appended to)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


# Training settings older runs recorded that no longer exist, with the value under which the run
# trained exactly as one without the setting does (``min_epochs``: patience_from's predecessor).
RETIRED_TRAIN_FIELDS = {"min_epochs": 0}


def _recorded_as_today(config: dict[str, Any], predates: Mapping[str, Any] = {}) -> dict[str, Any]:
    """A run's recorded configuration in today's terms: settings it predates take their defaults
    (``predates``: the run's own fields, e.g. ``center_prompts``; every training setting), retired
    ones at their neutral value are dropped, so a run that would train the same way today is reused
    rather than trained again (a 14-minute base model, say)."""
    config = {**jsonable(predates), **config}
    train = config.get("train")
    if not isinstance(train, dict):
        return config
    upgraded = {**jsonable(TrainConfig().__dict__), **train}
    for name, neutral in RETIRED_TRAIN_FIELDS.items():
        if upgraded.get(name, neutral) == neutral:
            upgraded.pop(name, None)
    return {**config, "train": upgraded}


def open_run(
    run_dir: Path, config: dict[str, Any], *, resume: bool, on_change: str = "refuse", predates: Mapping[str, Any] = {},
) -> dict[str, Any] | None:  # fmt: skip
    """Prepare ``run_dir`` for a job with ``config``; return the finished summary when it can be reused.

    A run folder never mixes two runs. Without ``resume`` it starts clean. With ``resume``: a
    folder whose ``config.json`` equals ``config`` is resumed from its last checkpoint, or reused
    as it is when finished; one made with another configuration is refused (``on_change="refuse"``,
    naming the fields that differ) or cleared and run again (``"rerun"``). ``predates``: the
    defaults of the run's fields, which a run recorded before a field existed trained with.
    """
    path = run_dir / "config.json"
    new = jsonable(config)  # as write_json stores it, so that an unchanged run compares equal
    old = _recorded_as_today(json.loads(path.read_text()), {k: v for k, v in predates.items() if k in new}) if path.exists() else None
    if resume and old is not None and old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if on_change == "refuse":
            raise ValueError(f"{run_dir}: holds a run with another configuration ({', '.join(changed)}); use another "
                             "--out, or train it again (without --resume; in an experiment: --on-change rerun).")  # fmt: skip
        logger.info("%s: configuration changed (%s); running it again", run_dir, ", ".join(changed))
        old = None
    if resume and old is not None and (run_dir / SUMMARY).exists():
        logger.info("reusing the finished run %s", run_dir)
        return json.loads((run_dir / SUMMARY).read_text())
    if rank() == 0:
        for stale in remove_stale_temporaries(run_dir) if run_dir.is_dir() else ():
            logger.info("removed %s, left by a run killed while writing it", stale)
        if not (resume and old is not None):
            _clear(run_dir)
        write_json(new, path)
    return None
