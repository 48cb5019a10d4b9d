"""Routing a scan to a bank center by its acquisition fingerprint, with calibrated abstention.

A center's key is a diagonal Gaussian over the fingerprint of its training scans
(:mod:`~centerprompt.bank.acquisition`: spacing, extent, CT noise and HU, PET SUV level and noise).
A scan's distance to a center is its squared Mahalanobis distance, divided by a scale fitted on
the center's own cases left out one at a time, so that for the center's own new scans it follows
a chi-square law with one degree of freedom per feature. The nearest center wins; a scan beyond the
chi-square quantile of the target false-fallback rate for every center goes to the base model, so a
scan from an unknown source gets what it got before the bank. The chi-square law is a model: keys
from a dozen cases under-state the tail of new scans' distances (at a nominal 5 % a tenth of
held-out scans fell back), so the default nominal rate is 0.01 %: measured on the synthetic and
factorial centers (benchmarks/routing_calibration.py), it sends every held-out scan home (the
largest distance 38 against a threshold of 45.9) and every unbanked center's scan to the base
model (the nearest at 169). The idea of
nearest-domain routing with fallback follows S-Prompts (arXiv 2207.12819); the abstention is a
per-center Mahalanobis out-of-distribution test (Lee et al., arXiv 1807.03888).

Each center's model uses only its own cases and fixed per-feature floors (in physical units), so
adding or removing a center never changes another center's key or threshold, and a one-center
bank routes and abstains like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2, norm, t

from centerprompt.bank.acquisition import FEATURES, FLOORS, acquisition_features

logger = logging.getLogger(__name__)

# The routing decision "no prompts": the base model. Not the strategy that trains nothing
# (centerprompt.strategies.BASE): this is where a scan goes, not how an adapter was trained.
FALLBACK = "base"
RESERVED = (FALLBACK, "auto", "oracle")  # words the CLI and reports use beside center names
DISTANCE = "acquisition-mahalanobis"
FALSE_FALLBACK = 1e-4  # default nominal share of a banked center's own new scans allowed to fall back
PRIOR_DOF = 3.0  # pseudo-cases at the floor variance: a few cases cannot claim a tiny spread
MIN_SCALE = 0.5  # lower bound of the leave-one-out scale, for keys from near-identical cases
OUTSIDE_Z = 6.0  # a feature this many center-stds from every center lies outside every range


def false_fallback_threshold(false_fallback: float, n_features: int = len(FEATURES)) -> float:
    """Calibrated distance beyond which a scan falls back: the chi-square (1 - rate) quantile."""
    if not 0.0 < false_fallback < 1.0:
        raise ValueError(f"false-fallback rate must lie in (0, 1), got {false_fallback}.")
    return float(chi2.isf(false_fallback, n_features))


def _normal_scores(x: np.ndarray, mean: np.ndarray, var: np.ndarray, n: int) -> np.ndarray:
    """Squared per-feature deviations of ``x`` as chi-square(1) terms: with a mean and variance from
    ``n`` cases, a new case's z follows Student's t (n - 1 + PRIOR_DOF degrees of freedom, the
    prior's pseudo-cases included), whose tail is heavier than the normal one; mapping it through
    its t probability to a normal score keeps the sum over features chi-square for few cases too."""
    z = np.abs(np.asarray(x, dtype=np.float64) - mean) / np.sqrt(var * (1.0 + 1.0 / n))
    p = 2.0 * t.sf(z, n - 1 + PRIOR_DOF)
    with np.errstate(divide="ignore"):
        return np.where(p > 1e-300, norm.isf(p / 2.0) ** 2, z**2)  # far out: z itself, the larger


def _variance(features: np.ndarray, mean: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Within-center variance shrunk towards the floor (PRIOR_DOF pseudo-cases), never below it."""
    scatter = ((features - mean) ** 2).sum(0)
    var = (scatter + PRIOR_DOF * floors**2) / (features.shape[0] - 1 + PRIOR_DOF)
    return np.maximum(var, floors**2)


@dataclass(frozen=True)
class RoutingKey:
    """A center's fingerprint model: mean and variance (F,), the leave-one-out scale, the case count.

    Summary statistics only: no case's features, file names or voxels.
    """

    mean: np.ndarray
    var: np.ndarray
    scale: float
    n_cases: int
    loo: np.ndarray | None = None  # own cases' leave-one-out distances (unscaled), at build time only

    @classmethod
    def from_features(cls, features: np.ndarray, floors: np.ndarray = FLOORS) -> RoutingKey:
        """Key from a center's training fingerprints (n, F).

        The scale is the mean leave-one-out squared distance per feature (each case against the
        mean and variance of the *other* cases), so distances of new scans, not of the cases the
        key was built from, follow chi-square; a one-case key has scale 1 (floors only).
        """
        features = np.asarray(features, dtype=np.float64)
        floors = np.broadcast_to(np.asarray(floors, dtype=np.float64), features.shape[1:])
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"need fingerprints of shape (n >= 1, F), got {features.shape}.")
        n, f = features.shape
        mean = features.mean(0)
        var = _variance(features, mean, floors) if n > 1 else floors**2
        if n == 1:
            return cls(mean, var, 1.0, 1, None)
        loo = np.empty(n)
        for i in range(n):
            rest = np.delete(features, i, axis=0)
            m = rest.mean(0)
            v = _variance(rest, m, floors) if n > 2 else floors**2
            loo[i] = float(_normal_scores(features[i], m, v, n - 1).sum())
        return cls(mean, var, max(float(loo.mean()) / f, MIN_SCALE), n, loo)

    def distance(self, x: np.ndarray) -> float:
        """Scaled squared Mahalanobis distance (in normal scores); chi-square with F degrees of freedom
        for the center's own new scans."""
        return float(_normal_scores(x, self.mean, self.var, self.n_cases).sum()) / self.scale

    def z(self, x: np.ndarray) -> np.ndarray:
        """Per-feature deviation in this center's standard deviations."""
        return (np.asarray(x, dtype=np.float64) - self.mean) / np.sqrt(self.var)

    def stats(self, false_fallback: float = FALSE_FALLBACK) -> dict[str, Any]:
        """What ``bank.json`` shows: case count, scale, threshold at ``false_fallback``, and the share
        of the key's own cases (left out in turn) that this threshold would send to the base model."""
        threshold = false_fallback_threshold(false_fallback, self.mean.size)
        loo = None if self.loo is None else float((self.loo / self.scale > threshold).mean())
        return {"n_cases": self.n_cases, "features": self.mean.size, "scale": self.scale,
                "false_fallback": false_fallback, "threshold": threshold, "loo_fallback_rate": loo}  # fmt: skip


