"""A center's model as a MONAI Bundle, the format hospitals deploy through (MONAI Bundle, Deploy, Label).

:func:`export_bundle` writes one folder that needs only MONAI and PyTorch (plus nibabel to read NIfTI)::

    OUT/configs/logging.conf    the logging configuration MONAI's bundle runner reads
    OUT/configs/metadata.json   MONAI's metadata fields; "centerprompt": center, strategy, P, backbone
                                fingerprint, preprocessing and what the base and the adapter were trained on
    OUT/configs/inference.json  ``python -m monai.bundle run``: centerprompt's preprocessing as MONAI transforms,
                                SlidingWindowInferer, softmax + argmax, Invertd, SaveImaged on the CT grid
    OUT/models/model.ts         the adapted network traced with TorchScript: takes (B, 2, *roi) CT+PET windows and
                                returns logits (B, 3, *roi); prompts (and head, LoRA, biases) are its own tensors
    OUT/models/model.pt         the same tensors as a state dict (weights only), loaded into model.ts at start-up
    OUT/scripts/steps.py        the head-and-neck crop (``select_fn`` of CropForegroundd) and the output names,
                                copied from centerprompt's own functions; imports no centerprompt
    OUT/docs/README.md, LICENSE

The bundle reproduces ``centerprompt predict``: the same transforms with the same arguments, the same
window, overlap and blending, softmax before argmax, and the same inversion onto the CT grid
(nearest neighbour), so its label maps equal predict's voxel for voxel.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from centerprompt.artifacts import backbone_fingerprint, build_adapted_model, read_adapter_metadata
from centerprompt.bank.storage import PromptBank
from centerprompt.checkpoints import SHOWN_PREPROCESS, BaseCheckpoint, BaseLike
from centerprompt.training.config import file_sha256
from centerprompt.data.labels import LABEL_NAMES
from centerprompt.data.transforms import PreprocessConfig, head_neck_mask
from centerprompt.evaluate import sliding_window_predict
from centerprompt.files import atomic_path, check_output, write_json
from centerprompt.runs.base import IN_CHANNELS, OUT_CHANNELS, open_base
from centerprompt.scoring import SW_BATCH

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export needs
# Where MONAI's model zoo points its bundles' metadata; verify_metadata downloads it from there.
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
CENTERPROMPT_VERSION = importlib.metadata.version("centerprompt")
OVERLAP = inspect.signature(sliding_window_predict).parameters["overlap"].default  # what predict uses
SCRIPTS_MODULE = "scripts.steps"  # the bundle root is on sys.path while `monai.bundle run` runs


def case_output_name(metadict: dict[str, Any], saver: Any) -> dict[str, Any]:
    """SaveImaged's ``output_name_formatter`` in a bundle: ``ID.nii.gz`` for ``ID__CT.nii.gz``, as
    ``centerprompt predict --input`` names its outputs (copied into the bundle's scripts/)."""
    name = Path(str(metadict["filename_or_obj"])).name
    return {"subject": name.split("__CT")[0], "idx": metadict.get("patch_index")}


def _scripts_source() -> str:
    """scripts/steps.py: the source of centerprompt's own functions, so the bundle crops exactly as predict does."""
    functions = "\n\n".join(inspect.getsource(f) for f in (head_neck_mask, case_output_name))
    return (f'"""Steps of this bundle that MONAI does not provide, copied from centerprompt {CENTERPROMPT_VERSION}\n'
            '(which this file does not import).\n\nhead_neck_mask: select_fn of CropForegroundd, the head-and-neck '
            'crop found from the body outline.\ncase_output_name: output_name_formatter of SaveImaged.\n"""\n\n'
            "from __future__ import annotations\n\nimport logging\nfrom pathlib import Path\nfrom typing import Any\n\n"
            f"import torch\n\nlogger = logging.getLogger(__name__)\n\n\n{functions}")  # fmt: skip


# ----------------------------------------------------------------------------- configs


def inference_config(preprocess: PreprocessConfig) -> dict[str, Any]:
    """configs/inference.json: centerprompt's inference preprocessing (``transforms._deterministic``) as
    MONAI config components, then the sliding window, softmax, argmax, inversion and saving of ``predict``.

    The CT is kept beside the stacked "image" (centerprompt deletes it): Invertd finds the CT's
    operations under "ct", the key its transforms were applied to.
    """
    keys, crop = ["ct", "pet"], preprocess.crop_voxels
    low, high = preprocess.ct_window
    mask = {"_target_": f"{SCRIPTS_MODULE}.head_neck_mask", "_mode_": "callable", "threshold": preprocess.body_hu,
            "depth": crop[2] if crop else None}  # fmt: skip
    transforms = [
        {"_target_": "LoadImaged", "keys": keys, "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys, "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "ResampleToMatchd", "keys": "pet", "key_dst": "ct", "mode": "bilinear", "padding_mode": "zeros",
         "_desc_": "PET onto the CT grid; no uptake outside the PET's field of view"},
        {"_target_": "Spacingd", "keys": keys, "pixdim": list(preprocess.spacing), "mode": ["bilinear", "bilinear"]},
        {"_target_": "CropForegroundd", "keys": keys, "source_key": "ct", "select_fn": mask, "allow_smaller": True,
         "start_coord_key": None, "end_coord_key": None,
         "_desc_": "head and neck: the body (CT above body_hu) in the top crop_mm[2] mm (scripts/steps.py)"},
        {"_target_": "CenterSpatialCropd", "keys": keys, "roi_size": [crop[0], crop[1], -1] if crop else -1},
        {"_target_": "ScaleIntensityRanged", "keys": "ct", "a_min": low, "a_max": high, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
        {"_target_": "ScaleIntensityRanged", "keys": "pet", "a_min": 0.0, "a_max": preprocess.suv_max, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": list(preprocess.roi_size)},
        {"_target_": "ConcatItemsd", "keys": keys, "name": "image"},
        {"_target_": "DeleteItemsd", "keys": "pet"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]  # fmt: skip
    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "ct",
         "nearest_interp": True, "_desc_": "back onto the CT grid, labels by nearest neighbour"},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
         "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
         "output_name_formatter": {"_target_": f"{SCRIPTS_MODULE}.case_output_name", "_mode_": "callable"}},
    ]  # fmt: skip
    models = "os.path.join(@bundle_root, 'models', '{}')"
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "input_dir": "$os.path.join(@bundle_root, 'input')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$[{'ct': ct, 'pet': ct.replace('__CT.nii', '__PT.nii')} "
                    "for ct in sorted(glob.glob(os.path.join(@input_dir, '*__CT.nii*')))]",
        "network_def": f"$torch.jit.load({models.format('model.ts')}, map_location='cpu')",
        "checkpoint": f"$torch.load({models.format('model.pt')}, map_location='cpu', weights_only=True)",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(preprocess.roi_size),
                    "sw_batch_size": SW_BATCH, "overlap": OVERLAP, "mode": "constant"},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "initialize": ["$torch.set_grad_enabled(False)", "$@network_def.load_state_dict(@checkpoint)"],
        # Case by case; clear() drops each case's volumes once written, so no case stays in memory.
        "run": ["$[@postprocessing({**item, 'pred': @inferer(item['image'][None].to(@device), @network)[0]}).clear() "
                "for item in @dataset]"],
    }  # fmt: skip


