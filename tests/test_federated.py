"""Federated pretraining and adaptation on Flower: FedAvg as computed by hand, what leaves a site,
the adapter other commands accept, one site trained as a central run (the deployed SuperLink:
test_federated_deploy.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from centerprompt.federated.site import FederatedJob  # noqa: E402

TINY_JOB = dict(preset="tiny", rounds=1, local_steps=2, seed=0)  # the first step of a warm-up has rate 0


def _replies(box: list[tuple[int, list[Any]]]):
    def inspect(server_round: int, replies: list[Any]) -> None:
        box.append((server_round, replies))

    return inspect


@pytest.fixture(scope="module")
def federated_base(two_centers: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One FedAvg round of two local steps at CHUM and MDA (tiny preset), with every site reply kept."""
    from centerprompt.federated.flower import simulate

    out = tmp_path_factory.mktemp("fed") / "pretrain"
    seen: list[tuple[int, list[Any]]] = []
    summary = simulate(FederatedJob(job="pretrain", **TINY_JOB), two_centers, ["CHUM", "MDA"], out, cpus=2,
                       inspect=_replies(seen))  # fmt: skip
    return {"out": out, "summary": summary, "seen": seen}


def test_one_round_is_fedavg_by_hand(federated_base: dict[str, Any], two_centers: Path) -> None:
    from safetensors.torch import load_file

    from centerprompt.federated.site import job_model
    from centerprompt.runs.selection import load_index

    train = [r for _, replies in federated_base["seen"] for r in replies if "arrays" in r.content]
    assert len(train) == 2
    states = [r.content["arrays"].to_torch_state_dict() for r in train]
    counts = [float(r.content["metrics"]["num-examples"]) for r in train]
    _, splits = load_index(two_centers, seed=0)
    assert sorted(counts) == sorted(float(len(splits[c]["train"])) for c in ("CHUM", "MDA"))
    model = job_model(FederatedJob(job="pretrain", **TINY_JOB))[0]
    initial = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(states[0]) == set(initial)
    saved = load_file(str(federated_base["out"] / "model.safetensors"))
    moved = 0
    for name, start in initial.items():
        by_hand = sum(c * s[name] for c, s in zip(counts, states)) / sum(counts)
        torch.testing.assert_close(saved[name], by_hand, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(states[0][name], states[1][name]) and not torch.equal(states[0][name], start))
    assert moved > 10  # both sites stepped, differently: the average is not one site's tensors
    rows = [json.loads(line) for line in (federated_base["out"] / "metrics.jsonl").read_text().splitlines()]
    total = sum(t.numel() * 4 for t in initial.values())
    assert rows[0]["round"] == 1 and all(total <= b < 1.01 * total for b in rows[0]["bytes_per_site"])


def test_no_case_id_or_voxel_leaves_a_site(federated_base: dict[str, Any]) -> None:
    """Every reply holds model tensors under the model's own names and scalar metrics, nothing else."""
    from centerprompt.federated.site import job_model

    shapes = {n: tuple(p.shape) for n, p in job_model(FederatedJob(job="pretrain", **TINY_JOB))[0].named_parameters()}
    kinds = set()
    for _, replies in federated_base["seen"]:
        for reply in replies:
            content = reply.content
            assert set(content.keys()) <= {"arrays", "metrics", "site"}
            if "site" in content:  # a training reply names its site, as its node config does
                assert dict(content["site"]) == {"center": "CHUM"} or dict(content["site"]) == {"center": "MDA"}
            metrics = dict(content["metrics"])
            kinds.add(tuple(sorted(metrics)))
            assert all(isinstance(v, (int, float)) for v in metrics.values())
            if "arrays" in content:
                for name, array in content["arrays"].items():
                    assert name in shapes and tuple(array.shape) == shapes[name] and array.dtype == "float32"
    assert kinds == {("lr", "num-examples", "train-loss"), ("num-examples", "val-dsc-agg")}  # lr: the shared schedule


