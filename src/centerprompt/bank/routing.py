"""Routing a scan to a bank center: features, keys, cosine distance, per-center thresholds.

Routing follows S-Prompts (Wang et al., arXiv 2207.12819) and L2P (arXiv 2112.08654): a scan's
query is the frozen encoder's mean-pooled patch-token feature of its central window; the nearest
key by cosine distance wins, and a scan farther than the threshold from every key falls back to
the base model (no prompts), so a scan from an unknown source gets what it got before the bank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from centerprompt.artifacts import backbone_fingerprint, load_model
from centerprompt.checkpoints import BaseLike
from centerprompt.data.transforms import inference_transforms
from centerprompt.jobs import load_index, open_base, split_defaults
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.train import default_device

logger = logging.getLogger(__name__)

# The routing decision "no prompts": the base model. Not the strategy that trains nothing
# (centerprompt.strategies.BASE): this is where a scan goes, not how an adapter was trained.
FALLBACK = "base"
RESERVED = (FALLBACK, "auto", "oracle")  # words the CLI and reports use beside center names
DISTANCE = "cosine"
ROUTING_K = 3.0  # per-center threshold: mean + k * std of the own cases' distances (at least their max)


def central_window(image: torch.Tensor, roi_size: Sequence[int]) -> torch.Tensor:
    """The ``roi_size`` window at the centre of ``image`` (B, C, *spatial), zero-padded if smaller."""
    pad: list[int] = []
    for size, r in reversed(list(zip(image.shape[2:], roi_size))):
        deficit = max(int(r) - size, 0)
        pad += [deficit // 2, deficit - deficit // 2]
    image = F.pad(image, pad)
    starts = [(s - int(r)) // 2 for s, r in zip(image.shape[2:], roi_size)]
    return image[(slice(None), slice(None), *(slice(a, a + int(r)) for a, r in zip(starts, roi_size)))]


def scan_features(model: PromptedUNETR, image: torch.Tensor) -> torch.Tensor:
    """Routing query (B, C): the frozen encoder's normed patch tokens, mean over patches.

    Computed on the central ``img_size`` window of the preprocessed volume (one encoder pass per
    scan, the same window for keys and queries). ``model`` must be the plain backbone
    (``prompt_mode="none"``): prompts would make the query depend on a center's tokens.
    """
    if model.prompt_mode != "none":
        raise ValueError("routing features need the plain backbone (prompt_mode='none').")
    roi = tuple(f * p for f, p in zip(model.feat_size, model.patch_size))
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens, _ = model.encode(central_window(image.to(device), roi))  # (B, N, C)
    return tokens.mean(1).float().cpu()  # (B, C)


def cosine_distance(features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, (B, C) x (K, C) -> (B, K); in [0, 2] whatever the feature width."""
    return 1.0 - F.normalize(features.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


@dataclass(frozen=True)
class RoutingKey:
    """A center's key (C,), its own cases' distances to it (n,), and the backbone they came from."""

    key: torch.Tensor
    distances: torch.Tensor
    fingerprint: str

    @classmethod
    def from_features(cls, features: torch.Tensor, fingerprint: str) -> RoutingKey:
        """Key = mean feature of a center's training cases (the S-Prompts domain centroid).

        Each case's distance is taken to the mean of the *other* cases (leave-one-out): a case is
        part of its own mean, so in-sample distances would understate how far a new scan lies.
        """
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"need features of shape (n >= 1, C), got {tuple(features.shape)}.")
        features, n = features.float(), features.shape[0]
        key = features.mean(0)
        if n == 1:
            return cls(key, torch.zeros(1), fingerprint)
        others = (n * key - features) / (n - 1)  # (n, C): each case's leave-one-out mean
        return cls(key, 1.0 - F.cosine_similarity(features, others, dim=-1), fingerprint)

    def stats(self, k: float = ROUTING_K) -> dict[str, float | int]:
        """Own-case distance statistics and the center's threshold max(mean + k*std, max)."""
        d = self.distances.double()
        mean, std = float(d.mean()), float(d.std()) if d.numel() > 1 else 0.0
        return {"n_cases": d.numel(), "mean": mean, "std": std, "max": float(d.max()), "k": k,
                "threshold": max(mean + k * std, float(d.max()))}  # fmt: skip


def routing_key(model: PromptedUNETR, images: Iterable[torch.Tensor]) -> RoutingKey:
    """Routing key from preprocessed volumes (each (C, D, H, W)) of one center's training cases."""
    features = torch.cat([scan_features(model, img[None]) for img in images])
    if features.shape[0] < 3:
        logger.warning("routing key from %d case(s): its threshold is unreliable", features.shape[0])
    return RoutingKey.from_features(features, backbone_fingerprint(model))


def routing_key_from_data(
    data_dir: str | Path, center: str, base: BaseLike, *, split: str = "train", skip_bad_cases: bool = False,
    progress: bool = True, splits_file: str | Path | None = None,
) -> RoutingKey:  # fmt: skip
    """Routing key of ``center`` from its ``split`` cases (default: training cases, never the test set),
    preprocessed as the base checkpoint was trained; the split as :func:`centerprompt.jobs.load_index`
    chooses it (``splits_file``, else the data folder's, else the base model's own)."""
    base = open_base(base)
    cases, splits = load_index(data_dir, skip_bad_cases=skip_bad_cases, splits_file=splits_file,
                               split_defaults=split_defaults(base, None))  # fmt: skip
    if center not in splits or not splits[center][split]:
        raise ValueError(f"center {center!r} has no labelled {split} cases in {data_dir} to compute its routing key.")
    model = load_model(base, prompt_mode="none").to(default_device()).eval()
    transform = inference_transforms(base.preprocess, with_label=False)
    ids = splits[center][split]
    images = (transform({"ct": str(cases[i].ct), "pet": str(cases[i].pet)})["image"].as_tensor() for i in ids)
    return routing_key(model, tqdm(images, total=len(ids), desc=f"key {center}", unit="case", disable=not progress))


@dataclass(frozen=True)
class Route:
    """Where one scan goes: a bank center or ``"base"`` (fallback), with the distances behind it."""

    center: str
    nearest: str
    distance: float
    runner_up: str | None
    runner_up_distance: float | None
    threshold: float

    @property
    def fallback(self) -> bool:
        return self.center == FALLBACK

    def to_dict(self) -> dict[str, Any]:
        return {"center": self.center, "nearest": self.nearest, "distance": self.distance,
                "runner_up": self.runner_up, "runner_up_distance": self.runner_up_distance,
                "threshold": self.threshold, "fallback": self.fallback}  # fmt: skip


def route_features(features: torch.Tensor, keys: torch.Tensor, names: Sequence[str], threshold: float) -> list[Route]:
    """Nearest key by cosine distance; a scan farther than ``threshold`` from it goes to the base model."""
    if keys.shape[0] == 0:
        raise ValueError("the bank has no routing keys: add centers with --data and --base to compute them.")
    dist = cosine_distance(features, keys)  # (B, K)
    order = dist.argsort(dim=1)
    routes = []
    for b in range(dist.shape[0]):
        best = int(order[b, 0])
        second = int(order[b, 1]) if keys.shape[0] > 1 else None
        d = float(dist[b, best])
        routes.append(Route(
            center=names[best] if d <= threshold else FALLBACK, nearest=names[best], distance=d,
            runner_up=None if second is None else names[second],
            runner_up_distance=None if second is None else float(dist[b, second]), threshold=threshold,
        ))  # fmt: skip
    return routes
