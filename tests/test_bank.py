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
    FALLBACK,
    BankModel,
    PromptBank,
    Route,
    RoutingKey,
    predict_with_bank,
    route_features,
    routing_key,
    validate_center,
)
from centerprompt.bank.evaluation import evaluate_with_bank, routing_summary, run_bank
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
    with pytest.raises(ValueError, match=f"not prompt-only; only {', '.join(bankable_names())} adapters"):
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
    with pytest.raises(ValueError, match="'toy-prompts' is not prompt-only"):  # unregistered: not bankable
        PromptBank(tmp_path / "bank2").add("CHUM", tmp_path / "a.safetensors")


def test_mixed_center_batch_equals_single_runs(tmp_path: Path, base_file: Path) -> None:
    adapters = {c: _adapter(base_file, tmp_path / f"{c}.safetensors", seed=i) for i, c in enumerate("AB")}
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
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)  # the prompts matter


def test_oracle_for_a_center_without_entry_is_the_base_model(tmp_path: Path, base_file: Path) -> None:
    PromptBank(tmp_path / "bank").add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    model = BankModel.from_files(base_file, tmp_path / "bank")
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, [FALLBACK, FALLBACK]), build_adapted_model(base_file)(x))


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
    assert far.fallback and far.center == FALLBACK and far.distance > max(thresholds)
    assert far.nearest in names and far.runner_up in names


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


def test_routing_two_centers_home_and_a_withheld_one_falls_back(tmp_path: Path, base_file: Path) -> None:
    """Keys from the frozen encoder on volumes of different intensity route each banked center's new
    scans home; the scans of a center withheld from the bank lie beyond every threshold and fall back."""
    base = load_model(base_file).eval()
    levels = {"A": 0.1, "B": 0.9, "C": 0.5}  # C: withheld; its nearest key is B's, but far beyond its threshold

    def scans(center: str, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return levels[center] + 0.02 * torch.randn(n, 2, 40, 36, 32, generator=g)  # larger than the window

    bank = PromptBank(tmp_path / "bank")
    for i, center in enumerate(("A", "B")):
        adapter = _adapter(base_file, tmp_path / f"{center}.safetensors", seed=i)
        bank.add(center, adapter, routing_key(base, scans(center, 3, i)))
    model = BankModel.from_files(base_file, tmp_path / "bank")
    assert model.bank.key_names == ["A", "B"] and set(model.bank.thresholds) == {"A", "B"}
    truth = ["A", "A", "B", "B", "C", "C"]
    test = torch.cat([scans("A", 2, 10), scans("B", 2, 11), scans("C", 2, 12)])

    routes = model.route(test)
    assert [r.center for r in routes] == ["A", "A", "B", "B", FALLBACK, FALLBACK]
    assert all(r.nearest == "B" and r.distance > r.threshold for r in routes[4:])
    summary = routing_summary(truth, routes, model.names)
    known = [(t, r) for t, r in zip(truth, routes) if t in model.names]
    home = sum(r.center == t for t, r in known)
    fell_back = sum(r.fallback for t, r in zip(truth, routes) if t not in model.names)
    assert summary["accuracy"] == home / len(known) == 1.0
    assert summary["accuracy_all"] == (home + fell_back) / len(truth) == 1.0
    assert summary["unknown_centers"]["C"]["fallback"] == 2

    nearest = model.route(test, threshold=2.0)  # no fallback: C's scans go to the nearest key, wrongly
    assert [r.center for r in nearest] == ["A", "A", "B", "B", "B", "B"]
    summary = routing_summary(truth, nearest, model.names)
    assert summary["accuracy"] == 1.0 and summary["accuracy_all"] == pytest.approx(4 / 6)
    assert summary["unknown_centers"]["C"] == {"n": 2, "fallback": 0, "wrong_center": 2, "fallback_rate": 0.0}
    assert all(r.center == FALLBACK for r in model.route(test, threshold=-1.0))


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic centers, three cases each (one per split); read-only for the tests that share it."""
    from centerprompt.data.synthetic import generate_dataset

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
    result = run_bank(synthetic_data, base_file, bank, modes=modes, score_at="preprocessed", progress=False)
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
    # Cosine distances are at most 2: with --threshold 2 every scan goes to its nearest key.
    cli("evaluate", "--bank", bank, "--base", base_file, "--data", data, "--out", out, "--single-center", "CHUM",
        "--score-at", "preprocessed", "--threshold", "2")  # fmt: skip
    result = json.loads((out / "bank_eval.json").read_text())
    assert (out / "confusion.png").stat().st_size > 0 and "| MDA |" in (out / "bank_eval.md").read_text()
    assert set(result["modes"]) == {"base", "oracle", "auto", "CHUM"}
    assert sum(sum(row.values()) for row in result["routing"]["confusion"].values()) == len(result["per_case"])
    unknown = result["routing"]["unknown_centers"]
    assert unknown == {"MDA": {"n": 1, "fallback": 0, "wrong_center": 1, "fallback_rate": 0.0}}
    for case in result["per_case"]:  # MDA has no entry: the oracle serves it the base model
        assert case["scores"]["oracle"]["used"] == ("CHUM" if case["center"] == "CHUM" else FALLBACK)

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
