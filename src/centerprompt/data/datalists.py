"""The layouts users arrive with beside HECKTOR's: an nnU-Net v2 raw dataset and a MONAI datalist JSON.

nnU-Net v2 (``nnUNet_raw/DatasetXXX_Name``): ``dataset.json`` names the channels
(``channel_names``: one CT, one PET/PT, any order), the labels (``labels``: background 0, GTVp 1,
GTVn 2, under any names that say so) and the ``file_ending``; images are
``imagesTr/CASE_0000.nii.gz`` (channel 0), ``CASE_0001.nii.gz`` (channel 1), labels
``labelsTr/CASE.nii.gz`` (and ``imagesTs/`` for unlabelled cases).

MONAI datalist (``load_decathlon_datalist``): a JSON file whose ``training`` (and optional
``validation``/``test``) items hold ``ct`` and ``pet`` (or ``image`` as [CT, PET]), ``label``
(optional) and ``center`` (optional), paths relative to the JSON file's folder.

A case's center is its ``center`` field, else the prefix of its ID before the first ``-`` or ``_``
(``CHUM-001``, ``CHUM_001``): centers are what centerprompt adapts to, so every case needs one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from centerprompt.data.cases import Case, DataError

logger = logging.getLogger(__name__)

CENTER_PREFIX = re.compile(r"^(?P<center>[A-Za-z0-9]+)[-_].+$")
NNUNET_CHANNELS = {"ct": ("ct",), "pet": ("pet", "pt", "suv")}  # channel names (lower case) per modality
LABEL_NAMES = {1: ("gtvp", "primary", "tumour", "tumor"), 2: ("gtvn", "node", "lymph")}  # words a label name holds


def detect_layout(path: Path) -> str:
    """``"datalist"`` (a JSON file), ``"nnunet"`` (a folder with an nnU-Net v2 dataset.json) or ``"hecktor"``."""
    if path.is_file() and path.suffix == ".json":
        return "datalist"
    dataset = path / "dataset.json"
    if dataset.is_file():
        try:
            if "channel_names" in json.loads(dataset.read_text()):
                return "nnunet"
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return "hecktor"


def describe_layout(path: Path) -> str:
    """One line saying how ``path`` is read (what ``check-data`` prints first)."""
    layout = detect_layout(path)
    if layout == "datalist":
        return f"{path}: a MONAI datalist JSON (ct, pet, label and center of each item; paths relative to its folder)"
    if layout == "nnunet":
        dataset = _read_json(path / "dataset.json")
        channels = _nnunet_channels(dataset, path / "dataset.json")
        return (f"{path}: an nnU-Net v2 raw dataset ({dataset.get('name', path.name)}): CT is channel "
                f"_{channels['ct']}, PET channel _{channels['pet']}, labels {dataset.get('labels')}, "
                f"numTraining {dataset.get('numTraining', '?')}; centers from the case IDs (CENTER-ID)")
    return f"{path}: the HECKTOR 2022 layout (imagesTr/<CENTER>-<ID>__CT|__PT.nii.gz, labelsTr/<CENTER>-<ID>.nii.gz)"


def _center(case_id: str, given: Any, source: str) -> str:
    if given:
        return str(given)
    m = CENTER_PREFIX.match(case_id)
    if not m:
        raise DataError(f"{source}: case {case_id!r} names no center; name cases <CENTER>-<ID> (CHUM-001) or give "
                        "each item a \"center\".")  # fmt: skip
    return m["center"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err}).") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _nnunet_channels(dataset: dict[str, Any], path: Path) -> dict[str, str]:
    """{"ct": "0000", "pet": "0001"}: the file suffix of each modality, from ``channel_names``."""
    names = {str(k): str(v).strip().lower() for k, v in dataset.get("channel_names", {}).items()}
    found = {}
    for modality, words in NNUNET_CHANNELS.items():
        index = [k for k, v in names.items() if v in words]
        if len(index) != 1:
            raise DataError(f"{path}: channel_names {dataset.get('channel_names')} must name one CT and one PET "
                            "channel (e.g. {\"0\": \"CT\", \"1\": \"PET\"}).")  # fmt: skip
        found[modality] = f"{int(index[0]):04d}"
    return found


def nnunet_channels(dataset_json: Path) -> dict[str, str]:
    """{"ct": "0000", "pet": "0001"} as an nnU-Net ``dataset.json`` names its channels."""
    return _nnunet_channels(_read_json(dataset_json), dataset_json)


def _check_nnunet_labels(dataset: dict[str, Any], path: Path) -> None:
    labels = {str(k).lower(): v for k, v in dataset.get("labels", {}).items()}
    values = {v for v in labels.values() if isinstance(v, int)}
    if values != {0, 1, 2}:
        raise DataError(f"{path}: labels {dataset.get('labels')} must be background 0, GTVp 1, GTVn 2.")
    for value, words in LABEL_NAMES.items():
        name = next(k for k, v in labels.items() if v == value)
        if not any(w in name for w in words):
            raise DataError(f"{path}: label {value} is called {name!r}; centerprompt segments GTVp as 1 and GTVn "
                            "as 2 (rename the labels if they mean these).")  # fmt: skip


def scan_nnunet(root: Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """The cases of an nnU-Net v2 raw dataset folder, and per-case problems (missing channel files)."""
    path = root / "dataset.json"
    dataset = _read_json(path)
    channels = _nnunet_channels(dataset, path)
    _check_nnunet_labels(dataset, path)
    ending = str(dataset.get("file_ending", ".nii.gz"))
    cases, problems = [], []
    for images, labels in ((root / "imagesTr", root / "labelsTr"), (root / "imagesTs", None)):
        if not images.is_dir():
            continue
        ids = sorted({p.name[: -len(ending) - 5] for p in images.glob(f"*_[0-9][0-9][0-9][0-9]{ending}")})
        for case_id in ids:
            ct, pet = (images / f"{case_id}_{channels[m]}{ending}" for m in ("ct", "pet"))
            label = labels / f"{case_id}{ending}" if labels is not None else None
            missing = [str(p) for p in (ct, pet) if not p.is_file()]
            if missing:
                problems.append((case_id, f"{case_id}: missing {', '.join(missing)}"))
                continue
            center = _center(case_id, None, str(path))
            cases.append(Case(case_id, center, ct, pet, label if label is not None and label.is_file() else None))
    if not cases and not problems:
        raise DataError(f"{root}: an nnU-Net dataset without cases (imagesTr/CASE_{channels['ct']}{ending}).")
    expected = dataset.get("numTraining")
    training = sum(c.label is not None for c in cases)
    if isinstance(expected, int) and expected != training:
        logger.warning("%s: numTraining is %d, labelsTr holds %d labelled cases", path, expected, training)
    return cases, problems


def scan_datalist(path: Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """The cases of a MONAI datalist JSON (every list it holds), and per-case problems."""
    from monai.data import load_decathlon_datalist

    data = _read_json(path)
    sections = [k for k in ("training", "validation", "test") if isinstance(data.get(k), list)]
    if not sections:
        raise DataError(f"{path}: a datalist holds a \"training\" (or \"validation\", \"test\") list of items.")
    cases, problems, seen = [], [], set()
    for section in sections:
        items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=section,
                                        base_dir=str(path.parent))  # fmt: skip
        for n, item in enumerate(items):
            image = item.get("image")
            ct, pet = (item.get("ct"), item.get("pet")) if "ct" in item else (image or [None, None])[:2]
            label = item.get("label")
            case_id = str(item.get("case_id") or Path(str(label or ct)).name.split(".nii")[0].removesuffix("__CT"))
            if not ct or not pet:
                problems.append((case_id, f"{path}: item {n} of {section} needs \"ct\" and \"pet\" (or \"image\": [CT, PET])"))
                continue
            if case_id in seen:
                problems.append((case_id, f"{path}: case {case_id} listed twice"))
                continue
            seen.add(case_id)
            missing = [str(p) for p in (ct, pet, label) if p and not Path(p).is_file()]
            if missing:
                problems.append((case_id, f"{case_id}: missing {', '.join(missing)} (listed in {path})"))
                continue
            cases.append(Case(case_id, _center(case_id, item.get("center"), str(path)), Path(ct), Path(pet),
                              Path(label) if label else None))  # fmt: skip
    return cases, problems
