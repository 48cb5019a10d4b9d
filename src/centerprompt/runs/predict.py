"""Predicting label maps for new scans: outputs checked before any work, each input pair checked
as ``check-data`` checks it, the label map written on the CT grid."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from centerprompt.artifacts import build_adapted_model
from centerprompt.checkpoints import BaseCheckpoint, BaseLike
from centerprompt.data.checks import check_pair
from centerprompt.data.cases import DataError
from centerprompt.data.transforms import (
    PreprocessConfig,
    inference_transforms,
    probabilities_path,
    save_prediction,
)
from centerprompt.data.transforms import save_probabilities as save_probabilities_file
from centerprompt.evaluate import mirrored_predict, sliding_window_predict
from centerprompt.files import bars, check_output
from centerprompt.runs.base import check_adapter_preprocess, open_base
from centerprompt.scoring import SW_BATCH
from centerprompt.training.devices import default_device

logger = logging.getLogger(__name__)


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


def check_prediction_outputs(
    pairs: Sequence[tuple[str | Path, str | Path, str | Path]], *, overwrite: bool = False, probabilities: bool = False
) -> None:
    """Before any work: every output of ``pairs`` (CT, PET, output; with ``probabilities`` also its
    probabilities file) can be written (:func:`check_prediction_out`), none is an input image, and
    none exists unless ``overwrite`` (a prediction never silently replaces a file: a label map,
    another run's predictions)."""
    images = {Path(p).resolve() for ct, pet, _ in pairs for p in (ct, pet)}
    existing = []
    for _, _, label_map in pairs:
        for out in (label_map, probabilities_path(label_map)) if probabilities else (label_map,):
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
    input (1, 2, D, H, W) on the CPU, and the transform that inverts it.

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
        yield Path(ct), Path(out), data, data["image"].as_tensor()[None], transform


@dataclass
class Served:
    """What serves one scan: a network, its other forward arguments, and (from a bank) the center
    chosen and the routing decision behind it."""

    net: nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)
    center: str | None = None
    route: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        return {"center": self.center, "route": self.route} if self.center is not None else {}


class ModelSource(Protocol):
    """Where predictions come from (a base with or without an adapter; a bank with routing): the
    one thing :func:`predict` and :func:`~centerprompt.runs.score.evaluate` vary. Opened lazily, so
    outputs are checked before any model is read."""

    device: torch.device

    @property
    def base(self) -> BaseCheckpoint: ...

    def describe(self) -> dict[str, Any]:
        """What a result records about the source."""
        ...

    def serve(self, ct: Path, pet: Path) -> Served: ...


class AdaptedModel:
    """A base model, with an adapter if given: one network for every scan, on ``device`` (default:
    the GPU when there is one)."""

    def __init__(self, base: BaseLike, adapter: str | Path | None = None, device: torch.device | None = None) -> None:
        self._spec, self.adapter = base, adapter
        self.device = device or default_device()

    @functools.cached_property
    def base(self) -> BaseCheckpoint:
        base = open_base(self._spec, self.adapter)
        check_adapter_preprocess(base, self.adapter)
        return base

    @functools.cached_property
    def model(self) -> nn.Module:
        return build_adapted_model(self.base, self.adapter).to(self.device)

    def describe(self) -> dict[str, Any]:
        return {"base": str(self.base.path), "adapter": str(self.adapter) if self.adapter else None}

    def serve(self, ct: Path, pet: Path) -> Served:
        return Served(self.model)


