"""Bring your own MONAI UNETR (issue 15): every command takes a user's MONAI checkpoint and its preprocessing.

A MONAI user has a UNETR trained in MONAI, saved with ``torch.save`` (a bare state dict, or the
dict ``CheckpointSaver`` writes) or shipped as a bundle, and a new center. Each source runs
adapt -> evaluate -> predict -> bank add end to end, the adapter is accepted against the user's
original file, and anything that is not a UNETR's weights is refused with one line naming the
file, without ever being unpickled.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.networks.nets import UNETR, UNet
from tiny import TINY

from centerprompt.artifacts import backbone_fingerprint, load_model, read_adapter_metadata, save_adapter, save_model
from centerprompt.checkpoints import BaseSpec, resolve_base
from centerprompt.cli import main
from centerprompt.training.config import AdaptRun, ExperimentRun, file_sha256
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.runs.adapt import adapt_config
from centerprompt.runs.selection import load_index
from centerprompt.strategies import apply_strategy

# 6 mm voxels and a 192 mm crop give 32^3 volumes: one window of the tiny model, and one crop per case.
COARSE = {"spacing": [6.0, 6.0, 6.0], "crop_mm": [192.0, 192.0, 192.0], "roi_size": [32, 32, 32], "num_samples": 1}
MARKER = "unpickled.marker"


class Payload:
    """A pickled object whose unpickling would create a marker file (what a malicious .pt would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def data(two_centers: Path) -> Path:
    return two_centers


@pytest.fixture(scope="module")
def unetr_state() -> dict[str, torch.Tensor]:
    """The issue's network: MONAI's UNETR at the tiny size (12 layers, patch 16: MONAI fixes them)."""
    torch.manual_seed(0)
    return UNETR(**TINY).state_dict()


def _case(data: Path) -> tuple[Path, Path]:
    ct = data / "imagesTr" / "MDA-005__CT.nii.gz"
    return ct, ct.with_name("MDA-005__PT.nii.gz")


def _write_source(kind: str, state: dict[str, torch.Tensor], root: Path) -> tuple[Path, list[str]]:
    """A user's checkpoint of ``kind`` and the flags that describe it (--model-config, --preprocess)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "coarse.json").write_text(json.dumps(COARSE))
    if kind == "state dict":  # the issue's file, with what a state dict cannot say given in files
        torch.save(state, root / "unetr.pt")
        (root / "net.yaml").write_text("num_heads: 4\n")
        return root / "unetr.pt", ["--model-config", str(root / "net.yaml"), "--preprocess", str(root / "coarse.json")]
    if kind == "CheckpointSaver dict":  # what MONAI's CheckpointSaver(save_dict={"net": ..., "optimizer": ...}) writes
        params = [torch.nn.Parameter(v.clone()) for v in state.values() if v.is_floating_point()]
        optimizer = torch.optim.Adam(params)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()  # an optimizer state as training leaves it
        torch.save({"net": state, "optimizer": optimizer.state_dict(), "epoch": 3}, root / "checkpoint_final.pth")
        flags = ["--model-config", str(root / "net.json"), "--preprocess", str(root / "coarse.json")]
        (root / "net.json").write_text(json.dumps({"num_heads": 4}))
        return root / "checkpoint_final.pth", flags
    bundle = root / "unetr_bundle"  # a minimal MONAI bundle: network and preprocessing from its configs
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    torch.save(state, bundle / "models" / "model.pt")
    inference = {
        "imports": ["$import torch"],
        "device": "$torch.device('cpu')",  # expressions are never evaluated
        "heads": 4,
        # A macro and a relative id, as MONAI's own configs write them (ConfigParser resolves both).
        "network_def": {"_target_": "monai.networks.nets.UNETR", "in_channels": 2, "out_channels": 3,
                        "img_size": "%inferer::roi_size", "feature_size": 4, "hidden_size": 48, "mlp_dim": 96,
                        "num_heads": "@##heads"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": ["ct", "pet"]},
            {"_target_": "Orientationd", "keys": ["ct", "pet"], "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": ["ct", "pet"], "pixdim": [6.0, 6.0, 6.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "ct", "a_min": -200, "a_max": 200, "b_min": 0, "b_max": 1,
             "clip": True},
            {"_target_": "ScaleIntensityRanged", "keys": "pet", "a_min": 0, "a_max": 10, "b_min": 0, "b_max": 1,
             "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4},
    }  # fmt: skip
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    (root / "crop.json").write_text(json.dumps({"crop_mm": COARSE["crop_mm"], "num_samples": 1}))  # what no MONAI transform says
    return bundle, ["--preprocess", str(root / "crop.json")]


def test_issue_reproduction_a_bare_monai_state_dict_adapts(
    data: Path, unetr_state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """The issue's commands as they are: adapt says, once, what it assumes, and records it."""
    # Validation slides 32^3 windows over a 2 mm volume (about 80 windows, ~30 s on 2 cores); what this
    # test checks comes before and after it.
    monkeypatch.setattr("centerprompt.training.cases.validator", lambda scorer: lambda model: 0.0)
    base = tmp_path / "unetr.pt"
    torch.save(unetr_state, base)
    run = tmp_path / "ad"
    with caplog.at_level(logging.INFO):
        assert main(["adapt", "--data", str(data), "--center", "MDA", "--base", str(base), "--strategy", "deep",
                     "--epochs", "1", "--shots", "2", "--out", str(run)]) == 0  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "unetr.pt" in warnings[0] and "num_heads=12" in warnings[0] and "defaults spacing=" in warnings[0]

    config = json.loads((run / "config.json").read_text())
    defaults = PreprocessConfig(roi_size=(32, 32, 32)).to_dict()  # the window follows the network's img_size
    assert config["base_sha256"] == file_sha256(base)
    assert config["base_model"]["preprocess"] == defaults and config["base_model"]["preprocess_from"] == "defaults"
    assert config["base_model"]["assumed"] == ["num_heads=12"]
    assert config["base_model"]["model"]["hidden_size"] == 48 and config["base_model"]["model"]["num_layers"] == 12
    adapter = read_adapter_metadata(run / "adapter.safetensors")
    assert adapter["backbone_fingerprint"] == backbone_fingerprint(load_model(base))  # the user's own weights
    assert adapter["extra"]["preprocess"] == defaults


@pytest.mark.parametrize("kind", ["state dict", "CheckpointSaver dict", "bundle"])
def test_each_source_runs_adapt_evaluate_predict_and_bank_add(
    data: Path, unetr_state: dict, tmp_path: Path, kind: str
) -> None:  # fmt: skip
    base, flags = _write_source(kind, unetr_state, tmp_path)
    with_base = ["--base", str(base), *flags]
    run = tmp_path / "adapt"
    assert main(["adapt", "--data", str(data), "--center", "MDA", *with_base, "--strategy", "deep", "--num-prompts", "2",
                 "--epochs", "1", "--shots", "2", "--out", str(run)]) == 0  # fmt: skip
    adapter = run / "adapter.safetensors"
    config = json.loads((run / "config.json").read_text())
    resolved = config["base_model"]
    assert resolved["model"]["num_heads"] == 4 and resolved["assumed"] == []
    assert resolved["preprocess"]["roi_size"] == [32, 32, 32] and resolved["preprocess"]["crop_mm"] == COARSE["crop_mm"]
    if kind == "bundle":  # spacing, CT window and SUV range from the bundle's transforms, the crop from --preprocess
        assert resolved["kind"] == "MONAI bundle" and resolved["preprocess_from"] == "--preprocess over the bundle's"
        assert resolved["preprocess"]["spacing"] == [6.0, 6.0, 6.0]
        assert resolved["preprocess"]["ct_window"] == [-200.0, 200.0] and resolved["preprocess"]["suv_max"] == 10.0
        assert config["base_sha256"] == file_sha256(base / "models" / "model.pt")
    else:
        assert resolved["preprocess_from"] == "--preprocess" and config["preprocess"] == COARSE
        assert config["model_config"] == {"num_heads": 4}
    # The adapter belongs to the user's weights: the fingerprint of the network read from their file.
    fingerprint = read_adapter_metadata(adapter)["backbone_fingerprint"]
    assert fingerprint == backbone_fingerprint(resolve_base(BaseSpec(base, {"num_heads": 4})).build())

    scores = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(data), *with_base, "--adapter", str(adapter), "--centers", "MDA",
                 "--out", str(scores)]) == 0  # fmt: skip
    result = json.loads(scores.read_text())
    assert set(result["per_center"]) == {"MDA"} and result["base"] == str(base)

    ct, pet = _case(data)
    out = tmp_path / "MDA-005.nii.gz"
    assert main(["predict", *with_base, "--adapter", str(adapter), "--ct", str(ct), "--pet", str(pet),
                 "--out", str(out)]) == 0  # fmt: skip
    assert nib.load(out).shape == nib.load(ct).shape

    bank = tmp_path / "bank"
    assert main(["bank", "add", "--bank", str(bank), "--center", "MDA", "--adapter", str(adapter), "--data", str(data),
                 *with_base]) == 0  # fmt: skip
    index = json.loads((bank / "bank.json").read_text())
    assert index["backbone_fingerprint"] == fingerprint and index["entries"][0]["routing"]["n_cases"] == 4

    if kind == "state dict":  # the bank is served from the user's file too
        route = tmp_path / "route"
        # A key from 4 cases is coarse: a tiny false-fallback rate keeps the scan from falling back on distance alone.
        assert main(["bank", "route", "--bank", str(bank), "--data", str(data), "--centers", "MDA", *with_base,
                     "--false-fallback", "1e-9", "--out", str(route)]) == 0  # fmt: skip
        assert json.loads((route / "bank_eval.json").read_text())["routing"]["confusion"]["MDA"]["MDA"] == 1
    if kind == "bundle":  # and so is the transformer-reliance check
        reliance = tmp_path / "reliance.json"
        assert main(["inspect", *with_base, "--data", str(data), "--centers", "MDA", "--out", str(reliance)]) == 0
        assert json.loads(reliance.read_text())["token_grid"] == [2, 2, 2]


