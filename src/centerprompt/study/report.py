"""Experiment report: tables and figures from the leave-one-center-out results dict.

The results dict (written as ``results.json``, read by other tools, keys are stable)::

    {"new_center", "data_dir", "base_checkpoint", "new_center_test_cases": [...], "machine": {...},
     "date", "command",
     "strategies": {name: {"trainable_params", "total_params", "trainable_fraction", "artifact_bytes",
                           "train_seconds", "peak_memory_mb", "epochs",
                           "new_center": {"dsc_agg", "dice_mean", "hd95_median", "per_case"},
                           "old_centers": {"dsc_agg", ..., "per_center": {C: {"dsc_agg"}}},
                           "old_centers_base": {"dsc_agg", ...}, "artifact"}}}

Strategy ``strategies.BASE`` is the base model (direct inference). Figures use matplotlib's object API
(``Figure``, rendered by Agg) rather than pyplot, so no global backend is switched and no figure is
left registered; every file is written to a temporary name in its folder, then renamed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from centerprompt.data.labels import GTVN, GTVP, LABEL_NAMES
from centerprompt.files import atomic_path, write_json
from centerprompt.strategies import BASE

logger = logging.getLogger(__name__)

#: Overlay colours per label value; red and cyan stay distinct for red-green colour blindness.
LABEL_COLORS: dict[int, tuple[str, str]] = {GTVP: (LABEL_NAMES[GTVP], "#e8242a"), GTVN: (LABEL_NAMES[GTVN], "#1cc8e8")}
NEW_COLOR, OLD_COLOR = "#1f5fa8", "#e07b1a"
_DASH = "–"


def _save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=150, bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


def _get(d: Mapping[str, Any] | None, *keys: str) -> Any:
    """Nested lookup that yields None for any missing level, so partial results still render."""
    for key in keys:
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return _DASH if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def human_count(n: int | None) -> str:
    """92160 -> '92.2k', 95_900_000 -> '95.9M'."""
    if n is None:
        return _DASH
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def human_bytes(n: int | None) -> str:
    """Decimal units, as file sizes are usually quoted: 368_640 -> '368.6 kB'."""
    if not n:
        return _DASH
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _base_levels(results: Mapping[str, Any]) -> tuple[float, float]:
    """Base model's (new-center, old-centers) DSCagg mean, from strategy 'none' or any old_centers_base."""
    strategies = results.get("strategies", {})
    new = _num(_get(strategies, BASE, "new_center", "dsc_agg", "mean"))
    old = _num(_get(strategies, BASE, "old_centers", "dsc_agg", "mean"))
    if math.isnan(old):
        for s in strategies.values():
            old = _num(_get(s, "old_centers_base", "dsc_agg", "mean"))
            if not math.isnan(old):
                break
    return new, old


def _context_lines(results: Mapping[str, Any]) -> list[str]:
    """The two numbers a reader needs before the table: can prompts act, and how much is there to gain."""
    lines = []
    reliance = _get(results, "base", "transformer_reliance")
    if reliance:
        lines.append(
            f"Transformer reliance of the base model: old-center DSCagg {_fmt(_num(reliance.get('intact_dsc_agg')))} "
            f"intact, {_fmt(_num(reliance.get('ablated_dsc_agg')))} with every ViT token grid feeding the decoder "
            f"replaced by its mean token (drop {_fmt(_num(reliance.get('drop')))}; near 0, for a trained base, means "
            "the decoder ignores the transformer and prompts have nothing to steer)."
        )
    gap = results.get("oracle_gap")
    if gap is not None:
        lines.append(f"Oracle gap on the new center (oracle − base, DSCagg mean): {_fmt(_num(gap), '+.3f')}.")
    return [line for text in lines for line in (text, "")]


