"""Prompt bank: every center served from one frozen backbone, with automatic routing per scan.

A bank is a folder::

    BANK/bank.json                 backbone fingerprint, model config, prompt mode, P, one row per center
    BANK/<CENTER>.safetensors      the center's prompt-only adapter (copied as it is)
    BANK/<CENTER>.key.safetensors  its routing key (optional): the mean frozen-encoder feature

Only prompt-only adapters (``shallow``, ``deep``) can be banked: they leave the backbone untouched,
so one forward pass can serve a batch that mixes centers (per-sample prompts (B, S, P, C)).

Routing follows S-Prompts (Wang et al., arXiv 2207.12819) and L2P (arXiv 2112.08654): a scan's
query is the frozen encoder's mean-pooled patch-token feature of its central window; the nearest
key by cosine distance wins, and a scan farther than the threshold from every key falls back to
the base model (no prompts), so a scan from an unknown source gets what it got before the bank.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from centerprompt.artifacts import PROMPT_FIELDS, atomic_path, backbone_fingerprint, load_model, read_adapter_metadata
from centerprompt.data.transforms import inference_transforms, save_prediction
from centerprompt.evaluate import sliding_window_predict
from centerprompt.jobs import base_preprocess, load_index, prediction_inputs
from centerprompt.scoring import SW_BATCH
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.strategies import apply_strategy
from centerprompt.train import default_device

logger = logging.getLogger(__name__)

BANK_FORMAT = "centerprompt-bank/1"
KEY_FORMAT = "centerprompt-bank-key/1"
BANK_FILE = "bank.json"
BASE = "base"  # routing decision "no prompts": the base model
RESERVED = (BASE, "auto", "oracle")  # words the CLI and reports use beside center names
BANKABLE = ("shallow", "deep")
DISTANCE = "cosine"
ROUTING_K = 3.0  # per-center threshold: mean + k * std of the own cases' distances (at least their max)
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_ENTRY_FILE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}(\.key)?\.safetensors$")
_TMP_FILE_RE = re.compile(r"^\..+\.tmp$")  # artifacts.atomic_path's temporary names


def validate_center(name: str) -> str:
    """A center name is 1-32 letters, digits, '-' or '_', so no name can write outside the bank."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"center name {name!r} must be 1-32 letters, digits, '-' or '_'.")
    if name in RESERVED:
        raise ValueError(f"center name {name!r} is reserved ({', '.join(RESERVED)} name routing modes).")
    return name


# ----------------------------------------------------------------------------- routing keys