@pytest.fixture(scope="module")
def faulty_adaptation(federated_base: dict[str, Any], two_centers: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Federated deep prompts at CHUM and MDA (FedAdam, three rounds, one site enough for a round)
    through two faults: MDA raises in round 2, and the server dies in round 3 (after round 2's
    checkpoint, before its own); the same command is then run again."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from centerprompt.federated.app import Federation
    from centerprompt.federated.flower import make_client_app, make_server_app, simulate

    out = tmp_path_factory.mktemp("fed") / "adapt"
    job = FederatedJob(job="adapt", base=str(federated_base["out"] / "model.safetensors"), strategy="deep",
                       num_prompts=2, shots=2, rounds=3, local_steps=1, server_optimizer="fedadam")  # fmt: skip
    sites = make_client_app(job, two_centers, ["CHUM", "MDA"])
    client = ClientApp()

    @client.train()
    def train(msg: Any, context: Any) -> Any:
        if context.node_config["partition-id"] == 1 and msg.content["config"]["federation-round"] == 2:
            raise RuntimeError("MDA's node went down")
        return sites(msg, context)

    @client.evaluate()
    def evaluate(msg: Any, context: Any) -> Any:
        return sites(msg, context)

    def server_dies(server_round: int, replies: list[Any]) -> None:
        if server_round == 3:
            raise RuntimeError("the server was killed")

    box: dict[str, Any] = {}
    server = make_server_app(job, out, Federation(sites=2, site_names=("CHUM", "MDA"), min_sites=1), server_dies, box)
    with pytest.raises(RuntimeError, match="server was killed"):
        run_simulation(server_app=server, client_app=client, num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})  # fmt: skip
    assert "summary" not in box
    killed = torch.load(out / "last_round.pt", weights_only=True)
    rows_before = (out / "metrics.jsonl").read_text()
    seen: list[tuple[int, list[Any]]] = []
    summary = simulate(job, two_centers, ["CHUM", "MDA"], out, cpus=2, inspect=_replies(seen), min_sites=1)
    return {"out": out, "job": job, "summary": summary, "killed": killed, "rows_before": rows_before, "seen": seen}


def test_a_site_that_fails_a_round_is_left_out_of_it_and_rejoins(faulty_adaptation: dict[str, Any]) -> None:
    out, summary = faulty_adaptation["out"], faulty_adaptation["summary"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["sites_trained"] for r in rows] == [["CHUM", "MDA"], ["CHUM"], ["CHUM", "MDA"]]
    assert "MDA's node went down" in rows[1]["sites_failed"]["MDA"] and not rows[2]["sites_failed"]
    assert len(rows[1]["bytes_per_site"]) == 1 and rows[1]["train_loss"] is not None
    assert summary["rounds_with_all_sites"] == 2
    assert [(f["round"], f["site"]) for f in summary["site_failures"]] == [(2, "MDA")]


def test_a_killed_server_resumes_after_its_last_round_with_its_optimizer_state(faulty_adaptation: dict[str, Any]) -> None:
    """The rerun trains round 3 only, from round 2's global tensors and FedAdam's moments: the final
    prompts are FedAdam's step from the checkpoint by hand (a server that restarted its moments or
    counted rounds from 1 again would land elsewhere)."""
    from safetensors.torch import load_file

    out, killed, seen = faulty_adaptation["out"], faulty_adaptation["killed"], faulty_adaptation["seen"]
    assert killed["round"] == 2 and set(killed["server"]) == {"m_t", "v_t"}
    assert {r for r, _ in seen} == {3}  # nothing trained twice
    assert (out / "metrics.jsonl").read_text().startswith(faulty_adaptation["rows_before"])
    train = [r for _, replies in seen for r in replies if "arrays" in r.content]
    counts = [float(r.content["metrics"]["num-examples"]) for r in train]
    expected = {}
    for name, x in killed["tensors"].items():
        x = x.double()
        mean = sum(c * r.content["arrays"].to_torch_state_dict()[name].double() for c, r in zip(counts, train)) / sum(counts)
        m = 0.9 * killed["server"]["m_t"][name].double() + 0.1 * (mean - x)
        v = 0.99 * killed["server"]["v_t"][name].double() + 0.01 * (mean - x) ** 2
        expected[name] = x + 1e-2 * (1 - 0.99**4) ** 0.5 / (1 - 0.9**4) * m / (v.sqrt() + 1e-3)
    saved = load_file(str(out / "adapter.safetensors"))
    assert set(expected) <= set(saved)
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name].double(), tensor, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(tensor, killed["tensors"][name].double())
    assert not (out / "last_round.pt").exists()


def test_federated_adapter_is_an_ordinary_adapter(faulty_adaptation: dict[str, Any], federated_base: dict[str, Any]) -> None:
    from centerprompt.artifacts import build_adapted_model, read_adapter_metadata

    base, summary = federated_base["out"] / "model.safetensors", faulty_adaptation["summary"]
    adapter = Path(summary["artifact"])
    meta = read_adapter_metadata(adapter)
    assert meta["strategy"] == "deep" and meta["extra"]["center"] == "CHUM,MDA"
    model = build_adapted_model(base, adapter)  # refuses an adapter of another backbone
    assert model.num_prompts == 2
    rows = [json.loads(line) for line in (faulty_adaptation["out"] / "metrics.jsonl").read_text().splitlines()]
    prompt_bytes = sum(t.numel() * 4 for n, t in model.named_parameters() if "prompt" in n)
    assert all(prompt_bytes <= b < prompt_bytes + 4096 for r in rows for b in r["bytes_per_site"])  # + names, shapes
    assert summary["tensor_bytes_per_message"] < 0.05 * federated_base["summary"]["tensor_bytes_per_message"]


