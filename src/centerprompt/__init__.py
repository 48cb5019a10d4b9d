"""centerprompt: adapt a frozen UNETR to a new PET/CT center with prompt tokens.

Public API (kept stable, other tools import it)::

    from centerprompt import PromptedUNETR, apply_strategy

Imports are lazy so that ``import centerprompt`` and ``centerprompt --help`` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "PromptedUNETR": "centerprompt.models.prompted_unetr",
    "apply_strategy": "centerprompt.strategies",
    "parameter_report": "centerprompt.strategies",
    "STRATEGIES": "centerprompt.strategies",
    "Strategy": "centerprompt.strategies",
    "Option": "centerprompt.strategies",
    "register": "centerprompt.strategies",
    "save_adapter": "centerprompt.artifacts",
    "load_adapter": "centerprompt.artifacts",
    "save_model": "centerprompt.artifacts",
    "load_model": "centerprompt.artifacts",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from centerprompt.artifacts import load_adapter, load_model, save_adapter, save_model
    from centerprompt.models.prompted_unetr import PromptedUNETR
    from centerprompt.strategies import STRATEGIES, Option, Strategy, apply_strategy, parameter_report, register


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'centerprompt' has no attribute {name!r}")
