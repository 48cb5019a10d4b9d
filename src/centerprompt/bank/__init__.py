"""Prompt bank: every center served from one frozen backbone, with automatic routing per scan.

Split by concern, in the order a scan meets them:

- :mod:`~centerprompt.bank.storage`: the bank folder (``bank.json``, one adapter and optional
  routing key per center), adding, listing, removing and loading centers;
- :mod:`~centerprompt.bank.acquisition`: a scan's acquisition fingerprint (header geometry, CT
  noise and HU, PET SUV level and noise) from its original files;
- :mod:`~centerprompt.bank.routing`: per-center fingerprint models, scaled Mahalanobis distance,
  thresholds calibrated for a false-fallback rate, the route of a scan (a center or
  :data:`FALLBACK`, the base model, with the reason);
- :mod:`~centerprompt.bank.keys`: a center's routing key from its training cases;
- :mod:`~centerprompt.bank.serving`: :class:`BankModel` (one backbone, many centers' prompts,
  mixed batches) and :class:`BankSource`, the bank as the model source of ``predict`` and ``evaluate``;
- :mod:`~centerprompt.bank.evaluation`: routing accuracy, confusion and Dice per routing mode.

Only adapters of a bankable strategy (the registry's ``Strategy.bankable``) can be banked: they
leave the backbone untouched. The bank sits above the runs, scoring, artifacts, strategies and data;
nothing below it imports it.
"""

from __future__ import annotations

from centerprompt.bank.evaluation import routing_summary, run_bank, write_routing_report
from centerprompt.bank.acquisition import FEATURES, acquisition_features
from centerprompt.bank.routing import (
    DISTANCE,
    FALLBACK,
    FALSE_FALLBACK,
    RESERVED,
    Route,
    RoutingKey,
    false_fallback_threshold,
    route_features,
    route_scan,
)
from centerprompt.bank.keys import routing_key_from_data
from centerprompt.bank.serving import BankModel, BankSource, load_bank_model
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
    "BANK_FILE", "BANK_FORMAT", "DISTANCE", "FALLBACK", "FALSE_FALLBACK", "FEATURES", "KEY_FORMAT", "RESERVED",
    "BankEntry", "BankModel", "LoadedBank", "PromptBank", "Route", "RoutingKey", "acquisition_features",
    "BankSource", "false_fallback_threshold", "load_bank_model", "route_features",
    "route_scan", "routing_key_from_data", "routing_summary", "run_bank", "validate_center", "write_routing_report",
]  # fmt: skip
