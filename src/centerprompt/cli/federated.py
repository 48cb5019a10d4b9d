"""``centerprompt federated``: pretraining and prompt tuning across hospitals on Flower."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centerprompt.cli.paths import add_num_prompts, out_path
from typing import Any

from centerprompt import strategies as registry  # import-light: the registry names the choices


def _job(args: argparse.Namespace, job: str) -> Any:
    from centerprompt.federated.site import FederatedJob
    from centerprompt.training.presets import get_preset

    preset = get_preset(args.preset)
    recipe = preset.federated if job == "pretrain" else None  # the sites' batch and rate
    paced = recipe if args.local_epochs is None and args.local_steps is None else None  # its rounds and steps
    rounds = args.rounds or (paced.rounds if paced else preset.pretrain_epochs if job == "pretrain" else preset.adapt_epochs)
    return FederatedJob(job=job, preset=args.preset, rounds=rounds, local_epochs=args.local_epochs or 1,
                        local_steps=paced.local_steps if paced else args.local_steps or 0,
                        lr=args.lr or (recipe.lr if recipe else None),
                        batch_size=args.batch_size or (recipe.batch_size if recipe else None), seed=args.seed,
                        mu=args.mu if args.mu is not None else recipe.mu if recipe else 0.0,
                        sites_per_round=args.sites_per_round,
                        base=str(Path(args.base).resolve()) if getattr(args, "base", None) else "",
                        strategy=getattr(args, "strategy", "deep"), num_prompts=getattr(args, "num_prompts", 10),
                        prompt_dropout=getattr(args, "prompt_dropout", 0.0), optimizer=getattr(args, "optimizer", "adamw"),
                        shots=getattr(args, "shots", 8), server_optimizer=args.server_optimizer,
                        server_lr=args.server_lr, server_momentum=args.server_momentum)  # fmt: skip


def _centers(args: argparse.Namespace) -> list[str]:
    from centerprompt.data.hecktor import find_cases

    present = sorted({c.center for c in find_cases(args.data)})
    if args.centers:
        centers = [c.strip() for c in args.centers.split(",") if c.strip()]
        unknown = [c for c in centers if c not in present]
        if unknown:
            raise ValueError(f"--centers: {args.data} has no case of {', '.join(unknown)} (it has {', '.join(present)}).")
        return centers
    exclude = getattr(args, "exclude_center", None)
    if exclude is None:
        raise ValueError("--centers: name the sites (centers of --data) that adapt together.")
    return [c for c in present if c != exclude]


def _run(args: argparse.Namespace, job_name: str) -> int:
    from centerprompt.federated import require_flower

    if not args.simulate:
        raise ValueError("without --simulate the federation is deployed: write its app with `centerprompt federated "
                         "app`, start flower-superlink and one flower-supernode per site, then `flwr run` "
                         "(README, 'Several hospitals').")  # fmt: skip
    require_flower(simulation=True)
    from centerprompt.federated.flower import simulate

    job = _job(args, job_name)
    centers = _centers(args)
    summary = simulate(job, args.data, centers, args.out, cpus=args.cpus, min_sites=args.min_sites)
    print(json.dumps({k: summary[k] for k in ("job", "sites", "site_names", "rounds_run", "rounds_with_all_sites",
                                              "server_seconds", "artifact", "artifact_bytes",
                                              "tensor_bytes_per_message", "final_val_dsc_agg", "kept_round")}, indent=1))  # fmt: skip
    for failure in summary["site_failures"]:
        print(f"round {failure['round']}: site {failure['site']} was left out ({failure['reason']})")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    return _run(args, "pretrain")


def _cmd_adapt(args: argparse.Namespace) -> int:
    return _run(args, "adapt")


def _cmd_app(args: argparse.Namespace) -> int:
    from centerprompt.federated.app import Federation, write_flower_app

    federation = Federation(sites=args.sites, min_sites=args.min_sites, round_timeout=args.round_timeout)
    folder = write_flower_app(args.app, _job(args, args.job), args.out, federation)
    print(f"Flower App written to {folder}: start flower-superlink and {args.sites} flower-supernode(s) "
          f"(--node-config 'data-dir=\"/site/data\" center=\"NAME\"'), then: flwr run {folder} CONNECTION")
    return 0


def _common(p: argparse.ArgumentParser, *, adapt: bool, base_required: bool = True) -> None:
    p.add_argument("--preset", default="cpu", help="model and preprocessing preset (pretraining; default cpu)")
    p.add_argument("--rounds", type=int, help="federated rounds (default: the preset's federated pretraining rounds, "
                   "cpu 88, or its adaptation epochs)")
    p.add_argument("--local-epochs", type=int, help="epochs over a site's cases per round (default 1)")
    p.add_argument("--local-steps", type=int, help="stop a site's round after this many steps (0: no cap; default: "
                   "the preset's federated pretraining steps, cpu 5, unless --local-epochs is given, else 0)")
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's federated pretraining rate, cpu 4e-3, "
                   "or the strategy's), warm-up then cosine over all rounds")
    p.add_argument("--sites-per-round", type=int, default=0,
                   help="sites that train each round, in turn, each pass over the sites a seeded shuffle "
                   "(1: the model passes from site to site round a fixed ring; default 0: all)")
    p.add_argument("--batch-size", type=int, help="volumes per step at each site (default: the preset's federated pretraining batch, cpu 1, else its batch)")
    p.add_argument("--mu", type=float, help="FedProx proximal weight for heterogeneous sites (0: FedAvg; default: "
                   "the preset's federated pretraining recipe's, cpu 1e-3, else 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-optimizer", default="fedavg", choices=("fedavg", "fedavgm", "fedadam", "fedyogi"),
                   help="how the server combines a round: FedAvg (default), or a server-side optimiser "
                        "stepping along the averaged change (FedAvgM, FedAdam, FedYogi)")
    p.add_argument("--server-lr", type=float,
                   help="server rate (FedAvgM: scales the averaged change, default 1; FedAdam/FedYogi: eta, default 0.01)")
    p.add_argument("--server-momentum", type=float, default=0.0,
                   help="FedAvgM's momentum (default 0); FedAdam/FedYogi's beta_1 (0: 0.9)")
    p.add_argument("--min-sites", type=int, default=0,
                   help="sites a round needs after the first (which waits for all); a site that fails or times out "
                        "is left out of that round and rejoins the next (default: more than half)")
    if adapt:
        p.add_argument("--base", required=base_required, type=Path,
                       help="base model.safetensors (adaptation; the same file at every site and on the server)")
        p.add_argument("--strategy", default="deep", choices=[n for n in registry.strategy_names() if n != "none"])
        add_num_prompts(p)
        p.add_argument("--prompt-dropout", type=float, default=0.0)
        p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"),
                       help="adamw (default) or sgd with momentum 0.9 (VPT's recipe for prompts)")
        p.add_argument("--shots", type=int, default=8, help="labelled cases per site (default 8)")


def register(sub: argparse._SubParsersAction) -> None:
    fed = sub.add_parser("federated", help="train across hospitals that cannot share scans (Flower)")
    actions = fed.add_subparsers(dest="federated_command", metavar="ACTION", required=True)
    for name, adapt, text in (("pretrain", False, "pretrain the base model with FedAvg, one Flower client per center"),
                              ("adapt", True, "several new centers tune one set of prompts, exchanging only those")):  # fmt: skip
        p = actions.add_parser(name, help=text)
        p.add_argument("--data", required=True, type=Path, help="HECKTOR-layout folder holding every site's cases")
        p.add_argument("--out", required=True, type=out_path, help="folder for the model or adapter, metrics and summary")
        p.add_argument("--simulate", action="store_true", help="run every site on this machine (Flower's Ray backend)")
        p.add_argument("--centers", help="comma-separated sites (centers of --data)" +
                       ("" if adapt else "; default: every center but --exclude-center"))  # fmt: skip
        if not adapt:
            p.add_argument("--exclude-center", help="the center kept out of pretraining (the new center)")
        p.add_argument("--cpus", type=int, help="CPUs for the simulation (default: all); one per site process")
        _common(p, adapt=adapt)
        p.set_defaults(func=_cmd_adapt if adapt else _cmd_pretrain, out_kind="folder")
    p = actions.add_parser("app", help="write the Flower App folder for a deployed federation (flwr run)")
    p.add_argument("--app", required=True, type=Path, help="folder to write the app into")
    p.add_argument("--job", required=True, choices=("pretrain", "adapt"))
    p.add_argument("--out", required=True, type=out_path, help="where the ServerApp writes results (on the server)")
    p.add_argument("--sites", type=int, default=2, help="SuperNodes that must connect before the first round")
    p.add_argument("--round-timeout", type=float, default=3600.0,
                   help="seconds the server waits for a round's replies; a site later than that is left out of the round")
    _common(p, adapt=True, base_required=False)
    p.set_defaults(func=_cmd_app, out_kind="folder")