def test_job_round_trips_through_a_flower_run_config() -> None:
    job = FederatedJob(job="adapt", base="/b/model.safetensors", rounds=3, mu=0.01, lr=0.5, server_optimizer="fedavgm",
                       server_lr=2.0, server_momentum=0.5)  # fmt: skip
    assert FederatedJob.from_config(job.to_config() | {"out": "/x", "sites": 2}) == job
    with pytest.raises(ValueError, match="FedAvg has no server rate"):
        FederatedJob(server_lr=2.0)
    with pytest.raises(ValueError, match="base model"):
        FederatedJob(job="adapt")
    with pytest.raises(ValueError, match="trains nothing"):
        FederatedJob(job="adapt", base="b", strategy="none")


def test_without_flower_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:  # fmt: skip
    import importlib.util

    from centerprompt.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(["federated", "pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "x"), "--simulate"]) == 2
    assert "pip install 'centerprompt[federated]'" in capsys.readouterr().err


def test_an_interrupted_run_resumes_after_its_last_round(tmp_path: Path) -> None:
    """The server keeps the global tensors after every round; a rerun of the same job starts from
    there (and its metrics keep the finished rounds), a rerun of another job is refused."""
    from centerprompt.federated.flower import _resume
    from centerprompt.federated.site import job_model, trainable_tensors

    job = FederatedJob(job="pretrain", preset="tiny", rounds=3)
    saved = {n: t + 1.0 for n, t in trainable_tensors(job_model(job)[0]).items()}
    torch.save({"round": 2, "job": json.dumps(job.to_config(), sort_keys=True), "tensors": saved},
               tmp_path / "last_round.pt")  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)))
    model = job_model(job)[0]
    done, rows, server = _resume(tmp_path, job, model)
    assert done == 2 and server == {} and [r["round"] for r in rows] == [1, 2]  # round 3 was not checkpointed: it runs again
    for name, tensor in trainable_tensors(model).items():
        torch.testing.assert_close(tensor, saved[name])
    with pytest.raises(ValueError, match="another job"):
        _resume(tmp_path, FederatedJob(job="pretrain", preset="tiny", rounds=4), job_model(job)[0])
    assert _resume(tmp_path / "fresh", job, job_model(job)[0]) == (0, [], {})


def test_one_site_trains_exactly_as_a_central_run_of_the_same_epochs(two_centers: Path, tmp_path: Path) -> None:
    """Round r of a site is epochs (r-1) x local_epochs onwards of the Trainer a central run uses,
    with its optimizer moments and schedule kept between rounds: two rounds at one site (FedProx off)
    give the weights of two central epochs on the same cases, seed and settings, bit for bit. A
    site that rebuilt its optimizer, reseeded its loader its own way or decayed prompts differently
    would differ."""
    from centerprompt.federated.site import Site, job_model, trainable_tensors
    from centerprompt.training.cases import CachedCases
    from centerprompt.training.loop import Trainer, fit

    job = FederatedJob(job="pretrain", preset="tiny", rounds=2, seed=3)
    site = Site(two_centers, job, "CHUM")
    state, lrs = trainable_tensors(site.model), []
    for server_round in (1, 2):
        state, metrics = site.train_round(state, server_round)
        lrs.append(metrics["lr"])
    assert lrs[0] < lrs[1]  # one warm-up over both rounds' steps, as over a central run's epochs

    model, preprocess, preset = job_model(job)  # the same seeded initialisation
    params = [p for p in model.parameters() if p.requires_grad]
    cached = CachedCases.load(site.train_cases, site.val_cases, preprocess)
    cfg = job.train_config(preset)
    assert cfg.epochs == 2 and cfg.lr == preset.pretrain_lr and cfg.class_weights == preset.class_weights
    fit(Trainer(model, params, cached.train, cfg), tmp_path / "central", progress=False)
    central = trainable_tensors(model)
    assert set(central) == set(state)
    assert all(torch.equal(central[n], state[n]) for n in state)
    assert not torch.equal(central[next(iter(state))], trainable_tensors(job_model(job)[0])[next(iter(state))])