def bundle_metadata(
    base: BaseCheckpoint, adapter_meta: dict[str, Any] | None, center: str | None, fingerprint: str, version: str
) -> dict[str, Any]:  # fmt: skip
    """configs/metadata.json: the fields MONAI's metadata schema requires, and what centerprompt knows of the model."""
    p = base.preprocess
    strategy = adapter_meta["strategy"] if adapter_meta else "none"
    num_prompts = adapter_meta["num_prompts"] if adapter_meta else 0
    trained = {k: v for k, v in base.extra.items() if k in ("preset", "train_centers", "exclude_center",
                                                              "oracle_shots")}  # fmt: skip
    adapted = None
    if adapter_meta:
        adapted = {k: v for k, v in adapter_meta["extra"].items() if k in ("center", "shots", "splits_sha256")}
    window = list(p.roi_size)
    channels = {str(v): name for v, name in LABEL_NAMES.items()}
    who = f"center {center}" if center else "the base model (no center's adapter)"
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by centerprompt {CENTERPROMPT_VERSION}"},
        "monai_version": importlib.metadata.version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nib.__version__},  # MONAI 1.6 renames "optional_..." to this
        "task": f"Head-and-neck tumour segmentation (GTVp, GTVn) in PET/CT for {who}",
        "description": f"UNETR (MONAI) adapted to {who} with the {strategy!r} strategy of centerprompt "
                       f"(P={num_prompts} prompt tokens), folded into one TorchScript network.",
        "authors": "exported with centerprompt; the model's authors are those who trained it",
        "copyright": "see LICENSE",
        "data_type": "nibabel",
        "image_classes": f"2 channels: CT (HU window {list(p.ct_window)} scaled to [0, 1]) and PET resampled onto the "
                         f"CT grid (SUV [0, {p.suv_max}] scaled to [0, 1]), at {list(p.spacing)} mm",
        "pred_classes": "3 channels of logits: 0 background, 1 GTVp (primary tumour), 2 GTVn (lymph nodes)",
        "intended_use": "research; not validated for clinical use",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CT+PET", "num_channels": IN_CHANNELS,
                "spatial_shape": window, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {"0": "CT", "1": "PET"}}},
            "outputs": {"pred": {
                "type": "image", "format": "labels", "num_channels": OUT_CHANNELS, "spatial_shape": window,
                "dtype": "float32", "value_range": [], "is_patch_data": True, "channel_def": channels}},
        },
        "centerprompt": {
            "version": CENTERPROMPT_VERSION, "center": center, "strategy": strategy, "num_prompts": num_prompts,
            "backbone_fingerprint": fingerprint, "base_sha256": file_sha256(base.weights),
            "preprocess": {k: p.to_dict()[k] for k in SHOWN_PREPROCESS},
            "sliding_window": {"roi_size": window, "sw_batch_size": SW_BATCH, "overlap": OVERLAP, "mode": "constant"},
            "pretraining": trained, "adaptation": adapted,
        },
    }  # fmt: skip


