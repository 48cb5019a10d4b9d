"""The jobs a user runs: pretrain a base model, adapt it to a center, score it, predict with it.

Each job joins the data layer (HECKTOR reader, checks, MONAI pipelines) to the model layer
(PromptedUNETR, strategies, artifacts) and the training loop. A run folder holds the resolved
configuration (``config.json``), a log, per-epoch metrics, checkpoints and a ``summary.json``
written last, whose presence marks the run as finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from centerprompt.artifacts import build_adapted_model, read_adapter_metadata, save_adapter, save_model
from centerprompt.checkpoints import ADAPTER_FIELDS, BaseCheckpoint, BaseLike, BaseSpec, resolve_base
from centerprompt.data.checks import CHECKS_FILE, check_pair, validate_cases
from centerprompt.data.labels import NUM_LABELS
from centerprompt.data.hecktor import (
    SPLITS_FILE,
    Case,
    DataError,
    Splits,
    find_cases,
    leave_one_center_out,
    read_splits,
    resolve_splits,
    split_hash,
    splits_from_json,
    write_splits,
)
from centerprompt.data.transforms import (
    PreprocessConfig,
    inference_transforms,
    make_dataset,
    save_prediction,
    train_transforms,
)
from centerprompt.evaluate import aggregate, sliding_window_predict
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.config import AdaptRun, PretrainRun, config_hash, file_sha256
from centerprompt.presets import get_preset
from centerprompt.strategies import FULL, apply_strategy, get_strategy, parameter_report
from centerprompt.files import bars, check_output, folder_lock, jsonable, remove_stale_temporaries, write_json
from centerprompt.scoring import SW_BATCH, Scorer, validator
from centerprompt.train import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE, TrainConfig, default_device, fit, rank

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
# Prompt-aware pretraining: share of samples read with the shared prompt set instead of their
# center's (chosen before any run: most steps teach center prompts, enough teach the shared set).
SHARED_PROMPT_SHARE = 0.3
IN_CHANNELS, OUT_CHANNELS = 2, NUM_LABELS  # CT + PET in; background, GTVp, GTVn out


@contextlib.contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """While a job runs (rank 0 only): hold the run folder's lock (a second writer is refused,
    :func:`folder_lock`) and copy the package's log records into ``run_dir/log.txt``."""
    if rank() != 0:
        yield
        return
    with folder_lock(run_dir), _logged(run_dir):
        yield


@contextlib.contextmanager
def _logged(run_dir: Path) -> Iterator[None]:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("centerprompt")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def load_index(
    data_dir: str | Path, *, skip_bad_cases: bool = False, check: bool = True, seed: int = 0,
    cache_dir: str | Path | None = None, splits_file: str | Path | None = None,
    split_defaults: Sequence[Path | Splits | None] = (),
) -> tuple[dict[str, Case], Splits]:  # fmt: skip
    """Cases by ID (checked like ``check-data``) and the split to use; nothing is written into ``data_dir``.

    The split is :func:`centerprompt.data.hecktor.resolve_splits`'s: ``splits_file`` (``--splits``;
    written there when it does not exist yet), ``DIR/splits.json``, ``split_defaults``
    (:func:`split_defaults`), or made from the cases with ``seed``. A listed case that is no longer
    usable is an error naming it, or with ``skip_bad_cases`` left out of its split (``Splits.skipped``)
    without moving any other case.

    The checks read every voxel, so a case is checked once per process while its files keep their
    path, size and mtime; with ``cache_dir`` (a run folder, never the data folder) the results are
    also kept in ``cache_dir/data_checks.json`` for later processes of the same run.
    """
    found = find_cases(data_dir, skip_bad_cases=skip_bad_cases)
    cache_file = Path(cache_dir) / CHECKS_FILE if cache_dir is not None else None
    cases = validate_cases(found, skip_bad_cases=skip_bad_cases, cache_file=cache_file) if check else found
    splits = resolve_splits(data_dir, cases, path=splits_file, defaults=split_defaults, seed=seed,
                            skip_bad_cases=skip_bad_cases)  # fmt: skip
    # Recorded in summary.json: the cases the checks left out, whether or not a split listed them.
    failed = {c.case_id for c in found} - {c.case_id for c in cases}
    splits.skipped = tuple(sorted(set(splits.skipped) | failed))
    return {c.case_id: c for c in cases}, splits


