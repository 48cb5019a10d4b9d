"""A command's base model: read once from wherever the user has it, checked to segment HECKTOR's
labels from CT and PET, identified by its weights' hash, and the split it was pretrained with."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from centerprompt.artifacts import read_adapter_metadata
from centerprompt.checkpoints import ADAPTER_FIELDS, BaseCheckpoint, BaseLike, BaseSpec, resolve_base
from centerprompt.data.hecktor import Splits, split_hash, splits_from_json
from centerprompt.data.labels import NUM_LABELS
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.training.config import file_sha256

logger = logging.getLogger(__name__)


IN_CHANNELS, OUT_CHANNELS = 2, NUM_LABELS  # CT + PET in; background, GTVp, GTVn out


def open_base(base: BaseLike, adapter: str | Path | None = None) -> BaseCheckpoint:
    """A command's base model, read once (any source :func:`centerprompt.checkpoints.resolve_base`
    reads) and checked to take CT and PET and segment background, GTVp and GTVn.

    With ``adapter``, a foreign base for which neither network arguments nor preprocessing were
    given takes those the adapter recorded when it was trained on it, so commands after ``adapt``
    need no more than the user's file and the adapter. What remains assumed (``num_heads``, default
    preprocessing) is logged here, in one warning; an opened checkpoint is returned as it is.
    """
    if isinstance(base, BaseCheckpoint):
        return base
    spec = base if isinstance(base, BaseSpec) else BaseSpec(Path(base))
    ckpt = resolve_base(spec)
    if adapter is not None and ckpt.foreign:
        meta, recorded = read_adapter_metadata(adapter), f"adapter {Path(adapter).name}"
        if spec.model_config is None:
            network = {k: v for k, v in meta["config"].items() if k not in ADAPTER_FIELDS}
            ckpt = replace(ckpt, config={**ckpt.config, **network}, assumed=(), given=True)
        if spec.preprocess is None and (trained := meta["extra"].get("preprocess")) is not None:
            ckpt = replace(ckpt, preprocess=PreprocessConfig.from_dict(trained), preprocess_from=recorded, given=True)
    channels = ckpt.config["in_channels"], ckpt.config["out_channels"]
    if channels != (IN_CHANNELS, OUT_CHANNELS):
        raise ValueError(
            f"{ckpt.path}: the network takes {channels[0]} input channel(s) and gives {channels[1]} output(s); "
            f"centerprompt feeds CT and PET ({IN_CHANNELS}) and segments background, GTVp and GTVn ({OUT_CHANNELS})."
        )
    if (note := ckpt.assumptions()) is not None:
        logger.warning(note)
    return ckpt


def base_preprocess(base: BaseLike) -> PreprocessConfig:
    """The preprocessing a base model expects (its metadata, its bundle, ``--preprocess`` or the defaults)."""
    return resolve_base(base).preprocess


def base_provenance(ckpt: BaseCheckpoint) -> dict[str, Any]:
    """What identifies a run's base model: the weights' SHA-256 and, unless the file alone says it
    (a centerprompt checkpoint taken as it is), how it was read: network arguments, preprocessing
    and their sources (so a changed --preprocess, bundle configuration or assumption retrains)."""
    record = {"base_sha256": file_sha256(ckpt.weights)}
    if ckpt.foreign or ckpt.given:
        record["base_model"] = ckpt.record()
    return record


def check_adapter_preprocess(ckpt: BaseCheckpoint, adapter: str | Path | None) -> None:
    """Warn when an adapter was trained with other preprocessing than this command uses."""
    if adapter is None:
        return
    trained = read_adapter_metadata(adapter)["extra"].get("preprocess")
    used = ckpt.preprocess.to_dict()
    if trained is not None and trained != used:
        changed = ", ".join(k for k in used if trained.get(k) != used[k])
        logger.warning("%s was trained with other preprocessing (%s) than this command uses (%s); give the "
                       "--preprocess it was adapted with", adapter, changed, ckpt.preprocess_from)  # fmt: skip


def base_splits(base: BaseCheckpoint | None) -> Splits | None:
    """The split a centerprompt base model was pretrained with (recorded in its metadata), if any."""
    stored = base.extra.get("splits") if base is not None else None
    return splits_from_json(stored, f"the split {base.path} was pretrained with") if stored else None


def check_base_split(base: BaseCheckpoint, splits: Splits) -> None:
    """Warn when a split is not the one ``base`` was pretrained with: its test cases may be some of
    the base's training cases. Only the centers both list count (a new site's split is its own)."""
    own = base_splits(base)
    if own is None:
        return
    common = set(own.assignment) & set(splits.assignment)
    if split_hash({c: own.assignment[c] for c in common}) != split_hash({c: splits.assignment[c] for c in common}):
        logger.warning("%s was pretrained with another split than the one in %s: its pretraining cases may be among "
                       "this command's test cases; give --splits with the split its run folder kept (splits.json)",
                       base.path, splits.source)  # fmt: skip