@dataclass(frozen=True)
class Route:
    """Where one scan goes: a bank center or ``"base"`` (fallback), the distances and, on fallback, why."""

    center: str
    nearest: str
    distance: float
    runner_up: str | None
    runner_up_distance: float | None
    threshold: float
    reason: str | None = None

    @property
    def fallback(self) -> bool:
        return self.center == FALLBACK

    def to_dict(self) -> dict[str, Any]:
        return {"center": self.center, "nearest": self.nearest, "distance": self.distance,
                "runner_up": self.runner_up, "runner_up_distance": self.runner_up_distance,
                "threshold": self.threshold, "fallback": self.fallback, "reason": self.reason}  # fmt: skip


def _require_keys(keys: Mapping[str, RoutingKey]) -> None:
    if not keys:
        raise ValueError("the bank has no routing keys: add centers with --data and --base to compute them.")


def route_features(
    x: np.ndarray, keys: Mapping[str, RoutingKey], false_fallback: float = FALSE_FALLBACK,
    names: Sequence[str] = FEATURES,
) -> Route:  # fmt: skip
    """Nearest center by scaled Mahalanobis distance; beyond the threshold, or with a feature outside
    every center's range (:data:`OUTSIDE_Z`), the scan goes to the base model with the reason."""
    _require_keys(keys)
    threshold = false_fallback_threshold(false_fallback, len(names))
    bad = [n for n, v in zip(names, x) if not np.isfinite(v)]
    if bad:  # NaN would compare as "near": refuse instead of routing on it
        reason = f"fingerprint features {', '.join(bad)} are not finite (NaN or infinite voxels?)"
        logger.info("falling back to the base model: %s", reason)
        return Route(FALLBACK, next(iter(keys)), float("inf"), None, None, threshold, reason)
    dist = sorted((k.distance(x), c) for c, k in keys.items())
    (d, nearest), second = dist[0], dist[1] if len(dist) > 1 else None
    z = np.stack([np.abs(k.z(x)) for k in keys.values()])  # (K, F)
    outside = np.flatnonzero(z.min(0) > OUTSIDE_Z)
    reason = None
    if outside.size:
        k, f = keys[nearest], int(outside[np.argmax(z.min(0)[outside])])
        reason = (f"{names[f]}={x[f]:.3g} lies outside every banked center's range "
                  f"(nearest {nearest}: {k.mean[f]:.3g} ± {np.sqrt(k.var[f]):.2g})")  # fmt: skip
    elif d > threshold:
        f = int(np.argmax(keys[nearest].z(x) ** 2))
        reason = (f"distance {d:.1f} to nearest center {nearest} exceeds {threshold:.1f} (false-fallback rate "
                  f"{false_fallback:g}); largest deviation {names[f]} at {keys[nearest].z(x)[f]:+.1f} std")  # fmt: skip
    if reason:
        logger.info("falling back to the base model: %s", reason)
    return Route(center=FALLBACK if reason else nearest, nearest=nearest, distance=d,
                 runner_up=second and second[1], runner_up_distance=second and second[0], threshold=threshold,
                 reason=reason)  # fmt: skip


def route_scan(
    ct: str | Path, pet: str | Path, keys: Mapping[str, RoutingKey], false_fallback: float = FALSE_FALLBACK
) -> Route:  # fmt: skip
    """Route one scan from its original CT and PET files (checked to have keys before reading them)."""
    _require_keys(keys)
    return route_features(acquisition_features(ct, pet), keys, false_fallback)
