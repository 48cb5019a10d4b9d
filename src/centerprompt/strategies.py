"""Adaptation strategies: which parts of a PromptedUNETR train for a new center.

A strategy is a name and its options, not a subclass. ``apply_strategy`` freezes and unfreezes in
place and returns the trainable parameters; everything it leaves frozen stays in eval mode while
the model trains (see ``PromptedUNETR.train``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from centerprompt.models.prompted_unetr import UNUSED_PARAMETER_MARKERS, PromptedUNETR

logger = logging.getLogger(__name__)

# The decoder's last up-block and the output head (UNETR attribute names).
DEFAULT_PARTIAL_MODULES = ("decoder2", "out")
DEFAULT_HEAD_MODULES = ("out",)
# MONAI's ViT attention projections; the names PEFT's target_modules match.
DEFAULT_LORA_TARGETS = ("qkv", "out_proj")


@dataclass(frozen=True)
class Strategy:
    """What a strategy trains, and the prompt mode the model must be built with."""

    name: str
    trains: str
    prompt_mode: str = "none"


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("none", "nothing (direct inference with the base model)"),
        Strategy("full", "every weight"),
        Strategy("partial", "the decoder's last up-block and the output head"),
        Strategy("shallow", "P prompt tokens before layer 1", "shallow"),
        Strategy("deep", "P prompt tokens at every layer", "deep"),
        Strategy("deep+head", "deep prompts and the output head", "deep"),
        Strategy("lora", "LoRA adapters on the attention projections (PEFT)"),
        Strategy("bitfit", "every bias"),
    )
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    return STRATEGIES[name]


def _set_trainable(model: nn.Module, predicate: Any) -> list[nn.Parameter]:
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(bool(predicate(name)))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def _in_modules(name: str, modules: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def apply_strategy(model: PromptedUNETR, name: str, **options: Any) -> list[nn.Parameter]:
    """Freeze ``model`` in place according to strategy ``name``; return the trainable parameters.

    Options:
        modules (partial): top-level or dotted module names to train. Defaults to
            ``("decoder2", "out")``: the decoder's last up-block and the output head.
        head_modules (deep+head): head modules trained with the prompts. Defaults to ``("out",)``.
        rank, alpha, dropout, target_modules (lora): LoRA rank r (default 8), scaling alpha
            (default 2*r), dropout (default 0.0) and the attention linear layers to adapt
            (default ``("qkv", "out_proj")``). LoRA: Hu et al., arXiv 2106.09685, through PEFT.

    ``shallow``, ``deep`` and ``deep+head`` need a model built with the matching ``prompt_mode``.
    MONAI's unused ``norm_cross_attn`` parameters are never trained (they get no gradient and
    would break DDP).
    """
    strategy = get_strategy(name)
    allowed = {
        "partial": {"modules"},
        "deep+head": {"head_modules"},
        "lora": {"rank", "alpha", "dropout", "target_modules"},
    }.get(name, set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"strategy {name!r} takes no option(s) {sorted(unknown)}.")
    if strategy.prompt_mode != "none" and model.prompt_mode != strategy.prompt_mode:
        raise ValueError(
            f"strategy {name!r} needs a model built with prompt_mode={strategy.prompt_mode!r}, "
            f"this one has prompt_mode={model.prompt_mode!r}."
        )

    def used(n: str) -> bool:
        return not any(marker in n for marker in UNUSED_PARAMETER_MARKERS)

    if name == "none":
        trainable = _set_trainable(model, lambda n: False)
    elif name == "full":
        trainable = _set_trainable(model, used)
    elif name == "partial":
        modules = tuple(options.get("modules", DEFAULT_PARTIAL_MODULES))
        known = dict(model.named_modules())
        missing = [m for m in modules if m not in known]
        if missing:
            raise ValueError(f"partial: the model has no module(s) {missing}.")
        trainable = _set_trainable(model, lambda n: _in_modules(n, modules))
    elif name in ("shallow", "deep"):
        trainable = _set_trainable(model, lambda n: n.startswith("prompts."))
    elif name == "deep+head":
        head = tuple(options.get("head_modules", DEFAULT_HEAD_MODULES))
        trainable = _set_trainable(model, lambda n: n.startswith("prompts.") or _in_modules(n, head))
    elif name == "bitfit":
        trainable = _set_trainable(model, lambda n: n.endswith(".bias") and used(n))
    else:  # lora
        trainable = _inject_lora(model, **options)
    # Re-apply train/eval so that newly frozen subtrees go to eval mode if the model is training.
    model.train(model.training)
    logger.debug("strategy %s: %d trainable tensors", name, len(trainable))
    return trainable


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


def _inject_lora(model: PromptedUNETR, **options: Any) -> list[nn.Parameter]:
    from peft import inject_adapter_in_model

    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model already carries LoRA adapters; build a fresh model for another run.")
    inject_adapter_in_model(lora_config(**options), model)
    return _set_trainable(model, lambda n: "lora_" in n)


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
