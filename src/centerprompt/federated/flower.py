"""Flower apps for federated pretraining and adaptation (Flower's Message API, flwr >= 1.42).

One :class:`~flwr.clientapp.ClientApp` per hospital (a :class:`~centerprompt.federated.site.Site`)
and one :class:`~flwr.serverapp.ServerApp` that runs FedAvg or a server-side optimiser from
``flwr.serverapp.strategy`` (:mod:`~centerprompt.federated.aggregation`), survives sites that fail
or time out (:class:`Federation`), checkpoints its state every round, and writes the same files as
the centralised jobs: ``model.safetensors`` (pretraining) or ``adapter.safetensors`` (adaptation)
of the round with the best federated validation Dice (as a central run keeps its best epoch), with
``metrics.jsonl`` (per round: loss, federated validation Dice, bytes each site sent, which sites
trained, failed or did not reply) and ``summary.json``. The same apps run in a local
simulation (:func:`simulate`, Ray backend) and deployed (``flower-superlink``, one
``flower-supernode`` per site, ``flwr run`` on the folder :func:`write_flower_app` writes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

for _name, _value in (("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"), ("FLWR_TELEMETRY_ENABLED", "0"),
                      ("FLWR_DISABLE_UPDATE_CHECK", "1")):  # fmt: skip
    os.environ.setdefault(_name, _value)  # no telemetry, no version check, no Ray warning: hospitals run offline

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from centerprompt.artifacts import save_adapter, save_model  # noqa: E402
from centerprompt.federated.aggregation import (SERVER_OPTIMIZERS, optimizer_state, restore_optimizer_state,  # noqa: E402
                                                server_options, turn)  # fmt: skip
from centerprompt.weights import load_weights_only  # noqa: E402
from centerprompt.federated.app import Federation  # noqa: E402
from centerprompt.federated.site import FederatedJob, Site, job_model, trainable_tensors  # noqa: E402
from centerprompt.data.hecktor import join_centers  # noqa: E402
from centerprompt.files import atomic_path, write_json  # noqa: E402
from centerprompt.runs.base import open_base  # noqa: E402
from centerprompt.models.prompted_unetr import PromptedUNETR  # noqa: E402
from centerprompt.strategies import get_strategy  # noqa: E402
from centerprompt.training.presets import get_preset  # noqa: E402

logger = logging.getLogger(__name__)

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"
BEST_FILE = "best_round.pt"  # the global tensors of the round with the best federated validation Dice so far
Inspect = Callable[[int, list[Message]], None]

# ----------------------------------------------------------------------------- the sites


_SITES: dict[tuple[str, str, str], Site] = {}  # one per (folder, center, job) in a long-lived process (Ray actor)


def _site(context: Context, job: FederatedJob, data_dir: str | None, centers: Sequence[str] | None) -> Site:
    """This node's site: ``--node-config 'data-dir="..." center="..."'`` when deployed; in a
    simulation the partition's center of the shared folder."""
    node = context.node_config
    if "data-dir" in node:
        folder, center = str(node["data-dir"]), str(node["center"]) if "center" in node else None
    elif data_dir is not None and centers is not None:
        folder, center = data_dir, centers[int(node["partition-id"])]
    else:
        raise ValueError("this SuperNode has no data folder: start it with --node-config 'data-dir=\"/path\"'.")
    key = (folder, center or "", json.dumps(job.to_config(), sort_keys=True))
    if key not in _SITES:
        _SITES[key] = Site(folder, job, center)
    return _SITES[key]


def _job(context: Context, default: FederatedJob | None) -> FederatedJob:
    return FederatedJob.from_config(context.run_config) if context.run_config else default or FederatedJob()


def make_client_app(job: FederatedJob | None = None, data_dir: str | Path | None = None,
                    centers: Sequence[str] | None = None) -> ClientApp:  # fmt: skip
    """The hospital side. Deployed, the job comes from the run config and the data from the node
    config; a simulation passes them here (``centers[partition-id]`` of ``data_dir``)."""
    app = ClientApp()
    folder = None if data_dir is None else str(data_dir)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = _site(context, _job(context, job), folder, centers)
        config = msg.content["config"]
        state, metrics = site.train_round(msg.content["arrays"].to_torch_state_dict(), int(config["federation-round"]))
        reply = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics),
                            "site": ConfigRecord({"center": site.center})})  # fmt: skip
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = _site(context, _job(context, job), folder, centers)
        metrics = site.evaluate_round(msg.content["arrays"].to_torch_state_dict())
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ----------------------------------------------------------------------------- the server


