"""Files centerprompt writes: full model checkpoints and small per-center adapter files.

Both are safetensors files whose metadata carries the configuration that built the model and
a SHA-256 of the file's content (:func:`centerprompt.checkpoints.content_hash`), so a damaged
file is refused when read instead of predicting garbage; an adapter also carries the strategy,
its options and the fingerprint of the frozen backbone it was trained on, so it refuses to load
onto another backbone. Every write is atomic
(:func:`centerprompt.files.atomic_path`), so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from centerprompt.checkpoints import ADAPTER_FIELDS, ADAPTER_SHAPE_FIELDS, MODEL_FORMAT, BaseLike, adapter_fields, resolve_base
from centerprompt.files import atomic_path
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.strategies import BASE, apply_strategy, get_strategy, is_added_tensor
from centerprompt.weights import CONTENT_HASH_KEY, check_finite, content_hash, read_safetensors, update_digest

ADAPTER_FORMAT = "centerprompt-adapter/1"


def _base_name(name: str) -> str:
    """State-dict name of a backbone tensor with PEFT's wrapping removed."""
    return name.replace(".base_layer.", ".")


def backbone_fingerprint(model: nn.Module, exclude: set[str] | frozenset[str] = frozenset()) -> str:
    """SHA-256 (16 hex digits) over the backbone tensors, names and values, minus ``exclude``.

    Tensors a strategy adds (``Strategy.adds``: prompts, LoRA) are never part of it, and PEFT's ``base_layer`` wrapping is undone,
    so a prompted or LoRA-injected model fingerprints like the plain backbone it was built on.
    """
    digest = hashlib.sha256()
    items = sorted((_base_name(n), t) for n, t in model.state_dict().items() if not is_added_tensor(n))
    update_digest(digest, ((name, t) for name, t in items if name not in exclude))
    return digest.hexdigest()[:16]


def _save(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str]) -> None:
    """Write a safetensors file atomically, its content hash added to ``meta`` (checked on every read);
    NaN or infinite weights are refused before anything is written."""
    check_finite(tensors, Path(path))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, CONTENT_HASH_KEY: content_hash(meta, tensors)})


# ----------------------------------------------------------------------------- full checkpoints