def test_after_adapt_the_adapter_supplies_what_the_state_dict_does_not_store(
    data: Path, unetr_state: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    """An adapter records the network and preprocessing it was trained with: predict needs only the
    user's file and the adapter; a --model-config that contradicts it is refused, not scored."""
    base = tmp_path / "unetr.pt"
    torch.save(unetr_state, base)
    model = resolve_base(BaseSpec(base, {"num_heads": 4}, COARSE)).build(prompt_mode="deep", num_prompts=2)
    apply_strategy(model, "deep")
    adapter = save_adapter(model, tmp_path / "adapter.safetensors", "deep", extra={"preprocess": COARSE})
    ct, pet = _case(data)
    args = ["predict", "--base", str(base), "--adapter", str(adapter), "--ct", str(ct), "--pet", str(pet),
            "--out", str(tmp_path / "p.nii.gz")]  # fmt: skip
    assert main(args) == 0
    assert nib.load(tmp_path / "p.nii.gz").shape == nib.load(ct).shape
    (tmp_path / "heads.json").write_text(json.dumps({"num_heads": 12}))
    assert main([*args, "--overwrite", "--model-config", str(tmp_path / "heads.json")]) == 2
    assert "num_heads=4 (model: 12)" in capsys.readouterr().err


def test_the_network_read_from_a_state_dict_is_monai_s(tmp_path: Path) -> None:
    """Inferred from names and shapes, plus num_heads given: the same function as the MONAI network
    (the defaults: test_artifacts.py), here wrapped by DDP under a checkpoint's "model" key."""
    variant = dict(proj_type="perceptron", norm_name="batch", res_block=False, qkv_bias=True)
    torch.manual_seed(0)
    reference = UNETR(**{**TINY, **variant}).eval()
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "m.ckpt")
    ckpt = resolve_base(BaseSpec(tmp_path / "m.ckpt", {"num_heads": TINY["num_heads"]}))
    for key, value in variant.items():
        assert ckpt.config[key] == value, key
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert (reference(x) - ckpt.build().eval()(x)).abs().max() <= 1e-5


