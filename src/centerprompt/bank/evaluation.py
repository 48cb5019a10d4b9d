"""Scoring a prompt bank: routing accuracy, confusion across centers, Dice per routing mode.

Modes: ``base`` (no prompts), ``oracle`` (the true center's prompts when it has an entry, the base
model otherwise), ``auto`` (nearest-key routing with fallback) and a bank center's name (that
center's prompts for every scan). Each (scan, chosen center) is predicted once and shared by the
modes that choose it, so oracle equals base for centers without an entry by construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from centerprompt.bank.acquisition import acquisition_features
from centerprompt.bank.routing import (
    DISTANCE,
    FALLBACK,
    FALSE_FALLBACK,
    Route,
    RoutingKey,
    false_fallback_threshold,
    route_features,
)
from centerprompt.bank.serving import load_bank_model
from centerprompt.files import atomic_path
from centerprompt.evaluate import aggregate
from centerprompt.checkpoints import BaseLike
from centerprompt.runs.base import open_base
from centerprompt.runs.selection import CaseSelection
from centerprompt.scoring import Predictor, Scorer
from centerprompt.training.devices import default_device

logger = logging.getLogger(__name__)


def routing_summary(true_centers: Sequence[str], routes: Sequence[Route], bank_names: Sequence[str]) -> dict[str, Any]:
    """Confusion matrix (true center x bank center or "base"), routing accuracy, unknown-center outcomes.

    A scan of a banked center is routed correctly when it goes to its own center; a scan of a
    center absent from the bank when it falls back to the base model (``accuracy_all`` counts both).
    """
    columns = [*bank_names, FALLBACK]
    confusion = {t: dict.fromkeys(columns, 0) for t in sorted(set(true_centers))}
    for t, r in zip(true_centers, routes):
        confusion[t][r.center] += 1
    known = [(t, r) for t, r in zip(true_centers, routes) if t in bank_names]
    right = sum(r.center == (t if t in bank_names else FALLBACK) for t, r in zip(true_centers, routes))
    unknown = {}
    for t in sorted(set(true_centers) - set(bank_names)):
        n, fallback = sum(confusion[t].values()), confusion[t][FALLBACK]
        unknown[t] = {"n": n, "fallback": fallback, "wrong_center": n - fallback, "fallback_rate": fallback / n}
    return {
        "columns": columns, "confusion": confusion, "n_known": len(known),
        "abstention_auc": abstention_auc(true_centers, routes, bank_names),
        "accuracy": sum(r.center == t for t, r in known) / len(known) if known else None,
        "accuracy_all": right / len(routes) if routes else None, "unknown_centers": unknown,
    }  # fmt: skip


def abstention_auc(true_centers: Sequence[str], routes: Sequence[Route], bank_names: Sequence[str]) -> float | None:
    """ROC AUC of the distance to the nearest center as a score for "this scan's center is not in the
    bank" (Mann-Whitney, ties count half); None unless both kinds of scan are present."""
    unknown = [r.distance for t, r in zip(true_centers, routes) if t not in bank_names]
    known = [r.distance for t, r in zip(true_centers, routes) if t in bank_names]
    if not unknown or not known:
        return None
    wins = sum((u > k) + 0.5 * (u == k) for u in unknown for k in known)
    return wins / (len(unknown) * len(known))