def save_model(model: PromptedUNETR, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the whole model (weights and the configuration that built it) atomically."""
    meta = {"format": MODEL_FORMAT, "config": json.dumps(model.config), "extra": json.dumps(dict(extra or {}))}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save(state, path, meta)
    return Path(path)


def load_model(base: BaseLike, **overrides: Any) -> PromptedUNETR:
    """Build a PromptedUNETR from a base checkpoint of any supported source.

    ``.safetensors`` files written by :func:`save_model` carry their configuration; a MONAI
    ``UNETR`` state dict (``.pt``/``.pth``, read with ``torch.load(weights_only=True)``), a
    checkpoint dict holding one, or a MONAI bundle folder are read by
    :func:`centerprompt.checkpoints.resolve_base` (pass ``num_heads`` if it is not 12, and
    ``img_size`` if the volume is not a cube). ``overrides`` change configuration fields, e.g.
    ``prompt_mode="deep"``.
    """
    return resolve_base(base).build(**overrides)


# ----------------------------------------------------------------------------- per-center adapters


def save_adapter(
    model: PromptedUNETR, path: str | Path, strategy: str, options: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write what ``strategy`` trained (prompts, head, LoRA, biases...) with its metadata.

    The fingerprint covers every backbone tensor the adapter does not replace, so it is computed
    the same way on the adapted model here and on the base model at load time.
    """
    get_strategy(strategy)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError(f"strategy {strategy!r} trained nothing: there is no adapter to save.")
    replaced = {_base_name(n) for n in tensors if not is_added_tensor(n)}
    meta = {
        "format": ADAPTER_FORMAT,
        "strategy": strategy,
        "options": json.dumps(dict(options or {})),
        "config": json.dumps(model.config),
        "backbone_fingerprint": backbone_fingerprint(model, exclude=replaced),
        "extra": json.dumps(dict(extra or {})),
    }
    _save(tensors, path, meta)
    return Path(path)


def read_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """Strategy, options, configuration, fingerprint and tensor names of an adapter file; P
    (``num_prompts``) is the configuration's, 0 when the adapter has no prompt tokens (files written
    before 2026-12-06 also kept a second copy beside it, which is not read)."""
    meta, tensors = read_safetensors(Path(path), ADAPTER_FORMAT)
    config = json.loads(meta["config"])
    fields = adapter_fields(config)
    return {
        "strategy": meta["strategy"],
        "num_prompts": fields["num_prompts"] if fields["prompt_mode"] != "none" else 0,  # tokens per set in use
        "options": json.loads(meta["options"]),
        "config": config,
        "backbone_fingerprint": meta["backbone_fingerprint"],
        "extra": json.loads(meta.get("extra", "{}")),
        "tensors": sorted(tensors),
    }


def load_adapter(model: PromptedUNETR, path: str | Path) -> dict[str, Any]:
    """Apply an adapter file to ``model`` (built with the adapter's prompt mode); return its metadata.

    Fails with a ValueError naming the file when the backbone configuration differs (which
    fields) or when the backbone weights differ (fingerprints).
    """
    path = Path(path)
    meta, tensors = read_safetensors(path, ADAPTER_FORMAT)
    config = json.loads(meta["config"])
    diff = [k for k in config if k not in ADAPTER_FIELDS and model.config.get(k) != config[k]]
    if diff:
        shown = ", ".join(f"{k}={config[k]} (model: {model.config.get(k)})" for k in diff)
        raise ValueError(f"{path}: adapter was trained for another backbone configuration: {shown}.")
    needs, has = adapter_fields(config), adapter_fields(model.config)
    for k in ADAPTER_SHAPE_FIELDS:
        if has[k] != needs[k]:
            raise ValueError(f"{path}: adapter needs a model with {k}={needs[k]!r}, this model has {has[k]!r}.")
    strategy = meta["strategy"]
    replaced = {_base_name(n) for n in tensors if not is_added_tensor(n)}
    expected, found = meta["backbone_fingerprint"], backbone_fingerprint(model, exclude=replaced)
    if expected != found:
        raise ValueError(
            f"{path}: adapter was trained on backbone {expected}, this model's backbone is {found} "
            "(different weights)."
        )
    options = json.loads(meta["options"])
    apply_strategy(model, strategy, **options)
    own = dict(model.named_parameters())
    wrong = [n for n in tensors if n not in own or own[n].shape != tensors[n].shape]
    if wrong:
        raise ValueError(f"{path}: tensors {wrong[:3]} do not fit this model.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
    return read_adapter_metadata(path)


def build_adapted_model(base: BaseLike, adapter: str | Path | None = None, *,
                        without_prompts: bool = False) -> PromptedUNETR:  # fmt: skip
    """The base checkpoint (any source :func:`load_model` reads) with an adapter applied (or alone), for inference.

    ``without_prompts``: the adapter's other tensors (head, norm steering) without its prompt tokens,
    to credit a gain to the part that makes it (an adapter without prompts is an error); on a base
    trained with prompts (prompt-aware pretraining), the base's own prompts take their place.
    """
    base = resolve_base(base)
    if adapter is None:
        model = load_model(base)
        apply_strategy(model, BASE)
        return model.eval()
    meta = read_adapter_metadata(adapter)
    model = load_model(base, **adapter_fields(meta["config"]))
    load_adapter(model, adapter)
    if without_prompts:
        if get_strategy(meta["strategy"]).prompt_mode == "none":
            raise ValueError(f"{adapter}: adapter has no prompt tokens to remove.")
        if "prompts.tokens" in base.state:  # the backbone reads prompts: give it the base's own
            model.prompts.tokens.data.copy_(base.state["prompts.tokens"])
            apply_strategy(model, BASE)
            return model.eval()
        plain = PromptedUNETR(**{**model.config, "prompt_mode": "none"})
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prompts.")})
        model = plain
    apply_strategy(model, BASE)
    return model.eval()