def test_a_changed_preprocess_is_a_new_run_and_centerprompt_bases_keep_their_configuration(
    data: Path, unetr_state: dict, tmp_path: Path
) -> None:  # fmt: skip
    _, splits = load_index(data)
    torch.save(unetr_state, tmp_path / "unetr.pt")

    def config(base: Path, **given) -> dict:
        return adapt_config(AdaptRun(data_dir=data, center="MDA", base=base, out=tmp_path / "r", shots=2, **given),
                            splits)  # fmt: skip

    plain, coarse = config(tmp_path / "unetr.pt"), config(tmp_path / "unetr.pt", preprocess=COARSE)
    finer = config(tmp_path / "unetr.pt", preprocess={**COARSE, "spacing": [4.0, 4.0, 4.0]})
    assert "preprocess" not in plain and coarse["preprocess"] == COARSE
    assert len({json.dumps(c, sort_keys=True) for c in (plain, coarse, finer)}) == 3
    assert finer["base_model"]["preprocess"]["spacing"] == [4.0, 4.0, 4.0]
    # A centerprompt checkpoint says everything itself: its config.json is what it was before issue 15.
    ours = save_model(resolve_base(tmp_path / "unetr.pt").build(), tmp_path / "model.safetensors",
                      extra={"preprocess": PreprocessConfig(**COARSE).to_dict()})  # fmt: skip
    assert {"base_model", "preprocess", "model_config"}.isdisjoint(config(ours))


