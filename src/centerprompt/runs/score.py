"""Scoring a model source (a base, an adapter, a bank) on a split of a data folder: per case and per center."""

from __future__ import annotations

import logging
from typing import Any

from centerprompt.evaluate import aggregate
from centerprompt.runs.predict import ModelSource
from centerprompt.runs.selection import CaseSelection

logger = logging.getLogger(__name__)


def evaluate(selection: CaseSelection, source: ModelSource, *, progress: bool = True) -> dict[str, Any]:
    """Per-case and per-center scores of ``source`` (a base with or without an adapter; a bank
    serving each scan) on ``selection``; served from a bank, each case also records the center used
    and its route.

    The split is the selection's file, ``DATA/splits.json``, the one the base was pretrained with,
    or made with seed 0 (:func:`~centerprompt.runs.selection.load_index`); the result records its
    source, hash and skipped cases.
    """
    selected = selection.open(source.base)
    scorer = selected.scorer(source.base.preprocess)
    served = [source.serve(c.ct, c.pet) for c in scorer.cases]
    per_case = scorer.score_predictions(lambda i: scorer.predict(served[i].net, i, **served[i].kwargs),
                                        desc="evaluate", progress=progress)  # fmt: skip
    per_case = [{**scores, **s.record()} for scores, s in zip(per_case, served)]
    return {**selected.record(), **source.describe(), **aggregate(per_case), "per_case": per_case}
