"""Does the decoder use the transformer? The token ablation behind ``base.transformer_reliance``.

Prompts, LoRA and BitFit act only inside the ViT. If a UNETR segments from its convolutional
skip path on the raw image, they have nothing to steer, whatever their recipe. The ablation
replaces every ViT token grid that feeds the decoder (the skip hidden states and the normed
output) by its mean over the window's tokens: the transformer's spatial information is gone, its
global summary stays. The drop in DSCagg from the intact model is the model's reliance on the
transformer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import nn

from centerprompt.artifacts import build_adapted_model
from centerprompt.checkpoints import BaseLike
from centerprompt.evaluate import aggregate
from centerprompt.runs.base import open_base
from centerprompt.runs.selection import CaseSelection
from centerprompt.scoring import Scorer
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.training.devices import default_device


def _mean_token_grid(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    grid = args[0]  # (B, C, *feat_size)
    spatial = tuple(range(2, grid.ndim))
    return (grid.mean(dim=spatial, keepdim=True).expand_as(grid).contiguous(), *args[1:])


@contextlib.contextmanager
def mean_token_ablation(model: PromptedUNETR) -> Iterator[PromptedUNETR]:
    """Within the block, every token grid reaching the decoder is replaced by its mean token."""
    handles = [m.register_forward_pre_hook(_mean_token_grid) for m in model.token_consumers()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _dsc_agg(results: list[dict[str, Any]]) -> float:
    value = aggregate(results)["overall"]["dsc_agg"]["mean"]
    return float("nan") if value is None else float(value)


def transformer_reliance(
    model: PromptedUNETR, scorer: Scorer, *, intact_cases: list[dict[str, Any]] | None = None, progress: bool = False
) -> dict[str, Any]:
    """DSCagg (mean of GTVp and GTVn) of ``model`` on ``scorer``'s cases, intact and token-ablated.

    ``drop`` = intact - ablated: near 0 when the decoder ignores the transformer, large when the
    segmentation depends on it. ``intact_cases``: the intact model's per-case scores on these
    cases, when the caller already has them.
    """
    if intact_cases is None:
        intact_cases = scorer.score(model, desc="reliance: intact", progress=progress)
    with mean_token_ablation(model):
        ablated_cases = scorer.score(model, desc="reliance: mean tokens", progress=progress)
    intact, ablated = _dsc_agg(intact_cases), _dsc_agg(ablated_cases)
    return {
        "intact_dsc_agg": intact,
        "ablated_dsc_agg": ablated,
        "drop": intact - ablated if not (np.isnan(intact) or np.isnan(ablated)) else float("nan"),
        "cases": [c["case_id"] for c in intact_cases],
        "ablation": "every ViT token grid feeding the decoder replaced by its mean token",
    }


def prompt_reading(model: PromptedUNETR, scorer: Scorer, *, own_cases: list[dict[str, Any]] | None = None,
                   progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Does a prompt-aware base read its prompts? DSCagg on ``scorer``'s cases read with each case's
    own center set, with the shared set, and with another center's set (the next center's in the
    model's list, so each case gets a set learned on other scans and another contouring), with
    paired bootstrap intervals of the differences. Differences near 0 mean the prompts steer nothing."""
    from centerprompt.study.intervals import paired_difference

    names = model.center_prompts.names
    if own_cases is None:
        own_cases = scorer.score(model, desc="prompts: own", progress=progress)
    tokens = model.center_prompts.tokens.detach()
    other = {c.center: tokens[(names.index(c.center) + 1) % len(names)] for c in scorer.cases if c.center in names}
    readings = {
        "the shared set": scorer.score_predictions(
            lambda i: scorer.predict(model, i, prompts=model.prompts.tokens.detach()), desc="prompts: shared",
            progress=progress),
        "another center's set": scorer.score_predictions(
            lambda i: scorer.predict(model, i, prompts=other.get(scorer.cases[i].center, model.prompts.tokens.detach())),
            desc="prompts: another center's", progress=progress),
    }  # fmt: skip
    return {"own_dsc_agg": _dsc_agg(own_cases),
            "minus_own": {k: paired_difference(own_cases, v) for k, v in readings.items()}}  # fmt: skip


def inspect_base(base: BaseLike, selection: CaseSelection, *, progress: bool = True) -> dict[str, Any]:
    """Transformer reliance of a base checkpoint on ``selection``, whose centers default to those
    the checkpoint was trained on (its metadata), or every labelled center for a checkpoint without
    that record (e.g. a bare MONAI UNETR).
    """
    base = open_base(base)
    selected = selection.open(base, base.extra.get("train_centers"))
    model = build_adapted_model(base).to(default_device())
    scorer = selected.scorer(base.preprocess)
    intact = scorer.score(model, desc="reliance: intact", progress=progress)
    reading = {"prompt_reading": prompt_reading(model, scorer, own_cases=intact, progress=progress)
               } if model.center_prompts is not None else {}  # fmt: skip
    return {"base": str(base.path), **selected.record(), "centers": selected.centers,
            "token_grid": list(model.feat_size),
            **transformer_reliance(model, scorer, intact_cases=intact, progress=progress), **reading}  # fmt: skip