def predict(
    source: ModelSource, pairs: Sequence[tuple[str | Path, str | Path, str | Path]], *, progress: bool = True,
    on_bad_case: Callable[[str], Any] | None = None, overwrite: bool = False, tta: bool = False,
    save_probabilities: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Segment each (CT, PET) pair and write the label map to its output path on the CT grid; one
    record per written prediction: input, output and, from a bank, the center used and its route.

    ``tta``: the mean of the 8 mirrored predictions (:func:`~centerprompt.evaluate.mirrored_predict`,
    8 times the time). ``save_probabilities``: also the softmax on the CT grid, ``CASE_probabilities.nii.gz``
    beside ``CASE.nii.gz`` (:func:`~centerprompt.data.transforms.save_probabilities`).
    Output paths are checked before the model is read (:func:`check_prediction_outputs`: an
    existing file is replaced only with ``overwrite``), inputs pair by pair
    (:func:`prediction_inputs`): a bad pair raises DataError and writes nothing for it, or with
    ``on_bad_case`` (e.g. a list's ``append``) is reported there and the next pair goes on.
    """
    check_prediction_outputs(pairs, overwrite=overwrite, probabilities=save_probabilities)
    preprocess = source.base.preprocess
    run = mirrored_predict if tta else sliding_window_predict
    pets = {Path(ct): Path(pet) for ct, pet, _ in pairs}
    records = []
    for ct, out, data, image, transform in prediction_inputs(pairs, preprocess, progress, on_bad_case):
        started = time.perf_counter()
        served = source.serve(ct, pets[ct])
        probs = run(served.net, image.to(source.device), preprocess.roi_size, SW_BATCH, **served.kwargs).cpu()
        record = {"ct": str(ct), "out": str(save_prediction(probs.argmax(1), data, out, transform)), **served.record()}
        if save_probabilities:
            record["probabilities"] = str(save_probabilities_file(probs, data, probabilities_path(out), transform))
        records.append(record)
        logger.info("%s -> %s%s (%.1f s)", ct, out, f" with {served.center}" if served.center else "",
                    time.perf_counter() - started)  # fmt: skip
    return records


def folder_pairs(folder: str | Path, out_dir: str | Path) -> list[tuple[Path, Path, Path]]:
    """(CT, PET, output ``CASE.nii.gz``) for every case of a folder of HECKTOR-named images
    (``CASE__CT.nii.gz``, ``CASE__PT.nii.gz``; its ``imagesTr`` when it has one) or of nnU-Net-named
    ones (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``: which channel is CT is read from the
    ``dataset.json`` beside or above them, else 0000 is CT as in nnU-Net's HECKTOR datasets)."""
    folder = Path(folder)
    images = folder / "imagesTr" if (folder / "imagesTr").is_dir() else folder
    cts = sorted(images.glob("*__CT.nii*"))
    if not cts:
        return _nnunet_pairs(images, Path(out_dir))
    pairs = []
    for ct in cts:
        case_id = ct.name.split("__CT")[0]
        # A missing PET keeps its expected name: the pair's check then names it, and only this case is skipped.
        pet = next(iter(sorted(images.glob(f"{case_id}__PT.nii*"))), images / f"{case_id}__PT.nii.gz")
        pairs.append((ct, pet, Path(out_dir) / f"{case_id}.nii.gz"))
    return pairs


def _nnunet_pairs(images: Path, out_dir: Path) -> list[tuple[Path, Path, Path]]:
    from centerprompt.data.datalists import nnunet_channels

    dataset = next((d / "dataset.json" for d in (images, images.parent) if (d / "dataset.json").is_file()), None)
    channels = nnunet_channels(dataset) if dataset is not None else {"ct": "0000", "pet": "0001"}
    cts = sorted(images.glob(f"*_{channels['ct']}.nii*"))
    if not cts:
        raise FileNotFoundError(f"{images}: no *__CT.nii.gz (HECKTOR) or *_{channels['ct']}.nii.gz (nnU-Net) files to "
                                "segment.")  # fmt: skip
    if dataset is None:
        logger.info("%s: nnU-Net names without a dataset.json: _0000 taken as CT, _0001 as PET", images)
    pairs = []
    for ct in cts:
        case_id, ending = ct.name.split(f"_{channels['ct']}.nii")[0], ".nii" + ct.name.split(".nii", 1)[1]
        pairs.append((ct, images / f"{case_id}_{channels['pet']}{ending}", out_dir / f"{case_id}.nii.gz"))
    return pairs
