"""Base models from wherever a user has one: the one place that knows checkpoint formats.

Every ``--base`` (and every ``base`` argument in Python) goes through :func:`resolve_base`, which
returns the network's arguments, the preprocessing it expects and its weights, whatever the source:

- centerprompt's ``model.safetensors``: configuration and preprocessing in its metadata;
- a MONAI ``UNETR`` state dict saved with ``torch.save`` (``.pt``, ``.pth``, ``.ckpt``, any name),
  or with safetensors without centerprompt's metadata;
- the dicts MONAI's own tools write: a ``CheckpointSaver`` file (or Lightning's, or a hand-made
  one) holding the network's state dict under ``net``, ``network``, ``model``, ``state_dict``,
  ``model_state_dict`` or ``module`` (other keys are searched too; a ``module.``/``model.`` prefix
  is removed);
- a MONAI Bundle folder: weights from ``models/model.pt``; network arguments from the
  ``network_def`` of ``configs/inference.json`` (or ``.yaml``/``.yml``) when its ``_target_`` is
  MONAI's UNETR; preprocessing from its ``preprocessing`` transforms and ``inferer`` where they map
  onto :class:`PreprocessConfig` (``Spacingd`` pixdim -> ``spacing``; ``ScaleIntensityRanged``
  a_min/a_max -> ``ct_window``, or ``suv_max`` when its keys name the PET; the inferer's
  ``roi_size`` -> ``roi_size``). References ``@name`` are followed; ``$`` expressions are never
  evaluated (give ``--model-config``/``--preprocess`` for what they hold).

``torch.load`` runs with ``weights_only=True`` only: tensors and plain containers load, a file that
would have to run code to load (a pickled module or any other object) is refused, never unpickled.

A state dict does not store every argument: the architecture (sizes, depth, patch, projection,
normalisation, residual blocks) is inferred from tensor names and shapes, ``num_heads`` is not
(MONAI's default, 12, is assumed). ``model_config`` (``--model-config``) overrides what is
inferred or read; ``preprocess`` (``--preprocess``) overrides the preprocessing fields it names.
A foreign checkpoint without preprocessing gets centerprompt's defaults with ``roi_size`` = the
network's ``img_size`` (its position embedding has a fixed length).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from centerprompt.files import read_text
from centerprompt.weights import (
    POSITION_KEY,
    check_finite,
    config_from_state_dict,
    load_weights_only,
    network_state,
    read_safetensors,
    unetr_state,
)
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.models.prompted_unetr import PromptedUNETR

logger = logging.getLogger(__name__)

MODEL_FORMAT = "centerprompt-model/1"
# Metadata key of the SHA-256 over a file's content (:func:`content_hash`); files without it load unverified.
CENTERPROMPT = "centerprompt model"  # BaseCheckpoint.kind of our own files
# Config fields that describe what an adapter adds (prompts, norm steering, image prompt), not the backbone:
# set by the strategy (an adapter may change them), never by a base; with the values of a model that adds nothing.
ADAPTER_DEFAULTS = {"prompt_mode": "none", "num_prompts": 10, "prompt_dropout": 0.0, "steer_norms": False,
                    "image_prompt": 0, "kv_prompts": 0}  # fmt: skip
ADAPTER_FIELDS = tuple(ADAPTER_DEFAULTS)
# Those that shape the adapter's tensors: an adapter loads only onto a model built with the same.
ADAPTER_SHAPE_FIELDS = ("prompt_mode", "num_prompts", "steer_norms", "image_prompt", "kv_prompts")
ARG_ALIASES = {"pos_embed": "proj_type"}  # MONAI < 1.3 names
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # read with torch.load even when damaged (else: by content)
BUNDLE_WEIGHTS = Path("models") / "model.pt"
BUNDLE_CONFIGS = tuple(Path("configs") / f"inference.{ext}" for ext in ("json", "yaml", "yml"))
UNETR_CLASSES = ("UNETR", "PromptedUNETR")  # last component of a bundle's network ``_target_``
PET_KEY_WORDS = ("pet", "pt", "suv")  # a ScaleIntensityRanged on such keys sets suv_max, not the CT window
# PreprocessConfig fields that shape what the network sees (the others only augment training).
SHOWN_PREPROCESS = ("spacing", "ct_window", "suv_max", "body_hu", "crop_mm", "roi_size")


def adapter_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter fields of a model configuration; those an older file lacks take the values that add nothing."""
    return {k: config.get(k, default) for k, default in ADAPTER_DEFAULTS.items()}


