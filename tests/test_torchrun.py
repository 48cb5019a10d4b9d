"""``torchrun --nproc_per_node 2 -m centerprompt pretrain`` on the CPU (gloo): rank 0 alone writes
the run folder, the base serves ``predict``, and the run trains as one process with the same global
batch does (steps, schedule, split, loss, how far the weights move). That the ranks end with equal
weights is test_train.py's DDP test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain(data: Path, out: Path, batch_size: int) -> list[str]:
    return ["pretrain", "--data", str(data), "--exclude-center", "MDA", "--preset", "tiny", "--out", str(out),
            "--batch-size", str(batch_size), "--seed", "0"]  # fmt: skip


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_torchrun_two_processes_train_as_one_with_the_same_global_batch(two_centers: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(two_centers, data)
    from centerprompt.cli import main

    launch = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    ddp = subprocess.run([*launch, "-m", "centerprompt", *_pretrain(data, tmp_path / "ddp", batch_size=1)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main(_pretrain(data, tmp_path / "single", batch_size=2)) == 0

    # rank 0 alone writes: one line per epoch, one log of the run, the same files as one process writes
    files = {p.name for p in (tmp_path / "ddp").iterdir()}
    assert files == {p.name for p in (tmp_path / "single").iterdir()}
    epochs = _lines(tmp_path / "ddp" / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [e["epoch"] for e in _lines(tmp_path / "single" / "metrics.jsonl")]
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert log.count("pretraining on") == 1

    # one global batch of two volumes a step: as many steps, the same schedule, the same split, and
    # the same loss within what the ranks' own random crops allow (a rank that trained on the whole
    # data would take twice the steps, and the schedule per epoch would differ; AdamW's step does not
    # tell a summed gradient from an averaged one: test_train.py's DDP test checks the ranks agree)
    for a, b in zip(epochs, _lines(tmp_path / "single" / "metrics.jsonl")):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05)
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    single_summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert ddp_summary["splits"] == single_summary["splits"]

    # the last epoch's weights moved as far from the same start as one process moved them (not to the
    # same place: each rank crops and augments its half of the batch with its own random stream)
    from centerprompt.runs.base import IN_CHANNELS, OUT_CHANNELS
    from centerprompt.models.prompted_unetr import PromptedUNETR
    from centerprompt.training.presets import get_preset

    torch.manual_seed(0)
    start = PromptedUNETR(in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, **get_preset("tiny").model).state_dict()
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True)["trainable"] for run in ("ddp", "single"))
    moved_a = torch.sqrt(sum(((a[k] - start[k]) ** 2).sum() for k in start if k in a))
    moved_b = torch.sqrt(sum(((b[k] - start[k]) ** 2).sum() for k in start if k in b))
    assert moved_a > 0 and 0.8 < moved_a / moved_b < 1.25

    # the base serves predictions
    case = sorted(data.glob("imagesTr/MDA-*__CT.nii.gz"))[0]
    out = tmp_path / "pred.nii.gz"
    assert main(["predict", "--base", str(tmp_path / "ddp" / "model.safetensors"), "--ct", str(case),
                 "--pet", str(case).replace("__CT", "__PT"), "--out", str(out)]) == 0  # fmt: skip
    assert out.exists()
