"""Federated adaptation on Flower: rounds computed by hand through a failed site and a killed and
resumed server, what leaves a site, the adapter other commands accept, one site trained as a
central run (federated pretraining on a deployed SuperLink: test_federated_deploy.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from centerprompt.federated.site import FederatedJob  # noqa: E402

BETA = 0.5  # FedAvgM's server momentum in the simulated federation


def _replies(box: list[tuple[int, list[Any]]], die_in: int | None = None):
    def inspect(server_round: int, replies: list[Any]) -> None:
        box.append((server_round, replies))
        if server_round == die_in:
            raise RuntimeError("the server was killed")

    return inspect


@pytest.fixture(scope="module")
def federation(two_centers: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Federated deep prompts at CHUM and MDA on a tiny base (FedAvgM with momentum, three rounds of
    two local epochs of one step, the first of a warm-up having rate 0; one site enough for a round) through two faults: MDA raises in round 2, and the
    server dies in round 3 (after round 2's checkpoint, before its own); the same command is then
    run again. Every site reply of both server runs is kept."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from centerprompt.cli import main
    from centerprompt.federated.app import Federation
    from centerprompt.federated.flower import make_client_app, make_server_app, simulate

    base = tmp_path_factory.mktemp("base")
    assert main(["pretrain", "--data", str(two_centers), "--exclude-center", "MDA", "--out", str(base), "--preset",
                 "tiny", "--epochs", "1"]) == 0  # fmt: skip
    out = tmp_path_factory.mktemp("fed") / "adapt"
    job = FederatedJob(job="adapt", base=str(base / "model.safetensors"), strategy="deep", num_prompts=2, shots=2,
                       rounds=3, local_epochs=2, server_optimizer="fedavgm", server_momentum=BETA)  # fmt: skip
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

    seen: list[tuple[int, list[Any]]] = []
    server = make_server_app(job, out, Federation(sites=2, site_names=("CHUM", "MDA"), min_sites=1),
                             _replies(seen, die_in=3))  # fmt: skip
    with pytest.raises(RuntimeError, match="server was killed"):
        run_simulation(server_app=server, client_app=client, num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 1, "include_dashboard": False}})  # fmt: skip
    killed = torch.load(out / "last_round.pt", weights_only=True)
    rows_before = (out / "metrics.jsonl").read_text()
    resumed: list[tuple[int, list[Any]]] = []
    summary = simulate(job, two_centers, ["CHUM", "MDA"], out, cpus=1, inspect=_replies(resumed), min_sites=1)
    return {"out": out, "base": base / "model.safetensors", "job": job, "summary": summary, "killed": killed,
            "rows_before": rows_before, "seen": seen, "resumed": resumed}  # fmt: skip


def _trained(box: list[tuple[int, list[Any]]], server_round: int) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """The tensors and case counts of the sites that trained ``server_round``."""
    train = [r for n, replies in box if n == server_round for r in replies if not r.has_error() and "arrays" in r.content]
    return [r.content["arrays"].to_torch_state_dict() for r in train], [float(r.content["metrics"]["num-examples"]) for r in train]


def _mean(states: list[dict[str, torch.Tensor]], counts: list[float], name: str) -> torch.Tensor:
    return sum(c * s[name].double() for c, s in zip(counts, states)) / sum(counts)


def test_rounds_are_fedavgm_by_hand_through_a_failed_site_and_a_resumed_server(federation: dict[str, Any]) -> None:
    """Round 1 averages both sites by case count (FedAvgM's first step is the average itself), round
    2 steps along CHUM's change alone with momentum, and the resumed server's round 3 continues from
    round 2's tensors and momentum: the last round's tensors are that arithmetic, and the saved
    prompts are those of the round with the best validation Dice (kept across the kill when it came
    before it). A server that averaged unweighted, counted a failed site, lost its momentum on resume,
    trained a round twice or saved another round lands elsewhere."""
    from safetensors.torch import load_file

    from centerprompt.federated.site import job_model, trainable_tensors

    job, killed = federation["job"], federation["killed"]
    x0 = {n: t.double() for n, t in trainable_tensors(job_model(job)[0]).items()}
    (s1, c1), (s2, c2), (s3, c3) = _trained(federation["seen"], 1), _trained(federation["seen"], 2), \
        _trained(federation["resumed"], 3)  # fmt: skip
    assert (len(s1), len(s2), len(s3)) == (2, 1, 2) and c1 == c3 == [2.0, 2.0]  # FedAvg's weights: the shots
    assert {r for r, _ in federation["resumed"]} == {3}  # nothing trained twice
    names = list(x0)
    momentum = dict(zip(names, killed["server"]["momentum_vector"]))
    assert killed["round"] == 2 and set(killed["server"]) == {"momentum_vector"}
    final = load_file(str(federation["out"] / "adapter.safetensors"))
    last = torch.load(federation["out"] / "last_round.pt", weights_only=True)
    assert last["round"] == 3
    rows = [json.loads(line) for line in (federation["out"] / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_dsc_agg"] for r in rows]
    kept = federation["summary"]["kept_round"]
    assert kept == 1 + vals.index(max(vals))  # as a central run keeps its best epoch: the first of equals
    moved = 0
    for name in names:
        x1 = _mean(s1, c1, name)  # momentum starts as the first pseudo-gradient x0 - mean: x1 is the mean
        m2 = BETA * (x0[name] - x1) + (x1 - _mean(s2, c2, name))
        x2 = x1 - m2
        torch.testing.assert_close(killed["tensors"][name].double(), x2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(momentum[name].double(), m2, rtol=1e-5, atol=1e-7)
        x3 = x2 - (BETA * m2 + (x2 - _mean(s3, c3, name)))
        torch.testing.assert_close(last["tensors"][name].double(), x3, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(final[name].double(), (x1, x2, x3)[kept - 1], rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(s1[0][name], s1[1][name]))
    assert moved == len(names)  # both sites stepped, differently: the mean is not one site's tensors


def test_no_case_id_or_voxel_leaves_a_site(federation: dict[str, Any]) -> None:
    """Every reply holds model tensors under the model's own names, scalar metrics and its site's
    name, nothing else."""
    from centerprompt.federated.site import job_model

    shapes = {n: tuple(p.shape) for n, p in job_model(federation["job"])[0].named_parameters()}
    kinds = set()
    for _, replies in federation["seen"] + federation["resumed"]:
        for reply in replies:
            if reply.has_error():
                continue
            content = reply.content
            assert set(content.keys()) <= {"arrays", "metrics", "site"}
            if "site" in content:  # a training reply names its site, as its node config does
                assert dict(content["site"]) in ({"center": "CHUM"}, {"center": "MDA"})
            metrics = dict(content["metrics"])
            kinds.add(tuple(sorted(metrics)))
            assert all(isinstance(v, (int, float)) for v in metrics.values())
            if "arrays" in content:
                for name, array in content["arrays"].items():
                    assert name in shapes and tuple(array.shape) == shapes[name] and array.dtype == "float32"
    assert kinds == {("lr", "num-examples", "train-loss"), ("num-examples", "val-dsc-agg")}  # lr: the shared schedule


def test_a_site_that_fails_a_round_is_left_out_of_it_and_rejoins(federation: dict[str, Any]) -> None:
    out, summary = federation["out"], federation["summary"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert (out / "metrics.jsonl").read_text().startswith(federation["rows_before"])  # the killed run's rounds kept
    assert [r["sites_trained"] for r in rows] == [["CHUM", "MDA"], ["CHUM"], ["CHUM", "MDA"]]
    assert "MDA's node went down" in rows[1]["sites_failed"]["MDA"] and not rows[2]["sites_failed"]
    assert len(rows[1]["bytes_per_site"]) == 1 and rows[1]["train_loss"] is not None
    assert summary["rounds_with_all_sites"] == 2
    assert [(f["round"], f["site"]) for f in summary["site_failures"]] == [(2, "MDA")]
    assert not (out / "best_round.pt").exists()  # the kept round is the artifact; the last round stays in last_round.pt


def test_federated_adapter_is_an_ordinary_adapter(federation: dict[str, Any]) -> None:
    from centerprompt.artifacts import build_adapted_model, read_adapter_metadata

    summary = federation["summary"]
    adapter = Path(summary["artifact"])
    meta = read_adapter_metadata(adapter)
    assert meta["strategy"] == "deep" and meta["extra"]["center"] == "CHUM,MDA"
    model = build_adapted_model(federation["base"], adapter)  # refuses an adapter of another backbone
    assert model.num_prompts == 2
    rows = [json.loads(line) for line in (federation["out"] / "metrics.jsonl").read_text().splitlines()]
    prompt_bytes = sum(t.numel() * 4 for n, t in model.named_parameters() if "prompt" in n)
    assert all(prompt_bytes <= b < prompt_bytes + 4096 for r in rows for b in r["bytes_per_site"])  # + names, shapes
    whole = sum(t.numel() * 4 for n, t in model.named_parameters() if "prompt" not in n)
    assert summary["tensor_bytes_per_message"] < 0.05 * whole


def test_server_optimizer_moments_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    """FedAdam's per-name moments (and FedAvgM's list) go through the round checkpoint and back."""
    import numpy as np
    from flwr.serverapp.strategy import FedAdam

    from centerprompt.federated.aggregation import optimizer_state, restore_optimizer_state

    strategy, fresh = FedAdam(), FedAdam()
    strategy.m_t = {"a": np.arange(3.0), "b": np.ones((2, 2), dtype=np.float32)}
    strategy.v_t = {"a": np.full(3, 0.5), "b": np.zeros((2, 2), dtype=np.float32)}
    torch.save({"server": optimizer_state(strategy)}, tmp_path / "state.pt")
    restore_optimizer_state(fresh, torch.load(tmp_path / "state.pt", weights_only=True)["server"])
    for name in ("m_t", "v_t"):
        assert set(getattr(fresh, name)) == {"a", "b"}
        for key, value in getattr(strategy, name).items():
            np.testing.assert_array_equal(getattr(fresh, name)[key], value)
    assert optimizer_state(FedAdam()) == {}
    with pytest.raises(ValueError, match="does not keep"):
        restore_optimizer_state(FedAdam(), {"momentum_vector": []})


def test_sites_take_turns_when_fewer_than_all_train_a_round() -> None:
    """--sites-per-round k: every site trains once a pass over the sites, the groups averaged
    together change between passes (a fixed order would pair the same sites forever when k divides
    n), no round holds a site twice, and the absolute round and seed decide (a resumed server keeps
    the turn); one site a round is the fixed ring of cyclic weight transfer."""
    import numpy as np

    from centerprompt.federated.aggregation import turn

    nodes = [42, 7, 19]
    assert [turn(nodes, r, 1) for r in range(1, 7)] == [[7], [19], [42], [7], [19], [42]]
    assert turn(nodes, 5, 0) == turn(nodes, 5, 3) == turn(nodes, 5, 4) == [7, 19, 42]
    six = [60, 10, 50, 20, 40, 30]
    for k in (2, 3, 4):
        rounds = [turn(six, r, k, seed=0) for r in range(1, 61)]
        assert all(len(g) == len(set(g)) == k for g in rounds)
        counts = np.unique(np.concatenate(rounds), return_counts=True)[1]
        assert counts.max() - counts.min() <= 1, counts  # equal passes, whatever k
        assert len({tuple(g) for g in rounds}) > 6 // k  # the groups change
    assert [turn(six, r, 3, seed=0) for r in range(1, 9)] != [turn(six, r, 3, seed=1) for r in range(1, 9)]
    assert turn(six, 17, 3, seed=2) == turn(list(reversed(six)), 17, 3, seed=2)
    with pytest.raises(ValueError, match="sites per round"):
        FederatedJob(sites_per_round=-1)


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


def test_the_command_line_sets_what_each_site_trains_with() -> None:
    """--batch-size and --lr reach every site's optimisation settings (a site's batch is a recipe choice:
    it sets how many steps a pass over the site's cases takes), --sites-per-round the server's job, and
    all of it survives Flower's run config (what a deployed server and its sites read). Without them,
    pretraining takes the preset's federated recipe (not a central run's batch and rate), whole local
    epochs asked for are not capped by its steps, and an adaptation steps as `adapt` does."""
    from centerprompt.cli import build_parser
    from centerprompt.cli.federated import _job
    from centerprompt.strategies import get_strategy
    from centerprompt.training.presets import get_preset

    def job(*flags: str, action: str = "pretrain") -> FederatedJob:
        return _job(build_parser().parse_args(["federated", action, "--data", "d", "--out", "o", "--simulate", *flags]), action)

    given = job("--batch-size", "1", "--lr", "3e-3", "--rounds", "4", "--sites-per-round", "2", "--mu", "0")
    cpu = get_preset("cpu")
    cfg = given.train_config(cpu)
    assert (cfg.batch_size, cfg.lr, cfg.epochs, given.sites_per_round, given.mu) == (1, 3e-3, 4, 2, 0.0)
    assert FederatedJob.from_config(given.to_config()) == given
    recipe, default = cpu.federated, job()
    assert (default.rounds, default.local_steps, default.local_epochs, default.mu) == (recipe.rounds, recipe.local_steps, 1, recipe.mu)
    assert recipe.mu > 0
    cfg = default.train_config(cpu)
    assert (cfg.batch_size, cfg.lr) == (recipe.batch_size, recipe.lr) != (cpu.batch_size, cpu.pretrain_lr)
    epochs = job("--local-epochs", "2")
    assert (epochs.rounds, epochs.local_steps, epochs.local_epochs, epochs.batch_size) == (cpu.pretrain_epochs, 0, 2, 1)
    adapt = job("--base", "b.safetensors", action="adapt")
    cfg = adapt.train_config(cpu)
    assert (adapt.rounds, adapt.local_steps, cfg.batch_size, cfg.lr, adapt.mu) == (cpu.adapt_epochs, 0, cpu.batch_size, get_strategy("deep").lr, 0.0)


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
    there (and its metrics keep the finished rounds) with the best round it had kept, a rerun of
    another job is refused."""
    from centerprompt.federated.flower import BEST_FILE, _best_so_far, _resume
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
    # The best round so far survives the kill if it finished; a later one's file is not trusted.
    for best_round, kept in ((2, True), (3, False)):
        torch.save({"round": best_round, "val_dsc_agg": 0.5, "tensors": saved}, tmp_path / BEST_FILE)
        assert (_best_so_far(tmp_path, rows) is not None) == kept