def base_splits(base: BaseCheckpoint | None) -> Splits | None:
    """The split a centerprompt base model was pretrained with (recorded in its metadata), if any."""
    stored = base.extra.get("splits") if base is not None else None
    return splits_from_json(stored, f"the split {base.path} was pretrained with") if stored else None


def split_defaults(base: BaseCheckpoint | None, run_dir: Path | None) -> list[Path | Splits | None]:
    """Where a job's split comes from when neither ``--splits`` nor ``DIR/splits.json`` gives it:
    the split its base model was pretrained with (adaptation and evaluation then test on cases the
    base never trained on), then the one its run folder used before (a rerun keeps its split)."""
    return [base_splits(base), run_dir / SPLITS_FILE if run_dir is not None else None]


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


def keep_splits(splits: Splits, run_dir: Path) -> Path:
    """Record the split a run used in ``run_dir/splits.json`` (rank 0; unchanged when it already holds it)."""
    path = run_dir / SPLITS_FILE
    with contextlib.suppress(DataError):  # an unreadable record is replaced
        if path.exists() and read_splits(path).sha256 == splits.sha256:
            return path
    if rank() == 0:
        write_splits(splits, path)
    return path


RUN_FILES = ("config.json", SUMMARY, METRICS_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT, "model.safetensors",
             "adapter.safetensors")  # fmt: skip


