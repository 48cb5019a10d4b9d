"""Turn benchmarks/results.json into benchmarks/RESULTS.md: tables, targets met or not, and why.

    python benchmarks/render.py [results.json] [RESULTS.md]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# (name, section, how to read the measured value, limit): every target of issue 5.
TARGETS = (
    ("deep step time vs full ({size})", "time", "≤", 0.6),
    ("deep training memory vs full ({size})", "memory", "≤", 0.5),
    ("deep P=10 inference time vs MONAI UNETR (vit-b, sliding window)", "inference", "≤", 1.10),
    ("deep P=10 adapter bytes vs full checkpoint (vit-b)", "storage", "≤", 0.002),
    ("time waiting for data vs step time (cpu preset, cached)", "data", "≤", 0.10),
)
MODULE_ORDER = ("vit", "encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2", "out")


def _f(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _model_label(training: Mapping[str, Any]) -> str:
    m = training["model"]
    side = "×".join(str(s) for s in m["img_size"])
    return (f"{side}, patch {m.get('patch_size', 16)}, hidden {m.get('hidden_size', 768)}, {m.get('num_layers', 12)} layers, "
            f"batch {training['batch']}, {training['warmup']} warm-up + {training['repeats']} timed rounds")  # fmt: skip


def target_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured ratio (None when that measurement is missing) and whether it is met."""
    cost = results.get("cost", {})
    rows = []
    for name, kind, op, limit in TARGETS:
        values: list[tuple[str, float | None]] = []
        if kind in ("time", "memory"):
            for size, training in cost.get("training", {}).items():
                deep = training["strategies"].get("deep", {})
                values.append((name.format(size=size), deep.get("time_ratio" if kind == "time" else "memory_ratio")))
        elif kind == "inference":
            values.append((name, cost.get("inference", {}).get("vit-b", {}).get("ratio")))
        elif kind == "storage":
            values.append((name, cost.get("storage", {}).get("ratio")))
        else:
            values.append((name, cost.get("data", {}).get("fraction")))
        for label, value in values:
            met = None if value is None else value <= limit
            rows.append({"name": label, "value": value, "limit": limit, "op": op, "met": met})
    return rows


def _target_line(row: Mapping[str, Any]) -> str:
    verdict = {True: "met", False: "not met", None: "not measured"}[row["met"]]
    pct = row["limit"] < 0.01
    value = "–" if row["value"] is None else (f"{row['value']:.4%}" if pct else f"{row['value']:.2f}×")
    limit = f"{row['limit']:.1%}" if pct else f"{row['limit']:.2f}×"
    return f"- **{verdict}**: {row['name']}: {value} (target {row['op']} {limit})"