def test_one_site_trains_exactly_as_a_central_run_of_the_same_epochs(two_centers: Path, tmp_path: Path) -> None:
    """Round r of a site is epochs (r-1) x local_epochs onwards of the Trainer a central run uses,
    with its optimizer moments and schedule kept between rounds: two rounds at one site (FedProx off)
    give the weights of two central epochs on the same cases, seed and settings, bit for bit (the
    site's random stream is its own, so that sites do not crop and augment in lockstep). A
    site that rebuilt its optimizer, reseeded its loader its own way or decayed prompts differently
    would differ."""
    from dataclasses import replace

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
    cfg = site.cfg  # the job's settings with the site's own random stream
    assert cfg == replace(job.train_config(preset), seed=cfg.seed) and cfg.seed != Site(two_centers, job, "MDA").cfg.seed
    assert cfg.epochs == 2 and cfg.lr == preset.pretrain_lr and cfg.class_weights == preset.class_weights
    fit(Trainer(model, params, cached.train, cfg), tmp_path / "central", progress=False)
    central = trainable_tensors(model)
    assert set(central) == set(state)
    assert all(torch.equal(central[n], state[n]) for n in state)
    assert not torch.equal(central[next(iter(state))], trainable_tensors(job_model(job)[0])[next(iter(state))])
