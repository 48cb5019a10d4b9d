"""A bank center's routing key from its labelled cases in a data folder: the one place the bank
reads a data folder's split (routing itself holds only the statistics)."""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from centerprompt.bank.acquisition import acquisition_features
from centerprompt.bank.routing import RoutingKey
from centerprompt.checkpoints import BaseLike
from centerprompt.files import bars
from centerprompt.runs.base import open_base
from centerprompt.runs.selection import CaseSelection

logger = logging.getLogger(__name__)


def routing_key_from_data(selection: CaseSelection, base: BaseLike | None = None, *, progress: bool = True) -> RoutingKey:
    """Routing key of the one center of ``selection`` from its cases' original files (by default its
    training cases, never the test set); the split as the selection chooses it (its file, else the
    data folder's, else the base model's own)."""
    (center,) = selection.centers
    selected = selection.open(open_base(base) if base is not None else None)
    cases = [selected.cases[i] for i in selected.ids]
    if not cases:
        raise ValueError(f"center {center!r} has no labelled {selection.split} cases in {selection.data_dir} to "
                         "compute its routing key.")  # fmt: skip
    if len(cases) < 3:
        logger.warning("routing key of %s from %d case(s): its threshold is uncalibrated", center, len(cases))
    features = [acquisition_features(c.ct, c.pet)
                for c in tqdm(cases, desc=f"key {center}", unit="case", disable=bars(progress))]  # fmt: skip
    return RoutingKey.from_features(np.stack(features))