def _readme(metadata: dict[str, Any]) -> str:
    cp = metadata["centerprompt"]
    p, crop = cp["preprocess"], cp["preprocess"]["crop_mm"]
    region = f"the top {crop[2]:g} mm of the body, {crop[0]:g} x {crop[1]:g} mm in plane" if crop else "the body"
    return f"""# {metadata["task"]}

{metadata["description"]} Exported by centerprompt {cp["version"]}; needs MONAI {metadata["monai_version"]}+,
PyTorch and nibabel, not centerprompt.

## Run

Put each case as `ID__CT.nii.gz` and `ID__PT.nii.gz` (PET in SUV) in one folder, then from this folder:

```bash
python -m monai.bundle run --config_file configs/inference.json --input_dir /path/to/cases --output_dir /path/to/out
```

`python -m monai.bundle` needs the `fire` package (`pip install fire`); from Python:
`monai.bundle.run(config_file="configs/inference.json", input_dir=..., output_dir=...)`. Each case gives
`ID.nii.gz`, a uint8 label map on the CT grid: 0 background, 1 GTVp, 2 GTVn. From another folder, add
`--bundle_root /path/to/this/bundle`.

## What it does

The steps of `centerprompt predict`, as MONAI transforms with the same arguments: PET resampled onto the CT grid,
spacing {p["spacing"]} mm, head-and-neck crop ({region}; body: CT above {p["body_hu"]:g} HU), CT window
{p["ct_window"]} HU and PET SUV [0, {p["suv_max"]}] scaled to [0, 1], sliding windows of {p["roi_size"]} voxels
(overlap {cp["sliding_window"]["overlap"]}, constant blending), softmax and argmax, and the label map inverted onto
the CT grid by nearest neighbour. The crop is the one step MONAI has no transform for: it is
`scripts/steps.py` (a copy of centerprompt's function, imported through the bundle root, which
`monai.bundle run` puts on `sys.path`).

`models/model.ts` is the adapted network traced with TorchScript (center {cp["center"]}, strategy
{cp["strategy"]}, P={cp["num_prompts"]}): its prompts are tensors of the module, so it takes only the image
window. `models/model.pt` holds the same tensors as a state dict, loaded into it at start-up.
Backbone fingerprint: {cp["backbone_fingerprint"]}.

Not validated for clinical use.
"""


