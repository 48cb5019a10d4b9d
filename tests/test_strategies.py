"""Strategies: what trains, what stays bit-for-bit frozen, and the parameter accounting."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from tiny import tiny_model

from centerprompt import PromptedUNETR, apply_strategy, parameter_report
from centerprompt.strategies import STRATEGIES


def model_for(strategy: str, **kwargs) -> PromptedUNETR:
    return tiny_model(prompt_mode=STRATEGIES[strategy].prompt_mode, num_prompts=4, dropout_rate=0.1, **kwargs)


@pytest.mark.parametrize("strategy", ["full", "partial", "shallow", "deep", "deep+head", "lora", "bitfit"])
def test_training_changes_only_trainable_tensors(strategy: str) -> None:
    torch.manual_seed(0)
    model = model_for(strategy)
    params = apply_strategy(model, strategy, **({"rank": 2} if strategy == "lora" else {}))
    assert params, "a training strategy must train something"
    model.train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(2, 2, 32, 32, 32)
    y = torch.randint(0, 3, (2, 1, 32, 32, 32))
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    for name, tensor in before.items():
        if name in trainable:
            assert not torch.equal(tensor, after[name]), f"{name} should have trained"
        else:
            assert torch.equal(tensor, after[name]), f"{name} should be frozen"


@pytest.mark.parametrize("strategy", ["deep", "shallow", "lora", "partial"])
def test_frozen_modules_stay_in_eval_mode(strategy: str) -> None:
    model = model_for(strategy)
    apply_strategy(model, strategy)
    model.train()
    if strategy == "lora":
        assert model.vit.patch_embedding.training is False
        assert model.vit.blocks[0].attn.training is True  # holds trainable LoRA layers
    else:
        assert model.vit.training is False
        assert model.vit.blocks[0].attn.drop_output.training is False
    if strategy in ("deep", "shallow"):
        assert model.prompts.training is True
        assert model.decoder2.training is False


def test_full_keeps_dropout_active_inside_trainable_blocks() -> None:
    model = model_for("full")
    apply_strategy(model, "full")
    model.train()
    assert model.vit.blocks[0].attn.drop_output.training is True
    unused = [n for n, p in model.named_parameters() if "norm_cross_attn" in n]
    assert unused and not any(dict(model.named_parameters())[n].requires_grad for n in unused)


def test_none_trains_nothing_and_bad_requests_fail() -> None:
    model = model_for("none")
    assert apply_strategy(model, "none") == []
    with pytest.raises(ValueError, match="prompt_mode='deep'"):
        apply_strategy(model, "deep")
    with pytest.raises(ValueError, match="unknown strategy"):
        apply_strategy(model, "half")
    with pytest.raises(ValueError, match="no module"):
        apply_strategy(model, "partial", modules=("decoder9",))
    with pytest.raises(ValueError, match="no option"):
        apply_strategy(model, "deep", rank=2)


def test_partial_modules_are_a_parameter() -> None:
    model = model_for("partial")
    apply_strategy(model, "partial", modules=("out",))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("out.") for n in names)


# Exact counts for the paper configuration: ViT-B UNETR, 2 channels, 3 classes, 96^3.
MONAI_UNETR_PARAMS = 95_948_467


@pytest.mark.parametrize(
    "strategy,options,trainable",
    [
        ("deep", {}, 12 * 10 * 768),
        ("shallow", {}, 10 * 768),
        ("lora", {"rank": 8}, 442_368),
    ],
)
def test_vit_b_parameter_counts(strategy: str, options: dict, trainable: int) -> None:
    mode = STRATEGIES[strategy].prompt_mode
    model = PromptedUNETR(in_channels=2, out_channels=3, img_size=96, prompt_mode=mode, num_prompts=10)
    apply_strategy(model, strategy, **options)
    report = parameter_report(model)
    assert report["trainable_params"] == trainable
    assert report["total_params"] == MONAI_UNETR_PARAMS + trainable
    assert report["artifact_tensor_bytes"] == 4 * trainable
    if strategy == "deep":
        assert report["trainable_fraction"] < 0.01