@dataclass(frozen=True)
class BaseSpec:
    """What a user names as the base model: a file or bundle folder, and optionally its network
    arguments and preprocessing (the contents of ``--model-config`` and ``--preprocess``)."""

    path: Path
    model_config: Mapping[str, Any] | None = None
    preprocess: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.model_config is not None:
            object.__setattr__(self, "model_config", model_arguments(self.model_config, "--model-config"))
        if self.preprocess is not None:
            object.__setattr__(self, "preprocess", preprocess_fields(self.preprocess, "--preprocess"))


@dataclass(frozen=True)
class BaseCheckpoint:
    """A base model read from any supported source: what builds it, what it expects, where it came from.

    ``config``: PromptedUNETR arguments (prompt fields only as a centerprompt file stored them). ``preprocess_from``: ``"checkpoint"``,
    ``"bundle"``, ``"--preprocess"`` (possibly over one of those) or ``"defaults"``. ``assumed``:
    model arguments that were neither stored nor given, with the value taken. ``extra``: the
    metadata centerprompt stores (preset, training centers); empty for a foreign checkpoint.
    """

    path: Path
    kind: str
    weights: Path
    config: dict[str, Any]
    preprocess: PreprocessConfig
    preprocess_from: str
    assumed: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    given: bool = False  # a --model-config or --preprocess changed what the file alone says
    model_given: tuple[str, ...] = ()  # the network arguments --model-config set
    state: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def foreign(self) -> bool:
        return self.kind != CENTERPROMPT

    def build(self, **overrides: Any) -> PromptedUNETR:
        """A PromptedUNETR with these weights; ``overrides`` change configuration fields (e.g. ``prompt_mode``)."""
        try:
            model = PromptedUNETR(**{**self.config, **overrides})
            model.load_backbone_state_dict(self.state)
        except (ValueError, TypeError) as err:
            if self.model_given:  # the arguments the user gave are the first suspect, not the file
                shown = ", ".join(f"{k}={self.config[k]!r}" for k in self.model_given)
                raise ValueError(f"{self.path} does not fit the network --model-config describes ({shown}): {err} "
                                 "Check those arguments against the network the file was saved from.") from err
            hint = " (give --model-config with the arguments the network was built with)" if self.foreign else ""
            raise ValueError(f"{self.path}: {err}{hint}") from err
        tokens = self.state.get("prompts.tokens")
        if tokens is not None and model.prompts is not None and tokens.shape == model.prompts.tokens.shape:
            model.prompts.tokens.data.copy_(tokens)
        return model

    def record(self) -> dict[str, Any]:
        """What a run records of its base beyond the weights' hash: how it was read and interpreted."""
        return {"kind": self.kind, "model": self.config, "preprocess": self.preprocess.to_dict(),
                "preprocess_from": self.preprocess_from, "assumed": list(self.assumed)}  # fmt: skip

    def assumptions(self) -> str | None:
        """One sentence naming what was assumed for lack of information (None when nothing was)."""
        parts = []
        if self.assumed:
            parts.append(f"assuming {', '.join(self.assumed)}, which a state dict does not store (MONAI's default; "
                         "give --model-config if the network was built otherwise)")  # fmt: skip
        if self.preprocess_from == "defaults":
            p = self.preprocess.to_dict()
            shown = ", ".join(f"{k}={p[k]}" for k in SHOWN_PREPROCESS)
            parts.append(f"no preprocessing given, assuming centerprompt's defaults {shown} (give --preprocess "
                         "if it was trained otherwise)")  # fmt: skip
        return f"{self.path} ({self.kind}): " + "; ".join(parts) + "." if parts else None


BaseLike = Union[str, Path, BaseSpec, BaseCheckpoint]


# ----------------------------------------------------------------------------- arguments and files


def model_arguments(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """UNETR arguments from a user's file or a bundle, checked against PromptedUNETR's signature."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a mapping of UNETR arguments, got {type(values).__name__}.")
    allowed = set(inspect.signature(PromptedUNETR).parameters) - set(ADAPTER_FIELDS)
    args = {ARG_ALIASES.get(k, k): v for k, v in values.items() if not str(k).startswith("_")}
    prompt = sorted(set(args) & set(ADAPTER_FIELDS))
    if prompt:
        raise ValueError(f"{source}: {', '.join(prompt)} come from --strategy and --prompts, not the model configuration.")
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"{source}: unknown UNETR argument(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))}).")
    return args


def preprocess_fields(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """PreprocessConfig fields from a user's file, validated (missing fields keep their defaults)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a mapping of preprocessing fields, got {type(values).__name__}.")
    try:
        PreprocessConfig.from_dict(dict(values))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}.") from err
    return dict(values)


