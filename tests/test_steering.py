"""The adapters that act after the decoder's norms and on the image: what they train, that they
start as the identity, that their files round-trip, and what the attribution rows remove."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from centerprompt.artifacts import build_adapted_model, load_model, save_adapter, save_model
from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.training.presets import get_preset
from centerprompt.strategies import STRATEGIES, apply_strategy, parameter_report

NEW = ("head", "norm", "deep+norm", "image", "kv")


def _cpu_model(strategy: str) -> PromptedUNETR:
    return PromptedUNETR(in_channels=2, out_channels=3, **{**get_preset("cpu").model,
                                                           **STRATEGIES[strategy].model_fields(10)})  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # The output convolution: 8 input features x 3 classes + 3 biases.
        ("head", 8 * 3 + 3),
        # A scale and a shift per channel of every conv-path instance norm of the cpu preset: encoder1's
        # three norms of 8 channels, encoder2's up-block (two norms of 16), decoder4 (three of 32),
        # decoder3 (three of 16), decoder2 (three of 8): 224 channels, as in shared/REFERENCE.md (448).
        ("norm", 2 * (3 * 8 + 2 * 16 + 3 * 32 + 3 * 16 + 3 * 8)),
        # Deep prompts (6 layers x 10 tokens x 192) and the same norm parameters.
        ("deep+norm", 6 * 10 * 192 + 448),
        # A scale and a shift map of 8^3 for each of CT and PET.
        ("image", 2 * 2 * 8**3),
    ],
)
def test_each_strategy_trains_exactly_what_it_says(strategy: str, expected: int) -> None:
    model = _cpu_model(strategy)
    trained = apply_strategy(model, strategy)
    assert sum(p.numel() for p in trained) == expected
    report = parameter_report(model)
    assert report["trainable_params"] == expected and report["trainable_fraction"] < 0.01
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vit.") and not n.startswith("prompts.") for n in names)  # the backbone stays frozen


@pytest.mark.parametrize("strategy", ["norm", "image"])
def test_an_untrained_adapter_gives_the_base_logits(strategy: str) -> None:
    torch.manual_seed(0)
    base = tiny_model().eval()
    adapted = tiny_model(**STRATEGIES[strategy].model_fields())
    adapted.load_backbone_state_dict(base.state_dict())
    apply_strategy(adapted, strategy)
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(adapted.eval()(x), base(x))
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.3)
        assert not torch.allclose(adapted(x), base(x), atol=1e-3)  # and the parts are on the path


def test_norm_steering_moves_what_the_instance_norm_removes() -> None:
    """A per-channel offset on a token grid vanishes after the decoder's first norm; the steering shift does not."""
    torch.manual_seed(0)
    model = tiny_model(steer_norms=True).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        plain = model(x)
        first = next(m for n, m in model.named_modules() if n.endswith("norm1") and n.startswith("decoder"))
        first.steer_shift.fill_(0.5)
        assert not torch.allclose(model(x), plain, atol=1e-3)


@pytest.mark.parametrize("strategy", NEW)
def test_adapter_file_round_trips(tmp_path: Path, strategy: str) -> None:
    torch.manual_seed(0)
    base_path = save_model(tiny_model(), tmp_path / "model.safetensors")
    adapted = load_model(base_path, **STRATEGIES[strategy].model_fields(3))
    apply_strategy(adapted, strategy)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    artifact = save_adapter(adapted, tmp_path / "adapter.safetensors", strategy)
    assert artifact.stat().st_size < 0.05 * base_path.stat().st_size
    restored = build_adapted_model(base_path, artifact)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(adapted.eval()(x), restored(x), atol=1e-6)


def test_an_adapter_refuses_a_model_built_without_its_parts(tmp_path: Path) -> None:
    from centerprompt.artifacts import load_adapter

    torch.manual_seed(0)
    base_path = save_model(tiny_model(), tmp_path / "model.safetensors")
    adapted = load_model(base_path, **STRATEGIES["norm"].model_fields())
    apply_strategy(adapted, "norm")
    artifact = save_adapter(adapted, tmp_path / "norm.safetensors", "norm")
    with pytest.raises(ValueError, match="steer_norms=True"):
        load_adapter(load_model(base_path), artifact)


def test_without_prompts_keeps_the_other_parts_and_drops_the_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_model()
    base_path = save_model(base, tmp_path / "model.safetensors")
    adapted = load_model(base_path, **STRATEGIES["deep+head"].model_fields(3))
    apply_strategy(adapted, "deep+head")
    with torch.no_grad():
        adapted.prompts.tokens.normal_()
        adapted.out.conv.conv.weight.add_(0.5)
    artifact = save_adapter(adapted, tmp_path / "deep+head.safetensors", "deep+head")
    stripped = build_adapted_model(base_path, artifact, without_prompts=True)
    assert stripped.prompts is None
    head_only = load_model(base_path)
    with torch.no_grad():
        head_only.out.conv.conv.weight.copy_(adapted.out.conv.conv.weight)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(stripped(x), head_only.eval()(x), atol=1e-6)
        assert not torch.allclose(stripped(x), adapted.eval()(x), atol=1e-3)  # the prompts did something
    norm = load_model(base_path, **STRATEGIES["norm"].model_fields())
    apply_strategy(norm, "norm")
    with pytest.raises(ValueError, match="no prompt tokens"):
        build_adapted_model(base_path, save_adapter(norm, tmp_path / "norm.safetensors", "norm"), without_prompts=True)


def test_a_plain_monai_state_dict_loads_into_a_steered_model() -> None:
    from monai.networks.nets import UNETR

    monai_net = UNETR(in_channels=2, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=48,
                      mlp_dim=96, num_heads=4)  # fmt: skip
    model = PromptedUNETR(in_channels=2, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=48,
                          mlp_dim=96, num_heads=4, steer_norms=True, image_prompt=4)  # fmt: skip
    model.load_backbone_state_dict(monai_net.state_dict())
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), monai_net.eval()(x), atol=1e-5)  # identity until trained
    assert {n for n in model.state_dict()} - set(monai_net.state_dict()) == {
        n for n in model.state_dict() if n.endswith(("steer_scale", "steer_shift")) or n.startswith("image_prompt.")
    }
