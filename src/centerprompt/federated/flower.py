"""Flower apps for federated pretraining and adaptation (Flower's Message API, flwr >= 1.42).

One :class:`~flwr.clientapp.ClientApp` per hospital (a :class:`~centerprompt.federated.site.Site`)
and one :class:`~flwr.serverapp.ServerApp` that runs FedAvg (or FedProx with ``mu``) from
``flwr.serverapp.strategy`` and writes the same files as the centralised jobs: ``model.safetensors``
(pretraining) or ``adapter.safetensors`` (adaptation), with ``metrics.jsonl`` (per round: loss,
federated validation Dice, bytes each site sent) and ``summary.json``. The same apps run in a local
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
from flwr.serverapp.strategy import FedAvg, FedProx  # noqa: E402

from centerprompt.artifacts import save_adapter, save_model  # noqa: E402
from centerprompt.weights import load_weights_only  # noqa: E402
from centerprompt.federated.site import FederatedJob, Site, job_model, trainable_tensors  # noqa: E402
from centerprompt.data.hecktor import join_centers  # noqa: E402
from centerprompt.files import write_json  # noqa: E402
from centerprompt.runs.base import open_base  # noqa: E402
from centerprompt.models.prompted_unetr import PromptedUNETR  # noqa: E402
from centerprompt.strategies import get_strategy  # noqa: E402
from centerprompt.training.presets import get_preset  # noqa: E402

logger = logging.getLogger(__name__)

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"
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
        reply = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site = _site(context, _job(context, job), folder, centers)
        metrics = site.evaluate_round(msg.content["arrays"].to_torch_state_dict())
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ----------------------------------------------------------------------------- the server


def _strategy(job: FederatedJob, sites: int, start_round: int, metrics_path: Path, rows: list[dict[str, Any]],
              inspect: Inspect | None):  # fmt: skip
    """FedAvg or FedProx weighted by each site's number of cases (the sites follow the learning-rate
    schedule of a central run over the same epochs); each round's loss, rate, validation Dice and
    the bytes each site sent go to ``metrics_path`` as soon as the round ends."""
    base = FedProx if job.mu > 0 else FedAvg
    extra = {"proximal_mu": job.mu} if job.mu > 0 else {}

    class Strategy(base):  # type: ignore[misc, valid-type]
        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            config["federation-round"] = start_round + server_round  # Flower counts from 1 again in a resumed run
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
            replies = list(replies)
            if inspect is not None:
                inspect(start_round + server_round, replies)
            ok = [r for r in replies if not r.has_error()]
            arrays, metrics = super().aggregate_train(server_round, ok)
            rows.append({"round": start_round + server_round, "lr": float(metrics["lr"]) if metrics else None,
                         "sites": len(ok), "failed": len(replies) - len(ok),
                         "bytes_per_site": [r.content["arrays"].count_bytes() for r in ok],
                         "train_loss": float(metrics["train-loss"]) if metrics else None})  # fmt: skip
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
            replies = list(replies)
            if inspect is not None:
                inspect(start_round + server_round, replies)
            metrics = super().aggregate_evaluate(server_round, replies)
            rows[-1]["val_dsc_agg"] = float(metrics["val-dsc-agg"]) if metrics else None
            with metrics_path.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            return metrics

    return Strategy(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=sites, min_evaluate_nodes=sites,
                    min_available_nodes=sites, **extra)  # fmt: skip


def _resume(out: Path, job: FederatedJob, model: PromptedUNETR) -> tuple[int, list[dict[str, Any]]]:
    """Rounds already done by an interrupted run of this very job (its last global tensors loaded)."""
    last, metrics = out / "last_round.pt", out / METRICS_FILE
    if not last.exists():
        return 0, []
    saved = load_weights_only(last, remedy="delete it to start over")
    if saved.get("job") != json.dumps(job.to_config(), sort_keys=True):
        raise ValueError(f"{out} holds an interrupted federated run of another job; use another --out or delete it.")
    model.load_state_dict(saved["tensors"], strict=False)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return int(saved["round"]), [r for r in rows if r["round"] <= saved["round"]]


def run_server(grid: Grid, job: FederatedJob, out: Path, sites: int, site_names: Sequence[str] | None = None,
               inspect: Inspect | None = None, timeout: float = 3600.0) -> dict[str, Any]:  # fmt: skip
    """FedAvg rounds over ``sites`` connected sites; write the artifact, metrics and summary in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    finished = out / SUMMARY_FILE
    if finished.exists():  # a finished run of this very job is kept, as the centralised jobs keep theirs
        summary = json.loads(finished.read_text())
        if {k: summary.get(k) for k in job.to_config()} == json.loads(json.dumps(job.to_config())) and \
                Path(summary["artifact"]).exists():
            logger.info("reusing the finished federated run %s", out)
            return summary
    model = job_model(job)[0]
    done, rows = _resume(out, job, model)
    if done:
        logger.info("resuming %s after round %d of %d", out, done, job.rounds)
    (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))  # the finished rounds only
    strategy = _strategy(job, sites, done, out / METRICS_FILE, rows, inspect)
    started = time.perf_counter()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by the strategy before round 1 and after every round: keep the global tensors."""
        if server_round == 0:
            return None
        absolute = done + server_round
        tmp = out / "last_round.pt.tmp"
        torch.save({"round": absolute, "job": json.dumps(job.to_config(), sort_keys=True),
                    "tensors": arrays.to_torch_state_dict()}, tmp)  # fmt: skip
        tmp.replace(out / "last_round.pt")
        return None

    remaining = job.rounds - done
    if remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable_tensors(model)), num_rounds=remaining,
                                train_config=ConfigRecord({}), evaluate_fn=checkpoint, timeout=timeout)  # fmt: skip
        if len(result.arrays) == 0:
            raise RuntimeError("no federated round succeeded: every site failed (see the SuperNodes' logs).")
        model.load_state_dict(result.arrays.to_torch_state_dict(), strict=False)
    seconds = time.perf_counter() - started
    tensors = trainable_tensors(model)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    extra = {"federated": {"rounds": job.rounds, "sites": sites, "site_names": list(site_names or []),
                           "strategy": "FedProx" if job.mu > 0 else "FedAvg", "mu": job.mu,
                           "local_epochs": job.local_epochs}}  # fmt: skip
    if job.job == "pretrain":
        preset = get_preset(job.preset)
        extra.update(preprocess=preset.preprocess.to_dict(), preset=preset.name, train_centers=list(site_names or []))
        artifact = save_model(model, out / "model.safetensors", extra=extra)
    else:
        base = open_base(job.base)
        extra.update(center=join_centers(site_names or []) or "federated", shots=job.shots, base=str(job.base),
                     preprocess=base.preprocess.to_dict())  # fmt: skip
        options = get_strategy(job.strategy).resolve_options({})
        artifact = save_adapter(model, out / "adapter.safetensors", job.strategy, options, extra=extra)
    summary = {"job": f"federated {job.job}", **job.to_config(), "sites": sites, "site_names": list(site_names or []),
               "rounds_run": len(rows), "server_seconds": seconds, "artifact": str(artifact),
               "artifact_bytes": artifact.stat().st_size, "tensor_bytes_per_message": tensor_bytes,
               "final_val_dsc_agg": rows[-1]["val_dsc_agg"] if rows else None}  # fmt: skip
    write_json(summary, out / SUMMARY_FILE)
    (out / "last_round.pt").unlink(missing_ok=True)
    return summary


def make_server_app(job: FederatedJob | None = None, out: str | Path | None = None, sites: int | None = None,
                    site_names: Sequence[str] | None = None, inspect: Inspect | None = None,
                    box: dict[str, Any] | None = None) -> ServerApp:  # fmt: skip
    """The coordinating side. Deployed, the job, ``out`` (an absolute path on the server) and
    ``sites`` come from the run config; a simulation passes them here. ``inspect(round, replies)``
    sees every site's reply (an audit of what leaves the hospitals); ``box`` receives the summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        summary = run_server(grid, _job(context, job), Path(str(config.get("out", out))),
                             int(config.get("sites", sites or 2)), site_names, inspect)  # fmt: skip
        if box is not None:
            box["summary"] = summary

    return app


def simulate(job: FederatedJob, data_dir: str | Path, centers: Sequence[str], out: str | Path, *,
             cpus: int | None = None, inspect: Inspect | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the federation on this machine: one simulated SuperNode per center of ``data_dir``
    (Flower's Ray backend, one CPU per client process, as many at a time as there are CPUs)."""
    from flwr.simulation import run_simulation

    if len(set(centers)) != len(centers) or not centers:
        raise ValueError(f"--centers: give each site's center once, got {', '.join(centers) or 'none'}.")
    box: dict[str, Any] = {}
    server = make_server_app(job, Path(out).resolve(), len(centers), list(centers), inspect, box)
    client = make_client_app(job, Path(data_dir).resolve(), list(centers))
    cpus = cpus or os.cpu_count() or 1
    run_simulation(server_app=server, client_app=client, num_supernodes=len(centers),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})  # fmt: skip
    if "summary" not in box:
        raise RuntimeError("the federated simulation ended without a result (see Flower's log above).")
    return box["summary"]