def read_config_file(path: str | Path, what: str = "configuration") -> dict[str, Any]:
    """A JSON or YAML mapping (``.yaml``/``.yml`` as YAML, anything else as JSON, YAML if JSON fails)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what}).")
    text = read_text(path, what)
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: neither JSON nor YAML ({str(err).splitlines()[0]}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the {what} must be a mapping of names to values, got {type(data).__name__}.")
    return data


# ----------------------------------------------------------------------------- weights


def _read_weights(path: Path) -> tuple[dict[str, str] | None, dict[str, torch.Tensor], str]:
    """(centerprompt metadata or None, state dict, kind) of a weights file, by its content."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    with open(path, "rb") as f:
        head = f.read(4)
    torch_file = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save's zip, or a legacy pickle
    if path.suffix != ".safetensors" and (torch_file or path.suffix in TORCH_SUFFIXES):
        state, key = network_state(load_weights_only(path), path)
        check_finite(state, path)
        return None, state, "MONAI state dict" if key is None else f"checkpoint (network under {key!r})"
    meta, tensors = read_safetensors(path, None)
    fmt = meta.get("format")
    if fmt == MODEL_FORMAT:
        return meta, tensors, CENTERPROMPT
    if fmt is not None:
        raise ValueError(f"{path}: a {fmt} file, not a base model (an adapter goes to --adapter).")
    state = unetr_state(tensors)
    if state is None:
        raise ValueError(f"{path}: a safetensors file, but not of a MONAI UNETR (no {POSITION_KEY}).")
    return None, state, "MONAI state dict"


# ----------------------------------------------------------------------------- MONAI bundles


def _bundle_config(folder: Path) -> tuple[Path | None, Any]:
    """The bundle's inference configuration as MONAI's ``ConfigParser`` holds it, its ``%`` macros
    and relative ``@`` ids resolved (never evaluated: nothing is instantiated, no ``$`` is run)."""
    from monai.bundle import ConfigParser

    for name in BUNDLE_CONFIGS:
        if (folder / name).is_file():
            parser = ConfigParser(read_config_file(folder / name, "bundle configuration"))
            try:
                parser.resolve_macro_and_relative_ids()
            except (KeyError, ValueError, OSError) as err:
                raise ValueError(f"{folder / name}: a % macro or @ reference does not resolve ({err}).") from err
            return folder / name, parser
    return None, None


def _follow(value: Any, config: Any, depth: int = 0) -> Any:
    """``@id`` references replaced by the raw content ``ConfigParser`` holds under that id (looked up,
    never instantiated); other values as they are; an id that names nothing stays a reference."""
    if isinstance(value, str) and value.startswith("@") and depth < 16:
        try:
            found = config.get(value[1:])
        except (KeyError, ValueError, IndexError, TypeError):
            return value
        return value if found is None else _follow(found, config, depth + 1)
    if isinstance(value, list):
        return [_follow(v, config, depth + 1) for v in value]
    return value


def _literal(value: Any) -> bool:
    """A value that needs no evaluation (no ``$`` expression, ``%`` macro or unresolved ``@`` reference)."""
    if isinstance(value, str):
        return not value.startswith(("$", "%", "@"))
    if isinstance(value, list):
        return all(_literal(v) for v in value)
    return True


def _bundle_network(config_file: Path, config: Any) -> dict[str, Any] | None:
    """UNETR arguments of the bundle's ``network_def`` (None when it has none)."""
    net = _follow(config.get("network_def"), config)
    if net is None:
        return None
    target = str(net.get("_target_", "")) if isinstance(net, Mapping) else ""
    if target.rsplit(".", 1)[-1] not in UNETR_CLASSES:
        raise ValueError(f"{config_file}: network_def is {target or net!r}, not MONAI's UNETR.")
    args = {k: _follow(v, config) for k, v in net.items() if not k.startswith("_")}
    return model_arguments(args, f"{config_file} network_def")


def _bundle_preprocess(config_file: Path, config: Any) -> tuple[dict[str, Any], list[str]]:
    """PreprocessConfig fields read from the bundle's transforms and inferer, and what could not be read."""
    found: dict[str, Any] = {}
    skipped: list[str] = []
    pre = _follow(config.get("preprocessing"), config)
    transforms = _follow(pre.get("transforms", []), config) if isinstance(pre, Mapping) else []
    for t in transforms if isinstance(transforms, list) else []:
        if not isinstance(t, Mapping):
            continue
        name = str(t.get("_target_", "")).rsplit(".", 1)[-1]
        args = {k: _follow(v, config) for k, v in t.items()}
        if not all(_literal(v) for v in args.values()):
            skipped.append(f"{name} (an argument is an expression)")
            continue
        if name == "Spacingd" and "pixdim" in args:
            pixdim = args["pixdim"] if isinstance(args["pixdim"], list) else [args["pixdim"]] * 3
            found["spacing"] = [float(x) for x in pixdim]
        elif name == "ScaleIntensityRanged" and "a_min" in args and "a_max" in args:
            keys = args.get("keys", [])
            keys = [keys] if isinstance(keys, str) else list(keys)
            if any(w in str(k).lower().split("_") or str(k).lower() == w for k in keys for w in PET_KEY_WORDS):
                if float(args["a_min"]) == 0:
                    found["suv_max"] = float(args["a_max"])
                else:
                    skipped.append("ScaleIntensityRanged on PET with a_min != 0")
            elif "ct_window" not in found:
                found["ct_window"] = [float(args["a_min"]), float(args["a_max"])]
            if (float(args.get("b_min", 0)), float(args.get("b_max", 1))) != (0.0, 1.0):
                skipped.append("ScaleIntensityRanged b_min/b_max (centerprompt scales to [0, 1])")
    inferer = _follow(config.get("inferer"), config)
    if isinstance(inferer, Mapping) and "roi_size" in inferer:
        roi = _follow(inferer["roi_size"], config)
        if _literal(roi) and isinstance(roi, list) and len(roi) == 3:
            found["roi_size"] = [int(x) for x in roi]
        else:
            skipped.append("inferer roi_size")
    return preprocess_fields(found, f"{config_file} preprocessing"), skipped


