"""Prompt-aware pretraining: one prompt set per pretraining center plus a shared set (issue 24, Part B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import TINY, tiny_model

from centerprompt.strategies import apply_strategy, get_strategy


def _aware(**kwargs):
    torch.manual_seed(0)
    return tiny_model(prompt_mode="deep", num_prompts=3, center_prompts=("CHUM", "HGJ"), **kwargs).eval()


def test_each_center_reads_its_own_prompts_and_others_the_shared_set() -> None:
    model = _aware()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        hgj = model(x, centers=["HGJ"])
        assert torch.allclose(hgj, model(x, prompts=model.center_prompts.tokens[1]))
        assert not torch.allclose(hgj, model(x, centers=["CHUM"]), atol=1e-6)
        shared = model(x)
        for other in (None, "USZ"):  # the shared set: no center given, or one without its own set
            assert torch.equal(model(x, centers=[other]), shared)
        pair = model(torch.cat([x, x]), centers=["HGJ", None])
        assert torch.allclose(pair[0], hgj[0], atol=1e-5) and torch.allclose(pair[1], shared[0], atol=1e-5)


def test_a_step_trains_the_sets_of_the_batch_only() -> None:
    model = _aware()
    params = apply_strategy(model, "full")
    out = model(torch.randn(2, 2, 32, 32, 32), centers=["CHUM", None])
    out.square().mean().backward()
    grad = model.center_prompts.tokens.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0  # HGJ was not in the batch
    assert model.prompts.tokens.grad.abs().sum() > 0  # the shared set served the second sample
    assert any(p is model.center_prompts.tokens for p in params)  # pretraining ("full") trains the sets too


def test_wrong_uses_are_refused() -> None:
    with pytest.raises(ValueError, match="prompt_mode"):
        tiny_model(center_prompts=("CHUM",))
    model, plain = _aware(), tiny_model()
    x = torch.randn(2, 2, 32, 32, 32)
    with pytest.raises(ValueError, match="without center_prompts"):
        plain(x, centers=["CHUM", "HGJ"])
    with pytest.raises(ValueError, match="3 centers for a batch of 2"):
        model(x, centers=["CHUM", "HGJ", None])


def test_plain_monai_weights_load_into_a_prompt_aware_model_and_not_the_reverse() -> None:
    from monai.networks.nets import UNETR

    torch.manual_seed(1)
    monai = UNETR(**TINY)  # 12 layers
    aware = tiny_model(num_layers=12, prompt_mode="deep", num_prompts=3, center_prompts=("CHUM",))
    tokens = aware.center_prompts.tokens.detach().clone()
    aware.load_backbone_state_dict(monai.state_dict())
    assert torch.equal(aware.out.conv.conv.weight, monai.out.conv.conv.weight)
    assert torch.equal(aware.center_prompts.tokens, tokens)  # absent from a plain checkpoint: left as built
    with pytest.raises(RuntimeError, match="center_prompts.tokens"):
        monai.load_state_dict(aware.state_dict())


def test_strategies_on_a_prompted_base_keep_its_prompts() -> None:
    base = {**TINY, "prompt_mode": "deep", "num_prompts": 3, "center_prompts": ["CHUM"]}
    fields = get_strategy("norm").model_fields(10, 0.1, base)
    assert (fields["prompt_mode"], fields["num_prompts"], fields["prompt_dropout"]) == ("deep", 3, 0.0)
    assert get_strategy("deep").model_fields(3, 0.0, base)["num_prompts"] == 3
    with pytest.raises(ValueError, match="deep prompts of 3 tokens"):
        get_strategy("deep").model_fields(10, 0.0, base)
    with pytest.raises(ValueError, match="--num-prompts 3"):
        get_strategy("shallow").model_fields(3, 0.0, base)
    assert get_strategy("norm").model_fields(10, 0.0, TINY)["prompt_mode"] == "none"  # a plain base: as before


def test_pretrain_adapt_and_score_a_prompt_aware_base(two_centers: Path, tmp_path: Path) -> None:
    """The base learns CHUM's set and the shared one; ``deep`` starts from the shared set; ``norm``
    keeps the base's prompts frozen; an experiment reads old centers with their own sets (and, in
    the ``:everywhere`` rows, with the new center's); the scorer reads a CHUM case with CHUM's set."""
    from centerprompt.artifacts import build_adapted_model
    from centerprompt.checkpoints import resolve_base
    from centerprompt.training.config import AdaptRun, ExperimentRun, PretrainRun
    from centerprompt.data.hecktor import find_cases
    from centerprompt.study.experiment import run_experiment
    from centerprompt.runs.adapt import adapt
    from centerprompt.runs.pretrain import pretrain
    from centerprompt.scoring import Scorer

    out = tmp_path / "base"
    pretrain(PretrainRun(data_dir=two_centers, out=out, exclude_center="MDA", preset="tiny", epochs=1,
                         center_prompts=2, progress=False))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["center_prompts"] == ["CHUM"] and config["shared_prompt_share"] == 0.3
    base = resolve_base(out / "model.safetensors")
    assert base.config["center_prompts"] == ["CHUM"] and base.state["center_prompts.tokens"].shape[0] == 1

    deep = base.build(**get_strategy("deep").model_fields(2, base=base.config))
    assert torch.equal(deep.prompts.tokens, base.state["prompts.tokens"])
    assert torch.equal(deep.center_prompts.tokens, base.state["center_prompts.tokens"])

    run = AdaptRun(data_dir=two_centers, center="MDA", base=out / "model.safetensors", out=tmp_path / "norm",
                   strategy="norm", shots=2, epochs=1, progress=False)  # fmt: skip
    adapt(run)
    model = build_adapted_model(out / "model.safetensors", tmp_path / "norm" / "adapter.safetensors")
    assert torch.equal(model.prompts.tokens, base.state["prompts.tokens"])  # frozen, not in the adapter

    results = run_experiment(ExperimentRun(
        data_dir=two_centers, new_center="MDA", out=tmp_path / "exp", strategies=("none", "deep", "deep+head"),
        base=out / "model.safetensors", shots=2, num_prompts=2, adapt_epochs=3, score_at="preprocessed",
        progress=False))  # fmt: skip
    rows = results["strategies"]
    assert set(rows) == {"none", "deep", "deep:everywhere", "deep+head", "deep+head:no-prompts", "deep+head:everywhere"}
    # deep trains only the default set: old centers, read with their own sets, are exactly as before
    assert rows["deep"]["old_centers"]["per_case"] == rows["none"]["old_centers"]["per_case"]
    assert rows["deep:everywhere"]["everywhere_of"] == "deep"
    adapted = build_adapted_model(out / "model.safetensors", rows["deep+head"]["artifact"])
    assert not torch.equal(adapted.prompts.tokens, base.state["prompts.tokens"])  # trained from the shared set
    stripped = build_adapted_model(out / "model.safetensors", rows["deep+head"]["artifact"], without_prompts=True)
    assert torch.equal(stripped.prompts.tokens, base.state["prompts.tokens"])  # the base's own take their place
    assert torch.equal(stripped.out.conv.conv.weight, adapted.out.conv.conv.weight)

    chum = [c for c in find_cases(two_centers) if c.center == "CHUM"][:1]
    seen: list = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("centers")), with_kwargs=True)
    Scorer(chum, base.preprocess, score_at="preprocessed").predict(model, 0)
    assert seen and all(c == ["CHUM"] for c in seen)


def test_prompt_reading_reads_each_case_with_the_sets_it_names(two_centers: Path) -> None:
    """``inspect --base`` on a prompt-aware base: own set, shared set, the next center's set."""
    from centerprompt.data.hecktor import find_cases
    from centerprompt.training.presets import PRESETS
    from centerprompt.study.reliance import prompt_reading
    from centerprompt.scoring import Scorer

    torch.manual_seed(0)
    model = tiny_model(**{**PRESETS["tiny"].model, "prompt_mode": "deep", "num_prompts": 2,
                          "center_prompts": ("CHUM", "MDA")}).eval()  # fmt: skip
    cases = find_cases(two_centers)
    scorer = Scorer([next(c for c in cases if c.center == name) for name in ("CHUM", "MDA")],
                    PRESETS["tiny"].preprocess, score_at="preprocessed")  # fmt: skip
    seen: list[tuple[str, torch.Tensor]] = []

    def spy(module, args, kwargs):
        chosen = (kwargs.get("prompts") if kwargs.get("prompts") is not None
                  else model.center_prompts.select(kwargs.get("centers") or [None], model.prompts.tokens)[0])  # fmt: skip
        seen.append(chosen.detach().clone())

    model.register_forward_pre_hook(spy, with_kwargs=True)
    r = prompt_reading(model, scorer)
    assert set(r["minus_own"]) == {"the shared set", "another center's set"}
    assert r["minus_own"]["the shared set"]["n_cases"] == 2
    chum, mda, shared = model.center_prompts.tokens[0], model.center_prompts.tokens[1], model.prompts.tokens
    windows = len(seen) // 6  # own, shared, another's for each of the two cases, the same windows each time
    expected = [chum, mda, shared, shared, mda, chum]
    for k, tokens in enumerate(expected):
        assert all(torch.equal(t, tokens) for t in seen[k * windows:(k + 1) * windows])
