"""The training loop: it learns, resumes to the same weights, and agrees across DDP ranks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny import tiny_model

from centerprompt import apply_strategy
from centerprompt.training.loop import PHASES, TrainConfig, Trainer, fit


def toy_data(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Bright cubes labelled 1 on a noisy background: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        image = torch.randn(2, 32, 32, 32, generator=g) * 0.1
        label = torch.zeros(1, 32, 32, 32, dtype=torch.long)
        lo = 4 + 3 * i
        image[:, lo : lo + 10, lo : lo + 10, 8:18] += 1.0
        label[:, lo : lo + 10, lo : lo + 10, 8:18] = 1
        items.append({"image": image, "label": label})
    return items


CFG = dict(epochs=4, lr=1e-2, batch_size=2, warmup_epochs=1, patience=0, seed=3)


def _trained(tmp: Path, strategy: str = "deep", **kwargs) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = tiny_model(prompt_mode="deep", num_prompts=2)
    params = apply_strategy(model, strategy)
    result = fit(Trainer(model, params, toy_data(), TrainConfig(**CFG)), tmp, progress=False, **kwargs)
    return model, result


def test_fit_writes_run_files_and_reduces_loss(tmp_path: Path) -> None:
    model, result = _trained(tmp_path, "full")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    assert result.epochs_run == 4 and result.train_seconds > 0
    # Where the time went: every epoch's phases, summed in the result, within the epoch's own time.
    assert all(r[k] >= 0 for r in rows for k in PHASES) and all(r["step_s"] > 0 for r in rows)
    assert result.phase_seconds.keys() == {k for k in PHASES}
    assert result.phase_seconds["step_s"] == pytest.approx(sum(r["step_s"] for r in rows), abs=0.05)
    assert sum(result.phase_seconds.values()) <= result.train_seconds + 0.05
    # Trained channels-last on the CPU, handed back contiguous (safetensors refuses strided tensors).
    assert all(p.is_contiguous() for p in model.parameters())
    # The same curves as TensorBoard event files: `tensorboard --logdir RUN` shows them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert {"train/lr", "train/seconds"} <= set(events.Tags()["scalars"])


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path) -> None:
    reference, _ = _trained(tmp_path / "straight")

    def crash(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt("killed mid-way")

    with pytest.raises(KeyboardInterrupt):
        _trained(tmp_path / "resumed", on_epoch_end=crash)
    rows = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    resumed, result = _trained(tmp_path / "resumed", resume=True)
    assert result.epochs_run == 4
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 4
    assert torch.equal(reference.prompts.tokens, resumed.prompts.tokens)


@pytest.mark.parametrize(
    ("scores", "patience_from", "stops_after", "best_epoch"),
    [
        ([0.5, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], 0, 4, 2),  # two validations without improvement
        ([0.5, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], 4, 6, 2),  # epochs 3-4 do not count
        ([0.7, 0.5, 0.5, 0.5, 0.8, 0.6, 0.6, 0.6], 0, 3, 1),  # an adaptation that dips first keeps its start...
        ([0.7, 0.5, 0.5, 0.5, 0.8, 0.6, 0.6, 0.6], 3, 7, 5),  # ...unless patience waits for the recovery
    ],
)
def test_early_stopping_and_best_epoch(
    tmp_path: Path, scores: list[float], patience_from: int, stops_after: int, best_epoch: int
) -> None:
    """Patience 2 stops two counted validations after the best; validations up to ``patience_from`` do not count."""
    given = iter(scores)
    torch.manual_seed(0)
    model = tiny_model(prompt_mode="deep", num_prompts=2)
    params = apply_strategy(model, "deep")
    cfg = TrainConfig(**{**CFG, "epochs": len(scores), "patience": 2, "patience_from": patience_from})
    result = fit(Trainer(model, params, toy_data(), cfg), tmp_path, validate=lambda m: next(given), progress=False)
    assert result.stopped_early and result.epochs_run == stops_after
    assert result.best_epoch == best_epoch and result.best_metric == pytest.approx(scores[best_epoch - 1])
    best = torch.load(tmp_path / "best.pt", weights_only=True)["trainable"]["prompts.tokens"]
    assert torch.equal(model.prompts.tokens.detach(), best)


def test_corrupt_checkpoint_is_reported(tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="last.pt"):
        _trained(tmp_path, resume=True)


class _Payload:
    """What a malicious checkpoint holds: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_malicious_last_checkpoint_is_refused_without_advice_to_unpickle_it(tmp_path: Path) -> None:
    """--resume on a last.pt holding a pickled object: the file, what it holds, what to do; never
    PyTorch's advice to set weights_only=False, and the object is never unpickled."""
    torch.save({"state": _Payload(tmp_path / "unpickled.marker")}, tmp_path / "last.pt")
    with pytest.raises(ValueError) as err:
        _trained(tmp_path, resume=True)
    text = str(err.value)
    assert str(tmp_path / "last.pt") in text and "pickled Python objects" in text and "delete it" in text
    assert "weights_only=False" not in text and not (tmp_path / "unpickled.marker").exists()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, _ = _trained(Path(out) / "run", "full")
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    initial = tiny_model(prompt_mode="deep", num_prompts=2)
    assert not torch.equal(a["out.conv.conv.weight"], initial.state_dict()["out.conv.conv.weight"])


def test_sgd_is_vpts_optimizer_and_others_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(prompt_mode="deep", num_prompts=2)
    params = apply_strategy(model, "deep")
    before = model.prompts.tokens.detach().clone()
    cfg = TrainConfig(**{**CFG, "epochs": 1, "optimizer": "sgd", "lr": 1.0})
    fit(Trainer(model, params, toy_data(), cfg), tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=False)["optimizer"]["param_groups"][0]
    assert state["momentum"] == 0.9 and "betas" not in state
    assert not torch.equal(model.prompts.tokens, before)
    with pytest.raises(ValueError, match="optimizer must be one of adamw, sgd"):
        TrainConfig(optimizer="lamb")


def test_class_weights_weight_the_cross_entropy(tmp_path: Path) -> None:
    """The same run with the foreground class weighted 10x has another loss from the first step on."""
    losses = []
    for weights in (None, [1, 10, 1]):  # a JSON list, as a run's config.json gives it back
        cfg = TrainConfig(**{**CFG, "epochs": 1, "class_weights": weights})
        torch.manual_seed(0)
        model = tiny_model()
        fit(Trainer(model, apply_strategy(model, "full"), toy_data(), cfg), tmp_path / str(weights), progress=False)
        losses.append(json.loads((tmp_path / str(weights) / "metrics.jsonl").read_text())["loss"])
    assert TrainConfig(class_weights=[1, 10, 1]).class_weights == (1.0, 10.0, 1.0)
    assert losses[1] > losses[0] + 0.1  # the background dominates the toy volumes: weighting class 1 raises the CE
    with pytest.raises(ValueError, match="class_weights must be positive"):
        TrainConfig(class_weights=(1.0, 0.0, 1.0))


def test_curves_also_go_to_mlflow_when_a_tracking_uri_is_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own convention: MLFLOW_TRACKING_URI set, every epoch's loss logged there with its step."""
    mlflow = pytest.importorskip("mlflow")
    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a plain folder
    _, result = _trained(tmp_path / "run", "full")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.run_name == "run" and run.data.params["epochs"] == "4" and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(r["epoch"], pytest.approx(r["loss"])) for r in rows]
