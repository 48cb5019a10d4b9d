"""Training across hospitals whose scans cannot leave their site, on Flower (``pip install
centerprompt[federated]``): federated pretraining with FedAvg or FedProx, and federated prompt
tuning in which sites exchange only the prompts (or prompts and head).

:mod:`centerprompt.federated.site` holds what a hospital does and imports no Flower;
:mod:`centerprompt.federated.flower` the Flower apps, the simulation and the deployable app folder.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = "federated training needs Flower: pip install 'centerprompt[federated]' (flwr[simulation])."


def require_flower(simulation: bool = False) -> None:
    """One clear error when Flower (or, for a simulation, its Ray backend) is not installed."""
    missing = [m for m in ("flwr",) + (("ray",) if simulation else ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not installed: {INSTALL_HINT}")
