"""MONAI Bundle export: the bundle runs with MONAI alone and writes predict's label maps.

The models are the tiny preset with random weights and random deep prompts (no training: what is
tested is that the bundle computes what centerprompt computes). Their preprocessing (4 mm voxels,
a 240 mm crop) gives the synthetic case about 58 x 55 x 58 voxels: 27 overlapping 32^3 windows,
placed where the overlap puts them, so the window placement and the blending are compared too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open

from centerprompt.bank import PromptBank
from centerprompt.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.*deprecated")  # MONAI bundles still use it
# Removes every sys.path entry from which centerprompt imports (the editable install's src/); MONAI
# and torch stay importable from site-packages.
WITHOUT_CENTERPROMPT = ("import os, sys\nsys.path[:] = [p for p in sys.path if not os.path.isfile("
                        "os.path.join(p or '.', 'centerprompt', '__init__.py'))]\n")  # fmt: skip
# `python -m monai.bundle run ...` is fire dispatching to monai.bundle.run; fire is a dependency of
# neither MONAI nor centerprompt, so without it the same function is called directly.
RUN_BUNDLE = """
import importlib.util, runpy
args = ["run", "--config_file", "configs/inference.json", "--input_dir", {cases!r}, "--output_dir", {out!r}]
if importlib.util.find_spec("fire") is None:
    from monai.bundle import run
    run(config_file=args[2], input_dir=args[4], output_dir=args[6])
