"""Prompt bank: safe folder writes, one backbone for all centers, mixed batches, routing and fallback."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import pytest
import torch
from tiny import tiny_model

from centerprompt import apply_strategy
from centerprompt.artifacts import backbone_fingerprint, build_adapted_model, load_model, save_adapter, save_model
from centerprompt.bank import (
    BASE,
    BankModel,
    PromptBank,
    RoutingKey,
    predict_with_bank,
    route_features,
    routing_key,
    validate_center,
)
from centerprompt.bank_eval import evaluate_with_bank
from centerprompt.cli.bank import register
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.strategies import STRATEGIES

# 6 mm voxels and a 192 mm crop give 32^3 volumes: one window of the tiny model.
SMALL = PreprocessConfig(spacing=(6.0, 6.0, 6.0), crop_mm=(192.0, 192.0, 192.0), roi_size=(32, 32, 32))


def _base(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_model(tiny_model(), path, extra={"preprocess": SMALL.to_dict()})


def _adapter(base: Path, path: Path, strategy: str = "deep", seed: int = 1, prompts: int = 3) -> Path:
    model = load_model(base, prompt_mode=STRATEGIES[strategy].prompt_mode, num_prompts=prompts)
    apply_strategy(model, strategy)
    torch.manual_seed(seed)
    with torch.no_grad():  # stands in for training; large enough to change the output clearly
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    return save_adapter(model, path, strategy)


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    return _base(tmp_path / "model.safetensors")


def test_add_list_remove(tmp_path: Path, base_file: Path) -> None:
    bank = PromptBank(tmp_path / "bank")
    for i, center in enumerate(("CHUM", "MDA")):
        bank.add(center, _adapter(base_file, tmp_path / f"{center}.safetensors", seed=i))
    assert bank.names() == ["CHUM", "MDA"]
    index = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert index["prompt_mode"] == "deep" and index["num_prompts"] == 3
    assert index["backbone_fingerprint"] == backbone_fingerprint(load_model(base_file))
    with pytest.raises(ValueError, match="already in bank"):
        bank.add("CHUM", tmp_path / "MDA.safetensors")

    bank.remove("CHUM")
    assert bank.names() == ["MDA"]
    assert not (tmp_path / "bank" / "CHUM.safetensors").exists()
    with pytest.raises(ValueError, match="not in bank"):
        bank.remove("CHUM")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", "x" * 33, "a.b", "base", "auto"])
def test_center_names_cannot_escape_the_bank(name: str) -> None:
    with pytest.raises(ValueError, match="center name"):
        validate_center(name)


def test_interrupted_add_leaves_bank_json_unchanged(tmp_path: Path, base_file: Path, monkeypatch) -> None:
    bank_dir = tmp_path / "bank"
    bank = PromptBank(bank_dir)
    bank.add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    before = (bank_dir / "bank.json").read_bytes()

    def crash(src: str, dst: str) -> None:
        Path(dst).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("centerprompt.bank.shutil.copyfile", crash)
    with pytest.raises(OSError, match="disk full"):
        bank.add("MDA", tmp_path / "a.safetensors")
    assert (bank_dir / "bank.json").read_bytes() == before
    assert sorted(p.name for p in bank_dir.iterdir()) == ["CHUM.safetensors", "bank.json"]

    monkeypatch.undo()
    (bank_dir / "HGJ.safetensors").write_bytes(b"left by a killed add")  # a file without a row
    bank.add("MDA", tmp_path / "a.safetensors")
    assert not (bank_dir / "HGJ.safetensors").exists()
    assert bank.names() == ["CHUM", "MDA"]


def test_another_backbone_is_refused(tmp_path: Path, base_file: Path) -> None:
    bank = PromptBank(tmp_path / "bank")
    bank.add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    other_base = _base(tmp_path / "other.safetensors", seed=7)
    other = _adapter(other_base, tmp_path / "other_adapter.safetensors")
    ours, theirs = backbone_fingerprint(load_model(base_file)), backbone_fingerprint(load_model(other_base))
    with pytest.raises(ValueError, match=f"other_adapter.safetensors.*{theirs}.*{ours}"):
        bank.add("MDA", other)
    with pytest.raises(ValueError, match="num_prompts"):
        bank.add("MDA", _adapter(base_file, tmp_path / "p5.safetensors", prompts=5))
    with pytest.raises(ValueError, match="backbone"):
        PromptBank.load(tmp_path / "bank", load_model(other_base))


@pytest.mark.parametrize("strategy", ["deep+head", "partial"])
def test_non_prompt_strategy_is_refused(tmp_path: Path, base_file: Path, strategy: str) -> None:
    with pytest.raises(ValueError, match="not prompt-only"):
        PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors", strategy))
    assert not (tmp_path / "bank" / "bank.json").exists()


def test_mixed_center_batch_equals_single_runs(tmp_path: Path, base_file: Path) -> None:
    adapters = {c: _adapter(base_file, tmp_path / f"{c}.safetensors", seed=i) for i, c in enumerate("AB")}
    bank = PromptBank(tmp_path / "bank")
    for center, path in adapters.items():
        bank.add(center, path)
    model = BankModel.from_files(base_file, tmp_path / "bank")
    centers = ["A", BASE, "B", "B"]
    torch.manual_seed(3)
    x = torch.randn(len(centers), 2, 32, 32, 32)
    x[3] = x[0]  # the same scan served with another center's prompts
    with torch.no_grad():
        mixed = model(x, centers)
        for i, center in enumerate(centers[:3]):
            alone = build_adapted_model(base_file, None if center == BASE else adapters[center])(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)  # the prompts matter


def test_oracle_for_a_center_without_entry_is_the_base_model(tmp_path: Path, base_file: Path) -> None:
    PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    model = BankModel.from_files(base_file, tmp_path / "bank")
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, [BASE, BASE]), build_adapted_model(base_file)(x))


def test_routing_separable_features_and_fallback() -> None:
    torch.manual_seed(0)
    centroids = torch.linalg.qr(torch.randn(48, 4))[0].T  # 4 orthonormal directions
    keys = [RoutingKey.from_features(c + 0.02 * torch.randn(6, 48), "fp") for c in centroids[:3]]
    thresholds = [k.stats()["threshold"] for k in keys]
    assert all(k.stats()["threshold"] >= k.stats()["max"] for k in keys)
    stacked, names = torch.stack([k.key for k in keys]), ["A", "B", "C"]

    queries = centroids[:3] + 0.02 * torch.randn(3, 48)
    routes = route_features(queries, stacked, names, max(thresholds))
    assert [r.center for r in routes] == names
    assert all(r.runner_up_distance > r.distance for r in routes)

    (far,) = route_features(centroids[3:], stacked, names, max(thresholds))  # orthogonal to every key
    assert far.fallback and far.center == BASE and far.distance > max(thresholds)
    assert far.nearest in names and far.runner_up in names


def test_routing_through_the_bank_on_volumes(tmp_path: Path, base_file: Path) -> None:
    """Keys from the frozen encoder on clearly different volumes route new scans of each source home."""
    base = load_model(base_file).eval()
    levels = {"A": 0.1, "B": 0.9}

    def scans(center: str, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return levels[center] + 0.02 * torch.randn(n, 2, 40, 36, 32, generator=g)  # larger than the window

    bank = PromptBank(tmp_path / "bank")
    for i, center in enumerate(levels):
        adapter = _adapter(base_file, tmp_path / f"{center}.safetensors", seed=i)
        bank.add(center, adapter, routing_key(base, scans(center, 3, i)))
    model = BankModel.from_files(base_file, tmp_path / "bank")
    assert model.bank.key_names == ["A", "B"] and set(model.bank.thresholds) == {"A", "B"}
    test = torch.cat([scans("A", 2, 10), scans("B", 2, 11)])
    routes = model.route(test)
    assert [r.center for r in routes] == ["A", "A", "B", "B"]
    assert all(r.center == BASE for r in model.route(test, threshold=-1.0))


def test_cli_and_evaluation_on_synthetic_centers(tmp_path: Path, base_file: Path, capsys) -> None:
    from centerprompt.data.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", centers=["CHUM", "MDA"], cases_per_center=3, progress=False)
    adapter = _adapter(base_file, tmp_path / "chum.safetensors")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))

    def cli(*argv: str) -> None:
        args = parser.parse_args(["bank", *map(str, argv)])
        assert args.func(args) == 0

    bank, out = tmp_path / "bank", tmp_path / "eval"
    cli("add", "--bank", bank, "--center", "CHUM", "--adapter", adapter, "--data", data, "--base", base_file)
    cli("list", "--bank", bank)
    assert "CHUM" in capsys.readouterr().out
    # Cosine distances are at most 2: with --threshold 2 every scan goes to its nearest key.
    cli("evaluate", "--bank", bank, "--base", base_file, "--data", data, "--out", out, "--single-center", "CHUM",
        "--score-at", "preprocessed", "--threshold", "2")  # fmt: skip
    result = json.loads((out / "bank_eval.json").read_text())
    assert (out / "confusion.png").stat().st_size > 0 and "| MDA |" in (out / "bank_eval.md").read_text()
    assert set(result["modes"]) == {"base", "oracle", "auto", "CHUM"}
    assert sum(sum(row.values()) for row in result["routing"]["confusion"].values()) == len(result["per_case"])
    unknown = result["routing"]["unknown_centers"]
    assert unknown == {"MDA": {"n": 1, "fallback": 0, "wrong_center": 1, "fallback_rate": 0.0}}
    assert result["routing"]["accuracy"] == 1.0  # CHUM is the only key
    for case in result["per_case"]:
        if case["center"] == "MDA":  # no entry: the oracle serves the base model, identically
            assert case["scores"]["oracle"] == case["scores"]["base"]
            assert case["scores"]["oracle"]["used"] == BASE
        else:
            assert case["scores"]["oracle"]["used"] == "CHUM"
    assert result["modes"]["oracle"]["per_center"]["MDA"] == result["modes"]["base"]["per_center"]["MDA"]

    cli("route", "--bank", bank, "--base", base_file, "--data", data, "--out", tmp_path / "route")
    routed = json.loads((tmp_path / "route" / "bank_eval.json").read_text())
    assert routed["modes"] == {} and routed["threshold"] == pytest.approx(0.0)  # one training case: no spread
    assert routed["routing"]["confusion"]["MDA"]["base"] == 1

    single = evaluate_with_bank(data, base_file, bank, center="CHUM", centers=["CHUM"], score_at="preprocessed",
                                progress=False)  # fmt: skip
    assert single["per_center"]["CHUM"]["dsc_agg"] == result["modes"]["CHUM"]["per_center"]["CHUM"]["dsc_agg"]
    assert [case["used"] for case in single["per_case"]] == ["CHUM"]

    ct = next((data / "imagesTr").glob("MDA-*__CT.nii.gz"))
    pet, out_file = ct.with_name(ct.name.replace("__CT", "__PT")), tmp_path / "pred" / "MDA.nii.gz"
    (record,) = predict_with_bank(base_file, bank, [(ct, pet, out_file)], threshold=2.0, progress=False)
    assert record["center"] == "CHUM" and record["route"]["nearest"] == "CHUM"
    assert nib.load(out_file).shape == nib.load(ct).shape


def test_bank_without_keys_serves_named_centers_only(tmp_path: Path, base_file: Path) -> None:
    PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    model = BankModel.from_files(base_file, tmp_path / "bank")
    with pytest.raises(ValueError, match="no routing keys"):
        model.route(torch.zeros(1, 2, 32, 32, 32))
