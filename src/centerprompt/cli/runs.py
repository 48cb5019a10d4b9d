"""Sub-commands that train and use models: pretrain, adapt, evaluate, inspect, predict, experiment, demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from centerprompt.cli.paths import add_num_prompts, out_path
from typing import Any

from centerprompt import strategies as registry  # import-light: no torch until a command runs

PRESET_NAMES = ("cpu", "vit-b", "tiny")  # centerprompt.training.presets.PRESETS, named here to keep --help instant
DEMO_DATA = Path("data/synth")
PHASE_HEADING = "\nWhere the time went"  # results.md's phase table, which the demo prints whole with data generation
DEMO_CENTER = "MDA"  # contrast CT, liberal contours, all nodes contoured: the most distinct profile


def _common_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="maximum epochs (default: the preset's)")
    p.add_argument("--lr", type=float, help="learning rate (default: per strategy)")
    p.add_argument("--batch-size", type=int, help="volumes per step (default: the preset's)")
    p.add_argument("--patience", type=int, default=10,
                   help="early stopping: validations without improvement (an adaptation counts them from half its epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--skip-bad-cases", action="store_true",
                   help="skip (with a warning) cases that fail the checks, also those an existing split lists: left "
                        "out of this run and recorded in summary.json; the split file is not changed and every other "
                        "case keeps its split")  # fmt: skip
    splits_argument(p)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")


def splits_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--splits", type=Path, metavar="FILE",
                   help="split file (per-center train/val/test case IDs) to use; written there first if it does not "
                        "exist, so several runs can share one split. Without it: DATA/splits.json if present (read, "
                        "never written), else the split the --base was pretrained with, else the run folder's "
                        "splits.json from an earlier run, else made from the labelled cases (with --seed where the command has one). A run folder "
                        "keeps the split it used in OUT/splits.json (evaluate: its source and hash in the JSON); "
                        "nothing is written into --data")  # fmt: skip


BASE_SOURCES = ("model.safetensors, a MONAI UNETR state dict or checkpoint (.pt/.pth/.ckpt, read with "
                "weights_only=True), or a MONAI bundle folder")  # fmt: skip


def base_arguments(p: argparse.ArgumentParser, *, required: bool = True, text: str = "base model") -> None:
    """``--base`` and what a user can say about a base model that is not centerprompt's own."""
    p.add_argument("--base", required=required, type=Path, help=f"{text}: {BASE_SOURCES}")
    p.add_argument("--model-config", type=Path, metavar="FILE",
                   help="JSON or YAML of UNETR arguments (num_heads, img_size, ...) over those read or inferred from "
                        "--base; a state dict does not store num_heads (12 is assumed)")  # fmt: skip
    p.add_argument("--preprocess", type=Path, metavar="FILE",
                   help="JSON or YAML of preprocessing fields (spacing, ct_window, suv_max, body_hu, crop_mm, roi_size, "
                        "...) over those of --base (its metadata or bundle; defaults for a bare state dict)")  # fmt: skip


def base_files(args: argparse.Namespace) -> dict[str, Any]:
    """``model_config`` and ``preprocess`` as read from the files ``--model-config`` and ``--preprocess`` name."""
    from centerprompt.checkpoints import read_config_file

    return {"model_config": read_config_file(args.model_config, "model configuration") if args.model_config else None,
            "preprocess": read_config_file(args.preprocess, "preprocessing") if args.preprocess else None}  # fmt: skip


def base_spec(args: argparse.Namespace) -> Any:
    """The ``BaseSpec`` of ``--base`` with its ``--model-config`` and ``--preprocess``."""
    from centerprompt.checkpoints import BaseSpec

    files = base_files(args)
    if args.base is None:
        if any(v is not None for v in files.values()):
            raise ValueError("--model-config and --preprocess describe a --base; give one.")
        return None
    return BaseSpec(args.base, **files)


def _option_dest(strategy: str, option: str) -> str:
    return f"option__{strategy}__{option}"


def _add_strategy_options(p: argparse.ArgumentParser) -> None:
    """One flag per registered strategy option that declares one, and ``--option NAME=VALUE`` for any."""
    group = p.add_argument_group("strategy options (each applies to its strategy only)")
    for strategy in registry.STRATEGIES.values():
        for o in strategy.options:
            if o.flag:
                group.add_argument(o.flag, dest=_option_dest(strategy.name, o.name), metavar="VALUE",
                                   help=f"{strategy.name}: {o.help} (default {o.default})")  # fmt: skip
    group.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                       help="an option of the chosen strategy by name (repeatable)")  # fmt: skip