def _training_table(training: Mapping[str, Any]) -> list[str]:
    lines = [
        "| strategy | trainable | step (s) | × full | × full (fastest) | training memory (MB) | × full "
        "| activations | gradients | optimizer | sampled peak (MB) | × full |",
        "|---|" + "---|" * 11,
    ]
    for name, r in training["strategies"].items():
        m = r["memory"]
        lines.append(
            f"| {name} | {r['trainable_params']:,} ({r['trainable_fraction']:.2%}) | {r['step_s']:.3f} | "
            f"{_f(r.get('time_ratio'))} | {_f(r.get('min_time_ratio'))} | {m['training_mb']:.0f} | {_f(r.get('memory_ratio'))} | "
            f"{m['activations_mb']:.0f} | {m['gradients_mb']:.0f} | {m['optimizer_mb']:.0f} | "
            f"{m['peak_sampled_mb']:.0f} | {_f(r.get('peak_sampled_ratio'))} |"
        )
    seen = {m for r in training["strategies"].values() for m in (*r["backward_reaches"], *r["activations_by_module_mb"])}
    modules = [m for m in MODULE_ORDER if m in seen or m in ("vit", "encoder1")]
    lines += ["", "Backward reaches (✓: the module's output requires grad) and activations kept for backward, MB:", "",
              "| strategy | " + " | ".join(modules) + " |", "|---|" + "---|" * len(modules)]  # fmt: skip
    for name, r in training["strategies"].items():
        acts = r["activations_by_module_mb"]
        cells = [("✓ " if mod in r["backward_reaches"] else "") + f"{acts.get(mod, 0.0):.0f}" for mod in modules]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def floor_paragraph(training: Mapping[str, Any], size: str) -> str:
    """Why a frozen backbone still costs most of a step, with this size's numbers."""
    s = training["strategies"]
    if "full" not in s or "deep" not in s:
        return ""
    full, deep = s["full"]["memory"], s["deep"]["memory"]
    acts_full, acts_deep = s["full"]["activations_by_module_mb"], s["deep"]["activations_by_module_mb"]
    fed = sum(acts_deep.get(m, 0.0) for m in MODULE_ORDER if m not in ("vit", "encoder1"))
    patch = training["model"].get("patch_size", 16)
    fed_blocks = "encoder2–4, decoder5–2" if patch == 16 else "encoder2–3, decoder4–2"
    text = (
        f"**Why deep prompts do not make a step free ({size}).** The backbone is frozen, but prompt tokens enter "
        "every ViT layer, so backward must traverse the whole ViT and every decoder block fed by the ViT skips "
        f"({fed_blocks}, out); only encoder1, the convolution on the raw image, is skipped. What a "
        "frozen backbone saves is the weight-gradient half of backward (a linear or convolution layer's backward "
        "is one input-gradient and one weight-gradient product, each roughly a forward's cost), the gradient "
        "buffers and AdamW's two moments. A rough time floor is thus (forward + input-gradient backward) / "
        "(forward + full backward + optimizer) ≈ 2/3; the skipped encoder1 and weight-gradient kernels dearer "
        f"than the forward can push it lower. Measured: {s['deep']['time_ratio']:.2f}× full. Memory: the weights "
        f"({deep['weights_mb']:.0f} MB) stay. Of the activations ({deep['activations_mb']:.0f} MB against "
        f"{full['activations_mb']:.0f} MB for full), encoder1's ({acts_full.get('encoder1', 0.0):.0f} MB) go, and "
        f"the ViT keeps {acts_deep.get('vit', 0.0):.0f} MB instead of {acts_full.get('vit', 0.0):.0f} MB (PyTorch "
        "does not save a linear layer's input when its weight gets no gradient); the ViT-fed decoder blocks keep "
        f"theirs ({fed:.0f} MB; a convolution saves its input either way), {acts_deep.get('decoder2', 0.0):.0f} MB "
        f"of it in decoder2 at full resolution. Gradients ({full['gradients_mb']:.0f} MB) and optimizer state "
        f"({full['optimizer_mb']:.0f} MB) go, giving {s['deep']['memory_ratio']:.2f}× full."
    )
    if "partial" in s:
        text += (f" partial stops backward at decoder2, which is why it is the cheapest "
                 f"({s['partial']['time_ratio']:.2f}× time, {s['partial']['memory_ratio']:.2f}× memory).")  # fmt: skip
    if "lora" in s and "bitfit" in s:
        text += (f" lora ({s['lora']['time_ratio']:.2f}×) and bitfit ({s['bitfit']['time_ratio']:.2f}×) "
                 "backpropagate as far as deep prompts do (see the table) and add only small weight gradients.")  # fmt: skip
    if "deep+ckpt" in s:
        c = s["deep+ckpt"]
        text += (f" Activation checkpointing of the frozen ViT blocks and decoder blocks (deep+ckpt) brings memory "
                 f"to {c['memory_ratio']:.2f}× full at {c['time_ratio']:.2f}× full time (one more forward).")  # fmt: skip
    return text


