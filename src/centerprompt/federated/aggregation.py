"""How the server turns the sites' tensors into the next global model: Flower's FedAvg, or one of
its server-side optimisers (FedAvgM, FedAdam, FedYogi; Hsu et al. 2019, Reddi et al. 2021), which
treat the averaged change of a round as a pseudo-gradient and step with their own rate and
moments. FedProx is the sites' proximal term (``mu``) and combines with any of them.

The server optimiser's moments are state like the global tensors: :func:`optimizer_state` and
:func:`restore_optimizer_state` carry them through the per-round checkpoint, so a resumed server
continues exactly where the killed one stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from centerprompt.federated.site import DEFAULT_SERVER_LR

SERVER_OPTIMIZERS: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam,
                                              "fedyogi": FedYogi}  # fmt: skip
_MOMENTS = ("m_t", "v_t", "momentum_vector")  # FedOpt's first and second moments, FedAvgM's momentum


def server_options(name: str, lr: float | None, momentum: float) -> dict[str, Any]:
    """Keyword arguments of Flower's strategy ``name`` for a server rate ``lr`` and ``momentum``
    (FedAvgM's momentum; FedAdam's and FedYogi's first-moment decay beta_1, 0.9 when 0)."""
    lr = DEFAULT_SERVER_LR[name] if lr is None else lr
    if name == "fedavgm":
        return {"server_learning_rate": lr, "server_momentum": momentum}
    if name in ("fedadam", "fedyogi"):
        return {"eta": lr, "beta_1": momentum or 0.9}
    return {}


def optimizer_state(strategy: FedAvg) -> dict[str, Any]:
    """The server optimiser's moments as tensors (a weights-only checkpoint holds no numpy)."""
    state: dict[str, Any] = {}
    for name in _MOMENTS:
        value = getattr(strategy, name, None)
        if isinstance(value, dict) and value:
            state[name] = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in value.items()}
        elif isinstance(value, list):
            state[name] = [torch.from_numpy(np.asarray(v).copy()) for v in value]
    return state


def restore_optimizer_state(strategy: FedAvg, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if name not in _MOMENTS or not hasattr(strategy, name):
            raise ValueError(f"the checkpoint holds server state {name!r} that {type(strategy).__name__} does not keep.")
        if isinstance(value, dict):
            setattr(strategy, name, {k: v.numpy() for k, v in value.items()})
        else:
            setattr(strategy, name, [v.numpy() for v in value])


def turn(nodes: list[int], server_round: int, per_round: int) -> list[int]:
    """The sites that train round ``server_round`` (from 1) when ``per_round`` of them train at a
    time (0: all): the next ``per_round`` of the sorted ``nodes`` after the previous round's, so
    every site trains once every ``len(nodes) / per_round`` rounds."""
    if not per_round or per_round >= len(nodes):
        return sorted(nodes)
    ordered, start = sorted(nodes), (server_round - 1) * per_round
    return [ordered[(start + i) % len(ordered)] for i in range(per_round)]
