"""Training curves where users look for them: TensorBoard event files in every run folder, and an
MLflow run when the user points ``MLFLOW_TRACKING_URI`` at a tracking server or store (MLflow's own
convention; the optional ``tracking`` extra installs mlflow-skinny)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # event files of the training curves: `tensorboard --logdir RUN`
CURVES = ("loss", "lr", "val_dice", "seconds")  # per epoch, from metrics.jsonl's row


class Curves:
    """Per-epoch loss, learning rate, validation Dice and time, written as the epoch ends; a resumed
    run adds its epochs to the same TensorBoard curves (and opens a new MLflow run)."""

    def __init__(self, run_dir: Path, settings: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is not needed to predict

        self.board = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        self.mlflow: Any = None
        if os.environ.get("MLFLOW_TRACKING_URI"):
            try:
                import mlflow
            except ImportError:
                logger.warning("MLFLOW_TRACKING_URI is set but MLflow is not installed (pip install "
                               "'centerprompt[tracking]'); the curves go to %s only", run_dir / TENSORBOARD_DIR)  # fmt: skip
            else:
                mlflow.start_run(run_name=run_dir.name, tags={"run_dir": str(run_dir.resolve())})
                mlflow.log_params({k: str(v) for k, v in settings.items()})
                self.mlflow = mlflow

    def log(self, row: Mapping[str, Any], epoch: int) -> None:
        values = {name: float(row[name]) for name in CURVES if name in row}
        for name, value in values.items():
            self.board.add_scalar(f"train/{name}", value, epoch)
        self.board.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=epoch)

    def close(self) -> None:
        self.board.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