def _cost_sections(cost: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for size, training in cost.get("training", {}).items():
        lines += [f"## Training step: {size} ({_model_label(training)})", ""]
        lines += _training_table(training) + ["", floor_paragraph(training, size), ""]
    if cost.get("inference"):
        lines += ["## Inference (sliding window, roi = img_size, overlap 0.25)", "",
                  "| size | volume | MONAI UNETR (s) | no prompts (s) | deep P=10 (s) | deep vs baseline "
                  "| deep voxels/s | max abs diff MONAI vs ours |", "|---|" + "---|" * 7]  # fmt: skip
        for size, r in cost["inference"].items():
            sec = r["seconds"]
            lines.append(
                f"| {size} | {'×'.join(map(str, r['volume']))} | {_f(sec.get('monai'), '.3f')} | {sec['plain']:.3f} | "
                f"{sec['deep']:.3f} | {r['ratio']:.3f}× ({r['baseline']}) | {r['voxels_per_s']['deep']:,.0f} | "
                f"{_f(r.get('max_abs_diff_plain_vs_monai'), '.1e')} |"
            )
        lines.append("")
    if cost.get("storage"):
        st = cost["storage"]
        lines += ["## Storage per center (vit-b)", "",
                  f"deep P={st['num_prompts']} adapter: {st['adapter_bytes']:,} bytes; full checkpoint: "
                  f"{st['checkpoint_bytes']:,} bytes; ratio {st['ratio']:.4%}.", ""]  # fmt: skip
    if cost.get("data"):
        d = cost["data"]
        lines += ["## Data loading (cpu preset, CacheDataset in memory, num_workers=0)", "",
                  f"{d['strategy']} strategy, {d['cases']} cached synthetic cases, {d['crops_per_batch']} crops per batch, "
                  f"{d['steps']} steps: median wait {d['wait_s'] * 1000:.1f} ms, median step {d['step_s'] * 1000:.0f} ms; "
                  f"waiting is {d['fraction']:.1%} of step time.", ""]  # fmt: skip
    if cost.get("levers"):
        lines += ["## Levers", ""]
        for name, r in cost["levers"].items():
            if "skipped" in r:
                lines.append(f"- {name}: skipped ({r['skipped']}).")
            else:
                lines.append(f"- {name}: compile {r['compile_s']:.0f} s, then eager {r['eager_step_s']:.3f} s vs "
                             f"compiled {r['compiled_step_s']:.3f} s per deep step ({r['ratio']:.2f}×).")  # fmt: skip
        lines.append("- activation checkpointing: the deep+ckpt rows above.")
        lines.append("")
    return lines


def _quality_sections(q: Mapping[str, Any]) -> list[str]:
    st = q["settings"]
    lines = [f"## Quality: synthetic leave-one-center-out (preset {st.get('preset', 'cpu')})", "",
             f"Held-out centers {', '.join(st['centers'])}; seeds {', '.join(map(str, st['seeds']))}; "
             f"{st['shots']} shots, P={st['prompts']}. DSCagg is the mean of GTVp and GTVn aggregated Dice; "
             "values are the mean over centers, averaged over seeds, with the range of the per-seed means.", "",
             "| strategy | trainable | new center DSCagg | gain over base | oracle gap closed | old centers DSCagg "
             "| Δ old vs base | adapt time (s) | time to 95% of best val (s) |", "|---|" + "---|" * 8]  # fmt: skip
    for name, r in q["headline"].items():
        new, old = r["new"], r["old"]
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {_f(new['mean'], '.3f')} ({_f(new['min'], '.3f')}–{_f(new['max'], '.3f')}) | "
            f"{_f(r.get('gain'), '+.3f')} | {_f(r.get('gap_closed'), '.0%')} | "
            f"{_f(old['mean'], '.3f')} ({_f(old['min'], '.3f')}–{_f(old['max'], '.3f')}) | {_f(r['old_delta'], '+.3f')} | "
            f"{_f(r['train_s'], '.0f')} | {_f(r['time_to_95_s'], '.0f')} |"
        )
    per_run = [r for r in q["runs"] if r["kind"] == "headline" and r.get("reliance")]
    if per_run:
        lines += ["", "Per held-out center and seed: the base model's transformer reliance (old-center DSCagg intact → "
                  "with mean tokens) and the oracle gap on the new center (oracle − base):", "",
                  "| held out | seed | base old DSCagg | with mean tokens | reliance (drop) | oracle gap | deep gap closed "
                  "| full gap closed |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in per_run:
            rel, gap = r["reliance"], r.get("oracle_gap")
            closed = {n: (r["strategies"][n]["gain"] / gap if n in r["strategies"] and gap and gap >= 0.01 else None)
                      for n in ("deep", "full")}  # fmt: skip
            lines.append(f"| {r['center']} | {r['seed']} | {_f(rel['intact_dsc_agg'], '.3f')} | "
                         f"{_f(rel['ablated_dsc_agg'], '.3f')} | {_f(rel['drop'], '.3f')} | {_f(gap, '+.3f')} | "
                         f"{_f(closed['deep'], '.0%')} | {_f(closed['full'], '.0%')} |")  # fmt: skip
    for key, label in (("shots", "shots"), ("shots_gain", "shots, as gain over the base on the same test cases"),
                       ("prompts", "prompts P")):
        table = q.get(key) or {}
        if not table:
            continue
        columns = sorted({c for row in table.values() for c in row}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0))
        lines += ["", f"New-center DSCagg by {label} (seed {st['seeds'][0]}, mean over centers):", "",
                  "| strategy | " + " | ".join(map(str, columns)) + " |", "|---|" + "---|" * len(columns)]  # fmt: skip
        for name, row in table.items():
            spec = "+.3f" if key.endswith("_gain") else ".3f"
            lines.append(f"| {name} | " + " | ".join(_f(row.get(c), spec) for c in columns) + " |")
    return lines + [""]


def _preset_section(p: Mapping[str, Any]) -> list[str]:
    import candidates

    return ["## Choosing the CPU preset: does the decoder use the transformer?", "",
            f"Each candidate pretrained without {p['held_out']} (seed {p['seed']}) with its own epoch budget; step = "
            "median of 5 full fine-tuning steps (batch 2) after 2 warm-up steps; pretraining = wall time of the "
            "pretraining run including validation; DSCagg = mean of GTVp and GTVn on the old centers' test cases, "
            "original CT grid; ablated = the same with every ViT token grid feeding the decoder replaced by its "
            "mean token; reliance = the drop. Targets for the chosen preset: DSCagg ≥ 0.70 and reliance ≥ 0.25.", "",
            candidates.table(p["rows"])]  # fmt: skip


