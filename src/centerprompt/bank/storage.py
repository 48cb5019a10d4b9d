"""The bank folder: its ``bank.json`` index, adding, listing and removing centers, loading them.

A bank is a folder::

    BANK/bank.json                 backbone fingerprint, model config, prompt mode, P, one row per center
    BANK/<CENTER>.safetensors      the center's prompt-only adapter (copied as it is)
    BANK/<CENTER>.key.safetensors  its routing key (optional): mean and variance of its scans' acquisition
                                   fingerprint and the leave-one-out scale (summary statistics only)

``bank.json`` is data, not trusted: every file an entry names must be a plain entry file name
that resolves inside the folder, or the bank refuses to read, load or delete anything. Writers
(add, remove) hold an exclusive ``flock`` on the folder itself for their whole read-modify-write;
readers need no lock, since ``bank.json`` is only ever replaced by an atomic rename.

Only adapters of a bankable strategy (the registry's ``Strategy.bankable``: VPT prompts, norm
steering, image prompts) can be banked: they add tensors and leave the backbone untouched, so one
forward pass can serve a batch that mixes centers (per-sample prompts (B, S, P, C) and per-sample
steering values). One bank holds one kind: the same tensors, of the same shapes, for every center.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from centerprompt.artifacts import ADAPTER_FIELDS, backbone_fingerprint, read_adapter_metadata
from centerprompt.bank.acquisition import FEATURES
from centerprompt.bank.routing import DISTANCE, RESERVED, RoutingKey
from centerprompt.checkpoints import adapter_fields
from centerprompt.data.hecktor import split_centers
from centerprompt.files import atomic_path
from centerprompt.strategies import bankable_names, is_added_tensor

logger = logging.getLogger(__name__)

BANK_FORMAT = "centerprompt-bank/2"  # 2: acquisition-fingerprint keys (1: frozen-encoder cosine keys)
KEY_FORMAT = "centerprompt-bank-key/3"  # 3: the PET body found from the 99th percentile
KEY_TENSORS = ("mean", "var", "scale")  # all a key file holds: (F,), (F,), (1,)
BANK_FILE = "bank.json"
PROMPT_TENSOR = "prompts.tokens"  # the one tensor a bankable adapter file holds
# Always fullmatch: with match, "$" also matches before a final newline ("X\n" would pass).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")  # not "-x": it would read as an option
_ENTRY_FILE_RE = re.compile(r"[A-Za-z0-9_-]{1,32}(\.key)?\.safetensors")
_TMP_FILE_RE = re.compile(r"\..+\.tmp")  # files.atomic_path's temporary names


def validate_center(name: str) -> str:
    """A center name is 1-32 letters, digits, '-' or '_', so no name can write outside the bank."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"center name {name!r} must be 1-32 letters, digits, '-' or '_', starting with a letter "
                         "or digit.")  # fmt: skip
    if name.lower() in RESERVED:  # "Auto" or "BASE" would be told apart from the modes by case alone
        raise ValueError(f"center name {name!r} is reserved ({', '.join(RESERVED)} name routing modes).")
    return name


@dataclass(frozen=True)
class BankEntry:
    center: str
    file: str
    key_file: str | None
    routing: dict[str, Any] | None
    created: str
    strategy: str
    bytes: int


_ENTRY_FIELDS = {f.name for f in fields(BankEntry)}


@dataclass(frozen=True)
class LoadedBank:
    """Every entry's tensors stacked by name, (K, *shape) in ``names`` order (prompts: (K, S, P, C)),
    the adapter fields the serving model is built with, and the routing keys of the centers that have one."""

    names: list[str]
    tensors: dict[str, torch.Tensor]
    keys: dict[str, RoutingKey]
    fields: dict[str, Any]

    @property
    def prompts(self) -> torch.Tensor | None:
        return self.tensors.get(PROMPT_TENSOR)

    @property
    def key_names(self) -> list[str]:
        return list(self.keys)