def central_window(image: torch.Tensor, roi_size: Sequence[int]) -> torch.Tensor:
    """The ``roi_size`` window at the centre of ``image`` (B, C, *spatial), zero-padded if smaller."""
    pad: list[int] = []
    for size, r in reversed(list(zip(image.shape[2:], roi_size))):
        deficit = max(int(r) - size, 0)
        pad += [deficit // 2, deficit - deficit // 2]
    image = F.pad(image, pad)
    starts = [(s - int(r)) // 2 for s, r in zip(image.shape[2:], roi_size)]
    return image[(slice(None), slice(None), *(slice(a, a + int(r)) for a, r in zip(starts, roi_size)))]


def scan_features(model: PromptedUNETR, image: torch.Tensor) -> torch.Tensor:
    """Routing query (B, C): the frozen encoder's normed patch tokens, mean over patches.

    Computed on the central ``img_size`` window of the preprocessed volume (one encoder pass per
    scan, the same window for keys and queries). ``model`` must be the plain backbone
    (``prompt_mode="none"``): prompts would make the query depend on a center's tokens.
    """
    if model.prompt_mode != "none":
        raise ValueError("routing features need the plain backbone (prompt_mode='none').")
    roi = tuple(f * p for f, p in zip(model.feat_size, model.patch_size))
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens, _ = model.encode(central_window(image.to(device), roi))  # (B, N, C)
    return tokens.mean(1).float().cpu()  # (B, C)


def cosine_distance(features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, (B, C) x (K, C) -> (B, K); in [0, 2] whatever the feature width."""
    return 1.0 - F.normalize(features.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


@dataclass(frozen=True)
class RoutingKey:
    """A center's key (C,), its own cases' distances to it (n,), and the backbone they came from."""

    key: torch.Tensor
    distances: torch.Tensor
    fingerprint: str

    @classmethod
    def from_features(cls, features: torch.Tensor, fingerprint: str) -> RoutingKey:
        """Key = mean feature of a center's training cases (the S-Prompts domain centroid).

        Each case's distance is taken to the mean of the *other* cases (leave-one-out): a case is
        part of its own mean, so in-sample distances would understate how far a new scan lies.
        """
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"need features of shape (n >= 1, C), got {tuple(features.shape)}.")
        features, n = features.float(), features.shape[0]
        key = features.mean(0)
        if n == 1:
            return cls(key, torch.zeros(1), fingerprint)
        others = (n * key - features) / (n - 1)  # (n, C): each case's leave-one-out mean
        return cls(key, 1.0 - F.cosine_similarity(features, others, dim=-1), fingerprint)

    def stats(self, k: float = ROUTING_K) -> dict[str, float | int]:
        """Own-case distance statistics and the center's threshold max(mean + k*std, max)."""
        d = self.distances.double()
        mean, std = float(d.mean()), float(d.std()) if d.numel() > 1 else 0.0
        return {"n_cases": d.numel(), "mean": mean, "std": std, "max": float(d.max()), "k": k,
                "threshold": max(mean + k * std, float(d.max()))}  # fmt: skip


def routing_key(model: PromptedUNETR, images: Iterable[torch.Tensor]) -> RoutingKey:
    """Routing key from preprocessed volumes (each (C, D, H, W)) of one center's training cases."""
    features = torch.cat([scan_features(model, img[None]) for img in images])
    if features.shape[0] < 3:
        logger.warning("routing key from %d case(s): its threshold is unreliable", features.shape[0])
    return RoutingKey.from_features(features, backbone_fingerprint(model))


def routing_key_from_data(
    data_dir: str | Path, center: str, base: str | Path, *, split: str = "train", skip_bad_cases: bool = False,
    progress: bool = True,
) -> RoutingKey:  # fmt: skip
    """Routing key of ``center`` from its ``split`` cases (default: training cases, never the test set),
    preprocessed as the base checkpoint was trained."""
    cases, splits = load_index(data_dir, skip_bad_cases=skip_bad_cases)
    if center not in splits or not splits[center][split]:
        raise ValueError(f"center {center!r} has no labelled {split} cases in {data_dir} to compute its routing key.")
    model = load_model(base, prompt_mode="none").to(default_device()).eval()
    transform = inference_transforms(base_preprocess(base), with_label=False)
    ids = splits[center][split]
    images = (transform({"ct": str(cases[i].ct), "pet": str(cases[i].pet)})["image"].as_tensor() for i in ids)
    return routing_key(model, tqdm(images, total=len(ids), desc=f"key {center}", unit="case", disable=not progress))


@dataclass(frozen=True)
class Route:
    """Where one scan goes: a bank center or ``"base"`` (fallback), with the distances behind it."""

    center: str
    nearest: str
    distance: float
    runner_up: str | None
    runner_up_distance: float | None
    threshold: float

    @property
    def fallback(self) -> bool:
        return self.center == BASE

    def to_dict(self) -> dict[str, Any]:
        return {"center": self.center, "nearest": self.nearest, "distance": self.distance,
                "runner_up": self.runner_up, "runner_up_distance": self.runner_up_distance,
                "threshold": self.threshold, "fallback": self.fallback}  # fmt: skip


def route_features(features: torch.Tensor, keys: torch.Tensor, names: Sequence[str], threshold: float) -> list[Route]:
    """Nearest key by cosine distance; a scan farther than ``threshold`` from it goes to the base model."""
    if keys.shape[0] == 0:
        raise ValueError("the bank has no routing keys: add centers with --data and --base to compute them.")
    dist = cosine_distance(features, keys)  # (B, K)
    order = dist.argsort(dim=1)
    routes = []
    for b in range(dist.shape[0]):
        best = int(order[b, 0])
        second = int(order[b, 1]) if keys.shape[0] > 1 else None
        d = float(dist[b, best])
        routes.append(Route(
            center=names[best] if d <= threshold else BASE, nearest=names[best], distance=d,
            runner_up=None if second is None else names[second],
            runner_up_distance=None if second is None else float(dist[b, second]), threshold=threshold,
        ))  # fmt: skip
    return routes


# ----------------------------------------------------------------------------- the bank folder


@dataclass(frozen=True)
class BankEntry:
    center: str
    file: str
    key_file: str | None
    routing: dict[str, Any] | None
    created: str
    strategy: str
    bytes: int


@dataclass(frozen=True)
class LoadedBank:
    """Stacked prompts (K, S, P, C) in ``names`` order, and the keys (K', C) of the centers that have one."""

    names: list[str]
    prompts: torch.Tensor
    key_names: list[str]
    keys: torch.Tensor
    thresholds: dict[str, float]
    prompt_mode: str
    num_prompts: int

    def threshold(self, value: float | None = None) -> float:
        """``value`` if given, else the largest per-center threshold (no bank center's own cases fall back)."""
        if value is not None:
            return float(value)
        return max(self.thresholds.values(), default=math.inf)


class PromptBank:
    """A folder of prompt-only adapters sharing one backbone fingerprint, prompt mode and P.

    Writes are atomic (entry files first, then ``bank.json``), so an interrupted ``add`` leaves
    ``bank.json`` as it was; files without a row are removed by the next ``add``. One writer at a time.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index_path = self.path / BANK_FILE

    def _read(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"format": BANK_FORMAT, "backbone_fingerprint": None, "config": None, "prompt_mode": None,
                    "num_prompts": None, "distance": DISTANCE, "entries": []}  # fmt: skip
        try:
            index = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.index_path}: not valid JSON ({err}).") from err
        if index.get("format") != BANK_FORMAT:
            raise ValueError(f"{self.index_path}: not a {BANK_FORMAT} file (format is {index.get('format')!r}).")
        return index

    def _write(self, index: dict[str, Any]) -> None:
        with atomic_path(self.index_path) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")

    def entries(self) -> list[BankEntry]:
        return [BankEntry(**e) for e in self._read()["entries"]]

    def names(self) -> list[str]:
        return [e.center for e in self.entries()]

    def _clean_orphans(self, index: dict[str, Any]) -> None:
        """Remove entry and temporary files left by an interrupted add (no row in bank.json)."""
        if not self.path.is_dir():
            return
        keep = {e["file"] for e in index["entries"]} | {e["key_file"] for e in index["entries"] if e["key_file"]}
        for p in self.path.iterdir():
            if p.is_file() and p.name not in keep and (_ENTRY_FILE_RE.match(p.name) or _TMP_FILE_RE.match(p.name)):
                logger.info("removing %s (left by an interrupted add)", p)
                p.unlink()

    def check(self, center: str, adapter: str | Path) -> dict[str, Any]:
        """Refuse (ValueError) what ``add`` would refuse; return the adapter's metadata."""
        center, adapter = validate_center(center), Path(adapter)
        index = self._read()
        if any(e["center"] == center for e in index["entries"]):
            raise ValueError(f"center {center} is already in bank {self.path}; remove it first to replace it.")
        meta = read_adapter_metadata(adapter)
        if meta["strategy"] not in BANKABLE or meta["tensors"] != ["prompts.tokens"]:
            raise ValueError(
                f"{adapter}: strategy {meta['strategy']!r} is not prompt-only; only {', '.join(BANKABLE)} "
                "adapters leave the backbone untouched and can be banked."
            )
        fp, config = meta["backbone_fingerprint"], meta["config"]
        if index["backbone_fingerprint"] not in (None, fp):
            raise ValueError(
                f"{adapter}: adapter was trained on backbone {fp}, bank {self.path} holds backbone "
                f"{index['backbone_fingerprint']}."
            )
        if index["config"] is not None:
            diff = [k for k in config if k not in PROMPT_FIELDS[2:] and index["config"].get(k) != config[k]]
            if diff:
                shown = ", ".join(f"{k}={config[k]} (bank: {index['config'].get(k)})" for k in diff)
                raise ValueError(f"{adapter}: adapter does not fit bank {self.path}: {shown}.")
        return meta

    def add(self, center: str, adapter: str | Path, key: RoutingKey | None = None) -> BankEntry:
        """Copy a prompt-only adapter into the bank as ``center``, with its routing key if given."""
        meta, adapter = self.check(center, adapter), Path(adapter)
        fp, config = meta["backbone_fingerprint"], meta["config"]
        if key is not None and key.fingerprint != fp:
            raise ValueError(f"routing key of {center} comes from backbone {key.fingerprint}, {adapter} from {fp}.")
        if meta["extra"].get("center") not in (None, center):
            logger.warning("%s was adapted to center %s, banked as %s", adapter, meta["extra"]["center"], center)

        index = self._read()
        self._clean_orphans(index)
        entry = BankEntry(center=center, file=f"{center}.safetensors", key_file=None, routing=None,
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          strategy=meta["strategy"], bytes=adapter.stat().st_size)  # fmt: skip
        with atomic_path(self.path / entry.file) as tmp:
            shutil.copyfile(adapter, tmp)
        if key is not None:
            entry = replace(entry, key_file=f"{center}.key.safetensors", routing=key.stats())
            with atomic_path(self.path / entry.key_file) as tmp:
                save_file({"key": key.key.contiguous(), "distances": key.distances.contiguous()}, str(tmp),
                          metadata={"format": KEY_FORMAT, "center": center, "backbone_fingerprint": fp,
                                    "distance": DISTANCE})  # fmt: skip
        index.update(backbone_fingerprint=fp, config=config, prompt_mode=config["prompt_mode"],
                     num_prompts=config["num_prompts"])  # fmt: skip
        index["entries"].append(asdict(entry))
        self._write(index)
        logger.info("banked %s from %s (%s, key: %s)", center, adapter, meta["strategy"], key is not None)
        return entry

    def remove(self, center: str) -> None:
        """Delete the row (bank.json first, so a crash leaves only an orphan file), then the files."""
        index = self._read()
        rows = [e for e in index["entries"] if e["center"] == center]
        if not rows:
            known = ", ".join(self.names()) or "none"
            raise ValueError(f"center {center!r} is not in bank {self.path} (centers: {known}).")
        index["entries"] = [e for e in index["entries"] if e["center"] != center]
        if not index["entries"]:  # an empty bank accepts any backbone again
            index.update(backbone_fingerprint=None, config=None, prompt_mode=None, num_prompts=None)
        self._write(index)
        for name in (rows[0]["file"], rows[0]["key_file"]):
            if name:
                (self.path / name).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> LoadedBank:
        """Every entry's prompts, stacked (K, S, P, C), after checking it fits ``model``'s backbone."""
        bank = cls(path)
        index = bank._read()
        if not index["entries"]:
            raise ValueError(f"bank {bank.path} is empty (no {BANK_FILE} or no entries).")
        found = backbone_fingerprint(model)
        config = getattr(model, "config", {})
        diff = [k for k in index["config"] if k not in PROMPT_FIELDS and config.get(k) != index["config"][k]]
        if diff:
            raise ValueError(f"bank {bank.path} was built for another backbone configuration ({', '.join(diff)}).")
        prompts, key_names, keys, thresholds = [], [], [], {}
        for e in bank.entries():
            file = bank.path / e.file
            expected = read_adapter_metadata(file)["backbone_fingerprint"]
            if expected != found:
                raise ValueError(
                    f"{file}: adapter was trained on backbone {expected}, this model's backbone is {found}."
                )
            prompts.append(load_file(str(file))["prompts.tokens"].float())  # (S, P, C)
            if e.key_file:
                key_path = bank.path / e.key_file
                with safe_open(str(key_path), framework="pt") as f:
                    if (f.metadata() or {}).get("backbone_fingerprint") != found:
                        raise ValueError(f"{key_path}: routing key was computed on another backbone than {found}.")
                    keys.append(f.get_tensor("key").float())
                key_names.append(e.center)
                thresholds[e.center] = float(e.routing["threshold"])
        hidden = prompts[0].shape[-1]
        return LoadedBank(
            names=[e.center for e in bank.entries()], prompts=torch.stack(prompts), key_names=key_names,
            keys=torch.stack(keys) if keys else torch.empty(0, hidden), thresholds=thresholds,
            prompt_mode=index["prompt_mode"], num_prompts=index["num_prompts"],
        )  # fmt: skip


# ----------------------------------------------------------------------------- serving


def _tie_backbone(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` use ``src``'s parameter and buffer objects: one copy of the backbone in memory."""
    for name, tensor in [*src.named_parameters(), *src.named_buffers()]:
        owner, _, leaf = name.rpartition(".")
        setattr(dst.get_submodule(owner), leaf, tensor)


class BankModel(nn.Module):
    """One frozen backbone seen twice: plain (fallback and routing queries) and prompted (bank entries).

    The prompted twin shares the plain model's tensors, so both always hold the same weights.
    Inference only: everything is frozen and in eval mode.
    """

    def __init__(self, base: PromptedUNETR, bank: LoadedBank) -> None:
        super().__init__()
        if base.prompt_mode != "none":
            raise ValueError("BankModel needs the plain base model (prompt_mode='none').")
        self.base = base
        self.prompted = PromptedUNETR(**{**base.config, "prompt_mode": bank.prompt_mode,
                                         "num_prompts": bank.num_prompts, "prompt_dropout": 0.0})  # fmt: skip
        _tie_backbone(base, self.prompted)
        apply_strategy(self.base, "none")
        apply_strategy(self.prompted, "none")
        self.bank = bank
        self.register_buffer("bank_prompts", bank.prompts.clone(), persistent=False)  # (K, S, P, C)
        self.register_buffer("keys", bank.keys.clone(), persistent=False)  # (K', C)
        self.eval()

    @classmethod
    def from_files(cls, base: str | Path, bank: str | Path) -> BankModel:
        model = load_model(base, prompt_mode="none")
        return cls(model, PromptBank.load(bank, model))

    @property
    def names(self) -> list[str]:
        return self.bank.names

    def prompts_for(self, centers: Sequence[str]) -> torch.Tensor:
        """Per-sample prompts (B, S, P, C) for bank centers."""
        unknown = sorted({c for c in centers if c not in self.names})
        if unknown:
            raise ValueError(f"center(s) {unknown} are not in the bank (centers: {', '.join(self.names)}).")
        return self.bank_prompts[[self.names.index(c) for c in centers]]

    def route(self, image: torch.Tensor, threshold: float | None = None) -> list[Route]:
        """Routing decision per scan of a preprocessed batch (B, C, *spatial)."""
        features = scan_features(self.base, image)
        return route_features(features, self.keys.cpu(), self.bank.key_names, self.bank.threshold(threshold))

    def member(self, center: str) -> tuple[PromptedUNETR, dict[str, Any]]:
        """The network and keyword arguments serving ``center`` (``"base"``: the plain model)."""
        if center == BASE:
            return self.base, {}
        return self.prompted, {"prompts": self.prompts_for([center])[0]}

    def forward(self, x: torch.Tensor, centers: Sequence[str]) -> torch.Tensor:
        """Logits for a batch mixing centers: ONE prompted pass for bank centers, one base pass for ``"base"``.

        Fallback samples cannot share the prompted pass (any prompt tokens change attention), so
        they run through the plain model separately and are put back in batch order.
        """
        if len(centers) != x.shape[0]:
            raise ValueError(f"got {len(centers)} centers for a batch of {x.shape[0]}.")
        banked = [i for i, c in enumerate(centers) if c != BASE]
        plain = [i for i, c in enumerate(centers) if c == BASE]
        parts = []
        if banked:
            prompts = self.prompts_for([centers[i] for i in banked])
            parts.append((banked, self.prompted(x[banked], prompts=prompts)))
        if plain:
            parts.append((plain, self.base(x[plain])))
        out = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))
        for idx, logits in parts:
            out[idx] = logits
        return out


def load_bank_model(base: str | Path, bank: str | Path, device: torch.device | None = None) -> BankModel:
    """The base checkpoint and a bank folder as one :class:`BankModel` on ``device``."""
    model = BankModel.from_files(base, bank)
    return model.to(device) if device is not None else model


def predict_with_bank(
    base: str | Path, bank: str | Path, pairs: Sequence[tuple[str | Path, str | Path, str | Path]], *,
    center: str = "auto", threshold: float | None = None, progress: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Like ``jobs.predict``, with each scan's prompts from the bank: ``center`` names one bank
    center (or ``"base"``) for every scan, or ``"auto"`` routes each scan. Returns one record per
    scan: input, output path, the center used and, when routed, the distances.
    """
    model = load_bank_model(base, bank, default_device())
    if center not in ("auto", BASE):
        model.prompts_for([center])
    preprocess = base_preprocess(base)
    records = []
    for ct, out, data, image, transform in prediction_inputs(pairs, preprocess, progress):
        route = model.route(image, threshold)[0] if center == "auto" else None
        chosen = route.center if route else center
        net, kwargs = model.member(chosen)
        pred = sliding_window_predict(net, image, preprocess.roi_size, SW_BATCH, **kwargs).argmax(1).cpu()
        save_prediction(pred, data, out, transform)
        records.append({"ct": str(ct), "out": str(out), "center": chosen, "route": route.to_dict() if route else None})
        logger.info("%s -> %s with %s", ct, out, chosen)
    return records


# ----------------------------------------------------------------------------- evaluation