def _recipes_section(r: Mapping[str, Any]) -> list[str]:
    """The loss and budget recipes at the chosen geometry (benchmarks/gpu_recipes.sh)."""
    lines = ["## Loss and budget at the chosen geometry: learning GTVn", "",
             f"`{r['command']}`, {r['date']}, {r['machine']} ({r['source']}). Each recipe pretrains the cpu preset's "
             f"model without {r['held_out']} (seed {r['seed']}); weights are the cross-entropy's (background, GTVp, "
             "GTVn); epochs run (best) under early stopping (patience 10); DSCagg on the old centers' test cases, "
             "original CT grid. Quality does not depend on the device; the times are GPU times with nine runs side "
             "by side. At 4 mm the labels themselves, resampled to the model's grid and back, reach DSCagg GTVp "
             "0.902, GTVn 0.817 (mean 0.860): the ceiling of this geometry.", "",
             "| recipe | CE weights | crop (mm) | epochs (best) of max | old DSCagg | GTVp | GTVn | reliance |",
             "|---|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in sorted(r["rows"], key=lambda x: (x["max_epochs"], x["class_weights"] or [1, 1, 1], x["crop_mm"])):
        weights = "unweighted" if row["class_weights"] is None else ", ".join(f"{w:g}" for w in row["class_weights"])
        chosen = " (chosen: cpu)" if row["name"] == "cpu-w1-10-ep40" else ""
        lines.append(f"| {row['name']}{chosen} | {weights} | {row['crop_mm']:.0f} | {row['epochs']} ({row['best_epoch']}) "
                     f"of {row['max_epochs']} | {row['old_dsc_agg']:.3f} | {row['gtvp']:.3f} | {row['gtvn']:.3f} | "
                     f"{row['reliance']:.3f} |")  # fmt: skip
    return lines + [""]


def _bracket(interval: Mapping[str, Any] | None) -> str:
    return f" [{interval['ci'][0]:.3f}, {interval['ci'][1]:.3f}]" if interval else ""


def _federated_section(f: Mapping[str, Any]) -> list[str]:
    """Federated against centralised pretraining and adaptation (benchmarks/federated.py)."""
    lines = ["## Several hospitals: federated against centralised (Flower simulation)", ""]
    runs = f.get("pretraining", [])
    if runs:
        first = runs[0]
        lines += [f"Pretraining without MDA: {len(first['sites'])} Flower clients ({', '.join(first['sites'])}), weighted "
                  "by case count; rounds × local epochs is the number of passes over each site's data. Each run is "
                  "compared with the centralised base named in its line (the same preset, data and seed, early stopping "
                  "within the preset's epoch budget), both scored on the old centers' test cases on the original CT "
                  "grid. Brackets: 95% bootstrap intervals over the test cases; the difference is paired (the same "
                  "resamples for both models).", ""]  # fmt: skip
        lines += [f"- {_run_line(r)}" for r in runs] + [""]
        lines += ["| pretraining | server | rounds × local epochs | old GTVp | old GTVn | old DSCagg [95% CI] | "
                  "federated − centralised [95% CI] | wall time (s) | bytes per site per round |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        def reference(r: Mapping[str, Any]) -> tuple[str, float]:  # a folder may hold a retrained base
            return r["centralised"].get("folder", ""), r["centralised"]["seconds"]

        order = list(dict.fromkeys(reference(r) for r in runs))
        shown: tuple[str, float] | None = None
        for r in sorted(runs, key=lambda r: order.index(reference(r))):  # each under the base it was compared with
            central, fed = r["centralised"], r["federated"]
            if reference(r) != shown:
                shown = reference(r)
                c = central["old_dsc_agg"]
                lines.append(f"| centralised ({central.get('folder', '')}) | – | {central['epochs']} epochs, best "
                             f"{central['best_epoch']} | {c['gtvp']:.3f} | {c['gtvn']:.3f} | {c['mean']:.3f}"
                             f"{_bracket(central.get('interval'))} | – | {central['seconds']:.0f} | – |")  # fmt: skip
            d, diff = fed["old_dsc_agg"], r.get("difference")
            server = fed.get("server_optimizer", "fedavg")
            if server != "fedavg":
                server += f" (lr {fed.get('server_lr') or 1.0:g}, momentum {fed.get('server_momentum', 0.0):g})"
            gap = f"{diff['difference']:+.3f}{_bracket(diff)}" if diff else "–"
            passes = f"{fed['rounds']} × {fed['local_epochs']}" + (f" ({fed['local_steps']} step a round)" if fed.get("local_steps") else "")
            passes += "".join(f", {name} {fed[key]:g}" for key, name in (("batch_size", "batch"), ("lr", "site lr"),
                                                                      ("sites_per_round", "sites a round"), ("mu", "FedProx mu")) if fed.get(key))
            passes += f", kept round {fed['kept_round']}" if fed.get("kept_round") else ""
            lines.append(f"| federated | {server} | {passes} | {d['gtvp']:.3f} | "
                         f"{d['gtvn']:.3f} | {d['mean']:.3f}{_bracket(fed.get('interval'))} | {gap} | "
                         f"{fed['seconds']:.0f} | {fed['bytes_per_site_per_round'] / 1e6:.1f} MB |")  # fmt: skip
        lines.append("")
        for r in runs:
            if "fresh_test" in r:
                t, fed = r["fresh_test"], r["federated"]
                c, fd = t["centralised"]["old_dsc_agg"], t["federated"]["old_dsc_agg"]
                lines.append(f"- Fresh patients ({t['cases']} new cases of the six centers, `{t['folder']}`), "
                             f"{fed['rounds']} × {fed['local_epochs']} run of `{fed['folder']}`: centralised "
                             f"{c['mean']:.3f}{_bracket(t['centralised']['interval'])} (GTVp {c['gtvp']:.3f}, GTVn "
                             f"{c['gtvn']:.3f}), federated {fd['mean']:.3f}{_bracket(t['federated']['interval'])} (GTVp "
                             f"{fd['gtvp']:.3f}, GTVn {fd['gtvn']:.3f}), difference "
                             f"{t['difference']['difference']:+.3f}{_bracket(t['difference'])}.")  # fmt: skip
        lines += [f"- {note}" for note in f.get("pretraining_notes", [])] + ([""] if f.get("pretraining_notes") else [])
    ad = f.get("adaptation")
    if ad is None:
        return lines + ["Adaptation of two new centers, federated against alone and pooled: not measured yet.", ""]
    centers = ad["centers"]
    lines += [f"Adaptation of two new centers ({' and '.join(centers)}, a folder of their own; profiles in "
              "[federated/new_centers.yaml](federated/new_centers.yaml)) on the centralised base, which saw neither; "
              f"{ad['shots']} shots and the same validation cases per center in every row; DSCagg (mean of GTVp and "
              f"GTVn) on each center's test cases ({', '.join(f'{c}: {n}' for c, n in ad['test_cases'].items())}). "
              "*joint (federated)*: both sites over Flower (FedAvg, one local epoch a round, the adaptation's "
              "epoch budget as rounds, the last round's tensors); *alone*: `centerprompt adapt` per center (best "
              "validation epoch, early stopping), scored on both centers; *each alone, own adapter*: each center "
              "with its own; *pooled (centralised)*: `centerprompt adapt --center " + ",".join(centers) + "`, both "
              "centers' cases on one machine. Time: training seconds (federated: the server's wall time, the two "
              "sites in parallel).", "", f"- {_run_line(ad)}", ""]  # fmt: skip
    for strategy, s in ad["strategies"].items():
        lines += [f"**{strategy}** ({s['rounds']} rounds, {s['bytes_per_site_per_round'] / 1e3:.1f} kB per site per round):", "",
                  "| adapter | " + " | ".join(f"{c} DSCagg (GTVp / GTVn)" for c in centers) + " | mean | time (s) |",
                  "|---|" + "---:|" * (len(centers) + 2)]  # fmt: skip
        own = {c: s["scores"][f"{c} alone"][c] for c in centers}
        rows = [*s["scores"].items(), ("each alone, own adapter", own)]
        seconds = {**s["seconds"], "each alone, own adapter": sum(s["seconds"][f"{c} alone"] for c in centers)}
        for name, by_center in rows:
            values = [by_center[c]["mean"] for c in centers]
            cells = [f"{d['mean']:.3f} ({d['gtvp']:.3f} / {d['gtvn']:.3f})" for d in (by_center[c] for c in centers)]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(values) / len(values):.3f} | {seconds[name]:.0f} |")
        lines.append("")
    return lines


def _run_line(r: Mapping[str, Any]) -> str:
    """Date, machine, command and note of one measured part."""
    m = r["machine"]
    return (f"{r['date']} on {m['cpu']} ({m['cores']} cores, {m['device']}), torch {m['torch']}, seed {r['seed']}: "
            f"`{r['command']}`" + (f". {r['note']}" if r.get("note") else ""))


def _provenance_lines(results: Mapping[str, Any], parts: Sequence[str]) -> list[str]:
    """One line per part: date, machine, command, wall time and note."""
    lines = []
    for part in parts:
        r = results[part]
        m = r["machine"]
        lines.append(f"- {part}: {r['date']} on {m['cpu']} ({m['cores']} cores, {r.get('threads', '?')} torch threads; "
                     f"{m['device']}), torch {m['torch']}, "
                     f"monai {m['monai']}; `{r['command'].split(' --note ')[0]}` ({r['wall_s']:.0f} s{', quick' if r.get('quick') else ''})"
                     + (f". {r['note']}" if r.get("note") else ""))  # fmt: skip
    return lines + [""]


def _gpu_section(gpu: Mapping[str, Any]) -> list[str]:
    """The paper-scale run on a GPU (benchmarks/gpu_paper_scale.sh): its targets and quality table;
    the full cost tables stay in gpu/RESULTS.md."""
    lines = ["## Paper scale on a GPU (ViT-B, 96³)", "",
             "From `benchmarks/gpu_paper_scale.sh`; every table of that run is in [gpu/RESULTS.md](gpu/RESULTS.md).", "",
             *_provenance_lines(gpu, [p for p in ("cost", "quality") if p in gpu])]  # fmt: skip
    if "cost" in gpu:
        lines += ["Targets on the GPU:", "", *(_target_line(row) for row in target_rows(gpu)), ""]
    if "quality" in gpu:
        lines += [line.replace("## Quality", "### Quality", 1) for line in _quality_sections(gpu["quality"])]
    return lines


def _calibration_lines(calibration: Mapping[str, Any] | None) -> list[str]:
    """The leave-one-center-out study of the abstention (benchmarks/routing_calibration.py)."""
    if not calibration:
        return []
    default = str(calibration["default_false_fallback"])
    lines = [f"Abstention measured leave one center out (`{calibration['command'].strip()}`, {calibration['date']}): "
             "each center in turn out of the bank, every other banked with a key from its training cases; "
             "their validation and test scans should go home, every scan of the left-out center fall back "
             "(factorial: POL with CHUS and ACQPOL with ACQ count as one acquisition, by construction "
             "indistinguishable by it).", "",
             "| data | nominal false-fallback rate | threshold | home (routings / scans) | fallback (scans) | "
             "largest own distance | nearest unbanked |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for study in calibration["studies"]:
        for rate, r in study["rates"].items():
            mark = " (default)" if rate == default else ""
            lines.append(f"| {study['data']} | {float(rate):g}{mark} | {r['threshold']:.1f} | {r['home']:.1%} "
                         f"({r['home_routings']} / {r['home_scans']}) | {r['fallback']:.1%} ({r['fallback_scans']}) | "
                         f"{r['home_largest_distance']:.1f} | {r['unbanked_nearest_distance']:.1f} |")  # fmt: skip
    return lines + [""]


def _bank_section(bank: Mapping[str, Any], timing: Mapping[str, Any] | None,
                  calibration: Mapping[str, Any] | None = None) -> list[str]:  # fmt: skip
    """Issue 12's routing targets from a ``bank evaluate`` JSON (benchmarks/bank_run.sh) and, if
    measured, what the fingerprint adds to prediction time (benchmarks/routing_time.py)."""
    routing = bank["routing"]
    unknown = list(routing["unknown_centers"].values())
    fallback = sum(u["fallback"] for u in unknown) / sum(u["n"] for u in unknown) if unknown else None
    oracle, auto = (bank["modes"][m]["per_center"] for m in ("oracle", "auto"))
    gap = max(abs(auto[c]["dsc_agg"]["mean"] - oracle[c]["dsc_agg"]["mean"]) for c in oracle)
    rows = [("scans of banked centers routed to their own center", routing["accuracy"], ">=", 0.95, ".0%"),
            ("scans of centers not in the bank falling back to the base model", fallback, ">=", 0.90, ".0%"),
            ("largest per-center DSCagg gap, automatic vs oracle routing", gap, "<=", 0.01, ".3f"),
            ("time routing adds to a prediction", timing["ratio"] if timing else None, "<=", 0.05, ".1%")]  # fmt: skip
    lines = ["## Prompt bank routing", "",
             f"From `bash benchmarks/bank_run.sh` (bank {', '.join(bank['bank_centers'])}; {bank['distance']}, "
             f"{bank['threshold_rule']}); report in [bank/bank_eval.md](bank/bank_eval.md)"
             + (f"; timing from `{timing['command'].strip()}` ({timing['date']}, {timing['scans']} scans: fingerprint "
                f"{timing['fingerprint_s']:.3f} s, predict {timing['predict_s']:.3f} s)" if timing else "") + ".", ""]  # fmt: skip
    for name, value, op, limit, spec in rows:
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        verdict = {True: "met", False: "not met", None: "not measured"}[met]
        shown = "–" if value is None else format(value, spec)
        lines.append(f"- **{verdict}**: {name}: {shown} (target {'≥' if op == '>=' else '≤'} {format(limit, spec)})")
    return lines + [f"- ROC AUC of the distance for \"center not in the bank\": {routing['abstention_auc']:.3f}", "",
                    *_calibration_lines(calibration)]  # fmt: skip


def _phase_rows(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    total = sum(r["seconds"] for r in rows) or 1.0
    out = ["| phase | seconds | share | of which |", "|---|---:|---:|---|"]
    for r in rows:
        detail = ", ".join(f"{k} {v:.0f} s" for k, v in (r.get("detail") or {}).items() if isinstance(v, (int, float)))
        out.append(f"| {r['phase']} | {r['seconds']:.0f} | {r['seconds'] / total:.0%} | {detail} |")
    return out + [f"| total | {total:.0f} | 100% | |"]


def _profile_section(p: Mapping[str, Any]) -> list[str]:
    """Where the demo's time goes (benchmarks/profile/profile.json): unit costs before and after, the
    py-spy phase shares of one pretraining epoch and one adaptation, the demo's phases, the recipes tried."""
    lines = ["## Where the demo's time goes (issue 25)", "", p["provenance"], ""]
    lines += ["| unit (cpu preset) | before | after | how measured |", "|---|---:|---:|---|"]
    lines += [f"| {u['what']} | {u['before']} | {u['after']} | {u['how']} |" for u in p["units"]]
    lines += ["", p["pyspy"]["text"], "", "| phase | " + " | ".join(p["pyspy"]["columns"]) + " |",
              "|---|" + "---:|" * len(p["pyspy"]["columns"])]  # fmt: skip
    lines += [f"| {row[0]} | " + " | ".join(row[1:]) + " |" for row in p["pyspy"]["rows"]]
    for demo in p["demos"]:
        lines += ["", demo["text"], "", *_phase_rows(demo["phases"])]
    lines += ["", p["recipes"]["text"], "", "| recipe | epochs (best) | best validation | old-center DSCagg | reliance | note |",
              "|---|---|---:|---:|---:|---|"]  # fmt: skip
    lines += [f"| {r['recipe']} | {r['epochs']} | {r['val']} | {r['old']} | {r['reliance']} | {r['note']} |"
              for r in p["recipes"]["rows"]]  # fmt: skip
    lines += ["", p["conclusion"], ""]
    return lines


def _ci(d: Mapping[str, Any] | None, key: str = "difference", spec: str = "+.3f") -> str:
    """A pooled figure with its interval (``intervals.pooled_difference`` or ``ratio_interval``)."""
    from centerprompt.study.report import with_ci

    return with_ci(d[key], d["ci"], spec) if d else "–"


def _factorial_tables(f: Mapping[str, Any]) -> list[str]:
    """One base's pooled table and its per-center table (benchmarks/factorial.py's summary)."""
    rows = f["strategies"]
    lines = ["Base DSCagg on each new center (and on the old centers): " + ", ".join(
                 f"{k} {v['new']:.3f}" for k, v in f["base_dsc"].items()) +
             f" (old {next(iter(f['base_dsc'].values()))['old']:.3f}).", "",
             "| strategy | trainable | mean gain [95% CI] | × full [95% CI] | old-center change [95% CI] "
             "| served per center by routing: gain / old-center change (old scans routed to it) |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, r in rows.items():
        frac = r.get("fraction_of_full")
        frac_text = _ci(frac, "ratio", ".0%") if frac else "–"
        served = r.get("served")
        served_text = (f"{_ci(served['gain'])} / {_ci(served['old_change'])} ({served['old_centers_routed']:.0%})"
                       if served else "–")  # fmt: skip
        lines.append(f"| {name} | {r['trainable_params']:,} ({100 * r['trainable_fraction']:.3g}%) | {_ci(r['gain'])} "
                     f"| {frac_text} | {_ci(r['old_change'])} | {served_text} |")  # fmt: skip
    added = [f"{n.split(':')[0]} {_ci(r['prompts_add'])}" for n, r in rows.items() if r.get("prompts_add")]
    if added:
        lines += ["", "What the prompts add on the new center (the adapter minus itself scored without its prompts, "
                  "paired over the same cases): " + "; ".join(added) + "."]  # fmt: skip
    centers = list(f["per_center"])
    lines += ["", "Per new center (both seeds pooled): new-center gain / old-center change.", "",
              "| strategy | " + " | ".join(centers) + " |", "|---|" + "---:|" * len(centers)]
    for name in rows:
        cells = [f"{_ci(f['per_center'][c][name]['gain'])} / {_ci(f['per_center'][c][name]['old_change'])}"
                 for c in centers]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _factorial_section(f: Mapping[str, Any], aware: Mapping[str, Any] | None = None) -> list[str]:
    """The prompt-adapter benchmark (benchmarks/factorial.py): new centers that differ by one thing,
    on the demo's base and (``aware``) on a prompt-aware base."""
    m = f["machine"]
    lines = ["## Which adapter reaches a new center: factorial new centers, with intervals (issue 24)", "",
             f"Command: `{f['command']}`; {f['date']}; {m['cpu']}, {m['cores']} cores, {m['device']}, torch "
             f"{m['torch']}, MONAI {m['monai']}. Base: `{f['base']}`. New centers (benchmarks/factorial_centers.yaml): "
             "ACQ changes acquisition only, POL contouring only, ACQPOL both; "
             f"{', '.join(map(str, sorted(set(f['new_test_cases'].values()))))} test cases per new center and seed, {f['old_test_cases']} "
             "old-center test cases; 8 adaptation and 6 validation cases; seeds 0 and 1 draw other adaptation cases "
             "and train with other seeds. Gains and old-center changes are DSCagg (mean of GTVp and GTVn) minus the "
             "base's on the same cases; brackets: stratified paired bootstrap 95% intervals (2000 resamples of test "
             "cases within each center and seed); × full = mean gain / full fine-tuning's mean gain, interval from "
             "the same resamples. `X:no-prompts` is adapter X scored with its prompt tokens removed. Served per center: "
             "the new center's model (an adapter in a bank, or full fine-tuning's whole model), keyed by its 8 "
             "adaptation cases' acquisition fingerprints, gets the test scans routed to it, the base model the "
             "others; each case scores as served.", "", *_factorial_tables(f)]  # fmt: skip
    if aware:
        lines += ["### On a prompt-aware base", "",
                  f"Command: `{aware['command']}`; {aware['date']}; same machine, centers, cases and seeds. Base: "
                  f"`{aware['base']}`, pretrained as the demo's base (same cases, epochs and seed) with "
                  "`--center-prompts 10`: deep prompts, one set per pretraining center and a shared set read on 30% "
                  "of the samples. A pretraining center's scans are read with its own set (old-center rows), a new "
                  "center's with the default set, which `deep` trains from the shared set; every other strategy "
                  "keeps the base's prompts frozen; × full is to this base's own full fine-tuning. `X:everywhere`: "
                  "adapter X with the old centers' scans read with the new center's prompts, as a model that is "
                  "not told a scan's center would read them.", "",
                  *_factorial_tables(aware)]  # fmt: skip
    notes = Path(__file__).resolve().parent / "factorial_notes.md"  # the reading of these figures, by hand
    return lines + [notes.read_text().strip() if notes.is_file() else "", ""]


def render(results: Mapping[str, Any], gpu: Mapping[str, Any] | None = None,
           bank: tuple[Any, ...] | None = None,
           recipes: Mapping[str, Any] | None = None, federated: Mapping[str, Any] | None = None,
           profile: Mapping[str, Any] | None = None, factorial: Mapping[str, Any] | None = None,
           factorial_aware: Mapping[str, Any] | None = None) -> str:
    """RESULTS.md text: header, targets, then one section per measurement; ``gpu``: the results of
    the paper-scale GPU run, summarised in a last section."""
    parts = [p for p in ("presets", "cost", "quality", "recipe") if p in results]
    lines = ["# Benchmarks: what prompt tuning costs and gains", "", *_provenance_lines(results, parts),
             "Every DSCagg below was measured before 2026-12-06 and pools voxel counts on each case's CT grid; "
             "`evaluate` and `score` now pool volumes in mm³ as the HECKTOR 2022 organisers do. Rescored in mm³, "
             "the demo's new-center DSCagg (one center, one voxel size) is unchanged and its old-center DSCagg "
             "moves by up to ±0.011 (README, Commands: Scoring).", ""]  # fmt: skip
    if "cost" in results:
        lines += ["Costs are medians over interleaved rounds in one process (same weights, same batch); "
                  "ratios are to full fine-tuning. Training memory = weights + activations saved for backward + "
                  "gradients + optimizer state, counted (an upper bound of the true peak: gradients grow while "
                  "activations are freed); \"× full (fastest)\" compares the fastest rounds, which other "
                  "load on a shared machine can only slow down; the sampled peak is the process's resident set size "
                  "(CUDA: the allocator's peak) during the first step, a noisier cross-check.", "",
                  "## Targets", ""]  # fmt: skip
        lines += [_target_line(row) for row in target_rows(results)] + [""]
        lines += _cost_sections(results["cost"])
    if profile:
        lines += _profile_section(profile)
    if "presets" in results:
        lines += _preset_section(results["presets"])
    if recipes:
        lines += _recipes_section(recipes)
    if factorial:
        lines += _factorial_section(factorial, factorial_aware)
    if "quality" in results:
        lines += _quality_sections(results["quality"])
    if "recipe" in results:
        import recipe

        r = results["recipe"]
        lines += ["## Deep-prompt recipes (is it how the prompts are trained?)", "",
                  f"One base model (held out {r['center']}, seed {r['seed']}, {r['shots']} shots, P=10 unless stated), "
                  "each recipe adapting it on the same cases; DSCagg mean of GTVp and GTVn on the same test cases as "
                  "the headline.", "", *recipe.table(r), ""]  # fmt: skip
    if bank:
        lines += _bank_section(*bank)
    if federated:
        lines += _federated_section(federated)
    if gpu:
        lines += _gpu_section(gpu)
    return "\n".join(lines).rstrip() + "\n"


def _read(path: str | Path | None) -> Any:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def write_markdown(
    results_path: str | Path, out_path: str | Path, gpu_path: str | Path | None = None,
    bank_dir: str | Path | None = None,
) -> Path:  # fmt: skip
    """Render ``results_path`` to ``out_path``, with the GPU run of ``gpu_path`` and the bank's routing
    (``bank_dir``/bank_eval.json and routing_time.json) when those files exist."""
    out_path = Path(out_path)
    bank = _read(Path(bank_dir) / "bank_eval.json") if bank_dir else None
    timing = _read(Path(bank_dir) / "routing_time.json") if bank_dir else None
    calibration = _read(Path(bank_dir) / "routing_calibration.json") if bank_dir else None
    here = Path(__file__).resolve().parent
    out_path.write_text(render(_read(results_path), _read(gpu_path), (bank, timing, calibration) if bank else None,
                               _read(here / "gpu" / "recipes" / "recipes.json") if gpu_path else None,
                               _read(here / "federated" / "federated.json") if gpu_path else None,
                               _read(here / "profile" / "profile.json") if gpu_path else None,
                               _read(here / "factorial.json") if gpu_path else None,
                               _read(here / "factorial_aware.json") if gpu_path else None))  # fmt: skip
    return out_path


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    args = sys.argv[1:]
    print(write_markdown(args[0] if args else here / "results.json", args[1] if len(args) > 1 else here / "RESULTS.md",
                         here / "gpu" / "results.json" if not args else None, here / "bank" if not args else None))