# configs/logging.conf as MONAI's model-zoo bundles ship it: `monai.bundle run` reads it (and warns without it).
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE_TEXT = """The configs and scripts/ of this bundle come from centerprompt (Apache License 2.0).
The model weights (models/) are licensed by whoever trained them; add their terms here before sharing them.
"""


# ----------------------------------------------------------------------------- export


def fold(model: torch.nn.Module, roi_size: Sequence[int]) -> torch.jit.ScriptModule:
    """The adapted model traced with TorchScript in eval mode: (B, 2, *roi) -> logits (B, 3, *roi).

    Tracing fixes ``prompts=None``, so the learned prompts become the module's own tensors. The
    trace is checked against the model on a batch of another size (the batch dimension must stay
    free: the inferer sends up to ``SW_BATCH`` windows at once).
    """
    model = model.eval().cpu()
    example = torch.rand(1, IN_CHANNELS, *roi_size)
    with warnings.catch_warnings(), torch.no_grad():
        # Shape checks (prompt batch, instance norm's input size) become constants: they held when tracing.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.*deprecated")  # see _write
        traced = torch.jit.trace(model, example, check_trace=False)
        check = torch.rand(2, IN_CHANNELS, *roi_size)
        expected, found = model(check), traced(check)
    if not torch.allclose(expected, found, rtol=1e-4, atol=1e-5):
        gap = float((expected - found).abs().max())
        raise RuntimeError(f"the TorchScript trace differs from the model (largest difference {gap:.3g}).")
    return traced


def check_out(out: str | Path) -> Path:
    """Refuse what :func:`centerprompt.files.check_output` refuses of a folder, and a non-empty folder
    (a bundle is written whole, never into another)."""
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; give a new folder for the bundle.")
    return check_output(out, "folder")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None] if fmt == "onnx" else []
    if missing:
        raise ValueError(f"--format onnx needs {' and '.join(ONNX_PACKAGES)} (PyTorch's exporter), and "
                         f"{', '.join(missing)} is not installed; the default TorchScript bundle needs only MONAI "
                         "and PyTorch.")  # fmt: skip


def _write(folder: Path, files: dict[str, str], traced: torch.jit.ScriptModule, metadata: dict[str, Any]) -> None:
    from monai.data import save_net_with_metadata

    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    write_json(metadata, folder / "configs" / "metadata.json")
    (folder / "models").mkdir()
    extra = {"inference.json": files["configs/inference.json"].encode()}
    with warnings.catch_warnings():  # PyTorch deprecates TorchScript; MONAI bundles (model.ts) still use it
        warnings.filterwarnings("ignore", message=".*torch.jit.save.*deprecated")
        save_net_with_metadata(traced, str(folder / "models" / "model.ts"), meta_values=metadata,
                               more_extra_files=extra)  # fmt: skip
    state = {k: v.detach().cpu().contiguous() for k, v in traced.state_dict().items()}
    torch.save(state, folder / "models" / "model.pt")