def _strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen strategy's options from its flags and ``--option``; a flag of another strategy is an error."""
    chosen = registry.get_strategy(args.strategy)
    options: dict[str, Any] = {}
    for strategy in registry.STRATEGIES.values():
        for o in strategy.options:
            value = getattr(args, _option_dest(strategy.name, o.name), None) if o.flag else None
            if value is None:
                continue
            if strategy.name != chosen.name:
                raise ValueError(f"{o.flag} is an option of --strategy {strategy.name}, not of {chosen.name}.")
            options[o.name] = o.parse(value)
    parsers = {o.name: o.parse for o in chosen.options}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or name not in parsers:
            known = ", ".join(parsers) or "none"
            raise ValueError(f"--option {item!r}: give NAME=VALUE with a {chosen.name} option ({known}).")
        options[name] = parsers[name](value)
    return options


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from centerprompt.training.config import PretrainRun
    from centerprompt.runs.pretrain import pretrain
    from centerprompt.training.devices import init_distributed

    run = PretrainRun(
        data_dir=args.data, out=args.out, exclude_center=args.exclude_center, preset=args.preset, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, patience=args.patience, seed=args.seed, resume=args.resume,
        skip_bad_cases=args.skip_bad_cases, amp=args.amp, compile=args.compile, splits=args.splits,
        center_prompts=args.center_prompts,
    )  # fmt: skip
    init_distributed()
    summary = pretrain(run)
    print(f"base model: {Path(args.out) / 'model.safetensors'} (best validation Dice {summary['best_metric']:.3f} "
          f"at epoch {summary['best_epoch']}, {summary['train_seconds']:.0f} s)")  # fmt: skip
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from centerprompt.training.config import AdaptRun
    from centerprompt.runs.adapt import adapt
    from centerprompt.training.devices import init_distributed

    run = AdaptRun(
        data_dir=args.data, center=args.center, base=args.base, out=args.out, strategy=args.strategy,
        num_prompts=args.num_prompts, shots=args.shots, options=_strategy_options(args), prompt_dropout=args.prompt_dropout,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
        optimizer=args.optimizer, amp=args.amp, compile=args.compile, resume=args.resume,
        skip_bad_cases=args.skip_bad_cases, splits=args.splits, **base_files(args),
    )  # fmt: skip
    init_distributed()
    s = adapt(run)
    print(f"{args.strategy}: {s['trainable_params']:,} trainable of {s['total_params']:,} "
          f"({100 * s['trainable_fraction']:.3f}%), artifact {s['artifact']} ({s['artifact_bytes']:,} bytes), "
          f"{s['train_seconds']:.0f} s")  # fmt: skip
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from centerprompt.training.config import ExperimentRun
    from centerprompt.study.experiment import run_all_centers, run_experiment

    run = ExperimentRun(
        data_dir=args.data, new_center=args.new_center, out=args.out,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()), base=args.base,
        preset=args.preset, shots=args.shots, num_prompts=args.num_prompts, pretrain_epochs=args.pretrain_epochs,
        adapt_epochs=args.adapt_epochs, patience=args.patience, seed=args.seed, score_at=args.score_at,
        on_change=args.on_change, skip_bad_cases=args.skip_bad_cases, splits=args.splits,
        command=" ".join(["centerprompt", *sys.argv[1:]]), **base_files(args),
    )  # fmt: skip
    if args.new_center == "all":
        text = run_all_centers(run)
    else:
        run_experiment(run)
        text = (Path(args.out) / "results.md").read_text()
    print(text)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from centerprompt.training.config import ExperimentRun
    from centerprompt.study.experiment import run_experiment

    started = time.perf_counter()
    data = Path(args.data)
    generation = {"phase": "data generation", "seconds": 0.0, "detail": {"reused": f"{data} was there"}}
    if not (data / "imagesTr").is_dir():
        from centerprompt.data.synthetic.writer import generate_dataset

        print(f"generating the synthetic multi-center dataset in {data} ...")
        generate_dataset(data, cases_per_center=args.cases_per_center)
        generation = {"phase": "data generation", "seconds": time.perf_counter() - started, "detail": {}}
    out = Path(args.out) / ("quick" if args.quick else "full")
    quick = dict(pretrain_epochs=3, adapt_epochs=2, shots=4, patience=0)
    full = dict(pretrain_epochs=None, adapt_epochs=None, shots=8, patience=10)
    settings: dict[str, Any] = quick if args.quick else full
    names = registry.strategy_names(registry.QUICK if args.quick else registry.STANDARD)
    settings["strategies"] = (*names, registry.ORACLE) if args.oracle else tuple(names)
    results = run_experiment(ExperimentRun(data_dir=data, new_center=args.new_center, out=out, preset="cpu",
                                           seed=args.seed, command="centerprompt demo" + (" --quick" if args.quick else ""),
                                           splits=args.splits, smoke=args.quick, **settings))  # fmt: skip
    from centerprompt.study.report import phase_table

    print((out / "results.md").read_text().split(PHASE_HEADING)[0])
    print(f"report: {out / 'results.md'}, figures: {out}/*.png\n")
    print(f"Where the demo's {time.perf_counter() - started:.0f} s went:\n")
    print("\n".join(phase_table([generation, *results["phase_seconds"]])))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train the base model on every center but one")
    p.add_argument("--data", required=True, type=Path, help="HECKTOR-layout folder")
    p.add_argument("--exclude-center", help="center left out of pretraining (the future new center)")
    p.add_argument("--out", required=True, type=out_path, help="run folder (model.safetensors is written there)")
    p.add_argument("--preset", default="cpu", choices=PRESET_NAMES, help="model size and preprocessing")
    p.add_argument("--center-prompts", type=int, default=0, metavar="P",
                   help="prompt-aware pretraining: deep prompts of P tokens, one set per training center and a "
                        "shared set (0: none)")  # fmt: skip
    _common_training(p)
    p.set_defaults(func=_cmd_pretrain, out_kind="folder")

    p = sub.add_parser("adapt", help="adapt the frozen base model to a new center with one strategy")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--center", required=True,
                   help="the new center; or several, comma-separated (USZ,CHB): one adapter on their cases pooled")
    base_arguments(p)
    p.add_argument("--strategy", default=registry.DEFAULT_STRATEGY, choices=registry.strategy_names())
    add_num_prompts(p)
    p.add_argument("--prompt-dropout", type=float, default=0.0)
    p.add_argument("--shots", type=int, default=8, help="labelled cases of the new center to adapt on")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                   help="sgd: VPT's recipe for prompts (momentum 0.9; give a large --lr)")
    p.add_argument("--out", required=True, type=out_path, help="run folder (adapter.safetensors is written there)")
    _common_training(p)
    _add_strategy_options(p)
    p.set_defaults(func=_cmd_adapt, out_kind="folder")

    p = sub.add_parser("experiment", help="leave-one-center-out comparison of strategies")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--new-center", required=True, help="held-out center, or 'all' for each in turn")
    p.add_argument("--strategies", default=",".join([*registry.strategy_names(registry.STANDARD), registry.ORACLE]),
                   help=f"comma-separated, of {', '.join(registry.strategy_names())}; 'oracle' retrains the base "
                        "with the new center's adaptation cases (the in-domain reference each gain is compared with)")
    base_arguments(p, required=False, text="use this base model instead of pretraining one")
    p.add_argument("--preset", default="cpu", choices=PRESET_NAMES)
    p.add_argument("--shots", type=int, default=8)
    add_num_prompts(p)
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--adapt-epochs", type=int)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-at", default="ct", choices=("ct", "preprocessed"))
    p.add_argument("--on-change", default="rerun", choices=("rerun", "refuse"),
                   help="a finished stage in --out made with other settings, cases or base: train it again "
                        "(default) or stop with an error")
    p.add_argument("--skip-bad-cases", action="store_true",
                   help="skip (with a warning) cases that fail the checks; every other case keeps its split")
    splits_argument(p)
    p.add_argument("--out", required=True, type=out_path, help="run folder: one split (OUT/splits.json) for every stage")
    p.set_defaults(func=_cmd_experiment, out_kind="folder")

    p = sub.add_parser("demo", help="synthetic data, then the experiment for one held-out center, on a CPU")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few epochs, to check that everything runs "
                   "(3 min 44 s on 2 CPU cores with the data there, 2026-12-06)")
    p.add_argument("--oracle", action="store_true",
                   help="also train the in-domain oracle (a second pretraining) and report each gain as a "
                        "fraction of its gap; rerun with it after a demo to add it to the finished runs")
    p.add_argument("--out", type=out_path, default=Path("runs/demo"))
    p.add_argument("--data", type=Path, default=DEMO_DATA, help="generated here if absent")
    p.add_argument("--new-center", default=DEMO_CENTER)
    p.add_argument("--cases-per-center", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    splits_argument(p)
    p.set_defaults(func=_cmd_demo, out_kind="folder")
