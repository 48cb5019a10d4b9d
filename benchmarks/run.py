"""Measure what prompt tuning costs and gains; write benchmarks/results.json and RESULTS.md.

    python benchmarks/run.py [--quick] [--part presets|cost|quality|all] [--out benchmarks]

``--quick`` runs the cost part with few repeats (about 10 minutes on a 2-core CPU) and never the
quality part; on a GPU (``--device cuda``) the cost part repeats more (``SETTINGS["gpu"]``). A
part's results replace that part in an existing results.json, so the cost part and the
(hours-long) quality part can be run separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Repeats per size: (warm-up rounds, timed rounds) for training and inference, and the volume
# each size segments. ViT-B at 96^3 takes seconds per step on a CPU, hence fewer rounds.
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {
        "train": {"cpu": (2, 5), "vit-b": (1, 2)},
        "infer": {"cpu": (1, 3), "vit-b": (1, 2)},
        "volume": {"cpu": (96, 96, 96), "vit-b": (96, 96, 96)},
        "data_steps": 10,
    },
    "full": {
        "train": {"cpu": (3, 15), "vit-b": (2, 5)},
        "infer": {"cpu": (1, 5), "vit-b": (1, 3)},
        "volume": {"cpu": (96, 96, 96), "vit-b": (96, 96, 144)},
        "data_steps": 30,
    },
    "gpu": {
        "train": {"cpu": (3, 15), "vit-b": (3, 15)},
        "infer": {"cpu": (2, 5), "vit-b": (2, 5)},
        "volume": {"cpu": (160, 160, 160), "vit-b": (160, 160, 160)},
        "data_steps": 30,
    },
}


def run_cost(quick: bool, device: Any) -> dict[str, Any]:
    """Every cost measurement of benchmarks/cost.py for both sizes."""
    import cost

    gpu = device.type == "cuda"
    s = SETTINGS["quick" if quick else "gpu" if gpu else "full"]
    levers = ["deep+ckpt"] + (["full+bf16", "deep+bf16"] if gpu else [])
    result: dict[str, Any] = {"settings": s, "training": {}, "inference": {}}
    for size, cfg in cost.SIZES.items():
        warmup, repeats = s["train"][size]
        print(f"training step, {size}: {warmup} warm-up + {repeats} timed rounds", file=sys.stderr, flush=True)
        result["training"][size] = cost.measure_training(
            cfg["model"], cfg["batch"], levers=levers, warmup=warmup, repeats=repeats, device=device
        )
        warmup, repeats = s["infer"][size]
        print(f"inference, {size}: volume {s['volume'][size]}", file=sys.stderr, flush=True)
        result["inference"][size] = cost.measure_inference(
            cfg["model"], s["volume"][size], warmup=warmup, repeats=repeats, device=device
        )
    print("storage", file=sys.stderr, flush=True)
    result["storage"] = cost.measure_storage(cost.SIZES["vit-b"]["model"])
    print("data loading", file=sys.stderr, flush=True)
    result["data"] = cost.measure_data(steps=s["data_steps"], device=device)
    levers_out: dict[str, Any] = {}
    if quick:
        levers_out["compile"] = {"skipped": "measured in full mode only"}
    elif gpu:
        levers_out["compile"] = {"skipped": "measured on CPU only (cpu preset)"}
    else:
        print("torch.compile (cpu preset, child process)", file=sys.stderr, flush=True)
        levers_out["compile"] = cost.compile_in_subprocess(cost.SIZES["cpu"]["model"], cost.SIZES["cpu"]["batch"])
    if not gpu:
        levers_out["bf16"] = {"skipped": "bf16 autocast is a GPU lever; CPU bf16 kernels are not what a user would run"}
    result["levers"] = levers_out
    return result


def run_presets(args: argparse.Namespace) -> dict[str, Any]:
    import candidates

    return candidates.run_candidates(args.data, args.work.parent / "candidates", center=args.centers.split(",")[0])


def run_recipe(args: argparse.Namespace) -> dict[str, Any]:
    import recipe

    return recipe.run_recipes(args.data, args.work, center=args.centers.split(",")[0])


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    import quality

    return quality.run_quality(
        args.data, args.work, centers=args.centers.split(","), seeds=[int(s) for s in args.seeds.split(",")],
        sweep_centers=args.sweep_centers.split(",") if args.sweep_centers else None, preset=args.preset,
        pretrain_epochs=args.pretrain_epochs, adapt_epochs=args.adapt_epochs, jobs=args.jobs,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="cost part only, few repeats (~10 min on a CPU)")
    p.add_argument("--part", choices=("presets", "cost", "quality", "recipe", "all"), default="all",
                   help="presets: the CPU preset candidates (pretraining each); recipe: deep-prompt training "
                        "recipes on the quality part's first base; all: cost then quality")
    p.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder of results.json and RESULTS.md")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 on a shared, busy CPU")
    p.add_argument("--data", type=Path, default=Path("data/synth"), help="quality: synthetic data (made if absent)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="quality: run folders (resumable)")
    p.add_argument("--centers", default="MDA,CHUM,HGJ", help="quality: held-out centers")
    p.add_argument("--seeds", default="0,1", help="quality: seeds of the headline table")
    p.add_argument("--sweep-centers", help="quality: centers that get the shots and prompts sweeps (default: all)")
    p.add_argument("--preset", default="cpu", help="quality: model preset (vit-b: the paper's scale, on a GPU)")
    p.add_argument("--pretrain-epochs", type=int, help="quality: pretraining (and oracle) epochs (default: the preset's)")
    p.add_argument("--adapt-epochs", type=int, help="quality: adaptation epochs (default: the preset's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="quality: processes that train bases, oracles and experiments side by side (a many-core GPU machine)")
    p.add_argument("--note", help="stated beside the part in RESULTS.md (e.g. other work that ran beside it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from centerprompt.study.experiment import machine_info
    from centerprompt.files import write_json
    from render import write_markdown

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    path = args.out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = ["cost"] if args.quick else ["cost", "quality"] if args.part == "all" else [args.part]
    run_part = {"presets": run_presets, "cost": lambda a: run_cost(a.quick, device), "quality": run_quality,
                "recipe": run_recipe}
    for part in parts:
        started = time.perf_counter()
        section = run_part[part](args)
        section.update(date=date.today().isoformat(), command=command.strip(), machine=machine_info(),
                       threads=torch.get_num_threads(),
                       wall_s=time.perf_counter() - started, quick=args.quick, note=args.note)  # fmt: skip
        results[part] = section
        write_json(results, path)
        print(f"{part}: {section['wall_s']:.0f} s", file=sys.stderr, flush=True)
    md = write_markdown(path, args.out / "RESULTS.md", args.out / "gpu" / "results.json", args.out / "bank")
    print(f"wrote {path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
