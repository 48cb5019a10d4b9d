"""Per-center adapter files and full checkpoints: round trips and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR
from tiny import TINY, tiny_model

from centerprompt import apply_strategy
from centerprompt.artifacts import (
    backbone_fingerprint,
    build_adapted_model,
    load_adapter,
    load_model,
    read_adapter_metadata,
    save_adapter,
    save_model,
)
from centerprompt.strategies import STRATEGIES


def _perturb_trainable(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("strategy", ["shallow", "deep", "deep+head", "lora", "bitfit", "partial"])
def test_adapter_round_trip_gives_the_same_output(tmp_path: Path, strategy: str) -> None:
    torch.manual_seed(0)
    base = tiny_model()
    base_path = save_model(base, tmp_path / "model.safetensors")
    adapted = load_model(base_path, prompt_mode=STRATEGIES[strategy].prompt_mode, num_prompts=3)
    options = {"rank": 2} if strategy == "lora" else {}
    apply_strategy(adapted, strategy, **options)
    _perturb_trainable(adapted)  # stands in for training
    artifact = save_adapter(adapted, tmp_path / "adapter.safetensors", strategy, options)
    meta = read_adapter_metadata(artifact)
    assert meta["strategy"] == strategy and meta["config"]["hidden_size"] == TINY["hidden_size"]
    # A prompt artifact holds only prompts: kilobytes, not a model.
    if strategy in ("shallow", "deep"):
        assert meta["tensors"] == ["prompts.tokens"]
        assert artifact.stat().st_size < 0.05 * base_path.stat().st_size

    restored = build_adapted_model(base_path, artifact)
    x = torch.randn(1, 2, 32, 32, 32)
    adapted.eval()
    with torch.no_grad():
        assert torch.allclose(adapted(x), restored(x), atol=1e-6)
        assert not torch.allclose(base.eval()(x), restored(x), atol=1e-4)


def test_adapter_refuses_another_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(prompt_mode="deep", num_prompts=3)
    apply_strategy(model, "deep")
    artifact = save_adapter(model, tmp_path / "a.safetensors", "deep")

    other_weights = tiny_model(prompt_mode="deep", num_prompts=3)  # same config, other weights
    with pytest.raises(ValueError, match="different weights"):
        load_adapter(other_weights, artifact)
    other_config = tiny_model(num_layers=6, prompt_mode="deep", num_prompts=3)
    with pytest.raises(ValueError, match="num_layers=4 \\(model: 6\\)"):
        load_adapter(other_config, artifact)
    no_prompts = tiny_model()
    no_prompts.load_state_dict(model.state_dict(), strict=False)
    with pytest.raises(ValueError, match="prompt_mode='deep'"):
        load_adapter(no_prompts, artifact)


def test_fingerprint_ignores_prompts_and_lora_wrapping() -> None:
    torch.manual_seed(0)
    plain = tiny_model()
    prompted = tiny_model(prompt_mode="deep")
    prompted.load_backbone_state_dict(plain.state_dict())
    assert backbone_fingerprint(plain) == backbone_fingerprint(prompted)
    apply_strategy(plain, "lora", rank=2)
    assert backbone_fingerprint(plain) == backbone_fingerprint(prompted)


def test_corrupt_and_foreign_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_model(bad)
    model_file = save_model(tiny_model(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a centerprompt-adapter"):
        load_adapter(tiny_model(), model_file)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="torn.pt"):
        load_model(torn)


def test_monai_pt_checkpoint_loads_with_inferred_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = UNETR(**TINY).eval()
    torch.save(reference.state_dict(), tmp_path / "unetr.pt")
    model = load_model(tmp_path / "unetr.pt", num_heads=TINY["num_heads"]).eval()
    assert model.config["num_layers"] == 12 and model.config["hidden_size"] == TINY["hidden_size"]
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert (reference(x) - model(x)).abs().max() <= 1e-5


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import centerprompt.artifacts as artifacts

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifacts, "save_file", explode)
    with pytest.raises(RuntimeError):
        save_model(tiny_model(), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []
