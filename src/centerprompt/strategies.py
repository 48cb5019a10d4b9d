"""Adaptation strategies: one registry of what each strategy trains and how.

A strategy is data, as a PEFT method is: a ``Strategy`` entry carries its selection (which
parameters of a PromptedUNETR train), its options with their defaults, its default learning rate
and weight decay, the prompt mode the model must be built with, the tensors it adds to the
backbone, whether a prompt bank can hold it, and where it appears (the quick comparison, the
default one). Every other layer (CLI, runs, training, artifacts, bank, study, demo) asks this registry,
so adding a strategy is one ``register`` call (see README, "Add a strategy").

The module imports neither torch nor MONAI at import time, so the CLI's ``--help`` stays instant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from centerprompt.models.prompted_unetr import PromptedUNETR

logger = logging.getLogger(__name__)

BASE = "none"  # the strategy that trains nothing: the base model as it is (direct inference)
FULL = "full"  # every weight: what pretraining uses
DEFAULT_STRATEGY = "deep"  # the method this project is about (Saeed et al. 2023)
ORACLE = "oracle"  # not a strategy: the experiment's row that retrains the base with the new center's cases

# Where a strategy appears by default: the quick comparison (demo --quick, sweeps), the standard
# comparison (experiment, demo), or only when asked for by name.
QUICK, STANDARD, EXTRA = "quick", "standard", "extra"
_TIERS = (QUICK, STANDARD, EXTRA)

# MONAI's ViT attention projections; the names PEFT's target_modules match.
DEFAULT_LORA_TARGETS = ("qkv", "out_proj")


def _prototype_prompts(model: PromptedUNETR, images: torch.Tensor) -> None:
    from centerprompt.models.prompts import token_prototypes

    model.prompts.tokens.data.copy_(token_prototypes(model, images, model.num_prompts))


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


@dataclass(frozen=True)
class Option:
    """A strategy option: its default, how the CLI flag parses it, and the flag's help."""

    name: str
    default: Any
    parse: Callable[[str], Any] = str
    help: str = ""
    flag: str | None = None  # the CLI flag, e.g. "--lora-rank"; None: --option NAME=VALUE only


# A selection freezes a model in place and returns its trainable parameters.
Selection = Callable[["PromptedUNETR", Mapping[str, Any]], list["nn.Parameter"]]