def _clear(run_dir: Path) -> None:
    """Remove what an earlier run left in ``run_dir`` (only the files a run writes; the log is appended to)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


# Training settings older runs recorded that no longer exist, with the value under which the run
# trained exactly as one without the setting does (``min_epochs``: patience_from's predecessor).
RETIRED_TRAIN_FIELDS = {"min_epochs": 0}


def _recorded_as_today(config: dict[str, Any], predates: Mapping[str, Any] = {}) -> dict[str, Any]:
    """A run's recorded configuration in today's terms: settings it predates take their defaults
    (``predates``: the run's own fields, e.g. ``center_prompts``; every training setting), retired
    ones at their neutral value are dropped, so a run that would train the same way today is reused
    rather than trained again (a 14-minute base model, say)."""
    config = {**jsonable(predates), **config}
    train = config.get("train")
    if not isinstance(train, dict):
        return config
    upgraded = {**jsonable(TrainConfig().__dict__), **train}
    for name, neutral in RETIRED_TRAIN_FIELDS.items():
        if upgraded.get(name, neutral) == neutral:
            upgraded.pop(name, None)
    return {**config, "train": upgraded}


def open_run(
    run_dir: Path, config: dict[str, Any], *, resume: bool, on_change: str = "refuse", predates: Mapping[str, Any] = {},
) -> dict[str, Any] | None:  # fmt: skip
    """Prepare ``run_dir`` for a job with ``config``; return the finished summary when it can be reused.

    A run folder never mixes two runs. Without ``resume`` it starts clean. With ``resume``: a
    folder whose ``config.json`` equals ``config`` is resumed from its last checkpoint, or reused
    as it is when finished; one made with another configuration is refused (``on_change="refuse"``,
    naming the fields that differ) or cleared and run again (``"rerun"``). ``predates``: the
    defaults of the run's fields, which a run recorded before a field existed trained with.
    """
    path = run_dir / "config.json"
    new = jsonable(config)  # as write_json stores it, so that an unchanged run compares equal
    old = _recorded_as_today(json.loads(path.read_text()), {k: v for k, v in predates.items() if k in new}) if path.exists() else None
    if resume and old is not None and old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if on_change == "refuse":
            raise ValueError(f"{run_dir}: holds a run with another configuration ({', '.join(changed)}); use another "
                             "--out, or train it again (without --resume; in an experiment: --on-change rerun).")  # fmt: skip
        logger.info("%s: configuration changed (%s); running it again", run_dir, ", ".join(changed))
        old = None
    if resume and old is not None and (run_dir / SUMMARY).exists():
        logger.info("reusing the finished run %s", run_dir)
        return json.loads((run_dir / SUMMARY).read_text())
    if rank() == 0:
        for stale in remove_stale_temporaries(run_dir) if run_dir.is_dir() else ():
            logger.info("removed %s, left by a run killed while writing it", stale)
        if not (resume and old is not None):
            _clear(run_dir)
        write_json(new, path)
    return None


# ----------------------------------------------------------------------------- pretrain


def pretrain_case_ids(
    splits: dict[str, dict[str, list[str]]], exclude_center: str | None, *, oracle_shots: int = 0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, validation) case IDs of a base model, or of the in-domain oracle for ``exclude_center``.

    The oracle adds the excluded center's ``oracle_shots`` adaptation cases to the training set
    and its adaptation validation cases to the validation set, exactly those that ``adapt`` with
    ``shots=oracle_shots`` and this seed uses; the center's test cases never enter.
    """
    if exclude_center is None:
        if oracle_shots:
            raise ValueError("an oracle needs the center it stands for: give exclude_center.")
        return sorted(i for s in splits.values() for i in s["train"]), sorted(i for s in splits.values() for i in s["val"])
    loco = leave_one_center_out(splits, exclude_center, shots=oracle_shots, seed=seed)
    if not oracle_shots:
        return loco.pretrain_train, loco.pretrain_val
    return sorted(loco.pretrain_train + loco.adapt_train), sorted(loco.pretrain_val + loco.adapt_val)


def pretrain_config(run: PretrainRun, splits: Splits) -> dict[str, Any]:
    """Everything that determines a pretraining run's result: ``config.json`` of its folder (the
    split enters by its hash, not its file's path: the same split read from elsewhere is the same run)."""
    p = run.preset_obj
    train_ids, val_ids = pretrain_case_ids(splits, run.exclude_center, oracle_shots=run.oracle_shots, seed=run.seed)
    train_ids = train_ids[: run.cases_limit] if run.cases_limit else train_ids
    cfg = TrainConfig(epochs=run.epochs or p.pretrain_epochs, lr=run.lr or p.pretrain_lr,
                      batch_size=run.batch_size or p.batch_size, patience=run.patience, seed=run.seed, amp=run.amp,
                      compile=run.compile, class_weights=p.class_weights)  # fmt: skip
    model: dict[str, Any] = {"in_channels": IN_CHANNELS, "out_channels": OUT_CHANNELS, **p.model}
    if run.center_prompts:
        center_of = {i: center for center, parts in splits.items() for ids in parts.values() for i in ids}
        model.update(prompt_mode="deep", num_prompts=run.center_prompts,
                     center_prompts=sorted({center_of[i] for i in train_ids}))  # fmt: skip
    return {
        "job": "pretrain", **run.provenance(), "model": model, "preprocess": p.preprocess.to_dict(),
        "train": cfg.__dict__, "splits_sha256": splits.sha256, "train_cases": train_ids, "val_cases": val_ids,
        **({"shared_prompt_share": SHARED_PROMPT_SHARE} if run.center_prompts else {}),
    }  # fmt: skip


def shared_prompts_sometimes(share: float) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """Each sample's center for prompt-aware pretraining, replaced by None (the shared set) with
    probability ``share``, so the shared set learns to serve any center (``random`` is reseeded
    every epoch by ``fit``: a resumed run draws the same)."""

    def inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"centers": [None if random.random() < share else c for c in batch["center"]]}

    return inputs


