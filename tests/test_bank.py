"""Prompt bank: safe folder writes, one backbone for all centers, mixed batches, routing and fallback."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import nibabel as nib
import pytest
import torch
from tiny import tiny_model

from centerprompt import apply_strategy
from centerprompt.artifacts import backbone_fingerprint, build_adapted_model, load_model, save_adapter, save_model
from centerprompt.bank import (
    FALLBACK,
    FALSE_FALLBACK,
    BankModel,
    PromptBank,
    Route,
    validate_center,
)
from centerprompt.bank.evaluation import routing_summary, run_bank
from centerprompt.bank.serving import BankSource
from centerprompt.runs.predict import predict
from centerprompt.runs.score import evaluate
from centerprompt.runs.selection import CaseSelection
from centerprompt.cli.bank import register
from centerprompt.data.transforms import PreprocessConfig
from centerprompt.scoring import Scorer
from centerprompt.strategies import STRATEGIES, Strategy, bankable_names, is_prompt, set_trainable, unregister
from centerprompt.strategies import register as register_strategy

# 6 mm voxels and a 192 mm crop give 32^3 volumes: one window of the tiny model.
SMALL = PreprocessConfig(spacing=(6.0, 6.0, 6.0), crop_mm=(192.0, 192.0, 192.0), roi_size=(32, 32, 32))


def _base(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_model(tiny_model(), path, extra={"preprocess": SMALL.to_dict()})


def _adapter(base: Path, path: Path, strategy: str = "deep", seed: int = 1, prompts: int = 3) -> Path:
    model = load_model(base, **STRATEGIES[strategy].model_fields(prompts))
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

    monkeypatch.setattr("centerprompt.bank.storage.shutil.copyfile", crash)
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
    with pytest.raises(ValueError, match=re.escape(f"changes backbone weights; only {', '.join(bankable_names())} adapters")):
        PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors", strategy))
    assert not (tmp_path / "bank" / "bank.json").exists()


def test_bankability_comes_from_the_registry(tmp_path: Path, base_file: Path) -> None:
    """A strategy registered as bankable is banked without the bank knowing its name (fails on a name list)."""
    toy = Strategy("toy-prompts", "deep prompts under another name", lambda m, o: set_trainable(m, is_prompt),
                   prompt_mode="deep", bankable=True, adds=is_prompt)  # fmt: skip
    register_strategy(toy)
    try:
        assert toy.name in bankable_names()
        entry = PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors", toy.name))
        assert entry.strategy == toy.name
    finally:
        unregister(toy.name)
    with pytest.raises(ValueError, match="'toy-prompts' changes backbone weights"):  # unregistered: not bankable
        PromptBank(tmp_path / "bank2").add("CHUM", tmp_path / "a.safetensors")


@pytest.mark.parametrize("strategy", ["deep", "norm", "deep+norm", "image", "spt", "kv"])
def test_mixed_center_batch_equals_single_runs(tmp_path: Path, base_file: Path, strategy: str) -> None:
    adapters = {c: _adapter(base_file, tmp_path / f"{c}.safetensors", strategy, seed=i) for i, c in enumerate("AB")}
    bank = PromptBank(tmp_path / "bank")
    for center, path in adapters.items():
        bank.add(center, path)
    model = BankModel.from_files(base_file, tmp_path / "bank")
    centers = ["A", FALLBACK, "B", "B"]
    torch.manual_seed(3)
    x = torch.randn(len(centers), 2, 32, 32, 32)
    x[3] = x[0]  # the same scan served with another center's prompts
    with torch.no_grad():
        mixed = model(x, centers)
        for i, center in enumerate(centers[:3]):
            alone = build_adapted_model(base_file, None if center == FALLBACK else adapters[center])(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)  # the per-center tensors matter
    served, inputs = model.member("B")
    alone = build_adapted_model(base_file, adapters["B"])
    with torch.no_grad():  # one center for every window of a scan: unbatched values, as sliding windows use
        torch.testing.assert_close(served(x[:2], **inputs), alone(x[:2]), atol=1e-5, rtol=1e-5)


def test_oracle_for_a_center_without_entry_is_the_base_model(tmp_path: Path, base_file: Path) -> None:
    PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    model = BankModel.from_files(base_file, tmp_path / "bank")
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, [FALLBACK, FALLBACK]), build_adapted_model(base_file)(x))


def test_routing_summary_counts_by_hand() -> None:
    """Accuracy over banked centers' scans, and over all scans with fallback right for unknown centers."""

    def route(center: str) -> Route:
        return Route(center=center, nearest="A", distance=0.0, runner_up=None, runner_up_distance=None, threshold=1.0)

    truth = ["A", "A", "B", "B", "C", "C"]  # C has no entry
    routes = [route(c) for c in ("A", "A", "B", FALLBACK, FALLBACK, "A")]
    summary = routing_summary(truth, routes, ["A", "B"])
    assert summary["n_known"] == 4
    assert summary["accuracy"] == pytest.approx(3 / 4)  # B -> base is wrong for a banked center
    assert summary["accuracy_all"] == pytest.approx(4 / 6)  # C -> base is right, C -> A is not
    assert summary["unknown_centers"] == {"C": {"n": 2, "fallback": 1, "wrong_center": 1, "fallback_rate": 0.5}}
    assert summary["confusion"]["B"] == {"A": 0, "B": 1, FALLBACK: 1}


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic centers, three cases each (one per split); read-only for the tests that share it."""
    from centerprompt.data.synthetic.writer import generate_dataset

    out = tmp_path_factory.mktemp("synthetic") / "data"
    return generate_dataset(out, centers=["CHUM", "MDA"], cases_per_center=3, progress=False)


def test_bank_predictions_equal_separately_built_models(
    tmp_path: Path, base_file: Path, synthetic_data: Path, monkeypatch
) -> None:  # fmt: skip
    """Every mode's prediction of every case equals that of a model built on its own from the base file
    plus the adapter of the center the mode used (the base alone for fallback), so a prediction cache
    that served another center's (or another mode's) label map would fail here."""
    adapters = {c: _adapter(base_file, tmp_path / f"{c}.safetensors", seed=i) for i, c in enumerate(("CHUM", "MDA"))}
    bank = tmp_path / "bank"
    for center, path in adapters.items():
        PromptBank(bank).add(center, path)

    served: dict[str, list[torch.Tensor]] = {}
    scorers: list[Scorer] = []
    score_predictions = Scorer.score_predictions

    def record(self: Scorer, predict, desc: str = "score", progress: bool = True):  # type: ignore[no-untyped-def]
        scorers.append(self)
        served[desc] = [predict(i).clone() for i in range(len(self.cases))]
        return score_predictions(self, predict, desc=desc, progress=progress)

    monkeypatch.setattr(Scorer, "score_predictions", record)
    modes = (FALLBACK, "oracle", "CHUM", "MDA")  # oracle and the single centers reuse earlier predictions
    result = run_bank(CaseSelection(synthetic_data, score_at="preprocessed"), base_file, bank, modes=modes, progress=False)
    assert set(served) == set(modes)

    scorer, references = scorers[0], {}
    for center in (FALLBACK, *adapters):
        model = build_adapted_model(base_file, adapters.get(center))
        references[center] = [scorer.predict(model, i) for i in range(len(scorer.cases))]
    for mode in modes:
        for i, case in enumerate(result["per_case"]):
            used = case["scores"][mode]["used"]
            assert torch.equal(served[mode][i], references[used][i]), (mode, case["case_id"], used)
    assert [c["scores"]["oracle"]["used"] for c in result["per_case"]] == ["CHUM", "MDA"]
    for i in range(len(scorer.cases)):  # the centers' predictions differ, so serving the wrong one is caught
        assert not torch.equal(references["CHUM"][i], references["MDA"][i])
        assert not torch.equal(references["CHUM"][i], references[FALLBACK][i])


def test_cli_and_evaluation_on_synthetic_centers(tmp_path: Path, base_file: Path, synthetic_data: Path,
                                                 capsys) -> None:  # fmt: skip
    data = synthetic_data
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
    # MDA's scanner (CT grid, noise, PET calibration) is not CHUM's: its scan falls back to the base model.
    cli("evaluate", "--bank", bank, "--base", base_file, "--data", data, "--out", out, "--single-center", "CHUM",
        "--score-at", "preprocessed", "--false-fallback", "0.01")  # fmt: skip
    result = json.loads((out / "bank_eval.json").read_text())
    assert (out / "confusion.png").stat().st_size > 0 and "| MDA |" in (out / "bank_eval.md").read_text()
    assert set(result["modes"]) == {"base", "oracle", "auto", "CHUM"}
    assert sum(sum(row.values()) for row in result["routing"]["confusion"].values()) == len(result["per_case"])
    unknown = result["routing"]["unknown_centers"]
    assert unknown == {"MDA": {"n": 1, "fallback": 1, "wrong_center": 0, "fallback_rate": 1.0}}
    assert result["false_fallback"] == 0.01
    for case in result["per_case"]:  # MDA has no entry: the oracle serves it the base model
        assert case["scores"]["oracle"]["used"] == ("CHUM" if case["center"] == "CHUM" else FALLBACK)

    cli("route", "--bank", bank, "--base", base_file, "--data", data, "--out", tmp_path / "route")
    routed = json.loads((tmp_path / "route" / "bank_eval.json").read_text())
    assert routed["modes"] == {} and routed["false_fallback"] == FALSE_FALLBACK
    assert routed["routing"]["confusion"]["MDA"]["base"] == 1
    mda = next(c["route"] for c in routed["per_case"] if c["center"] == "MDA")
    assert mda["nearest"] == "CHUM" and "outside every banked center's range" in mda["reason"]

    single = evaluate(CaseSelection(data, centers=("CHUM",), score_at="preprocessed"), BankSource(base_file, bank, "CHUM"),
                      progress=False)  # fmt: skip
    assert single["per_center"]["CHUM"]["dsc_agg"] == result["modes"]["CHUM"]["per_center"]["CHUM"]["dsc_agg"]
    assert [case["center"] for case in single["per_case"]] == ["CHUM"]

    ct = next((data / "imagesTr").glob("MDA-*__CT.nii.gz"))
    pet, out_file = ct.with_name(ct.name.replace("__CT", "__PT")), tmp_path / "pred" / "MDA.nii.gz"
    (record,) = predict(BankSource(base_file, bank), [(ct, pet, out_file)], progress=False)
    assert record["center"] == FALLBACK and record["route"]["nearest"] == "CHUM" and record["route"]["reason"]
    assert nib.load(out_file).shape == nib.load(ct).shape


def test_bank_without_keys_serves_named_centers_only(tmp_path: Path, base_file: Path) -> None:
    PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    model = BankModel.from_files(base_file, tmp_path / "bank")
    with pytest.raises(ValueError, match="no routing keys"):
        model.route(tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz")