# ----------------------------------------------------------------------------- resolution


def _img_size(config: Mapping[str, Any]) -> list[int]:
    img = config["img_size"]
    return [int(i) for i in img] if isinstance(img, (list, tuple)) else [int(img)] * 3


def _check_window(ckpt_path: Path, config: Mapping[str, Any], preprocess: PreprocessConfig) -> None:
    img = _img_size(config)
    if list(preprocess.roi_size) != img:
        raise ValueError(
            f"{ckpt_path}: preprocessing roi_size {list(preprocess.roi_size)} differs from the network's img_size "
            f"{img}; a UNETR's position embedding fixes its window, so they must be equal."
        )


def resolve_base(base: BaseLike) -> BaseCheckpoint:
    """Read a base model from any supported source (see the module docstring); a BaseCheckpoint is returned as it is.

    Raises ValueError (one sentence naming the file) for anything that is not a UNETR, and
    FileNotFoundError for a missing path.
    """
    if isinstance(base, BaseCheckpoint):
        return base
    spec = base if isinstance(base, BaseSpec) else BaseSpec(Path(base))
    path, given_model, given_pre = spec.path, dict(spec.model_config or {}), dict(spec.preprocess or {})
    stored_pre: dict[str, Any] = {}
    network: dict[str, Any] | None = None
    extra: dict[str, Any] = {}
    if path.is_dir():
        weights, kind = path / BUNDLE_WEIGHTS, "MONAI bundle"
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: a folder but not a MONAI bundle (no {BUNDLE_WEIGHTS}).")
        config_file, bundle = _bundle_config(path)
        if config_file is not None:
            network = _bundle_network(config_file, bundle)
            stored_pre, skipped = _bundle_preprocess(config_file, bundle)
            logger.info("%s: read %s from %s%s", path, ", ".join(stored_pre) or "no preprocessing",
                        config_file.relative_to(path), f"; not read: {', '.join(skipped)}" if skipped else "")  # fmt: skip
        _, state, _ = _read_weights(weights)
    else:
        weights = path
        meta, state, kind = _read_weights(path)
        if meta is not None:
            network = json.loads(meta["config"])
            extra = json.loads(meta.get("extra", "{}"))
            stored_pre = dict(extra.get("preprocess", {}))
    assumed: tuple[str, ...] = ()
    if network is None:  # a bare state dict: infer what the tensors tell
        try:
            network = config_from_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{weights}: {err}") from err
        if "num_heads" not in given_model:
            assumed = (f"num_heads={network['num_heads']}",)
    config = {**network, **given_model}  # prompt fields only from a centerprompt file (model_arguments refuses them)
    unread = sorted(k for k, v in config.items() if not _literal(v))
    unread += [k for k in ("in_channels", "out_channels", "img_size") if k not in config]
    if unread:
        raise ValueError(f"{path}: no plain value for the network's {', '.join(unread)} (an expression or a "
                         "missing argument in the bundle); give it in --model-config.")  # fmt: skip

    origin = "checkpoint" if kind == CENTERPROMPT else "bundle"
    if given_pre:
        source = "--preprocess" + (f" over the {origin}'s" if stored_pre else "")
    else:
        source = origin if stored_pre else "defaults"
    try:  # the window defaults to the network's: its position embedding fixes it
        preprocess = PreprocessConfig.from_dict({"roi_size": _img_size(config), **stored_pre, **given_pre})
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}.") from err
    _check_window(path, config, preprocess)
    return BaseCheckpoint(path=path, kind=kind, weights=weights, config=config, preprocess=preprocess,
                          preprocess_from=source, assumed=assumed, extra=extra,
                          given=bool(given_model or given_pre), model_given=tuple(sorted(given_model)),
                          state=state)  # fmt: skip