@dataclass(frozen=True)
class Strategy:
    """One adaptation strategy. ``select(model, options)`` receives every option, defaults filled in."""

    name: str
    description: str
    select: Selection
    options: tuple[Option, ...] = ()
    prompt_mode: str = "none"  # the PromptedUNETR prompt mode the model must be built with
    builds: Mapping[str, Any] = field(default_factory=dict)  # other PromptedUNETR fields it needs (steer_norms...)
    lr: float = 1e-3  # default learning rate with AdamW
    weight_decay: float = 1e-5  # prompts take none: decaying them pulls every token to zero
    bankable: bool = False  # its artifact only adds tensors (prompts, steering), so a bank can serve it on a shared backbone
    adds: Callable[[str], bool] | None = None  # names of the tensors it adds on top of the backbone
    tier: str = STANDARD
    reference: str = ""
    # Called once before training with the model and a batch of the new center's training crops
    # (B, C, *img_size), e.g. to initialise prompts from its tokens; None: nothing to prepare.
    prepare: Callable[["PromptedUNETR", "torch.Tensor"], None] | None = None

    def resolve_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every option with its value: ``given`` over the defaults; an unknown option is an error."""
        given = dict(given or {})
        known = {o.name: o.default for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            takes = f"takes {', '.join(sorted(known))}" if known else "takes no options"
            raise ValueError(f"strategy {self.name!r} {takes}; got {', '.join(unknown)}.")
        return {**known, **given}

    @property
    def trains(self) -> bool:
        return self.name != BASE

    def model_fields(
        self, num_prompts: int = 10, prompt_dropout: float = 0.0, base: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The PromptedUNETR fields a model trained with this strategy is built with (beyond the backbone's).

        ``base``: the base model's configuration. A base that was trained with prompts (prompt-aware
        pretraining) keeps them: a strategy without prompts leaves them in place, frozen, and one
        with prompts must take the same kind and number (it starts from the base's default set).
        """
        base_mode = (base or {}).get("prompt_mode", "none")
        if base_mode != "none":
            base_p = int(base["num_prompts"])  # type: ignore[index]
            if self.prompt_mode == "none":
                return {"prompt_mode": base_mode, "num_prompts": base_p, "prompt_dropout": 0.0, **self.builds}
            if (self.prompt_mode, num_prompts) != (base_mode, base_p):
                raise ValueError(f"the base model was trained with {base_mode} prompts of {base_p} tokens; strategy "
                                 f"{self.name!r} must train the same (--num-prompts {base_p}), or none.")  # fmt: skip
        return {"prompt_mode": self.prompt_mode, "num_prompts": num_prompts, "prompt_dropout": prompt_dropout,
                **self.builds}  # fmt: skip


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to the registry (a name already taken is an error); returns it."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"a strategy named {strategy.name!r} is already registered.")
    if strategy.tier not in _TIERS:
        raise ValueError(f"tier must be one of {', '.join(_TIERS)}, got {strategy.tier!r}.")
    STRATEGIES[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    """Remove a strategy (for tests and plug-ins that register temporarily)."""
    STRATEGIES.pop(name, None)


PLUGIN_GROUP = "centerprompt.strategies"  # entry points whose import registers strategies
_loaded_plugins: set[str] = set()


def load_plugins() -> None:
    """Import every module declared under the ``centerprompt.strategies`` entry-point group (once
    each), so that strategies a package registers are known to the CLI."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.value not in _loaded_plugins:
            _loaded_plugins.add(ep.value)
            ep.load()


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    return STRATEGIES[name]


def strategy_names(tier: str = EXTRA) -> list[str]:
    """Registered names up to ``tier``: quick ⊂ standard ⊂ extra (every strategy), in registration order."""
    allowed = _TIERS[: _TIERS.index(tier) + 1]
    return [s.name for s in STRATEGIES.values() if s.tier in allowed]


def bankable_names() -> list[str]:
    return [s.name for s in STRATEGIES.values() if s.bankable]


def is_added_tensor(name: str) -> bool:
    """Whether a state-dict name belongs to a tensor some strategy adds on top of the backbone."""
    return any(s.adds is not None and s.adds(name) for s in STRATEGIES.values())


# ----------------------------------------------------------------------------- selections


def set_trainable(model: nn.Module, predicate: Callable[[str], bool]) -> list[nn.Parameter]:
    """Train exactly the parameters whose name satisfies ``predicate``; return them."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(name)))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def in_modules(name: str, modules: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def used(name: str) -> bool:
    """MONAI's unused ``norm_cross_attn`` parameters get no gradient (and would break DDP): never trained."""
    from centerprompt.models.prompted_unetr import UNUSED_PARAMETER_MARKERS

    return not any(marker in name for marker in UNUSED_PARAMETER_MARKERS)


def is_prompt(name: str) -> bool:
    return name.startswith("prompts.")


def is_lora(name: str) -> bool:
    return "lora_" in name


def is_steering(name: str) -> bool:
    """A per-channel norm scale/shift or the image-space prompt (``models.steering``)."""
    from centerprompt.models.steering import is_steering as steering

    return steering(name)


def is_norm_steering(name: str) -> bool:
    return is_steering(name) and not name.startswith("image_prompt.")


IMAGE_PROMPT_GRID = 8  # the image prompt's map edge: 2 x 2 x 8^3 = 2048 numbers for CT and PET
KV_PROMPTS = 10  # key-value prompts per layer: 2 x 10 x width numbers per transformer layer


def is_key_value(name: str) -> bool:
    """A key-value prompt tensor (``models.key_value``)."""
    from centerprompt.models.key_value import is_key_value as key_value

    return key_value(name)


def _modules(model: PromptedUNETR, modules: Sequence[str], strategy: str) -> tuple[str, ...]:
    known = dict(model.named_modules())
    missing = [m for m in modules if m not in known]
    if missing:
        raise ValueError(f"{strategy}: the model has no module(s) {missing}.")
    return tuple(modules)


def _partial(model: PromptedUNETR, options: Mapping[str, Any]) -> list[nn.Parameter]:
    modules = _modules(model, options["modules"], "partial")
    return set_trainable(model, lambda n: in_modules(n, modules))


def _deep_head(model: PromptedUNETR, options: Mapping[str, Any]) -> list[nn.Parameter]:
    head = _modules(model, options["head_modules"], "deep+head")
    return set_trainable(model, lambda n: is_prompt(n) or in_modules(n, head))


def lora_config(rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                target_modules: Sequence[str] = DEFAULT_LORA_TARGETS) -> Any:  # fmt: skip
    """The PEFT ``LoraConfig`` used for the ``lora`` strategy."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
    return LoraConfig(
        r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
        target_modules=list(target_modules), bias="none",
    )  # fmt: skip


def _lora(model: PromptedUNETR, options: Mapping[str, Any]) -> list[nn.Parameter]:
    from peft import inject_adapter_in_model

    if any(is_lora(n) for n, _ in model.named_parameters()):
        raise ValueError("the model already carries LoRA adapters; build a fresh model for another run.")
    inject_adapter_in_model(lora_config(**options), model)
    return set_trainable(model, is_lora)


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("", "none") else float(text)


for _strategy in (
    Strategy(BASE, "nothing (direct inference with the base model)", lambda m, o: set_trainable(m, lambda n: False),
             tier=QUICK),  # fmt: skip
    Strategy(FULL, "every weight", lambda m, o: set_trainable(m, used), lr=1e-4, tier=QUICK),
    Strategy(
        "partial", "the decoder's last up-block and the output head", _partial,
        options=(Option("modules", ("decoder2", "out"), _comma_list, "comma-separated modules to train",
                        "--partial-modules"),),  # fmt: skip
    ),
    Strategy("shallow", "P prompt tokens before layer 1", lambda m, o: set_trainable(m, is_prompt),
             prompt_mode="shallow", lr=1e-2, weight_decay=0.0, bankable=True, adds=is_prompt,
             reference="Jia et al. 2022, VPT (arXiv 2203.12119)"),  # fmt: skip
    # Prompts want much larger steps than weights (VPT searched base learning rates of 0.1-50 with
    # SGD; with AdamW we use 1e-2).
    Strategy("deep", "P prompt tokens at every layer", lambda m, o: set_trainable(m, is_prompt),
             prompt_mode="deep", lr=1e-2, weight_decay=0.0, bankable=True, adds=is_prompt, tier=QUICK,
             reference="Jia et al. 2022, VPT; Saeed et al. 2023 (arXiv 2305.18948)"),  # fmt: skip
    Strategy("spt", "deep prompts initialised from the new center's token prototypes",
             lambda m, o: set_trainable(m, is_prompt), prompt_mode="deep", lr=1e-2, weight_decay=0.0, bankable=True,
             adds=is_prompt, tier=EXTRA, prepare=_prototype_prompts,
             reference="Self-Prompt Tuning, Wang et al. 2024 (arXiv 2402.02382)"),  # fmt: skip
    Strategy("kv", "learned keys and values appended to every layer's attention", 
             lambda m, o: set_trainable(m, is_key_value), builds={"kv_prompts": KV_PROMPTS}, lr=1e-2,
             weight_decay=0.0, bankable=True, adds=is_key_value, tier=EXTRA,
             reference="E2VPT, Han et al. 2023 (arXiv 2307.13770)"),  # fmt: skip
    Strategy(
        "deep+head", "deep prompts and the output head", _deep_head, prompt_mode="deep", lr=1e-2, weight_decay=0.0,
        adds=is_prompt,
        options=(Option("head_modules", ("out",), _comma_list, "comma-separated head modules trained with the prompts",
                        "--head-modules"),),  # fmt: skip
    ),
    # Attribution: the 27-parameter output convolution alone lowered the adaptation loss more than deep
    # prompts (shared/REFERENCE.md); every row with a head is read against this one.
    Strategy("head", "the output convolution only", lambda m, o: set_trainable(m, lambda n: in_modules(n, ("out",))),
             lr=1e-2, weight_decay=0.0),  # fmt: skip
    Strategy("norm", "a per-channel scale and shift after every decoder instance norm", 
             lambda m, o: set_trainable(m, is_norm_steering), builds={"steer_norms": True}, lr=1e-2,
             weight_decay=0.0, bankable=True, adds=is_steering,
             reference="FiLM, Perez et al. 2018 (arXiv 1709.07871); MS-Net (arXiv 2002.03366)"),  # fmt: skip
    Strategy("deep+norm", "deep prompts and the decoder norms' scale and shift",
             lambda m, o: set_trainable(m, lambda n: is_prompt(n) or is_norm_steering(n)), prompt_mode="deep",
             builds={"steer_norms": True}, lr=1e-2, weight_decay=0.0, bankable=True,
             adds=lambda n: is_prompt(n) or is_steering(n), tier=EXTRA),
    Strategy("image", "an image-space prompt: a low-resolution scale and shift map per modality",
             lambda m, o: set_trainable(m, lambda n: n.startswith("image_prompt.")),
             builds={"image_prompt": IMAGE_PROMPT_GRID}, lr=1e-2, weight_decay=0.0, bankable=True, adds=is_steering,
             tier=QUICK,
             reference="VPTTA (arXiv 2311.18363); ProSFDA"),  # fmt: skip
    Strategy(
        "lora", "LoRA adapters on the attention projections (PEFT)", _lora, adds=is_lora,
        options=(
            Option("rank", 8, int, "LoRA rank r", "--lora-rank"),
            Option("alpha", None, _optional_float, "LoRA scaling alpha (default 2r)", "--lora-alpha"),
            Option("dropout", 0.0, float, "LoRA dropout", "--lora-dropout"),
            Option("target_modules", DEFAULT_LORA_TARGETS, _comma_list, "comma-separated linear layers to adapt",
                   "--lora-targets"),  # fmt: skip
        ),
        reference="Hu et al. 2021 (arXiv 2106.09685)",
    ),
    Strategy("bitfit", "every bias", lambda m, o: set_trainable(m, lambda n: n.endswith(".bias") and used(n)),
             tier=EXTRA, reference="Ben Zaken et al. 2022 (arXiv 2106.10199)"),  # fmt: skip
):
    register(_strategy)


def apply_strategy(model: PromptedUNETR, name: str, **options: Any) -> list[nn.Parameter]:
    """Freeze ``model`` in place according to strategy ``name``; return the trainable parameters.

    ``options`` are the strategy's (``Strategy.options``; unknown ones are an error). A prompt
    strategy needs a model built with its ``prompt_mode``. Frozen subtrees go to eval mode if the
    model is training (see ``PromptedUNETR.train``).
    """
    strategy = get_strategy(name)
    resolved = strategy.resolve_options(options)
    if strategy.prompt_mode != "none" and model.prompt_mode != strategy.prompt_mode:
        raise ValueError(
            f"strategy {name!r} needs a model built with prompt_mode={strategy.prompt_mode!r}, "
            f"this one has prompt_mode={model.prompt_mode!r}."
        )
    wrong = {k: v for k, v in strategy.builds.items() if model.config.get(k) != v}
    if wrong:
        shown = ", ".join(f"{k}={v!r} (this one: {model.config.get(k)!r})" for k, v in wrong.items())
        raise ValueError(f"strategy {name!r} needs a model built with {shown}.")
    trainable = strategy.select(model, resolved)
    model.train(model.training)
    logger.debug("strategy %s: %d trainable tensors", name, len(trainable))
    return trainable


def parameter_report(model: nn.Module) -> dict[str, float | int]:
    """Trainable and total parameter counts, the fraction, and the bytes a center must store.

    The stored bytes are those of the trainable tensors (the per-center artifact's payload).
    """
    total = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total if total else 0.0,
        "artifact_tensor_bytes": sum(p.numel() * p.element_size() for p in params),
    }
