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
            assert set(content.keys()) <= {"arrays", "metrics"}
            metrics = dict(content["metrics"])
            kinds.add(tuple(sorted(metrics)))
            assert all(isinstance(v, (int, float)) for v in metrics.values())
            if "arrays" in content:
                for name, array in content["arrays"].items():
                    assert name in shapes and tuple(array.shape) == shapes[name] and array.dtype == "float32"
    assert kinds == {("lr", "num-examples", "train-loss"), ("num-examples", "val-dsc-agg")}  # lr: the shared schedule


def test_federated_adapter_is_an_ordinary_adapter(federated_base: dict[str, Any], two_centers: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    from centerprompt.artifacts import build_adapted_model, read_adapter_metadata
    from centerprompt.federated.flower import simulate

    base = federated_base["out"] / "model.safetensors"
    job = FederatedJob(job="adapt", base=str(base), strategy="deep", num_prompts=2, shots=2, rounds=2, local_steps=1)
    summary = simulate(job, two_centers, ["CHUM", "MDA"], tmp_path / "adapt", cpus=2)
    adapter = Path(summary["artifact"])
    meta = read_adapter_metadata(adapter)
    assert meta["strategy"] == "deep" and meta["extra"]["center"] == "CHUM,MDA"
    model = build_adapted_model(base, adapter)  # refuses an adapter of another backbone
    assert model.num_prompts == 2
    rows = [json.loads(line) for line in (tmp_path / "adapt" / "metrics.jsonl").read_text().splitlines()]
    prompt_bytes = sum(t.numel() * 4 for n, t in model.named_parameters() if "prompt" in n)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(prompt_bytes <= b < prompt_bytes + 4096 for r in rows for b in r["bytes_per_site"])  # + names, shapes
    assert summary["tensor_bytes_per_message"] < 0.05 * federated_base["summary"]["tensor_bytes_per_message"]


def test_job_round_trips_through_a_flower_run_config() -> None:
    job = FederatedJob(job="adapt", base="/b/model.safetensors", rounds=3, mu=0.01, lr=0.5)
    assert FederatedJob.from_config(job.to_config() | {"out": "/x", "sites": 2}) == job
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
    done, rows = _resume(tmp_path, job, model)
    assert done == 2 and [r["round"] for r in rows] == [1, 2]  # round 3 was not checkpointed: it runs again
    for name, tensor in trainable_tensors(model).items():
        torch.testing.assert_close(tensor, saved[name])
    with pytest.raises(ValueError, match="another job"):
        _resume(tmp_path, FederatedJob(job="pretrain", preset="tiny", rounds=4), job_model(job)[0])
    assert _resume(tmp_path / "fresh", job, job_model(job)[0]) == (0, [])


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