def leave_one_center_out(
    true_centers: Sequence[str], fingerprints: Sequence[np.ndarray], keys: dict[str, RoutingKey], false_fallback: float
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each banked center's scans routed with that center's key removed: all of them should fall back,
    as a new hospital's would; ``wrong_center`` counts those the other keys would claim. A one-key
    bank has nothing left to claim them (every scan falls back)."""
    out = {}
    for center in keys:
        rest = {c: k for c, k in keys.items() if c != center}
        xs = [x for t, x in zip(true_centers, fingerprints) if t == center]
        fallback = sum(route_features(x, rest, false_fallback).fallback for x in xs) if rest else len(xs)
        if xs:
            out[center] = {"n": len(xs), "fallback": fallback, "wrong_center": len(xs) - fallback,
                           "fallback_rate": fallback / len(xs)}  # fmt: skip
    return out


def _chooser(mode: str, bank_names: Sequence[str]) -> Any:
    """``(true center, route) -> bank center or "base"`` serving a scan under ``mode``."""
    if mode == FALLBACK:
        return lambda center, route: FALLBACK
    if mode == "oracle":  # the true center's prompts when it has an entry; the base model otherwise
        return lambda center, route: center if center in bank_names else FALLBACK
    if mode == "auto":
        return lambda center, route: route.center
    if mode not in bank_names:
        raise ValueError(f"mode {mode!r} is neither base, oracle, auto nor a bank center ({', '.join(bank_names)}).")
    return lambda center, route: mode


def _cached_predictor(scorer: Scorer, model: nn.Module) -> Callable[[list[str]], Predictor]:
    """For a list of chosen centers (one per case), the predictor that serves case i from center
    ``choices[i]``; each (case, center) is predicted once and shared by every list that chooses it."""
    preds: dict[tuple[int, str], torch.Tensor] = {}

    def routed(choices: list[str]) -> Predictor:
        def predict(index: int) -> torch.Tensor:
            key = (index, choices[index])
            if key not in preds:
                net, kwargs = model.member(key[1])
                preds[key] = scorer.predict(net, index, **kwargs).to(torch.uint8)
            return preds[key].long()

        return predict

    return routed


def run_bank(
    selection: CaseSelection, base: BaseLike, bank: str | Path, *, modes: Sequence[str] = (FALLBACK, "oracle", "auto"),
    false_fallback: float = FALSE_FALLBACK, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Route every scan of ``selection`` (its split as :func:`centerprompt.runs.selection.load_index`
    chooses, the base model's own split included) and score each mode: ``base``, ``oracle``,
    ``auto`` or a bank center.

    Each (scan, chosen center) is predicted once and shared by the modes that choose it. With no
    modes only routing is done. Returns ``{"bank", "base", "data_dir", "split", "threshold",
    "threshold_rule", "bank_centers", "routing": routing_summary(...), "modes": {mode: aggregate(...)},
    "per_case": [...]}``.
    """
    base = open_base(base)
    selected = selection.open(base)
    ids = selected.ids
    model = load_bank_model(base, bank, default_device())
    choosers = {mode: _chooser(mode, model.names) for mode in modes}
    scorer = selected.scorer(base.preprocess)
    routed_predictor = _cached_predictor(scorer, model)
    truth = [c.center for c in scorer.cases]
    routed = bool(model.bank.key_names) or "auto" in modes or not modes  # keyless banks serve named centers
    routes: list[Route | None] = [None] * len(ids)
    fingerprints: list[np.ndarray] = []
    if routed:
        fingerprints = [acquisition_features(c.ct, c.pet) for c in scorer.cases]
        routes = [route_features(x, model.bank.keys, false_fallback) for x in fingerprints]
    per_case = [{"case_id": c.case_id, "center": c.center, "in_bank": c.center in model.names,
                 "route": r and r.to_dict(), "scores": {}} for c, r in zip(scorer.cases, routes)]  # fmt: skip
    summaries = {}
    for mode, choose in choosers.items():
        choices = [choose(t, r) for t, r in zip(truth, routes)]
        results = scorer.score_predictions(routed_predictor(choices), desc=mode, progress=progress)
        for record, used, scores in zip(per_case, choices, results):
            metrics = {k: v for k, v in scores.items() if k not in ("case_id", "center")}
            record["scores"][mode] = {"used": used, **metrics}
        summaries[mode] = aggregate(results)
    return {
        **selected.record(), "base": str(base.path), "bank": str(bank),
        "bank_centers": model.names, "distance": DISTANCE, "false_fallback": false_fallback,
        "threshold": false_fallback_threshold(false_fallback),
        "threshold_rule": f"chi-square quantile at false-fallback rate {false_fallback:g}, leave-one-out scale",
        "routing": routing_summary(truth, routes, model.names) if routed else None, "modes": summaries,
        "leave_one_center_out": leave_one_center_out(truth, fingerprints, model.bank.keys, false_fallback)
        if routed else None,
        "per_case": per_case,
    }  # fmt: skip


# ----------------------------------------------------------------------------- report


def _dsc(summary: dict[str, Any] | None, center: str) -> str:
    value = ((summary or {}).get("per_center", {}).get(center) or {}).get("dsc_agg", {}).get("mean")
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def routing_markdown(result: dict[str, Any]) -> str:
    """Routing accuracy, confusion matrix, unknown-center outcomes and DSCagg per center and mode."""
    routing, columns = result["routing"], result["routing"]["columns"]
    acc, acc_all = (("–" if a is None else f"{100 * a:.1f}%") for a in (routing["accuracy"], routing["accuracy_all"]))
    auc = "–" if routing.get("abstention_auc") is None else f"{routing['abstention_auc']:.3f}"
    lines = [
        "# Prompt bank routing", "",
        f"Bank {result['bank']} ({', '.join(result['bank_centers'])}); "
        f"{result['split']} split of {result['data_dir']}; "
        f"{result['distance']} distance, threshold {result['threshold']:.4f} ({result['threshold_rule']}).", "",
        f"Routing accuracy on banked centers' scans: {acc} ({routing['n_known']} scans); "
        f"counting fallback as right for unknown centers: {acc_all}; ROC AUC of the distance for "
        f"\"center not in the bank\": {auc}.", "",
        "| true \\ routed | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns),
    ]  # fmt: skip
    for t, row in routing["confusion"].items():
        lines.append(f"| {t} | " + " | ".join(str(row[c]) for c in columns) + " |")
    if routing["unknown_centers"]:
        lines += ["", "Centers absent from the bank:", "",
                  "| center | scans | fallback | wrong center |", "|---|---:|---:|---:|"]  # fmt: skip
        for t, u in routing["unknown_centers"].items():
            lines.append(f"| {t} | {u['n']} | {u['fallback']} | {u['wrong_center']} |")
    if result.get("leave_one_center_out"):
        lines += ["", "Each banked center removed from the bank in turn (its scans should fall back):", "",
                  "| center | scans | fallback | wrong center |", "|---|---:|---:|---:|"]  # fmt: skip
        for t, u in result["leave_one_center_out"].items():
            lines.append(f"| {t} | {u['n']} | {u['fallback']} | {u['wrong_center']} |")
    modes = result.get("modes") or {}
    if modes:
        names = [m if m in (FALLBACK, "oracle", "auto") else f"single {m}" for m in modes]
        lines += ["", "DSCagg (mean of GTVp and GTVn) per center:", "",
                  "| center | in bank | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(modes)]  # fmt: skip
        for t in routing["confusion"]:
            row = " | ".join(_dsc(s, t) for s in modes.values())
            lines.append(f"| {t} | {'yes' if t in result['bank_centers'] else 'no'} | {row} |")
    return "\n".join(lines) + "\n"


def plot_confusion(result: dict[str, Any], path: str | Path) -> Path:
    """Heatmap of the routing confusion matrix, rows normalised, counts written in the cells."""
    import numpy as np
    from matplotlib.figure import Figure

    routing = result["routing"]
    rows, columns = list(routing["confusion"]), routing["columns"]
    counts = np.array([[routing["confusion"][t][c] for c in columns] for t in rows], dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(1.2 + 0.7 * len(columns), 1.0 + 0.5 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, int(n), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true center")
    ax.set_title(f"Routing of {result.get('split', '?')} scans by acquisition fingerprint\n(bank "
                 f"{Path(str(result.get('bank', '?'))).name}; false-fallback rate {result.get('false_fallback', '?')})",
                 fontsize=9)  # fmt: skip
    fig.colorbar(image, ax=ax, label="share of the center's scans")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=150, bbox_inches="tight")
    return Path(path)


def write_routing_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``OUT/bank_eval.json``, ``OUT/bank_eval.md`` and ``OUT/confusion.png``."""
    from centerprompt.files import write_json

    out = Path(out_dir)
    paths = {"json": write_json(result, out / "bank_eval.json"), "png": plot_confusion(result, out / "confusion.png")}
    with atomic_path(out / "bank_eval.md") as tmp:
        tmp.write_text(routing_markdown(result))
    paths["markdown"] = out / "bank_eval.md"
    return paths
