"""Paired bootstrap intervals for differences of DSCagg between two models on the same test cases.

DSCagg pools overlaps over a set of cases (2 sum TP / sum(|pred| + |label|) per class, mean of
GTVp and GTVn), so it is not a mean of per-case values and its interval cannot come from a
t-test: each resample draws test cases with replacement, the same draw for both models (paired:
the cases' difficulty cancels), and recomputes both DSCaggs. The 2.5% and 97.5% quantiles of the
difference are its 95% interval. Several experiments (new centers, seeds) are pooled by resampling
inside each one and averaging their differences per resample (a stratified bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from centerprompt.evaluate import CLASSES

N_RESAMPLES = 2000
LEVEL = 0.95
MIN_GAIN = 0.01  # a gain as a fraction of full fine-tuning's is not reported when full's is below this: noise

# (reference's per-case results, other's per-case results) of one experiment, one per experiment
Pairs = Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]]


def _counts(cases: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(n_cases, n_classes, 2): intersection and |pred| + |label| per case and class."""
    return np.array([[[c[k]["intersection"], c[k]["pred_volume"] + c[k]["label_volume"]] for k in CLASSES]
                     for c in cases], dtype=float).reshape(len(cases), len(CLASSES), 2)  # fmt: skip


def _dsc_agg(pooled: np.ndarray) -> np.ndarray:
    """Mean over classes of 2 TP / (|pred| + |label|) from pooled counts (..., n_classes, 2); a class
    with nothing predicted or labelled is left out of the mean, as ``evaluate.aggregate`` does."""
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(pooled[..., 1] > 0, 2 * pooled[..., 0] / pooled[..., 1], np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(per_class, axis=-1) if per_class.size else per_class


def _paired(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    ids_a, ids_b = [c["case_id"] for c in a], [c["case_id"] for c in b]
    if ids_a != ids_b:
        raise ValueError("a paired bootstrap needs both models scored on the same cases, in the same order.")
    if not ids_a:
        raise ValueError("no test cases to resample.")
    return _counts(a), _counts(b)


def _weights(n: int, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """(resamples, n): how often each case is drawn in each resample."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


def _point(a: np.ndarray, b: np.ndarray) -> float:
    """DSCagg of ``b``'s cases minus ``a``'s, from their counts."""
    return float(_dsc_agg(b.sum(0)) - _dsc_agg(a.sum(0)))


def _resampled(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DSCagg(b) - DSCagg(a) in each resample of the case weights ``w`` (resamples, n)."""
    return _dsc_agg(np.einsum("rn,nkj->rkj", w, b)) - _dsc_agg(np.einsum("rn,nkj->rkj", w, a))


def _resampled_difference(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    return _resampled(_weights(len(a), rng, resamples), a, b)


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    kept = draws[np.isfinite(draws)]  # a ratio's resample with a zero denominator has no value
    if not kept.size:
        return (math.nan, math.nan)
    lo, hi = np.quantile(kept, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def paired_difference(
    reference: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]], *, resamples: int = N_RESAMPLES,
    level: float = LEVEL, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """DSCagg(other) - DSCagg(reference) on the same cases, with its paired bootstrap interval.

    Each argument is the per-case results of one model (``case_metrics`` with ``case_id``). Returns
    ``{"difference", "ci": [lo, hi], "level", "resamples", "n_cases"}``.
    """
    a, b = _paired(reference, other)
    draws = _resampled_difference(a, b, np.random.default_rng(seed), resamples)
    return {"difference": _point(a, b), "ci": list(_interval(draws, level)), "level": level, "resamples": resamples,
            "n_cases": len(a)}  # fmt: skip


def dsc_interval(
    cases: Sequence[Mapping[str, Any]], *, resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """One model's DSCagg on ``cases`` with its bootstrap percentile interval (cases drawn with replacement)."""
    if not cases:
        raise ValueError("no test cases to resample.")
    counts = _counts(cases)
    draws = _dsc_agg(np.einsum("rn,nkj->rkj", _weights(len(counts), np.random.default_rng(seed), resamples), counts))
    return {"dsc_agg": float(_dsc_agg(counts.sum(0))), "ci": list(_interval(draws, level)), "level": level,
            "resamples": resamples, "n_cases": len(counts)}  # fmt: skip


def pooled_difference(
    pairs: Pairs, *, resamples: int = N_RESAMPLES,
    level: float = LEVEL, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The mean over experiments of DSCagg(other) - DSCagg(reference), each on its own test cases,
    with a stratified paired bootstrap interval (cases resampled inside each experiment)."""
    rng = np.random.default_rng(seed)
    points, draws = [], []
    for reference, other in pairs:
        a, b = _paired(reference, other)
        points.append(_point(a, b))
        draws.append(_resampled_difference(a, b, rng, resamples))
    if not pairs:
        raise ValueError("no experiments to pool.")
    return {"difference": float(np.mean(points)), "ci": list(_interval(np.mean(draws, axis=0), level)),
            "level": level, "resamples": resamples, "n_experiments": len(pairs),
            "n_cases": sum(len(r) for r, _ in pairs)}  # fmt: skip


def ratio_interval(
    pairs_num: Pairs, pairs_den: Pairs, *, resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Mean gain of one strategy over mean gain of another (e.g. of full fine-tuning), both on the
    same cases, with the interval of the ratio from the same resamples (one draw for both)."""
    num_draws, den_draws, num_pts, den_pts = [], [], [], []
    rng = np.random.default_rng(seed)
    for (ref_n, oth_n), (ref_d, oth_d) in zip(pairs_num, pairs_den, strict=True):
        a, b = _paired(ref_n, oth_n)
        c, d = _paired(ref_d, oth_d)
        if len(a) != len(c):
            raise ValueError("both gains must be measured on the same cases.")
        w = _weights(len(a), rng, resamples)  # one draw of cases for both gains
        num_draws.append(_resampled(w, a, b))
        den_draws.append(_resampled(w, c, d))
        num_pts.append(_point(a, b))
        den_pts.append(_point(c, d))
    den = float(np.mean(den_pts))
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = np.mean(num_draws, axis=0) / np.mean(den_draws, axis=0)
    return {"ratio": float(np.mean(num_pts)) / den if den else math.nan, "ci": list(_interval(draws, level)),
            "level": level, "resamples": resamples}  # fmt: skip


def fraction_of_full(pairs: Pairs, full_pairs: Pairs) -> dict[str, Any] | None:
    """:func:`ratio_interval` of a gain to full fine-tuning's, or None when full's mean gain is below
    ``MIN_GAIN`` (a ratio to noise)."""
    full_gain = np.mean([_point(*_paired(ref, full)) for ref, full in full_pairs]) if full_pairs else 0.0
    return ratio_interval(pairs, full_pairs) if abs(full_gain) >= MIN_GAIN else None


def add_intervals(results: dict[str, Any], reference: str = "none", full: str = "full") -> None:
    """Add to each row of an experiment's results: its new-center gain over ``reference`` and its
    old-center change, each with a paired bootstrap interval, and its gain as a fraction of ``full``'s
    (when full's gain is at least ``MIN_GAIN``)."""
    rows = results["strategies"]
    if reference not in rows:
        return
    base = rows[reference]
    full_pairs = [(base["new_center"]["per_case"], rows[full]["new_center"]["per_case"])] if full in rows else []
    for name, row in rows.items():
        row["gain_ci"] = paired_difference(base["new_center"]["per_case"], row["new_center"]["per_case"])["ci"]
        old = paired_difference(base["old_centers"]["per_case"], row["old_centers"]["per_case"])
        row["old_change"], row["old_change_ci"] = old["difference"], old["ci"]
        if name == reference:  # its own gain is 0 by construction
            continue
        ratio = fraction_of_full([(base["new_center"]["per_case"], row["new_center"]["per_case"])], full_pairs)
        if ratio is not None:
            row["fraction_of_full"], row["fraction_of_full_ci"] = ratio["ratio"], ratio["ci"]


def served_cases(results: Mapping[str, Any], name: str, part: str, reference: str = "none") -> list[Mapping[str, Any]]:
    """Per test case of ``part``, row ``name``'s result where the scan was routed to the new center's
    adapter (``results["routing"]``) and ``reference``'s elsewhere: what serving from a bank scores."""
    rows, routed = results["strategies"], results["routing"][part]
    own = {c["case_id"]: c for c in rows[name][part]["per_case"]}
    return [own[c["case_id"]] if routed[c["case_id"]] else c for c in rows[reference][part]["per_case"]]


def served_from_bank(results: Mapping[str, Any], name: str, reference: str = "none") -> dict[str, Any]:
    """Row ``name``'s new-center gain and old-center change when served from a bank, with intervals,
    and the shares of test scans routed to its adapter."""
    served: dict[str, Any] = {}
    for part, label in (("new_center", "gain"), ("old_centers", "old_change")):
        diff = paired_difference(results["strategies"][reference][part]["per_case"], served_cases(results, name, part))
        routed = results["routing"][part]
        served.update({label: diff["difference"], f"{label}_ci": diff["ci"],
                       f"{part}_routed": sum(routed.values()) / max(len(routed), 1)})  # fmt: skip
    return served


def pool_experiments(experiments: Mapping[str, Mapping[str, Any]], reference: str = "none",
                     full: str = "full") -> dict[str, Any]:  # fmt: skip
    """Pool several experiments' results (key: e.g. "ACQ/seed0") per strategy: mean new-center gain
    and old-center change over ``reference``, each with a stratified paired bootstrap interval, the
    gain as a fraction of ``full``'s, and the per-experiment rows."""
    names = [n for n in next(iter(experiments.values()))["strategies"]
             if all(n in e["strategies"] for e in experiments.values())]  # fmt: skip
    pooled: dict[str, Any] = {"experiments": list(experiments), "strategies": {}, "per_experiment": {}}
    for key, results in experiments.items():
        rows = results["strategies"]
        pooled["per_experiment"][key] = {
            n: {"new": rows[n]["new_center"]["dsc_agg"]["mean"], "old": rows[n]["old_centers"]["dsc_agg"]["mean"],
                "gain": rows[n].get("gain"), "gain_ci": rows[n].get("gain_ci"), "old_change": rows[n].get("old_change"),
                "old_change_ci": rows[n].get("old_change_ci"), "trainable_params": rows[n]["trainable_params"],
                "best_epoch": rows[n].get("best_epoch")}
            for n in names
        }  # fmt: skip

    def pairs(name: str, part: str = "new_center", ref: str = reference) -> list[tuple[Any, Any]]:
        return [(e["strategies"][ref][part]["per_case"], e["strategies"][name][part]["per_case"])
                for e in experiments.values()]  # fmt: skip

    full_pairs = pairs(full) if full in names else []
    for name in names:
        new_pairs, old_pairs = pairs(name), pairs(name, "old_centers")
        first = next(iter(experiments.values()))["strategies"][name]
        entry = {"gain": pooled_difference(new_pairs), "old_change": pooled_difference(old_pairs),
                 "trainable_params": first["trainable_params"], "trainable_fraction": first["trainable_fraction"]}  # fmt: skip
        if all("served" in e["strategies"][name] for e in experiments.values()):
            ref = [(e["strategies"][reference][p]["per_case"], served_cases(e, name, p, reference))
                   for p in ("new_center", "old_centers") for e in experiments.values()]  # fmt: skip
            k = len(experiments)
            entry["served"] = {"gain": pooled_difference(ref[:k]), "old_change": pooled_difference(ref[k:]),
                               "old_centers_routed": float(np.mean([e["strategies"][name]["served"]["old_centers_routed"]
                                                                    for e in experiments.values()]))}  # fmt: skip
        parent = first.get("attribution_of")
        if parent in names:  # what the prompts add: the adapter against itself without its prompts
            entry["prompts_add"] = pooled_difference(pairs(parent, ref=name))
        ratio = fraction_of_full(new_pairs, full_pairs) if name != reference else None
        if ratio is not None:
            entry["fraction_of_full"] = ratio
        pooled["strategies"][name] = entry
    return pooled