def _train(
    model: PromptedUNETR, params: list[torch.nn.Parameter], train: Sequence[Case], val: Sequence[Case],
    preprocess: PreprocessConfig, cfg: TrainConfig, run_dir: Path, *, resume: bool, progress: bool,
    batch_inputs: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    prepare: Callable[[PromptedUNETR, torch.Tensor], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Cache ``train`` and ``val`` (timed), then :func:`fit` with the validation DSCagg; the result's
    fields and ``cache_seconds`` for summary.json (pretraining and adaptation alike). ``prepare``
    (a strategy's) first sees the model and one crop of each training case, drawn with the seed."""
    started = time.perf_counter()
    train_ds = make_dataset(list(train), train_transforms(preprocess))
    scorer = Scorer(list(val), preprocess, score_at="preprocessed")
    cache_seconds = time.perf_counter() - started
    if prepare is not None:
        train_ds.transform.set_random_state(seed=cfg.seed)
        crops = [train_ds[i] for i in range(len(train_ds))]
        crops = [c[0] if isinstance(c, list) else c for c in crops]  # RandCropByPosNegLabeld gives lists
        model.eval()
        images = torch.stack([torch.as_tensor(c["image"]) for c in crops])  # MetaTensors become plain tensors
        prepare(model, images.to(next(model.parameters()).device))
    result = fit(model, params, train_ds, cfg, run_dir, validator(scorer), resume=resume, progress=progress,
                 batch_inputs=batch_inputs)  # fmt: skip
    logger.info("%.0f s to cache the cases, %.0f s to train: %s", cache_seconds, result.train_seconds,
                result.phase_seconds)  # fmt: skip
    return {**result.__dict__, "cache_seconds": cache_seconds}


def pretrain(run: PretrainRun, *, on_change: str = "refuse") -> dict[str, Any]:
    """Train the base model with every weight on all centers but ``run.exclude_center``.

    Writes ``OUT/model.safetensors`` (the best epoch on the validation cases, with its
    configuration, preprocessing and split in the metadata), ``OUT/splits.json`` (the split used:
    ``run.splits``, ``DATA/splits.json``, this folder's earlier one, or made with the seed) and
    ``OUT/summary.json`` (with the split's source, hash and skipped cases).
    """
    run_dir, p = Path(run.out), run.preset_obj
    with run_log(run_dir):
        cases, splits = load_index(run.data_dir, skip_bad_cases=run.skip_bad_cases, seed=run.seed, cache_dir=run_dir,
                                   splits_file=run.splits, split_defaults=split_defaults(None, run_dir))  # fmt: skip
        config = pretrain_config(run, splits)
        finished = open_run(run_dir, config, resume=run.resume, on_change=on_change, predates=run.defaults())
        if finished is not None:
            return finished
        keep_splits(splits, run_dir)
        train_ids, val_ids = config["train_cases"], config["val_cases"]
        torch.manual_seed(run.seed)
        model = PromptedUNETR(**config["model"])
        params = apply_strategy(model, FULL)
        logger.info("pretraining on %d cases (%d for validation), excluding %s", len(train_ids), len(val_ids),
                    run.exclude_center)  # fmt: skip
        share = config.get("shared_prompt_share")
        timing = _train(model, params, [cases[i] for i in train_ids], [cases[i] for i in val_ids], p.preprocess,
                        TrainConfig(**config["train"]), run_dir, resume=run.resume, progress=run.progress,
                        batch_inputs=shared_prompts_sometimes(share) if share is not None else None)  # fmt: skip
        summary = {"job": "pretrain", **timing, **parameter_report(model), "config_hash": config_hash(config),
                   "splits": splits.record()}  # fmt: skip
        if rank() == 0:
            train_centers = sorted({cases[i].center for i in train_ids})
            extra = {"preprocess": p.preprocess.to_dict(), "preset": p.name, "train_centers": train_centers,
                     "exclude_center": run.exclude_center, "oracle_shots": run.oracle_shots,
                     "splits": splits.to_json()}  # fmt: skip
            save_model(model, run_dir / "model.safetensors", extra=extra)
            write_json(summary, run_dir / SUMMARY)
    return summary


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


def _check_adapter_preprocess(ckpt: BaseCheckpoint, adapter: str | Path | None) -> None:
    """Warn when an adapter was trained with other preprocessing than this command uses."""
    if adapter is None:
        return
    trained = read_adapter_metadata(adapter)["extra"].get("preprocess")
    used = ckpt.preprocess.to_dict()
    if trained is not None and trained != used:
        changed = ", ".join(k for k in used if trained.get(k) != used[k])
        logger.warning("%s was trained with other preprocessing (%s) than this command uses (%s); give the "
                       "--preprocess it was adapted with", adapter, changed, ckpt.preprocess_from)  # fmt: skip


# ----------------------------------------------------------------------------- adapt


def adapt_config(run: AdaptRun, splits: Splits, base: BaseCheckpoint | None = None) -> dict[str, Any]:
    """Everything that determines an adaptation's result: ``config.json`` of its folder.

    The base checkpoint enters by the hash of its weights, so a retrained base (same path, new
    weights) is a new configuration; a foreign one also by how it was read (:func:`base_provenance`).
    ``base``: ``run``'s base model when already opened.
    """
    base = open_base(base or run.base_spec)
    preset = get_preset(base.extra.get("preset", "cpu"))
    strategy = get_strategy(run.strategy)
    adapt_train, adapt_val = adaptation_case_ids(splits, run.centers, shots=run.shots, seed=run.seed)
    epochs = run.epochs or preset.adapt_epochs
    cfg = TrainConfig(epochs=epochs, lr=run.lr or strategy.lr, patience_from=epochs // 2,
                      batch_size=run.batch_size or preset.batch_size, patience=run.patience, seed=run.seed,
                      weight_decay=strategy.weight_decay, amp=run.amp, compile=run.compile,
                      optimizer=run.optimizer, class_weights=preset.class_weights)  # fmt: skip
    return {"job": "adapt", **run.provenance(), **base_provenance(base), "train": cfg.__dict__,
            "splits_sha256": splits.sha256, "adapt_train": adapt_train, "adapt_val": adapt_val}  # fmt: skip


def adaptation_case_ids(splits: Splits, centers: Sequence[str], *, shots: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) case IDs of an adaptation: each center's ``shots`` cases and validation
    cases as :func:`leave_one_center_out` picks them (so they never overlap its test cases), pooled."""
    parts = [leave_one_center_out(splits, c, shots=shots, seed=seed) for c in centers]
    return sorted(i for p in parts for i in p.adapt_train), sorted(i for p in parts for i in p.adapt_val)


def adapt(run: AdaptRun, *, on_change: str = "refuse", base: BaseCheckpoint | None = None) -> dict[str, Any]:
    """Adapt the frozen base model to ``run.center`` with ``run.shots`` labelled cases and one strategy.

    Writes ``OUT/adapter.safetensors`` (what the strategy trained, best validation epoch),
    ``OUT/splits.json`` (the split used: ``run.splits``, ``DATA/splits.json``, the one the base was
    pretrained with, this folder's earlier one, or made with the seed) and ``OUT/summary.json``
    (parameters, artifact bytes, wall time, peak memory, the split's source and skipped cases).
    ``base``: ``run``'s base model when the caller has already opened it (an experiment opens it
    once for every stage).
    """
    run_dir, strategy = Path(run.out), get_strategy(run.strategy)
    with run_log(run_dir):
        base = open_base(base or run.base_spec)  # refuse a wrong file before reading the data
        cases, splits = load_index(run.data_dir, skip_bad_cases=run.skip_bad_cases, seed=run.seed, cache_dir=run_dir,
                                   splits_file=run.splits, split_defaults=split_defaults(base, run_dir))  # fmt: skip
        check_base_split(base, splits)
        config = adapt_config(run, splits, base)
        finished = open_run(run_dir, config, resume=run.resume, on_change=on_change, predates=run.defaults())
        if finished is not None:
            return finished
        keep_splits(splits, run_dir)
        for center in set(run.centers) & set(base.extra.get("train_centers", [])):
            logger.warning("center %s was part of the base model's pretraining data", center)
        preprocess = base.preprocess
        torch.manual_seed(run.seed)
        model = base.build(**strategy.model_fields(run.num_prompts, run.prompt_dropout, base.config))
        params = apply_strategy(model, run.strategy, **run.options)
        summary: dict[str, Any] = {"job": "adapt", "strategy": run.strategy, "center": run.center,
                                   **parameter_report(model), "train_seconds": 0.0, "peak_memory_mb": 0.0,
                                   "artifact": None, "artifact_bytes": 0, "config_hash": config_hash(config),
                                   "splits": splits.record()}  # fmt: skip
        if strategy.trains:
            logger.info("adapting to %s with %s on %d cases", run.center, run.strategy, len(config["adapt_train"]))
            summary.update(_train(model, params, [cases[i] for i in config["adapt_train"]],
                                  [cases[i] for i in config["adapt_val"]], preprocess, TrainConfig(**config["train"]),
                                  run_dir, resume=run.resume, progress=run.progress, prepare=strategy.prepare))  # fmt: skip
            if rank() == 0:
                extra = {"center": "+".join(run.centers), "shots": run.shots, "base": str(run.base),
                         "preprocess": preprocess.to_dict(), "splits_sha256": splits.sha256}  # fmt: skip
                artifact = save_adapter(model, run_dir / "adapter.safetensors", run.strategy, run.options, extra=extra)
                summary.update(artifact=str(artifact), artifact_bytes=artifact.stat().st_size)
        if rank() == 0:
            write_json(summary, run_dir / SUMMARY)
    return summary


# ----------------------------------------------------------------------------- evaluate and predict


def split_case_ids(splits: Splits, centers: Sequence[str], split: str, data_dir: str | Path) -> list[str]:
    """Case IDs of ``centers`` in ``split`` (train, val, test or all); unknown centers are an error."""
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be train, val, test or all, got {split!r}.")
    unknown = sorted(set(centers) - set(splits))
    if unknown or not centers:
        raise ValueError(f"no labelled cases for center(s) {unknown or '(none)'} in {data_dir}.")
    parts = ("train", "val", "test") if split == "all" else (split,)
    return sorted(i for c in centers for part in parts for i in splits[c][part])


def evaluate(
    data_dir: str | Path, base: BaseLike, *, adapter: str | Path | None = None, centers: Sequence[str] | None = None,
    split: str = "test", score_at: str = "ct", skip_bad_cases: bool = False, progress: bool = True,
    splits_file: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Per-case and per-center scores of the base model (with an adapter if given) on one split.

    The split is ``splits_file``, ``DATA/splits.json``, the one the base was pretrained with, or
    made with seed 0 (:func:`load_index`); the result records its source, hash and skipped cases.
    """
    base = open_base(base, adapter)
    cases, splits = load_index(data_dir, skip_bad_cases=skip_bad_cases, splits_file=splits_file,
                               split_defaults=split_defaults(base, None))  # fmt: skip
    check_base_split(base, splits)
    ids = split_case_ids(splits, centers or sorted(splits), split, data_dir)
    _check_adapter_preprocess(base, adapter)
    model = build_adapted_model(base, adapter).to(default_device())
    scorer = Scorer([cases[i] for i in ids], base.preprocess, score_at=score_at)
    per_case = scorer.score(model, desc="evaluate", progress=progress)
    return {"data_dir": str(data_dir), "base": str(base.path), "adapter": str(adapter) if adapter else None,
            "split": split, "splits": splits.record(), "score_at": score_at, **aggregate(per_case),
            "per_case": per_case}  # fmt: skip


NIFTI_SUFFIXES = (".nii.gz", ".nii")  # what save_prediction writes as one file (nibabel picks by name)


def check_prediction_out(path: str | Path, *, folder: bool = False) -> Path:
    """Refuse, before any work, an output that ``predict`` could not write (:func:`check_output`),
    and a file name not ending in .nii.gz/.nii: nibabel would write another format, or a .hdr/.img
    pair whose second file is left behind."""
    path = Path(path)
    if not folder and path.is_dir():
        raise ValueError(f"{path}: is a folder; give the output file of this case (NAME.nii.gz), or use --input "
                         "to segment a folder of cases.")  # fmt: skip
    if not folder and not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: a prediction is written as NIfTI; give a file name ending in .nii.gz (or .nii).")
    return check_output(path, "folder" if folder else "file")


def check_prediction_outputs(pairs: Sequence[tuple[str | Path, str | Path, str | Path]], *, overwrite: bool = False) -> None:
    """Before any work: every output of ``pairs`` (CT, PET, output) can be written
    (:func:`check_prediction_out`), none is an input image, and none exists unless ``overwrite``
    (a prediction never silently replaces a file: a label map, another run's predictions)."""
    images = {Path(p).resolve() for ct, pet, _ in pairs for p in (ct, pet)}
    existing = []
    for _, _, out in pairs:
        check_prediction_out(out)
        if Path(out).resolve() in images:
            raise ValueError(f"{out}: is an input image of this command; write the prediction to another file.")
        if Path(out).exists():
            existing.append(out)
    if existing and not overwrite:
        many = f" ({len(existing)} of the {len(pairs)} outputs exist)" if len(pairs) > 1 else ""
        raise ValueError(f"{existing[0]}: exists{many}; give --overwrite to replace it, or another --out.")


def _prediction_item(ct: Path, pet: Path, out: Path, transform: Any) -> dict[str, Any]:
    """The preprocessed item of a pair that passes :func:`check_pair`; DataError (one line naming the files) if not."""
    problems = check_pair(ct, pet)
    if problems:
        raise DataError("; ".join(problems))
    try:
        return transform({"ct": str(ct), "pet": str(pet), "case_id": out.name})
    except Exception as err:  # a pair the checks let through that MONAI cannot read: still this case's problem
        cause = err
        while cause.__cause__ is not None:  # MONAI wraps the real error in "applying transform ..."
            cause = cause.__cause__
        detail = " ".join(str(cause).split())[:200]
        raise DataError(f"cannot preprocess CT {ct} with PET {pet}: {type(cause).__name__}: {detail}") from err


def prediction_inputs(
    pairs: Sequence[tuple[str | Path, str | Path, str | Path]], preprocess: PreprocessConfig, progress: bool = True,
    on_bad_case: Callable[[str], Any] | None = None,
) -> Iterator[tuple[Path, Path, dict[str, Any], torch.Tensor, Any]]:  # fmt: skip
    """For each (CT, PET, output): the CT path, the output path, the preprocessed item, the network
    input (1, 2, D, H, W) on the default device, and the transform that inverts it.

    Each pair is first checked as ``check-data`` checks an unlabelled case (:func:`check_pair`:
    readable, 3D, finite, overlapping, CT in HU and PET in SUV), so a bad input is named instead
    of becoming an empty mask or a MONAI traceback. A bad pair raises :class:`DataError` (one line
    naming the files), or with ``on_bad_case`` is logged, handed to it as that line, and skipped.
    """
    transform = inference_transforms(preprocess, with_label=False)
    for ct, pet, out in tqdm(pairs, desc="predict", unit="case", disable=bars(progress)):
        try:
            data = _prediction_item(Path(ct), Path(pet), Path(out), transform)
        except DataError as err:
            if on_bad_case is None:
                raise
            logger.warning("skipping %s: %s", ct, err)
            on_bad_case(str(err))
            continue
        yield Path(ct), Path(out), data, data["image"].as_tensor()[None].to(default_device()), transform


def predict(
    base: BaseLike, pairs: Sequence[tuple[str | Path, str | Path, str | Path]], *,
    adapter: str | Path | None = None, progress: bool = True, on_bad_case: Callable[[str], Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:  # fmt: skip
    """Segment each (CT, PET) pair and write the label map to its output path on the CT grid.

    Output paths are checked before the model is read (:func:`check_prediction_outputs`: an
    existing file is replaced only with ``overwrite``), inputs pair by pair
    (:func:`prediction_inputs`): a bad pair raises DataError and writes nothing for it, or with
    ``on_bad_case`` (e.g. a list's ``append``) is reported there and the next pair goes on.
    """
    check_prediction_outputs(pairs, overwrite=overwrite)
    base = open_base(base, adapter)
    _check_adapter_preprocess(base, adapter)
    model = build_adapted_model(base, adapter).to(default_device())
    preprocess = base.preprocess
    written = []
    for ct, out, data, image, transform in prediction_inputs(pairs, preprocess, progress, on_bad_case):
        started = time.perf_counter()
        pred = sliding_window_predict(model, image, preprocess.roi_size, SW_BATCH).argmax(1).cpu()
        written.append(save_prediction(pred, data, out, transform))
        logger.info("%s -> %s (%.1f s)", ct, out, time.perf_counter() - started)
    return written


def folder_pairs(folder: str | Path, out_dir: str | Path) -> list[tuple[Path, Path, Path]]:
    """(CT, PET, output) for every case of a HECKTOR-style folder (``imagesTr`` or the folder itself)."""
    folder = Path(folder)
    images = folder / "imagesTr" if (folder / "imagesTr").is_dir() else folder
    cts = sorted(images.glob("*__CT.nii*"))
    if not cts:
        raise FileNotFoundError(f"{images}: no *__CT.nii.gz files to segment.")
    pairs = []
    for ct in cts:
        case_id = ct.name.split("__CT")[0]
        # A missing PET keeps its expected name: the pair's check then names it, and only this case is skipped.
        pet = next(iter(sorted(images.glob(f"{case_id}__PT.nii*"))), images / f"{case_id}__PT.nii.gz")
        pairs.append((ct, pet, Path(out_dir) / f"{case_id}.nii.gz"))
    return pairs
