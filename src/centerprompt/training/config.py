"""Run configurations: one validated dataclass per job, built once (by the CLI or in Python) and passed down whole.

A run's *provenance* is what determines its result: the dataclass fields minus how it is executed
(output folder, resume, progress bars). The job adds what it resolves (the preset's defaults, the
case lists, the hash of its input checkpoint) and writes all of it to the run folder's
``config.json``; a finished run is reused only when that file equals what is asked.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from centerprompt.checkpoints import BaseSpec
from centerprompt.data.hecktor import SPLITS_FILE, split_centers
from centerprompt.files import jsonable
from centerprompt.scoring import SCORE_AT
from centerprompt.strategies import DEFAULT_STRATEGY, ORACLE, STANDARD, Strategy, get_strategy, strategy_names
from centerprompt.training.loop import OPTIMIZERS, TrainConfig
from centerprompt.training.presets import PRESETS, Preset

ON_CHANGE = ("rerun", "refuse")  # a finished stage whose provenance differs from what is asked
# ``splits`` is where the split is read: the job records the split itself by its hash (``splits_sha256``).
EXECUTION_FIELDS = ("out", "resume", "progress", "skip_bad_cases", "command", "on_change", "splits", "smoke")
BASE_FIELDS = ("model_config", "preprocess")  # in a run's provenance only when given


MAX_SEED = 2**32 - 1  # numpy's seed range; every random source is seeded from it
MAX_PROMPTS = 1000  # prompt tokens per set: beyond this a window is mostly prompts (the cpu preset has 216 tokens)


def _positive(name: str, value: int | float | None, minimum: float = 1, maximum: float | None = None) -> None:
    """Refuse a value below ``minimum``, above ``maximum``, or not a finite number (``--lr inf`` would
    train to NaN weights and save them)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, got {value}.")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a configuration's canonical JSON."""
    return hashlib.sha256(json.dumps(jsonable(config), sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes: the identity of a run's input checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class TrainingFields(Protocol):
    """What a job says about optimisation (a central run, or a federated job's rounds)."""

    lr: float | None
    batch_size: int | None
    patience: int
    seed: int
    amp: bool
    compile: bool


def train_settings(job: TrainingFields, preset: Preset, epochs: int | None, strategy: Strategy | None = None,
                   optimizer: str = "adamw") -> TrainConfig:  # fmt: skip
    """The optimisation settings of a job, the one place they are decided for central and
    federated runs alike. Pretraining (``strategy`` None): the preset's epochs, rate, batch and
    loss weights. Adaptation: the strategy's rate and weight decay (the registry's), patience
    counted from half the epochs (an adaptation's validation Dice often dips before it rises)."""
    if strategy is None:
        return TrainConfig(epochs=epochs or preset.pretrain_epochs, lr=job.lr or preset.pretrain_lr,
                           batch_size=job.batch_size or preset.batch_size, patience=job.patience, seed=job.seed,
                           amp=job.amp, compile=job.compile, class_weights=preset.class_weights)  # fmt: skip
    epochs = epochs or preset.adapt_epochs
    return TrainConfig(epochs=epochs, lr=job.lr or strategy.lr, patience_from=epochs // 2,
                       batch_size=job.batch_size or preset.batch_size, patience=job.patience, seed=job.seed,
                       weight_decay=strategy.weight_decay, amp=job.amp, compile=job.compile, optimizer=optimizer,
                       class_weights=preset.class_weights)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class _Run:
    def provenance(self) -> dict[str, Any]:
        """The fields that determine the result (JSON-ready). A base model's ``model_config`` and
        ``preprocess`` appear only when given, so runs without them keep the configuration they had."""
        return jsonable({k: v for k, v in asdict(self).items()
                          if k not in EXECUTION_FIELDS and not (k in BASE_FIELDS and v is None)})  # fmt: skip

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The provenance fields that have a default, at it: what a run recorded before a field
        existed trained with (a new field defaults to the behaviour before it)."""
        return jsonable({f.name: f.default for f in fields(cls) if f.default is not MISSING
                         and f.name not in EXECUTION_FIELDS + BASE_FIELDS})  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class _OwnBase:
    """A user's base model beyond its path: ``model_config`` (UNETR arguments, ``--model-config``)
    and ``preprocess`` (PreprocessConfig fields, ``--preprocess``), both as read from their files
    (:class:`centerprompt.checkpoints.BaseSpec` validates them)."""

    model_config: dict[str, Any] | None = None
    preprocess: dict[str, Any] | None = None

    def _spec_for(self, base: Path) -> BaseSpec:
        return BaseSpec(Path(base), model_config=self.model_config, preprocess=self.preprocess)


@dataclass(frozen=True, kw_only=True)
class _Training(_Run):
    """What every training job takes. ``epochs`` and ``batch_size`` default to the preset's.
    ``splits``: a split file to use, written there first when it does not exist (``--splits``);
    None: ``DATA/splits.json``, the base model's split, the run folder's, or made with ``seed``
    (:func:`centerprompt.runs.selection.load_index`)."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    patience: int = 10  # validations without improvement before stopping (0: never stop early)
    seed: int = 0
    amp: bool = False
    compile: bool = False
    resume: bool = False
    skip_bad_cases: bool = False
    progress: bool = True
    splits: Path | None = None

    def __post_init__(self) -> None:
        _positive("--epochs", self.epochs)
        _positive("--batch-size", self.batch_size)
        _positive("--lr", self.lr, 1e-12)
        _positive("--patience", self.patience, 0)
        _positive("--seed", self.seed, 0, MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class PretrainRun(_Training):
    """Train the base model (every weight) on every center but ``exclude_center``.

    ``oracle_shots`` > 0 trains the in-domain oracle instead: the excluded center's adaptation
    cases join the training set (``runs.selection.pretrain_case_ids``). ``lr`` defaults to the preset's;
    ``cases_limit`` caps the training cases (smoke tests). ``center_prompts`` > 0: prompt-aware
    pretraining, with deep prompts of that many tokens, one set per training center and a shared
    set (``models.prompts.CenterPrompts``).
    """

    data_dir: Path
    out: Path
    exclude_center: str | None = None
    preset: str = "cpu"
    oracle_shots: int = 0
    cases_limit: int | None = None
    center_prompts: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        _positive("oracle shots", self.oracle_shots, 0)
        _positive("cases_limit", self.cases_limit)
        _positive("--center-prompts", self.center_prompts, 0, MAX_PROMPTS)
        if self.oracle_shots and not self.exclude_center:
            raise ValueError("an oracle needs the center it stands for: give exclude_center.")

    @property
    def preset_obj(self) -> Preset:
        return PRESETS[self.preset]


@dataclass(frozen=True, kw_only=True)
class AdaptRun(_Training, _OwnBase):
    """Adapt the frozen base model to ``center`` with ``shots`` labelled cases and one strategy.
    ``center`` may name several centers (``USZ,CHB``): one adapter trained on their cases pooled,
    ``shots`` of each (what ``centerprompt federated adapt`` trains without pooling the scans).

    ``base``: any source :func:`centerprompt.checkpoints.resolve_base` reads (centerprompt
    checkpoint, MONAI state dict or checkpoint, bundle folder), with ``model_config`` and
    ``preprocess`` when given. ``options`` are the strategy's (``Strategy.options``); they are
    stored with every default filled in. ``lr`` defaults to the strategy's.
    """

    data_dir: Path
    center: str
    base: Path
    out: Path
    strategy: str = DEFAULT_STRATEGY
    num_prompts: int = 10  # P, prompt tokens per set (the model's ``num_prompts``)
    shots: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    prompt_dropout: float = 0.0
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        super().__post_init__()
        strategy = get_strategy(self.strategy)
        object.__setattr__(self, "options", strategy.resolve_options(self.options))
        _positive("--num-prompts", self.num_prompts, maximum=MAX_PROMPTS)
        _positive("--shots", self.shots)
        if not all(self.centers) or len(set(self.centers)) != len(self.centers):
            raise ValueError(f"--center: a center, or several separated by commas, each once; got {self.center!r}.")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"--prompt-dropout must be in [0, 1), got {self.prompt_dropout}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        self.base_spec  # validates model_config and preprocess

    @property
    def base_spec(self) -> BaseSpec:
        """The base model with what the user said about it."""
        return self._spec_for(self.base)

    @property
    def centers(self) -> list[str]:
        """The centers whose cases train the adapter (one, or several pooled)."""
        return split_centers(self.center)

    def provenance(self) -> dict[str, Any]:
        # The base file's bytes identify it (its hash is added by the job), not its path; a strategy
        # without prompts does not depend on P, so a changed P does not retrain it.
        unused = {"base"} | ({"num_prompts", "prompt_dropout"} if get_strategy(self.strategy).prompt_mode == "none" else set())
        return {k: v for k, v in super().provenance().items() if k not in unused}


@dataclass(frozen=True, kw_only=True)
class ExperimentRun(_Run, _OwnBase):
    """The leave-one-center-out comparison for ``new_center``: pretrain (or ``base``, with its
    ``model_config`` and ``preprocess`` when given), adapt with each strategy, score new and old
    centers. ``on_change``: what to do with a finished stage in ``out`` whose provenance differs
    from what is asked (re-run it, or refuse). ``splits``: as for a training run; the experiment
    chooses its split once, keeps it in ``out/splits.json`` and gives that file to every stage."""

    data_dir: Path
    new_center: str
    out: Path
    strategies: tuple[str, ...] = field(default_factory=lambda: (*strategy_names(STANDARD), ORACLE))
    base: Path | None = None
    preset: str = "cpu"
    shots: int = 8
    num_prompts: int = 10  # P, prompt tokens per set (the model's ``num_prompts``)
    pretrain_epochs: int | None = None
    adapt_epochs: int | None = None
    patience: int = 10
    seed: int = 0
    score_at: str = "ct"
    on_change: str = "rerun"
    skip_bad_cases: bool = False
    progress: bool = True
    command: str | None = None
    splits: Path | None = None
    smoke: bool = False  # a smoke run (demo --quick): the report says its figures are not results

    def __post_init__(self) -> None:
        names = tuple(self.strategies)
        object.__setattr__(self, "strategies", names)
        if not names:
            raise ValueError("--strategies: give at least one strategy.")
        for name in names:
            if name != ORACLE:
                get_strategy(name)
        if len(set(names)) != len(names):
            raise ValueError(f"--strategies lists a name twice: {', '.join(names)}.")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        _positive("--shots", self.shots)
        _positive("--num-prompts", self.num_prompts, maximum=MAX_PROMPTS)
        _positive("--seed", self.seed, 0, MAX_SEED)
        _positive("--pretrain-epochs", self.pretrain_epochs)
        _positive("--adapt-epochs", self.adapt_epochs)
        _positive("--patience", self.patience, 0)
        if self.score_at not in SCORE_AT:
            raise ValueError(f"--score-at must be one of {', '.join(SCORE_AT)}, got {self.score_at!r}.")
        if self.on_change not in ON_CHANGE:
            raise ValueError(f"--on-change must be one of {', '.join(ON_CHANGE)}, got {self.on_change!r}.")
        self.base_spec  # validates model_config and preprocess

    @property
    def base_spec(self) -> BaseSpec | None:
        """The given base model, or None when the experiment pretrains one."""
        if self.base is None:
            if self.model_config is not None or self.preprocess is not None:
                raise ValueError("--model-config and --preprocess describe a --base; give one.")
            return None
        return self._spec_for(self.base)

    def pretrain_run(self, preset: str | None = None, oracle: bool = False) -> PretrainRun:
        """The base model's pretraining (or, ``oracle=True``, the in-domain oracle's) as this experiment asks it."""
        return PretrainRun(
            data_dir=self.data_dir, out=self.out / (ORACLE if oracle else "pretrain"), exclude_center=self.new_center,
            preset=preset or self.preset, epochs=self.pretrain_epochs, patience=self.patience, seed=self.seed,
            oracle_shots=self.shots if oracle else 0, resume=True, skip_bad_cases=self.skip_bad_cases,
            progress=self.progress, splits=self.out / SPLITS_FILE,
        )  # fmt: skip

    def adapt_run(self, strategy: str, base: Path) -> AdaptRun:
        return AdaptRun(
            data_dir=self.data_dir, center=self.new_center, base=base, out=self.out / "adapt" / strategy,
            strategy=strategy, num_prompts=self.num_prompts, shots=self.shots, epochs=self.adapt_epochs,
            patience=self.patience, seed=self.seed, resume=True, skip_bad_cases=self.skip_bad_cases,
            progress=self.progress, model_config=self.model_config, preprocess=self.preprocess,
            splits=self.out / SPLITS_FILE,
        )  # fmt: skip