def _strategy(job: FederatedJob, sites: int, min_sites: int, start_round: int, out: Path, rows: list[dict[str, Any]],
              inspect: Inspect | None):  # fmt: skip
    """The job's server optimiser, weighted by each site's number of cases (the sites follow the
    learning-rate schedule of a central run over the same epochs). The first round waits for every
    site; later rounds go on with ``min_sites`` connected, and a round aggregates the sites that
    replied (a site that raised or missed the timeout is skipped and asked again next round; with
    fewer than ``min_sites`` replies the global tensors stay). Each round's loss, rate, validation
    Dice, bytes each site sent and what happened to every site go to ``metrics.jsonl`` as soon as
    the round ends."""

    class Strategy(SERVER_OPTIMIZERS[job.server_optimizer]):  # type: ignore[misc, valid-type]
        names: dict[int, str] = {}  # node ID -> the center it reported
        asked: list[int] = []

        def _name(self, node: int) -> str:
            return self.names.get(node, f"node {node}")

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            self.min_available_nodes = self.min_train_nodes = sites if server_round == 1 else min_sites
            config["federation-round"] = start_round + server_round  # Flower counts from 1 again in a resumed run
            messages = list(super().configure_train(server_round, arrays, config, grid))
            chosen = turn([m.metadata.dst_node_id for m in messages], start_round + server_round, job.sites_per_round,
                          job.seed)
            messages = [m for m in messages if m.metadata.dst_node_id in chosen]
            self.asked = [m.metadata.dst_node_id for m in messages]
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
            replies, absolute = list(replies), start_round + server_round
            if inspect is not None:
                inspect(absolute, replies)
            ok = [r for r in replies if not r.has_error()]
            self.names.update({r.metadata.src_node_id: str(r.content["site"]["center"]) for r in ok})
            failed = {self._name(r.metadata.src_node_id): r.error.reason for r in replies if r.has_error()}
            replied = {r.metadata.src_node_id for r in replies}
            missing = [self._name(n) for n in self.asked if n not in replied]
            # FedAdam's bias correction counts rounds: the absolute one, also after a resume
            enough = bool(ok) and len(ok) >= min(min_sites, len(self.asked))  # a turn of fewer sites needs them all
            arrays, metrics = super().aggregate_train(absolute, ok) if enough else (None, None)
            if failed or missing or arrays is None:
                logger.warning("round %d: %d of %d sites trained%s%s%s", absolute, len(ok), len(self.asked),
                               "".join(f"; {n} failed: {why}" for n, why in failed.items()),
                               "".join(f"; {n} did not reply in time" for n in missing),
                               "; fewer than --min-sites: the global model is kept" if arrays is None else "")  # fmt: skip
            rows.append({"round": absolute, "lr": float(metrics["lr"]) if metrics else None,
                         "sites": len(ok) if arrays is not None else 0, "failed": len(self.asked) - len(ok),
                         "sites_trained": sorted(self._name(r.metadata.src_node_id) for r in ok),
                         "sites_failed": failed, "sites_missing": missing,
                         "bytes_per_site": [r.content["arrays"].count_bytes() for r in ok],
                         "train_loss": float(metrics["train-loss"]) if metrics else None})  # fmt: skip
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
            replies = list(replies)
            if inspect is not None:
                inspect(start_round + server_round, replies)
            metrics = super().aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])
            rows[-1]["val_dsc_agg"] = float(metrics["val-dsc-agg"]) if metrics else None
            with (out / METRICS_FILE).open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            return metrics

    return Strategy(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=sites, min_evaluate_nodes=min_sites,
                    min_available_nodes=sites,
                    **server_options(job.server_optimizer, job.server_lr, job.server_momentum))  # fmt: skip


