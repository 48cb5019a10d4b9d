"""Scoring a predictor on a fixed list of labelled cases: the layer every job, report and bank uses.

A predictor is anything that maps a case's index to its label map in preprocessed space, so a
single model, a model with a prompt bank or a cache of earlier predictions are scored the same way,
by the same metrics, without subclassing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from centerprompt.data.cases import Case
from centerprompt.data.transforms import (
    PreprocessConfig,
    inference_transforms,
    invert_prediction,
    load_label_on_ct_grid,
    make_dataset,
)
from centerprompt.evaluate import aggregate, case_metrics, sliding_window_predict
from centerprompt.files import bars

SCORE_AT = ("ct", "preprocessed")  # the grid cases are scored on: each CT's own, or the preprocessed crop
SW_BATCH = 4  # sliding windows per forward pass: fewer, larger calls are faster on CPU and GPU

Predictor = Callable[[int], torch.Tensor]  # case index -> label map (1, D, H, W) in preprocessed space


class Scorer:
    """Labelled cases preprocessed once, and the per-case scores of any predictor on them.

    ``score_at="ct"`` maps every prediction back onto the case's original CT grid and compares it
    with the label there, as the HECKTOR evaluation does; ``"preprocessed"`` compares in the
    resampled crop (faster, used for validation during training).
    """

    def __init__(self, cases: Sequence[Case], preprocess: PreprocessConfig, score_at: str = "ct") -> None:
        if score_at not in SCORE_AT:
            raise ValueError(f"score_at must be 'ct' or 'preprocessed', got {score_at!r}.")
        self.cases = list(cases)
        self.preprocess = preprocess
        self.score_at = score_at
        self.transform = inference_transforms(preprocess, with_label=True)
        self.dataset = make_dataset(self.cases, self.transform, cache="memory")
        self._ct_labels: dict[str, tuple[np.ndarray, tuple[float, ...]]] = {}

    def image(self, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The network input (1, C, D, H, W) of case ``index``."""
        return self.dataset[index]["image"].as_tensor()[None].to(device)

    def predict(self, model: torch.nn.Module, index: int, **model_kwargs: Any) -> torch.Tensor:
        """Label map (1, D, H, W) of ``model`` (sliding window) for case ``index``, in preprocessed space.

        A model with center prompts (prompt-aware pretraining) gets the case's center, so a
        pretraining center's scans are read with its own prompts, as that model serves them.
        """
        if getattr(model, "center_prompts", None) is not None and "prompts" not in model_kwargs:
            model_kwargs.setdefault("centers", [self.cases[index].center])
        image = self.image(index, next(model.parameters()).device)
        probs = sliding_window_predict(model, image, self.preprocess.roi_size, SW_BATCH, **model_kwargs)
        return probs.argmax(1).cpu()

    def _reference(self, index: int) -> tuple[np.ndarray, tuple[float, ...]]:
        case = self.cases[index]
        if case.case_id not in self._ct_labels:
            import nibabel as nib

            spacing = tuple(float(s) for s in nib.load(case.ct).header.get_zooms()[:3])
            self._ct_labels[case.case_id] = (load_label_on_ct_grid(case), spacing)
        return self._ct_labels[case.case_id]

    def score_predictions(
        self, predict: Predictor, desc: str = "score", progress: bool = True, distances: bool = True
    ) -> list[dict[str, Any]]:
        """Per-case metrics of ``predict(index)`` for every case, in list order (``distances=False``: no HD95)."""
        results = []
        for i in tqdm(range(len(self.cases)), desc=desc, unit="case", disable=bars(progress), leave=False):
            case, pred = self.cases[i], predict(i)
            if self.score_at == "ct":
                pred_ct = invert_prediction(pred, self.dataset[i], self.transform)[0].numpy().round()
                label, spacing = self._reference(i)
                metrics = case_metrics(pred_ct.astype(np.int64), label.astype(np.int64), spacing, distances=distances)
            else:
                label = self.dataset[i]["label"][0].as_tensor().round().long()
                metrics = case_metrics(pred[0], label, self.preprocess.spacing, distances=distances)
            results.append({"case_id": case.case_id, "center": case.center, **metrics})
        return results

    def score(
        self, model: torch.nn.Module, desc: str = "score", progress: bool = True, distances: bool = True
    ) -> list[dict[str, Any]]:
        """Per-case metrics of one model's sliding-window predictions."""
        return self.score_predictions(lambda i: self.predict(model, i), desc=desc, progress=progress, distances=distances)


def validator(scorer: Scorer) -> Callable[[torch.nn.Module], float]:
    """Validation metric for early stopping: mean of the GTVp and GTVn aggregated Dice (no HD95: not needed)."""

    def validate(model: torch.nn.Module) -> float:
        value = aggregate(scorer.score(model, progress=False, distances=False))["overall"]["dsc_agg"]["mean"]
        return 0.0 if np.isnan(value) else float(value)

    return validate
