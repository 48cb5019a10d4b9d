"""Prompt bank: every center served from one frozen backbone, with automatic routing per scan.

Split by concern, in the order a scan meets them:

- :mod:`~centerprompt.bank.storage`: the bank folder (``bank.json``, one adapter and optional
  routing key per center), adding, listing, removing and loading centers;
- :mod:`~centerprompt.bank.routing`: routing keys from the frozen encoder, cosine distance,
  per-center thresholds, the route of a scan (a center or :data:`FALLBACK`, the base model);
- :mod:`~centerprompt.bank.serving`: :class:`BankModel` (one backbone, many centers' prompts,
  mixed batches) and prediction with it;
- :mod:`~centerprompt.bank.evaluation`: routing accuracy, confusion and Dice per routing mode.

Only adapters of a bankable strategy (the registry's ``Strategy.bankable``) can be banked: they
leave the backbone untouched. The bank sits above jobs, scoring, artifacts, strategies and data;
nothing below it imports it.
"""

from __future__ import annotations

from centerprompt.bank.evaluation import evaluate_with_bank, routing_summary, run_bank, write_routing_report
from centerprompt.bank.routing import (
    DISTANCE,
    FALLBACK,
    RESERVED,
    ROUTING_K,
    Route,
    RoutingKey,
    central_window,
    cosine_distance,
    route_features,
    routing_key,
    routing_key_from_data,
    scan_features,
)
from centerprompt.bank.serving import BankModel, load_bank_model, predict_with_bank
from centerprompt.bank.storage import (
    BANK_FILE,
    BANK_FORMAT,
    KEY_FORMAT,
    BankEntry,
    LoadedBank,
    PromptBank,
    validate_center,
)

__all__ = [
    "BANK_FILE", "BANK_FORMAT", "DISTANCE", "FALLBACK", "KEY_FORMAT", "RESERVED", "ROUTING_K", "BankEntry",
    "BankModel", "LoadedBank", "PromptBank", "Route", "RoutingKey", "central_window", "cosine_distance",
    "evaluate_with_bank", "load_bank_model", "predict_with_bank", "route_features", "routing_key",
    "routing_key_from_data", "routing_summary", "run_bank", "scan_features", "validate_center",
    "write_routing_report",
]  # fmt: skip