else:
    sys.argv = ["monai.bundle", *args]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def _isolated(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` run by this environment's Python in a process that cannot import centerprompt."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", WITHOUT_CENTERPROMPT + code], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one synthetic MDA case (ID__CT.nii.gz, ID__PT.nii.gz)."""
    from centerprompt.data.synthetic.writer import generate_dataset

    root = generate_dataset(tmp_path_factory.mktemp("synth"), centers=["MDA"], cases_per_center=1, seed=1,
                            progress=False)  # fmt: skip
    return root / "imagesTr"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny-preset base and deep-prompt adapters (P=4) for MDA and CHUM."""
    from centerprompt.artifacts import save_adapter, save_model
    from centerprompt.checkpoints import resolve_base
    from centerprompt.data.transforms import PreprocessConfig
    from centerprompt.models.prompted_unetr import PromptedUNETR
    from centerprompt.training.presets import get_preset
    from centerprompt.strategies import apply_strategy

    root, tiny = tmp_path_factory.mktemp("models"), get_preset("tiny")
    pre = PreprocessConfig(spacing=(4.0, 4.0, 4.0), crop_mm=(240.0, 240.0, 240.0), roi_size=(32, 32, 32)).to_dict()
    torch.manual_seed(0)
    paths = {"base": save_model(PromptedUNETR(in_channels=2, out_channels=3, **tiny.model), root / "model.safetensors",
                                extra={"preprocess": pre, "preset": "tiny", "train_centers": ["CHUM"]})}  # fmt: skip
    for center in ("MDA", "CHUM"):
        model = resolve_base(paths["base"]).build(prompt_mode="deep", num_prompts=4)
        apply_strategy(model, "deep")
        with torch.no_grad():
            model.prompts.tokens.normal_()  # prompts that visibly change the output
        paths[center] = save_adapter(model, root / f"{center}.safetensors", "deep",
                                     extra={"center": center, "shots": 2, "preprocess": pre})  # fmt: skip
    return paths


@pytest.fixture(scope="module")
def bundle(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "MDA-bundle"
    assert main(["export", "--base", str(models["base"]), "--adapter", str(models["MDA"]), "--out", str(out)]) == 0
    return out


def test_the_bundle_runs_without_centerprompt_and_writes_predicts_label_map(
    bundle: Path, models: dict[str, Path], case: Path, tmp_path: Path
) -> None:  # fmt: skip
    refused = _isolated("import centerprompt", bundle)
    assert refused.returncode != 0 and "No module named 'centerprompt'" in refused.stderr

    out = tmp_path / "bundle_out"
    ran = _isolated(RUN_BUNDLE.format(cases=str(case), out=str(out)), bundle)
    assert ran.returncode == 0, ran.stderr[-3000:]

    reference = tmp_path / "predict" / "MDA-001.nii.gz"
    assert main(["predict", "--base", str(models["base"]), "--adapter", str(models["MDA"]), "--ct",
                 str(case / "MDA-001__CT.nii.gz"), "--pet", str(case / "MDA-001__PT.nii.gz"), "--out",
                 str(reference)]) == 0  # fmt: skip
    expected, found = nib.load(reference), nib.load(out / "MDA-001.nii.gz")
    labels = np.asarray(expected.dataobj)
    assert len(np.unique(labels)) >= 2, "a label map of one class would make the comparison trivial"
    assert found.shape == expected.shape and np.array_equal(np.asarray(found.dataobj), labels)  # voxel for voxel
    assert np.allclose(found.affine, expected.affine)


def test_the_prompts_are_folded_into_the_torchscript_network(bundle: Path, models: dict[str, Path]) -> None:
    from centerprompt.artifacts import build_adapted_model

    network = torch.jit.load(str(bundle / "models" / "model.ts"))
    adapted = build_adapted_model(models["base"], models["MDA"])
    x = torch.rand(3, 2, 32, 32, 32)  # another batch size than the trace's
    with torch.no_grad():
        found = network(x)  # the image alone: no prompts argument
        expected, plain = adapted(x), build_adapted_model(models["base"])(x)
    assert torch.allclose(found, expected, atol=1e-5) and not torch.allclose(found, plain, atol=1e-3)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(state) == set(network.state_dict()) and torch.equal(state["prompts.tokens"], adapted.prompts.tokens)


@pytest.mark.parametrize("strategy", ["deep+head", "lora", "deep+norm", "image", "kv"])
def test_fold_keeps_what_any_strategy_trained(strategy: str, models: dict[str, Path]) -> None:
    from centerprompt.deploy.bundle import fold
    from centerprompt.checkpoints import resolve_base
    from centerprompt.strategies import STRATEGIES, apply_strategy

    model = resolve_base(models["base"]).build(**STRATEGIES[strategy].model_fields(4))
    trained = apply_strategy(model, strategy)
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn_like(p))  # the head, the LoRA matrices: values no base model has
    network = fold(model, (32, 32, 32))
    x = torch.rand(3, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(network(x), model(x), atol=1e-5)
    folded = network.state_dict()
    assert all(torch.equal(folded[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_the_metadata_has_monais_fields_and_describes_the_network(bundle: Path, models: dict[str, Path]) -> None:
    from monai.bundle import verify_net_in_out
    from monai.bundle.utils import DEFAULT_METADATA

    from centerprompt.artifacts import read_adapter_metadata

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    # Beyond the schema (test_monai_verify_metadata_accepts_the_metadata): MONAI's own metadata
    # template's fields, and the tensor fields of each input and output.
    assert set(DEFAULT_METADATA) | {"schema"} <= set(meta)
    assert all(isinstance(meta[k], str) for k in ("schema", "version", "monai_version", "pytorch_version", "task"))
    for kind in ("inputs", "outputs"):
        for spec in meta["network_data_format"][kind].values():
            assert {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
                    "channel_def"} <= set(spec)  # fmt: skip
            assert all(isinstance(v, (int, float)) for v in spec["value_range"])
    cp = meta["centerprompt"]
    assert (cp["center"], cp["strategy"], cp["num_prompts"]) == ("MDA", "deep", 4)
    assert cp["backbone_fingerprint"] == read_adapter_metadata(models["MDA"])["backbone_fingerprint"]
    assert cp["pretraining"]["train_centers"] == ["CHUM"] and cp["preprocess"]["spacing"] == [4.0, 4.0, 4.0]
    # MONAI's own check: the network the config builds takes the declared input and gives the declared output.
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu",
                      bundle_root=str(bundle))  # fmt: skip
    assert (bundle / "docs" / "README.md").is_file() and (bundle / "LICENSE").is_file()
    import logging.config

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:  # the file MONAI's runner reads (it warns without one) is a valid logging configuration
        logging.config.fileConfig(bundle / "configs" / "logging.conf", disable_existing_loggers=False)
        assert root.level == logging.INFO
    finally:
        root.handlers[:], root.level = handlers, level


def test_monai_verify_metadata_accepts_the_metadata(bundle: Path, tmp_path: Path) -> None:
    """MONAI's own verification against the model zoo's schema (a local copy: nothing may download)."""
    import shutil

    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"  # verify_metadata downloads to this path unless the file is there
    shutil.copy(Path(__file__).parent / "data" / "meta_schema_20240725.json", schema)
    meta_file = bundle / "configs" / "metadata.json"
    assert json.loads(meta_file.read_text())["schema"].endswith("meta_schema_20240725.json")
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))  # raises ValidationError if not accepted
    broken = json.loads(meta_file.read_text())
    broken["network_data_format"]["inputs"]["image"]["num_channels"] = "two"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="num_channels|two"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))


def test_bank_export_writes_one_bundle_per_center(models: dict[str, Path], tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    for center in ("MDA", "CHUM"):
        PromptBank(bank).add(center, models[center])
    out = tmp_path / "bundles"
    assert main(["bank", "export", "--bank", str(bank), "--base", str(models["base"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["CHUM", "MDA"]
    one = tmp_path / "one"
    assert main(["export", "--base", str(models["base"]), "--bank", str(bank), "--center", "CHUM", "--out",
                 str(one)]) == 0  # fmt: skip
    for folder, center in ((out / "MDA", "MDA"), (out / "CHUM", "CHUM"), (one, "CHUM")):
        assert json.loads((folder / "configs" / "metadata.json").read_text())["centerprompt"]["center"] == center
        tokens = torch.load(folder / "models" / "model.pt", weights_only=True)["prompts.tokens"]
        with safe_open(str(models[center]), "pt") as f:
            assert torch.equal(tokens, f.get_tensor("prompts.tokens"))


def _other_backbone(models: dict[str, Path], root: Path) -> Path:
    """An adapter trained on another base (same configuration, other weights)."""
    from centerprompt.artifacts import save_adapter
    from centerprompt.checkpoints import resolve_base
    from centerprompt.strategies import apply_strategy

    model = resolve_base(models["base"]).build(prompt_mode="deep", num_prompts=4)
    with torch.no_grad():
        model.out.conv.conv.weight.add_(1.0)
    apply_strategy(model, "deep")
    return save_adapter(model, root / "other.safetensors", "deep")


@pytest.mark.parametrize("problem", ["not empty", "missing adapter", "other backbone", "bank alone", "not banked"])
def test_bad_input_is_refused_in_one_line(
    problem: str, models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # fmt: skip
    out = tmp_path / "out"
    args = ["export", "--base", str(models["base"]), "--out", str(out)]
    if problem == "not empty":
        (out / "keep.txt").parent.mkdir()
        (out / "keep.txt").write_text("x")
    elif problem == "missing adapter":
        args += ["--adapter", str(tmp_path / "nowhere.safetensors")]
    elif problem == "other backbone":
        args += ["--adapter", str(_other_backbone(models, tmp_path))]
    elif problem == "bank alone":
        args += ["--bank", str(tmp_path / "bank")]
    else:
        PromptBank(tmp_path / "bank").add("MDA", models["MDA"])
        args += ["--bank", str(tmp_path / "bank"), "--center", "CHUM"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    expected = {"not empty": "not an empty folder", "missing adapter": "no such adapter file",
                "other backbone": "trained on backbone", "bank alone": "--bank and --center go together",
                "not banked": "CHUM not in bank"}[problem]  # fmt: skip
    assert err.startswith("centerprompt export: error:") and expected in err and "\n" not in err
    if problem != "not empty":
        assert not out.exists()


def test_onnx_format_where_onnx_is_installed_and_one_line_where_not(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # fmt: skip
    out = tmp_path / "onnx"
    code = main(["export", "--base", str(models["base"]), "--adapter", str(models["MDA"]), "--format", "onnx",
                 "--out", str(out)])  # fmt: skip
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        import onnx

        assert code == 0
        onnx.checker.check_model(onnx.load(str(out / "models" / "model.onnx")))
        assert (out / "models" / "model.ts").is_file()  # inference.json still runs the TorchScript network
    else:
        err = capsys.readouterr().err.strip()
        assert code == 2 and "is not installed" in err and "\n" not in err and not out.exists()
