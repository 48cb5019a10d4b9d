"""The Flower App folder that ``flwr run`` ships to a deployed federation (SuperLink and SuperNodes).

It holds only a pyproject.toml (the app's name, components and run config: the job, the server's
output folder and the :class:`Federation`) and two one-line modules; the code is centerprompt, which
every SuperLink and SuperNode machine has installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from centerprompt.federated.site import FederatedJob
from centerprompt.files import atomic_path

PACKAGE = "centerprompt_flower"

_PYPROJECT = """\
# A Flower App for `flwr run` (Flower >= 1.42), written by `centerprompt federated app`.
[project]
name = "centerprompt-federated"
version = "1.0.0"
description = "centerprompt {job}: FedAvg across hospitals; only model tensors leave a site"
license = "Apache-2.0"
dependencies = ["centerprompt[federated]"]

[tool.flwr.app]
publisher = "centerprompt"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

[tool.flwr.app.config]
{config}
"""


@dataclass(frozen=True)
class Federation:
    """Who takes part and how long the server waits for them: ``sites`` must connect before the
    first round; later rounds need ``min_sites`` (0: more than half) connected and replying within
    ``round_timeout`` seconds, so a crashed or slow site costs a round its update, not the run."""

    sites: int
    site_names: tuple[str, ...] = ()
    min_sites: int = 0
    round_timeout: float = 3600.0

    def __post_init__(self) -> None:
        if self.sites < 1 or not 0 <= self.min_sites <= self.sites:
            raise ValueError(f"--sites must be at least 1 and --min-sites between 1 and --sites ({self.sites}) "
                             f"(0: more than half), got {self.min_sites}.")  # fmt: skip
        if not self.round_timeout > 0:
            raise ValueError(f"--round-timeout must be a positive number of seconds, got {self.round_timeout}.")

    @property
    def quorum(self) -> int:
        return self.min_sites or self.sites // 2 + 1


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_flower_app(folder: str | Path, job: FederatedJob, out: str | Path, federation: Federation) -> Path:
    """Write the app folder; ``out`` (made absolute) is where the ServerApp writes its results."""
    folder = Path(folder)
    settings = {**job.to_config(), "out": str(Path(out).resolve()), "sites": federation.sites,
                "min-sites": federation.min_sites, "round-timeout": federation.round_timeout}
    config = "\n".join(f"{key} = {_toml(value)}" for key, value in settings.items())
    files = {
        "pyproject.toml": _PYPROJECT.format(job=job.job, package=PACKAGE, config=config),
        f"{PACKAGE}/__init__.py": '"""centerprompt\'s federated apps, as Flower loads them."""\n',
        f"{PACKAGE}/server_app.py": "from centerprompt.federated.flower import make_server_app\n\napp = make_server_app()\n",
        f"{PACKAGE}/client_app.py": "from centerprompt.federated.flower import make_client_app\n\napp = make_client_app()\n",
    }
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text)
    return folder