def results_markdown(results: Mapping[str, Any]) -> str:
    """Paper-style markdown: one row per strategy, then old-center DSCagg per old center."""
    strategies: Mapping[str, Any] = results.get("strategies", {})
    machine = results.get("machine") or {}
    machine_text = ", ".join(f"{k}: {v}" for k, v in machine.items()) if isinstance(machine, Mapping) else str(machine)
    smoke = ["**Smoke run** (`demo --quick`: a few epochs, to check that everything runs): its figures are not "
             "results; run `centerprompt demo` for them.", ""] if results.get("smoke_run") else []  # fmt: skip
    lines = [
        f"# Adapting to new center {results.get('new_center', '?')}",
        "",
        *smoke,
        f"New center **{results.get('new_center', '?')}**, {len(results.get('new_center_test_cases', []))} test cases; "
        f"date {results.get('date', '?')}; machine {machine_text or '?'}.",
        "",
        "DSCagg = 2·Σ|A∩B| / Σ(|A|+|B|) pooled over the cases of a set (HECKTOR); mean = mean of GTVp and GTVn. "
        "Δ old = old-centers DSCagg mean of the adapted model minus the base model's. Gain = new-center mean "
        "minus the base model's; gap closed = gain / (oracle − base), where the oracle is the same "
        "architecture and budget pretrained with the new center's adaptation cases added; × full = gain / full "
        "fine-tuning's gain. Brackets: paired bootstrap 95% intervals over the test cases (DSCagg recomputed in "
        "each resample); an interval that holds 0 is no measured change. A row `X:no-prompts` is adapter X "
        "scored with its prompt tokens removed (on a prompt-aware base: replaced by the base's own): what the "
        "prompts add is X's gain minus that row's. On a prompt-aware base an old center's scans are read with its "
        "own prompt set; a row `X:everywhere` reads them with the new center's prompts instead.",
        "",
        *_context_lines(results),
        "| Strategy | Trainable | % of total | Artifact | New GTVp | New GTVn | New mean | Gain [95% CI] | × full "
        "| Gap closed | Old mean | Δ old [95% CI] | Time (s) | Peak mem (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in strategies.items():
        new = _get(s, "new_center", "dsc_agg") or {}
        old_mean = _num(_get(s, "old_centers", "dsc_agg", "mean"))
        delta = old_mean - _num(_get(s, "old_centers_base", "dsc_agg", "mean"))
        total, trainable = s.get("total_params"), s.get("trainable_params")
        fraction = s.get("trainable_fraction")
        if fraction is None and trainable is not None and total:
            fraction = trainable / total
        seconds = s.get("train_seconds")
        lines.append(
            f"| {name} | {human_count(trainable)} / {human_count(total)} "
            f"| {_DASH if fraction is None else format(100 * fraction, '.3g') + '%'} "
            f"| {human_bytes(s.get('artifact_bytes'))} "
            f"| {_fmt(_num(new.get('gtvp')))} | {_fmt(_num(new.get('gtvn')))} | {_fmt(_num(new.get('mean')))} "
            f"| {with_ci(s.get('gain'), s.get('gain_ci'))} | {with_ci(s.get('fraction_of_full'), None, '.0%')} "
            f"| {_fmt(s.get('gap_closed'), '.0%')} | {_fmt(old_mean)} | {with_ci(delta, s.get('old_change_ci'))} "
            f"| {_fmt(seconds, '.1f' if seconds is not None and seconds < 10 else '.0f')} "
            f"| {_fmt(s.get('peak_memory_mb'), '.0f')} |"
        )

    served = {n: s["served"] for n, s in strategies.items() if s.get("served")}
    if served:
        lines += ["", "Served per center (each test scan routed by its acquisition fingerprint to the new center's "
                  "model or to the base model, as `predict --bank` routes adapters; each case scored as served):", "",
                  "| Strategy | Gain [95% CI] | Δ old [95% CI] | New scans to the adapter | Old scans to the adapter |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {n} | {with_ci(v['gain'], v['gain_ci'])} | {with_ci(v['old_change'], v['old_change_ci'])} "
                  f"| {v['new_center_routed']:.0%} | {v['old_centers_routed']:.0%} |" for n, v in served.items()]  # fmt: skip

    centers = sorted({c for s in strategies.values() for c in (_get(s, "old_centers", "per_center") or {})})
    if centers:
        lines += [
            "",
            "Old-center DSCagg mean, per old center:",
            "",
            "| Strategy | " + " | ".join(centers) + " |",
            "|---|" + "---:|" * len(centers),
        ]
        for name, s in strategies.items():
            values = [_fmt(_num(_get(s, "old_centers", "per_center", c, "dsc_agg", "mean"))) for c in centers]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
    if results.get("phase_seconds"):
        lines += ["", "Where the time went (wall time of this command; the report's own time is in results.json):", "",
                  *phase_table(results["phase_seconds"])]  # fmt: skip
    return "\n".join(lines) + "\n"


def with_ci(value: Any, ci: Sequence[float] | None, spec: str = "+.3f") -> str:
    """``+0.052 [+0.021, +0.080]``; the value alone when there is no interval."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _DASH
    if not ci or any(c is None or math.isnan(c) for c in ci):
        return _fmt(value, spec)
    return f"{_fmt(value, spec)} [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"


def phase_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows of an experiment's phases (``PhaseClock.rows``): seconds, share, and what a
    training stage's time was spent on (caching, steps, validation, data waiting, checkpoints)."""
    total = sum(r["seconds"] for r in rows) or 1.0
    lines = ["| Phase | Seconds | Share | Of which |", "|---|---:|---:|---|"]
    for r in rows:
        detail = r.get("detail") or {}
        text = f"reused: {detail['reused']}" if "reused" in detail else ", ".join(f"{k} {v:.0f} s" for k, v in detail.items())
        lines.append(f"| {r['phase']} | {r['seconds']:.0f} | {r['seconds'] / total:.0%} | {text} |")
    lines.append(f"| total | {total:.0f} | 100% | |")
    return lines


def plot_dice_per_strategy(results: Mapping[str, Any], path: str | Path) -> Path:
    """Grouped bars of new-center and old-centers DSCagg mean per strategy; base levels dashed."""
    strategies: Mapping[str, Any] = results.get("strategies", {})
    names = list(strategies)
    new = [_num(_get(strategies[n], "new_center", "dsc_agg", "mean")) for n in names]
    old = [_num(_get(strategies[n], "old_centers", "dsc_agg", "mean")) for n in names]
    base_new, base_old = _base_levels(results)
    x = np.arange(len(names))
    width = 0.38
    fig = Figure(figsize=(max(6.0, 0.9 * len(names) + 2), 4.6), layout="constrained")
    ax = fig.subplots()
    center = results.get("new_center", "new center")
    for offset, values, color, label in ((-width / 2, new, NEW_COLOR, f"new center ({center})"),
                                         (width / 2, old, OLD_COLOR, "old centers")):
        bars = ax.bar(x + offset, values, width, color=color, label=label)
        ax.bar_label(bars, labels=[_fmt(v, ".2f") if not math.isnan(v) else "" for v in values], fontsize=7, padding=2)
    if not math.isnan(base_new):
        ax.axhline(base_new, color=NEW_COLOR, linestyle="--", linewidth=1, label="base model, new center")
    if not math.isnan(base_old):
        ax.axhline(base_old, color=OLD_COLOR, linestyle="--", linewidth=1, label="base model, old centers")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("DSCagg (mean of GTVp, GTVn)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Adaptation to {center}: new vs old centers")
    fig.legend(fontsize=8, loc="outside lower center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def plot_gains(results: Mapping[str, Any], path: str | Path) -> Path:
    """Each row's new-center gain and old-center change over the base, with their 95% intervals."""
    strategies = {n: s for n, s in results.get("strategies", {}).items() if n != BASE and s.get("gain") is not None}
    names = list(strategies)
    fig = Figure(figsize=(7.0, 0.45 * len(names) + 1.8), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    for offset, key, ci_key, color, label in ((-0.18, "gain", "gain_ci", NEW_COLOR, "new-center gain"),
                                              (0.18, "old_change", "old_change_ci", OLD_COLOR, "old-center change")):
        values = np.array([_num(strategies[n].get(key)) for n in names])
        cis = [strategies[n].get(ci_key) or [math.nan, math.nan] for n in names]
        err = np.array([[v - _num(c[0]), _num(c[1]) - v] for v, c in zip(values, cis)]).T if names else None
        ax.errorbar(values, y + offset, xerr=None if err is None or np.isnan(err).all() else np.nan_to_num(err),
                    fmt="o", color=color, capsize=3, label=label)  # fmt: skip
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("DSCagg mean, adapted − base (95% paired bootstrap interval)")
    ax.set_title(f"What each strategy changes ({results.get('new_center', '?')} new; old centers)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_figure(fig, path)


def plot_params_vs_dice(results: Mapping[str, Any], path: str | Path) -> Path:
    """Trainable parameters (log x) vs new-center DSCagg mean, one labelled point per strategy.

    Strategies that train nothing (the base model) cannot sit on a log axis; they are drawn as a
    dashed horizontal line instead.
    """
    strategies: Mapping[str, Any] = results.get("strategies", {})
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    points = []
    for name, s in strategies.items():
        params, dice = s.get("trainable_params") or 0, _num(_get(s, "new_center", "dsc_agg", "mean"))
        if math.isnan(dice):
            continue
        if params <= 0:
            ax.axhline(dice, color="grey", linestyle="--", linewidth=1, label=f"{name} (no training)")
        else:
            points.append((name, params, dice))
    span = max((d for *_, d in points), default=1.0) - min((d for *_, d in points), default=0.0) or 1.0
    placed: list[tuple[float, float]] = []
    for name, params, dice in sorted(points, key=lambda p: -p[2]):
        # Near-identical points (deep vs deep+head) would print labels on top of each other.
        crowded = any(abs(math.log10(params) - lx) < 0.4 and abs(dice - ly) < 0.05 * span for lx, ly in placed)
        placed.append((math.log10(params), dice))
        ax.scatter([params], [dice], color=NEW_COLOR, zorder=3)
        ax.annotate(name, (params, dice), xytext=(-6, -3) if crowded else (5, 4), textcoords="offset points",
                    ha="right" if crowded else "left", fontsize=8)
    ax.margins(x=0.08)
    ax.set_ylim(0, 1)  # DSCagg's own range: a few thousandths of noise must not fill the figure
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"new-center DSCagg mean ({results.get('new_center', '?')})")
    ax.set_title("Parameters trained vs new-center Dice")
    ax.grid(which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    return _save_figure(fig, path)


def _as_volume(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    while a.ndim > 3 and a.shape[0] == 1:  # drop batch/channel singletons
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume, got shape {a.shape}.")
    return a


def _tumour_slices(gt: np.ndarray, n_slices: int, axis: int) -> list[int]:
    """The slice with the largest label area and neighbours spread over the tumour's extent."""
    depth = gt.shape[axis]
    area = (np.moveaxis(gt, axis, 0) > 0).reshape(depth, -1).sum(axis=1)
    if not area.any():
        return sorted({int(i) for i in np.linspace(0, depth - 1, n_slices + 2)[1:-1].round()})
    occupied = np.flatnonzero(area)
    step = max(1, (occupied[-1] - occupied[0] + 1) // (n_slices + 1))
    peak = int(area.argmax())
    offsets = (np.arange(n_slices) - (n_slices - 1) // 2) * step
    return sorted({int(i) for i in np.clip(peak + offsets, 0, depth - 1)})


def _overlay(labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*labels.shape, 4))
    for value, (_, color) in LABEL_COLORS.items():
        rgba[labels == value] = to_rgba(color, alpha)
    return rgba


def plot_case_slices(
    ct: Any,
    pet: Any,
    gt: Any,
    preds: Mapping[str, Any],
    path: str | Path,
    n_slices: int = 3,
    axis: int = 0,
    title: str | None = None,
) -> Path:
    """Grid of axial slices through the tumour: rows CT, PET, ground truth, one per prediction.

    Columns are the slice of largest ground-truth area and neighbours across the tumour (evenly
    spaced slices when the ground truth is empty). Labels 1 (GTVp) and 2 (GTVn) are overlaid on CT.

    Args:
        ct, pet: image volumes (numpy or CPU torch), same shape; leading singleton dims are dropped.
        gt: ground-truth label map, same shape.
        preds: strategy name -> predicted label map, same shape.
        path: PNG to write.
        n_slices: columns. Default 3.
        axis: the axial (slice) axis; 0 for (D, H, W) label maps as scored. Slices are drawn as stored.
        title: the figure's title (which case, which center, which orientation).
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}.")
    ct, pet, gt = _as_volume(ct, "ct"), _as_volume(pet, "pet"), _as_volume(gt, "gt")
    preds = {name: _as_volume(p, f"preds[{name!r}]") for name, p in preds.items()}
    for name, vol in {"pet": pet, "gt": gt, **{f"preds[{k!r}]": v for k, v in preds.items()}}.items():
        if vol.shape != ct.shape:
            raise ValueError(f"{name} shape {vol.shape} differs from ct shape {ct.shape}.")
    slices = _tumour_slices(gt, n_slices, axis)
    ct_lo, ct_hi = np.percentile(ct, (1, 99))
    pet_hi = float(np.percentile(pet, 99.5)) or 1.0
    rows: list[tuple[str, np.ndarray | None]] = [("CT", None), ("PET", None), ("ground truth", gt), *preds.items()]

    fig = Figure(figsize=(2.4 * len(slices) + 0.6, 2.4 * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), len(slices), squeeze=False)
    for r, (row_name, labels) in enumerate(rows):
        for c, k in enumerate(slices):
            ax = axes[r, c]
            if row_name == "PET":
                ax.imshow(np.take(pet, k, axis), cmap="hot", vmin=0, vmax=pet_hi, interpolation="nearest")
            else:
                ax.imshow(np.take(ct, k, axis), cmap="gray", vmin=ct_lo, vmax=ct_hi, interpolation="nearest")
            if labels is not None:
                sl = np.take(labels, k, axis)
                ax.imshow(_overlay(sl), interpolation="nearest")
                for value, (_, color) in LABEL_COLORS.items():
                    if (sl == value).any():  # outline too: a fill alone fades on bright CT
                        ax.contour(sl == value, levels=[0.5], colors=[color], linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {k}", fontsize=9)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=9)
    handles = [Patch(color=color, label=name) for name, color in LABEL_COLORS.values()]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json (NaN as null), results.md and the summary figures into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "dice_per_strategy": out / "dice_per_strategy.png",
        "params_vs_dice": out / "params_vs_dice.png",
        "gains": out / "gains.png",
    }
    write_json(results, paths["json"])
    markdown = results_markdown(results)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_bytes(markdown.encode("utf-8"))
    plot_dice_per_strategy(results, paths["dice_per_strategy"])
    plot_params_vs_dice(results, paths["params_vs_dice"])
    plot_gains(results, paths["gains"])
    logger.info("report written to %s", out)
    return paths