def test_an_experiment_hands_its_base_description_to_every_stage(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    run = ExperimentRun(data_dir=data, new_center="MDA", out=tmp_path, base=tmp_path / "unetr.pt",
                        model_config={"num_heads": 4}, preprocess=COARSE)  # fmt: skip
    stage = run.adapt_run("deep", run.base)
    assert stage.base_spec == run.base_spec and stage.provenance()["preprocess"] == COARSE
    assert run.provenance()["model_config"] == {"num_heads": 4}
    with pytest.raises(ValueError, match="unknown UNETR argument"):
        ExperimentRun(data_dir=data, new_center="MDA", out=tmp_path, base=tmp_path / "x.pt", model_config={"heads": 4})
    (tmp_path / "p.json").write_text(json.dumps(COARSE))
    assert main(["experiment", "--data", str(data), "--new-center", "MDA", "--preprocess", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "exp")]) == 2  # fmt: skip
    assert "describe a --base" in capsys.readouterr().err


def _optimizer_only(path: Path) -> None:
    net = torch.nn.Linear(2, 2)
    torch.save(torch.optim.Adam(net.parameters()).state_dict(), path)


def _unet(path: Path) -> None:
    torch.save(UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8), strides=(2,)).state_dict(), path)


def _pickled_object(path: Path) -> None:
    torch.save({"net": Payload(path.parent / MARKER)}, path)


def _raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(path.parent / MARKER), protocol=4))


def _whole_module(path: Path) -> None:
    torch.save(UNETR(**TINY), path)


def _corrupt(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 this is no zip archive" + bytes(range(256)))


def _unet_bundle(path: Path) -> None:
    (path / "models").mkdir(parents=True)
    (path / "configs").mkdir()
    _unet(path / "models" / "model.pt")
    (path / "configs" / "inference.json").write_text(json.dumps({"network_def": {"_target_": "UNet"}}))


@pytest.mark.parametrize(
    "name, write, says",
    [
        ("optimizer.pt", _optimizer_only, "no UNETR state dict in this checkpoint (an optimizer's state?)"),
        ("unet.pt", _unet, "not of a MONAI UNETR"),
        ("payload.pt", _pickled_object, "never unpickles"),
        ("payload.pkl", _raw_pickle, "not a readable PyTorch weights file"),
        ("module.pth", _whole_module, "never unpickles"),
        ("corrupt.pt", _corrupt, "not a readable PyTorch weights file"),
        ("unet_bundle", _unet_bundle, "not MONAI's UNETR"),
    ],
)  # fmt: skip
def test_anything_but_a_unetr_is_refused_in_one_line_never_unpickled(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, write, says: str
) -> None:  # fmt: skip
    path = tmp_path / name
    write(path)
    ct, pet = _case(data)
    for command in (["predict", "--ct", str(ct), "--pet", str(pet), "--out", str(tmp_path / "p.nii.gz")],
                    ["adapt", "--data", str(data), "--center", "MDA", "--out", str(tmp_path / "ad")]):  # fmt: skip
        assert main([*command, "--base", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and says in err[0], err
    assert not (tmp_path / MARKER).exists()  # the payload was never unpickled
    assert not (tmp_path / "ad" / "adapter.safetensors").exists()