def export_bundle(
    base: BaseLike, out: str | Path, *, adapter: str | Path | None = None, center: str | None = None,
    fmt: str = "torchscript", version: str = "0.1.0",
) -> Path:  # fmt: skip
    """Write the MONAI Bundle of ``base`` with ``adapter`` (or alone) into the new folder ``out``.

    ``center`` names the center (default: the one the adapter was adapted to). The base is read as
    ``predict`` reads it (:func:`centerprompt.runs.base.open_base`), so the bundle uses the same
    preprocessing. The folder is written beside ``out`` and renamed into place when complete.
    """
    out = check_out(out)
    _check_format(fmt)
    if adapter is not None and not Path(adapter).is_file():
        raise FileNotFoundError(f"{adapter}: no such adapter file.")
    ckpt = open_base(base, adapter)
    adapter_meta = read_adapter_metadata(adapter) if adapter is not None else None
    model = build_adapted_model(ckpt, adapter)
    center = center or (adapter_meta["extra"].get("center") if adapter_meta else None)
    fingerprint = adapter_meta["backbone_fingerprint"] if adapter_meta else backbone_fingerprint(model)
    traced = fold(model, ckpt.preprocess.roi_size)
    metadata = bundle_metadata(ckpt, adapter_meta, center, fingerprint, version)
    files = {"configs/inference.json": json.dumps(inference_config(ckpt.preprocess), indent=2) + "\n",
             "configs/logging.conf": LOGGING_CONF, "scripts/__init__.py": "", "scripts/steps.py": _scripts_source(),
             "docs/README.md": _readme(metadata),
             "LICENSE": LICENSE_TEXT}  # fmt: skip
    with atomic_path(out) as tmp:
        try:
            _write(tmp, files, traced, metadata)
            if fmt == "onnx":
                _write_onnx(model, ckpt.preprocess.roi_size, tmp / "models" / "model.onnx")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # atomic_path removes files only
            raise
        if out.is_dir():
            out.rmdir()  # empty (check_out): the rename replaces it
    logger.info("bundle of %s written to %s", center or "the base model", out)
    return out


def _write_onnx(model: torch.nn.Module, roi_size: Sequence[int], path: Path) -> None:
    """models/model.onnx beside model.ts (MONAI's optional ONNX file), batch dimension free."""
    example = torch.rand(2, IN_CHANNELS, *roi_size)
    batch = {0: torch.export.Dim("batch", min=1, max=1024)}
    try:
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["image"], output_names=["pred"],
                          dynamic_shapes=(batch,), external_data=False, verbose=False)  # fmt: skip
    except Exception as err:  # the exporter's errors vary by version; all mean this network did not export
        raise ValueError(f"ONNX export failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from err


def export_bank(
    base: BaseLike, bank: str | Path, out: str | Path, *, centers: Sequence[str] | None = None,
    fmt: str = "torchscript", version: str = "0.1.0",
) -> list[Path]:  # fmt: skip
    """One bundle per banked center (or per center of ``centers``), in ``out/CENTER``."""
    out = check_out(out)
    _check_format(fmt)
    files = bank_adapters(bank, centers)
    base = open_base(base)
    return [export_bundle(base, out / c, adapter=f, center=c, fmt=fmt, version=version) for c, f in files.items()]


def bank_adapters(bank: str | Path, centers: Sequence[str] | None = None) -> dict[str, Path]:
    """The adapter file of each banked center (of ``centers`` only, if given), by center."""
    store = PromptBank(bank)
    entries = {e.center: store.path / e.file for e in store.entries()}  # entries() refuses files outside the bank
    if not entries:
        raise ValueError(f"bank {store.path} has no centers to export.")
    unknown = [c for c in centers or () if c not in entries]
    if unknown:
        raise ValueError(f"center(s) {', '.join(unknown)} not in bank {store.path} (centers: {', '.join(entries)}).")
    return {c: entries[c] for c in (centers or entries)}
