"""Reading weight files without trusting them: safetensors checked against the content hash
centerprompt stores in them and for non-finite values; ``torch.load`` with ``weights_only=True``
only (a pickled object is named and refused, never unpickled); the UNETR state dict found in
whatever a MONAI, Lightning or hand-made checkpoint holds, and the architecture it implies."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

CONTENT_HASH_KEY = "content_sha256"
NETWORK_KEYS = ("net", "network", "model", "state_dict", "model_state_dict", "module")  # searched first, in order
POSITION_KEY = "vit.patch_embedding.position_embeddings"  # (1, N, C): every UNETR state dict has it
_BOILERPLATE = ("weights only load failed", "please file an issue", "check the documentation", "in pytorch 2.6")


def update_digest(digest: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed each (name, tensor) to a ``hashlib`` digest: ``"name|dtype|shape"``, then the raw bytes."""
    for name, tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")


def content_hash(meta: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of what a centerprompt safetensors file holds, stored under :data:`CONTENT_HASH_KEY`.

    Covers the other metadata (JSON, sorted keys: the configuration and preprocessing are content
    too) and every tensor in name order (:func:`update_digest`), so a flipped byte anywhere that
    safetensors itself does not reject is caught when the file is read.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in meta.items() if k != CONTENT_HASH_KEY}, sort_keys=True).encode())
    update_digest(digest, sorted(tensors.items()))
    return digest.hexdigest()


def read_safetensors(
    path: Path, expected_format: str | None, with_tensors: bool = True
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a safetensors file; with ``expected_format``, its format must be that.

    With the tensors, a file that carries a content hash must match it (a damaged file is refused
    before anything uses its weights); a file without one (written before centerprompt stored it,
    or by another tool) is read unverified.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError) as err:  # a damaged header is a SafetensorError
        detail = " ".join(str(err).split())[:200]  # one line, however the library words it
        raise ValueError(f"{path}: not a readable safetensors file ({detail}).") from err
    expected = meta.get(CONTENT_HASH_KEY)
    if with_tensors and expected is None:
        logger.debug("%s: no %s in its metadata (an older or foreign file); read unverified", path, CONTENT_HASH_KEY)
    elif with_tensors and content_hash(meta, tensors) != expected:
        raise ValueError(f"{path}: damaged: its content no longer matches the SHA-256 stored in it "
                         f"({CONTENT_HASH_KEY}); copy the file again or retrain it.")  # fmt: skip
    if expected_format is not None and meta.get("format") != expected_format:
        raise ValueError(f"{path}: not a {expected_format} file (format is {meta.get('format')!r}).")
    check_finite(tensors, path)
    return meta, tensors


def check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinite values: such a model predicts background everywhere
    (or garbage) without any error, so it is named here instead."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}): training "
                         "diverged or the file was written wrongly; retrain it (with a lower --lr).")  # fmt: skip


STATE_DICT_REMEDY = "save the network's state_dict() instead"


def load_weights_only(path: Path, remedy: str | None = None) -> Any:
    """``torch.load(weights_only=True)``: tensors and containers only; anything else is refused unread,
    in one line naming the file and what to do (``remedy``; for pickled objects by default: save a
    state dict), never PyTorch's advice to set ``weights_only=False``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": the error that follows says more
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and archive errors are varied; all mean the same to a user
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise ValueError(
                f"{path}: holds pickled Python objects ({found.group(1)}), not only tensors; centerprompt loads "
                f"weights only and never unpickles objects: {remedy or STATE_DICT_REMEDY}."
            ) from err
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if not ln.lower().startswith(_BOILERPLATE)), lines[0] if lines else "")
        raise ValueError(f"{path}: not a readable PyTorch weights file ({detail[:160]})"
                         + (f"; {remedy}." if remedy else ".")) from err


def is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unetr_state(obj: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """The UNETR state dict in a flat mapping of tensors, with a wrapper prefix (``module.``...) removed."""
    prefixes = [k[: -len(POSITION_KEY)] for k in obj if isinstance(k, str) and k.endswith(POSITION_KEY)]
    if not prefixes:
        return None
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in obj.items()
            if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}  # fmt: skip


def network_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(UNETR state dict, the key it was found under) from whatever ``torch.load`` returned."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict of a MONAI UNETR.")
    state = unetr_state(obj)
    if state is not None:
        return state, None
    keys = [k for k in NETWORK_KEYS if k in obj] + sorted(str(k) for k in obj if k not in NETWORK_KEYS)
    for key in keys:
        value = obj.get(key)
        if is_tensor_map(value) and (state := unetr_state(value)) is not None:
            return state, key
    shown = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
    if is_tensor_map(obj):
        raise ValueError(f"{path}: a state dict, but not of a MONAI UNETR (no {POSITION_KEY}; keys: {shown}).")
    what = " (an optimizer's state?)" if {"state", "param_groups"} <= set(obj) else ""
    raise ValueError(f"{path}: no UNETR state dict in this checkpoint{what}; its keys are {shown}; centerprompt "
                     f"looks at the top level and under {', '.join(NETWORK_KEYS)}.")  # fmt: skip


def config_from_state_dict(state: Mapping[str, torch.Tensor], num_heads: int = 12) -> dict[str, Any]:
    """Recover a UNETR configuration from a bare MONAI state dict (``num_heads`` is not in it).

    Inferred: channels, cubic ``img_size``, ``feature_size``, ``hidden_size``, ``mlp_dim``,
    ``qkv_bias``, ``num_layers``, ``patch_size``, ``proj_type``, ``norm_name`` (instance or batch)
    and ``res_block``. A non-cubic volume needs ``img_size`` given.
    """
    try:
        pos = state[POSITION_KEY]  # (1, N, C)
        in_channels = state["encoder1.layer.conv1.conv.weight"].shape[1]
        if "vit.patch_embedding.patch_embeddings.weight" in state:  # Conv3d (C, in, p, p, p)
            proj_type, patch = "conv", state["vit.patch_embedding.patch_embeddings.weight"].shape[-1]
        else:  # Rearrange then Linear (C, in * p^3)
            linear = state["vit.patch_embedding.patch_embeddings.1.weight"]
            proj_type, patch = "perceptron", round((linear.shape[1] / in_channels) ** (1 / 3))
        out = state["out.conv.conv.weight"]  # (out_channels, feature_size, 1, 1, 1)
        return dict(
            in_channels=in_channels, out_channels=out.shape[0], img_size=[round(pos.shape[1] ** (1 / 3)) * patch] * 3,
            feature_size=out.shape[1], hidden_size=pos.shape[-1], mlp_dim=state["vit.blocks.0.mlp.linear1.weight"].shape[0],
            num_heads=num_heads, proj_type=proj_type,
            norm_name="batch" if "encoder1.layer.norm1.running_mean" in state else "instance",
            res_block="decoder2.conv_block.conv3.conv.weight" in state, qkv_bias="vit.blocks.0.attn.qkv.bias" in state,
            num_layers=len({k.split(".")[2] for k in state if k.startswith("vit.blocks.")}), patch_size=patch,
        )  # fmt: skip
    except KeyError as err:
        raise ValueError(f"not a UNETR state dict: key {err} is missing.") from err
