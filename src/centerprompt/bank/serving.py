"""Serving a bank: one frozen backbone, every center's prompts, batches that mix centers.

A scan goes to a bank center (that center's prompt tokens on the shared backbone) or falls back
to the plain base model (:data:`~centerprompt.bank.routing.FALLBACK`); ``center="auto"`` lets
:mod:`centerprompt.bank.routing` decide per scan.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from centerprompt.artifacts import load_model
from centerprompt.bank.routing import FALLBACK, FALSE_FALLBACK, Route, route_scan
from centerprompt.bank.storage import PROMPT_TENSOR, LoadedBank, PromptBank
from centerprompt.checkpoints import BaseCheckpoint, BaseLike
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.runs.base import open_base
from centerprompt.runs.predict import Served
from centerprompt.training.devices import default_device

logger = logging.getLogger(__name__)


def _tie_backbone(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` use ``src``'s parameter and buffer objects: one copy of the backbone in memory."""
    for name, tensor in [*src.named_parameters(), *src.named_buffers()]:
        owner, _, leaf = name.rpartition(".")
        setattr(dst.get_submodule(owner), leaf, tensor)


class BankModel(nn.Module):
    """One frozen backbone seen twice: plain (fallback and routing queries) and prompted (bank entries).

    The prompted twin shares the plain model's tensors, so both always hold the same weights.
    Inference only: everything is frozen and in eval mode.
    """

    def __init__(self, base: PromptedUNETR, bank: LoadedBank) -> None:
        super().__init__()
        if base.prompt_mode != "none":
            raise ValueError("BankModel needs the plain base model (prompt_mode='none').")
        self.base = base
        self.prompted = PromptedUNETR(**{**base.config, **bank.fields})
        _tie_backbone(base, self.prompted)
        self.bank = bank
        self.tensor_names = list(bank.tensors)
        for i, name in enumerate(self.tensor_names):  # buffers, so that .to(device) moves them
            self.register_buffer(f"bank_tensor_{i}", bank.tensors[name].clone(), persistent=False)  # (K, *shape)
        self.requires_grad_(False)  # inference only: the prompts come from the bank, nothing trains
        self.eval()

    @classmethod
    def from_files(cls, base: BaseLike, bank: str | Path) -> BankModel:
        model = load_model(base, prompt_mode="none")
        return cls(model, PromptBank.load(bank, model))

    @property
    def names(self) -> list[str]:
        return self.bank.names

    def inputs_for(self, centers: Sequence[str]) -> dict[str, Any]:
        """The prompted twin's keyword arguments for a batch of bank centers: per-sample ``prompts``
        (B, S, P, C) and per-sample steering values (``adapter``), whichever the bank holds."""
        unknown = sorted({c for c in centers if c not in self.names})
        if unknown:
            raise ValueError(f"center(s) {unknown} are not in the bank (centers: {', '.join(self.names)}).")
        rows = [self.names.index(c) for c in centers]
        values = {n: getattr(self, f"bank_tensor_{i}")[rows] for i, n in enumerate(self.tensor_names)}
        prompts = values.pop(PROMPT_TENSOR, None)
        return {**({"prompts": prompts} if prompts is not None else {}), **({"adapter": values} if values else {})}

    def route(self, ct: str | Path, pet: str | Path, false_fallback: float = FALSE_FALLBACK) -> Route:
        """Routing decision for one scan, from its original CT and PET files (their acquisition fingerprint)."""
        return route_scan(ct, pet, self.bank.keys, false_fallback)

    def member(self, center: str) -> tuple[PromptedUNETR, dict[str, Any]]:
        """The network and keyword arguments serving ``center`` (``"base"``: the plain model)."""
        if center == FALLBACK:
            return self.base, {}
        one = self.inputs_for([center])  # one center for every window of a scan: the values without a batch axis
        return self.prompted, {k: v[0] if k == "prompts" else {n: t[0] for n, t in v.items()} for k, v in one.items()}

    def forward(self, x: torch.Tensor, centers: Sequence[str]) -> torch.Tensor:
        """Logits for a batch mixing centers: ONE prompted pass for bank centers, one base pass for ``"base"``.

        Fallback samples cannot share the prompted pass (any prompt tokens change attention), so
        they run through the plain model separately and are put back in batch order.
        """
        if len(centers) != x.shape[0]:
            raise ValueError(f"got {len(centers)} centers for a batch of {x.shape[0]}.")
        banked = [i for i, c in enumerate(centers) if c != FALLBACK]
        plain = [i for i, c in enumerate(centers) if c == FALLBACK]
        parts = []
        if banked:
            parts.append((banked, self.prompted(x[banked], **self.inputs_for([centers[i] for i in banked]))))
        if plain:
            parts.append((plain, self.base(x[plain])))
        out = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))
        for idx, logits in parts:
            out[idx] = logits
        return out


def load_bank_model(base: BaseLike, bank: str | Path, device: torch.device | None = None) -> BankModel:
    """The base checkpoint and a bank folder as one :class:`BankModel` on ``device``."""
    model = BankModel.from_files(base, bank)
    return model.to(device) if device is not None else model


class BankSource:
    """A bank as a model source for ``predict`` and ``evaluate``: ``center`` names one bank center
    (or ``"base"``) for every scan, or ``"auto"`` routes each scan by its acquisition fingerprint
    (at most ``false_fallback`` of a banked center's own scans falling back). Opened lazily."""

    def __init__(self, base: BaseLike, bank: str | Path, center: str = "auto", false_fallback: float = FALSE_FALLBACK,
                 device: torch.device | None = None) -> None:  # fmt: skip
        self._spec, self.bank, self.center, self.false_fallback = base, bank, center, false_fallback
        self.device = device or default_device()

    @functools.cached_property
    def base(self) -> BaseCheckpoint:
        return open_base(self._spec)

    @functools.cached_property
    def model(self) -> BankModel:
        model = load_bank_model(self.base, self.bank, self.device)
        if self.center not in ("auto", FALLBACK):
            model.inputs_for([self.center])  # an unknown center is refused before any scan
        return model

    def describe(self) -> dict[str, Any]:
        return {"base": str(self.base.path), "bank": str(self.bank), "center": self.center,
                "false_fallback": self.false_fallback}  # fmt: skip

    def serve(self, ct: Path, pet: Path) -> Served:
        route = self.model.route(ct, pet, self.false_fallback) if self.center == "auto" else None
        chosen = route.center if route else self.center
        net, kwargs = self.model.member(chosen)
        return Served(net, kwargs, chosen, route.to_dict() if route else None)