class PromptBank:
    """A folder of prompt-only adapters sharing one backbone fingerprint, prompt mode and P.

    Writes are atomic (entry files first, then ``bank.json``), so an interrupted ``add`` leaves
    ``bank.json`` as it was; files without a row are removed by the next ``add``. Writers in other
    processes wait for each other (:meth:`_locked`); readers read one atomically replaced index.
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
        if isinstance(index, dict) and index.get("format") == "centerprompt-bank/1":
            raise ValueError(f"{self.index_path}: bank of format centerprompt-bank/1 (encoder-feature routing keys); "
                             f"rebuild it with `centerprompt bank add` for {BANK_FORMAT}.")  # fmt: skip
        if not isinstance(index, dict) or index.get("format") != BANK_FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise ValueError(f"{self.index_path}: not a {BANK_FORMAT} file (format is {found!r}).")
        for i, e in enumerate(index.get("entries", [])):
            if not isinstance(e, dict) or set(e) != _ENTRY_FIELDS:
                raise ValueError(f"{self.index_path}: entry {i} does not have the fields {sorted(_ENTRY_FIELDS)}.")
            try:  # as strict as on `bank add`: a name becomes a folder or file name (bank export's out/CENTER)
                validate_center(e["center"])
            except ValueError as err:
                raise ValueError(f"{self.index_path}: entry {i}: {err}") from None
            self._file(e["center"], e["file"])
            if e["key_file"] is not None:
                self._file(e["center"], e["key_file"])
        return index

    def _file(self, center: Any, name: Any) -> Path:
        """``BANK/name`` of entry ``center``, refused unless ``name`` is a plain entry file name that
        resolves inside the folder (no ``..``, absolute path or symlink out): a crafted ``bank.json``
        must make neither ``remove`` delete nor ``load`` read a file elsewhere."""
        folder = self.path.resolve()
        if isinstance(name, str) and _ENTRY_FILE_RE.fullmatch(name) and (folder / name).resolve().parent == folder:
            return folder / name
        where = f" ({(folder / name).resolve()})" if isinstance(name, str) else ""
        raise ValueError(
            f"{self.index_path}: entry {center!r} names {name!r}{where}, not an entry file inside bank folder "
            f"{folder}; refusing to read or delete it."
        )

    def _require_folder(self) -> None:
        """Refuse a missing bank folder, so a mistyped ``--bank`` is an error and not an empty bank."""
        if not self.path.is_dir():
            raise ValueError(f"bank folder {self.path} does not exist.")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[float]:
        """Hold the bank's exclusive lock while the block runs; yield the time it was taken.

        The lock is ``flock`` on the bank folder itself (created if absent): no lock file to
        leave behind or delete by mistake. Closing the descriptor releases it, also when the
        process dies. Local Linux filesystems only (NFS refuses flock on a directory).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield time.time()
        finally:
            os.close(fd)

    def _write(self, index: dict[str, Any]) -> None:
        with atomic_path(self.index_path) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")

    def entries(self) -> list[BankEntry]:
        """The centers' rows, in the order they were added; a missing folder is an error, not an empty bank."""
        self._require_folder()
        return [BankEntry(**e) for e in self._read()["entries"]]

    def names(self) -> list[str]:
        return [e.center for e in self.entries()]

    def _clean_orphans(self, index: dict[str, Any], locked_at: float) -> None:
        """Remove entry and temporary files left by an interrupted add: no row in ``index`` and last
        written before ``locked_at``, when this writer took the lock. Writers write files only while
        holding the lock, so such a file belongs to no live writer; the age test also spares a file
        that a writer not taking the lock (an older centerprompt) is writing right now."""
        keep = {e["file"] for e in index["entries"]} | {e["key_file"] for e in index["entries"] if e["key_file"]}
        for p in self.path.iterdir():
            orphan = p.name not in keep and (_ENTRY_FILE_RE.fullmatch(p.name) or _TMP_FILE_RE.fullmatch(p.name))
            if orphan and p.is_file() and p.stat().st_mtime < locked_at:
                logger.info("removing %s (left by an interrupted add)", p)
                p.unlink(missing_ok=True)

    def check(self, center: str, adapter: str | Path) -> dict[str, Any]:
        """Refuse (ValueError) what ``add`` would refuse; return the adapter's metadata."""
        center, adapter = validate_center(center), Path(adapter)
        index = self._read()
        if any(e["center"] == center for e in index["entries"]):
            raise ValueError(f"center {center} is already in bank {self.path}; remove it first to replace it.")
        meta = read_adapter_metadata(adapter)
        bankable = bankable_names()  # an unregistered strategy is not bankable either
        if meta["strategy"] not in bankable or not all(is_added_tensor(n) for n in meta["tensors"]):
            raise ValueError(
                f"{adapter}: strategy {meta['strategy']!r} changes backbone weights; only {', '.join(bankable)} "
                "adapters leave the backbone untouched and can be banked."
            )
        fp, config = meta["backbone_fingerprint"], meta["config"]
        if index["backbone_fingerprint"] not in (None, fp):
            raise ValueError(
                f"{adapter}: adapter was trained on backbone {fp}, bank {self.path} holds backbone "
                f"{index['backbone_fingerprint']}."
            )
        if index["config"] is not None:
            banked = {**index["config"], **adapter_fields(index["config"])}  # a bank from before a field existed
            diff = [k for k in config if k != "prompt_dropout" and banked.get(k) != config[k]]
            if diff:
                shown = ", ".join(f"{k}={config[k]} (bank: {index['config'].get(k)})" for k in diff)
                raise ValueError(f"{adapter}: adapter does not fit bank {self.path}: {shown}.")
        return meta

    def add(self, center: str, adapter: str | Path, key: RoutingKey | None = None) -> BankEntry:
        """Copy a prompt-only adapter into the bank as ``center``, with its routing key if given.

        Checked once before the lock (a refused add creates no folder) and again under it, where
        the whole read-modify-write of ``bank.json`` and the orphan clean-up happen, so concurrent
        adds of different centers all land and two adds of one center cannot both succeed.
        """
        meta, adapter = self.check(center, adapter), Path(adapter)
        adapted = meta["extra"].get("center")
        if adapted is not None and center not in split_centers(str(adapted)):
            logger.warning("%s was adapted to %s, banked as %s", adapter, adapted, center)
        with self._locked() as locked_at:
            return self._add_locked(center, adapter, key, locked_at)

    def _add_locked(self, center: str, adapter: Path, key: RoutingKey | None, locked_at: float) -> BankEntry:
        meta = self.check(center, adapter)  # again: another writer may have changed the bank meanwhile
        fp, config = meta["backbone_fingerprint"], meta["config"]
        index = self._read()
        self._clean_orphans(index, locked_at)
        entry = BankEntry(center=center, file=f"{center}.safetensors", key_file=None, routing=None,
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          strategy=meta["strategy"], bytes=adapter.stat().st_size)  # fmt: skip
        with atomic_path(self.path / entry.file) as tmp:
            shutil.copyfile(adapter, tmp)
        if key is not None:
            entry = replace(entry, key_file=f"{center}.key.safetensors", routing=key.stats())
            with atomic_path(self.path / entry.key_file) as tmp:
                tensors = [torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1)) for v in
                           (key.mean, key.var, key.scale)]  # fmt: skip
                save_file(dict(zip(KEY_TENSORS, tensors)), str(tmp),
                          metadata={"format": KEY_FORMAT, "center": center, "distance": DISTANCE,
                                    "features": ",".join(FEATURES), "n_cases": str(key.n_cases)})  # fmt: skip
        index.update(backbone_fingerprint=fp, config=config, prompt_mode=config["prompt_mode"],
                     num_prompts=config["num_prompts"])  # fmt: skip
        index["entries"].append(asdict(entry))
        self._write(index)
        logger.info("banked %s from %s (%s, key: %s)", center, adapter, meta["strategy"], key is not None)
        return entry

    def remove(self, center: str) -> None:
        """Delete the row (bank.json first, so a crash leaves only an orphan file), then the files;
        under the writers' lock, so a concurrent add neither loses this removal nor is lost by it."""
        self._require_folder()
        with self._locked():
            index = self._read()
            rows = [e for e in index["entries"] if e["center"] == center]
            if not rows:
                known = ", ".join(e["center"] for e in index["entries"]) or "none"
                raise ValueError(f"center {center!r} is not in bank {self.path} (centers: {known}).")
            index["entries"] = [e for e in index["entries"] if e["center"] != center]
            if not index["entries"]:  # an empty bank accepts any backbone again
                index.update(backbone_fingerprint=None, config=None, prompt_mode=None, num_prompts=None)
            self._write(index)
            for name in (rows[0]["file"], rows[0]["key_file"]):
                if name:
                    self._file(center, name).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> LoadedBank:
        """Every entry's prompts, stacked (K, S, P, C), after checking it fits ``model``'s backbone."""
        bank = cls(path)
        bank._require_folder()
        index = bank._read()  # once: a concurrent add must not change the entries between two reads
        entries = [BankEntry(**e) for e in index["entries"]]
        if not entries:
            raise ValueError(f"bank {bank.path} is empty (no {BANK_FILE} or no entries).")
        found = backbone_fingerprint(model)
        config = getattr(model, "config", {})
        diff = [k for k in index["config"] if k not in ADAPTER_FIELDS and config.get(k) != index["config"][k]]
        if diff:
            raise ValueError(f"bank {bank.path} was built for another backbone configuration ({', '.join(diff)}).")
        stacked: dict[str, list[torch.Tensor]] = {}
        keys = {}
        for e in entries:
            file = bank._file(e.center, e.file)
            expected = read_adapter_metadata(file)["backbone_fingerprint"]
            if expected != found:
                raise ValueError(
                    f"{file}: adapter was trained on backbone {expected}, this model's backbone is {found}."
                )
            tensors = load_file(str(file))
            if stacked and set(tensors) != set(stacked):
                raise ValueError(f"{file}: holds other tensors than the bank's other entries ({sorted(stacked)}).")
            for name, tensor in tensors.items():
                stacked.setdefault(name, []).append(tensor.float())
            if e.key_file:
                keys[e.center] = _read_key(bank._file(e.center, e.key_file))
        return LoadedBank(
            names=[e.center for e in entries], tensors={n: torch.stack(t) for n, t in stacked.items()}, keys=keys,
            fields={**adapter_fields(index["config"]), "prompt_dropout": 0.0},
        )  # fmt: skip


def _read_key(path: Path) -> RoutingKey:
    """A key file's summary statistics, refused (one sentence) unless it holds this version's features."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != KEY_FORMAT or meta.get("features") != ",".join(FEATURES):
            raise ValueError(f"{path}: routing key of another format or feature set than {KEY_FORMAT}; "
                             "remove the center and add it again with --data and --base.")  # fmt: skip
        mean, var, scale = (f.get_tensor(name).double().numpy() for name in KEY_TENSORS)
    return RoutingKey(mean=mean, var=var, scale=float(scale[0]), n_cases=int(meta["n_cases"]))
