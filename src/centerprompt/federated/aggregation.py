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


def turn(nodes: list[int], server_round: int, per_round: int, seed: int = 0) -> list[int]:
    """The sites that train round ``server_round`` (from 1) when ``per_round`` of them train at a
    time (0: all), as the next ``per_round`` of a stream of passes over the sorted ``nodes``, each
    pass a seeded shuffle: every site trains once a pass (equal data passes, as all-sites rounds
    give) while the groups averaged together change from pass to pass (a fixed order with
    ``per_round`` dividing the number of sites would average the same groups forever). A pass is
    redrawn while it would put a site twice into a round that straddles two passes. One site a
    round keeps the sorted order: cyclic weight transfer hands the model round a fixed ring, and a
    shuffle could give one site two rounds running. The absolute round and the seed decide, so a
    resumed server keeps the turn."""
    ordered = sorted(nodes)
    if not per_round or per_round >= len(ordered):
        return ordered
    if per_round == 1:
        return [ordered[(server_round - 1) % len(ordered)]]
    rng, stream, end = np.random.default_rng(seed), [], server_round * per_round
    while len(stream) < end:
        straddle = stream[len(stream) - len(stream) % per_round:]  # the open round's sites
        order = [ordered[i] for i in rng.permutation(len(ordered))]
        if not set(straddle) & set(order[: per_round - len(straddle)]):
            stream += order
    return sorted(stream[end - per_round : end])