def _resume(out: Path, job: FederatedJob, model: PromptedUNETR) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Rounds already done by an interrupted run of this very job (its last global tensors loaded),
    their metrics, and the server optimiser's state after the last of them."""
    last, metrics = out / "last_round.pt", out / METRICS_FILE
    if not last.exists():
        return 0, [], {}
    saved = load_weights_only(last, remedy="delete it to start over")
    if saved.get("job") != json.dumps(job.to_config(), sort_keys=True):
        raise ValueError(f"{out} holds an interrupted federated run of another job; use another --out or delete it.")
    model.load_state_dict(saved["tensors"], strict=False)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return int(saved["round"]), [r for r in rows if r["round"] <= saved["round"]], saved.get("server", {})


def _save_round(out: Path, job: FederatedJob, absolute: int, arrays: ArrayRecord, strategy: Any) -> None:
    """The server's state after a finished round: global tensors and the server optimiser's moments."""
    _save(out / "last_round.pt", {"round": absolute, "job": json.dumps(job.to_config(), sort_keys=True),
                                  "tensors": arrays.to_torch_state_dict(), "server": optimizer_state(strategy)})


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _best_so_far(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The kept round of an interrupted run (:data:`BEST_FILE`), if it is one of its finished rounds."""
    path = out / BEST_FILE
    if not path.exists():
        return None
    best = load_weights_only(path, remedy="delete it to start over")
    return best if any(r["round"] == best["round"] for r in rows) else None


def run_server(grid: Grid, job: FederatedJob, out: Path, federation: Federation,
               inspect: Inspect | None = None) -> dict[str, Any]:  # fmt: skip
    """The job's rounds over the federation's sites; write the artifact, metrics and summary in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    finished = out / SUMMARY_FILE
    if finished.exists():  # a finished run of this very job is kept, as the centralised jobs keep theirs
        summary = json.loads(finished.read_text())
        if {k: summary.get(k) for k in job.to_config()} == json.loads(json.dumps(job.to_config())) and \
                Path(summary["artifact"]).exists():
            logger.info("reusing the finished federated run %s", out)
            return summary
    model = job_model(job)[0]
    done, rows, server_state = _resume(out, job, model)
    if done:
        logger.info("resuming %s after round %d of %d", out, done, job.rounds)
    (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))  # the finished rounds only
    strategy = _strategy(job, federation.sites, federation.quorum, done, out, rows, inspect)
    restore_optimizer_state(strategy, server_state)
    best = _best_so_far(out, rows)
    started = time.perf_counter()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by the strategy before round 1 and after every round (after its validation):
        keep the server's state, and the round's tensors when its validation Dice is the best yet."""
        nonlocal best
        if server_round > 0:
            absolute = done + server_round
            _save_round(out, job, absolute, arrays, strategy)
            val = rows[-1].get("val_dsc_agg") if rows and rows[-1]["round"] == absolute else None
            if val is not None and (best is None or val > best["val_dsc_agg"]):
                best = {"round": absolute, "val_dsc_agg": val, "tensors": arrays.to_torch_state_dict()}
                _save(out / BEST_FILE, best)
        return None

    remaining = job.rounds - done
    if remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable_tensors(model)), num_rounds=remaining,
                                train_config=ConfigRecord({}), evaluate_fn=checkpoint,
                                timeout=federation.round_timeout)  # fmt: skip
        if len(result.arrays) == 0:
            raise RuntimeError("no federated round succeeded: every site failed (see the SuperNodes' logs).")
        model.load_state_dict(result.arrays.to_torch_state_dict(), strict=False)
    if best is not None:  # the round a central run's early stopping would keep: the best validation Dice
        model.load_state_dict(best["tensors"], strict=False)
    seconds = time.perf_counter() - started
    tensors = trainable_tensors(model)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    names = list(federation.site_names) or sorted({n for r in rows for n in r.get("sites_trained", [])})
    lost = [{"round": r["round"], "site": n, "reason": why} for r in rows
            for n, why in {**r.get("sites_failed", {}), **dict.fromkeys(r.get("sites_missing", []), "no reply in time")}.items()]  # fmt: skip
    extra = {"federated": {"rounds": job.rounds, "sites": federation.sites, "site_names": names,
                           "server_optimizer": job.server_optimizer, "mu": job.mu,
                           "local_epochs": job.local_epochs}}  # fmt: skip
    if job.job == "pretrain":
        preset = get_preset(job.preset)
        extra.update(preprocess=preset.preprocess.to_dict(), preset=preset.name, train_centers=names)
        artifact = save_model(model, out / "model.safetensors", extra=extra)
    else:
        base = open_base(job.base)
        extra.update(center=join_centers(names) or "federated", shots=job.shots, base=str(job.base),
                     preprocess=base.preprocess.to_dict())  # fmt: skip
        options = get_strategy(job.strategy).resolve_options({})
        artifact = save_adapter(model, out / "adapter.safetensors", job.strategy, options, extra=extra)
    summary = {"job": f"federated {job.job}", **job.to_config(), "sites": federation.sites, "site_names": names,
               "min_sites": federation.quorum, "rounds_run": len(rows), "server_seconds": seconds,
               "rounds_with_all_sites": sum(r["sites"] == federation.sites for r in rows), "site_failures": lost,
               "artifact": str(artifact), "artifact_bytes": artifact.stat().st_size,
               "tensor_bytes_per_message": tensor_bytes,
               "final_val_dsc_agg": rows[-1]["val_dsc_agg"] if rows else None,
               "kept_round": best["round"] if best else (rows[-1]["round"] if rows else 0),
               "kept_val_dsc_agg": best["val_dsc_agg"] if best else None}  # fmt: skip
    if lost:
        logger.warning("finished with %d site failure(s): %s", len(lost),
                       "; ".join(f"round {f['round']} {f['site']}" for f in lost))  # fmt: skip
    write_json(summary, out / SUMMARY_FILE)
    (out / BEST_FILE).unlink(missing_ok=True)  # it is the artifact now; last_round.pt stays, as a central run's last.pt
    return summary


def make_server_app(job: FederatedJob | None = None, out: str | Path | None = None,
                    federation: Federation | None = None, inspect: Inspect | None = None,
                    box: dict[str, Any] | None = None) -> ServerApp:  # fmt: skip
    """The coordinating side. Deployed, the job, ``out`` (an absolute path on the server),
    ``sites``, ``min-sites`` and ``round-timeout`` come from the run config; a simulation passes
    them here. ``inspect(round, replies)`` sees every site's reply (an audit of what leaves the
    hospitals); ``box`` receives the summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        plan = federation or Federation(sites=int(config.get("sites", 2)), min_sites=int(config.get("min-sites", 0)),
                                        round_timeout=float(config.get("round-timeout", 3600.0)))  # fmt: skip
        summary = run_server(grid, _job(context, job), Path(str(config.get("out", out))), plan, inspect)
        if box is not None:
            box["summary"] = summary

    return app


def simulate(job: FederatedJob, data_dir: str | Path, centers: Sequence[str], out: str | Path, *,
             cpus: int | None = None, inspect: Inspect | None = None, min_sites: int = 0) -> dict[str, Any]:  # fmt: skip
    """Run the federation on this machine: one simulated SuperNode per center of ``data_dir``
    (Flower's Ray backend, one CPU per client process, as many at a time as there are CPUs)."""
    from flwr.simulation import run_simulation

    if len(set(centers)) != len(centers) or not centers:
        raise ValueError(f"--centers: give each site's center once, got {', '.join(centers) or 'none'}.")
    box: dict[str, Any] = {}
    federation = Federation(sites=len(centers), site_names=tuple(centers), min_sites=min_sites)
    server = make_server_app(job, Path(out).resolve(), federation, inspect, box)
    client = make_client_app(job, Path(data_dir).resolve(), list(centers))
    cpus = cpus or os.cpu_count() or 1
    run_simulation(server_app=server, client_app=client, num_supernodes=len(centers),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})  # fmt: skip
    if "summary" not in box:
        raise RuntimeError("the federated simulation ended without a result (see Flower's log above).")
    return box["summary"]
