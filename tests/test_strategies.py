"""Strategies: what trains, what stays bit-for-bit frozen, and the parameter accounting."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from tiny import tiny_model

from centerprompt import PromptedUNETR, apply_strategy, parameter_report
from centerprompt.strategies import STRATEGIES


def model_for(strategy: str, **kwargs) -> PromptedUNETR:
    return tiny_model(**STRATEGIES[strategy].model_fields(4), dropout_rate=0.1, **kwargs)


@pytest.mark.parametrize("strategy", ["full", "partial", "shallow", "deep", "deep+head", "lora", "bitfit", "head", "norm",
                                      "deep+norm", "image", "spt", "kv"])
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
        ("spt", {}, 12 * 10 * 768),  # deep prompts, only initialised otherwise
        ("shallow", {}, 10 * 768),
        ("lora", {"rank": 8}, 442_368),
        # A scale and a shift per channel of every conv-path instance norm: encoder1 3 x 16, encoder2's two
        # up-blocks 2 x 2 x 32, encoder3's one 2 x 64 (encoder4 has none), decoder5..2 3 x (128, 64, 32, 16).
        ("norm", {}, 2 * (3 * 16 + 4 * 32 + 2 * 64 + 3 * (128 + 64 + 32 + 16))),
        ("image", {}, 2 * 2 * 8**3),  # an 8^3 scale and shift map for CT and PET
        ("kv", {}, 12 * 10 * 2 * 768),  # a key and a value of width 768 per prompt and layer
    ],
)
def test_vit_b_parameter_counts(strategy: str, options: dict, trainable: int) -> None:
    model = PromptedUNETR(in_channels=2, out_channels=3, img_size=96, **STRATEGIES[strategy].model_fields(10))
    apply_strategy(model, strategy, **options)
    report = parameter_report(model)
    assert report["trainable_params"] == trainable
    assert report["total_params"] == MONAI_UNETR_PARAMS + trainable
    assert report["artifact_tensor_bytes"] == 4 * trainable
    if strategy == "deep":
        assert report["trainable_fraction"] < 0.01


PREPARED: list[tuple[int, ...]] = []  # what the test strategy's ``prepare`` was given


def _norms(model: PromptedUNETR, options: dict) -> list:
    from centerprompt.strategies import set_trainable

    blocks = options["blocks"]
    return set_trainable(model, lambda n: n.startswith("vit.blocks.") and (".norm1." in n or ".norm2." in n)
                         and (blocks is None or int(n.split(".")[2]) in blocks))  # fmt: skip


@pytest.fixture
def layernorm_strategy():
    from centerprompt.strategies import EXTRA, Option, Strategy, register, unregister

    parse = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    yield register(Strategy("layernorm", "the ViT's LayerNorm weights", _norms, lr=1e-2, tier=EXTRA,
                            options=(Option("blocks", None, parse, "ViT blocks to train"),),
                            prepare=lambda model, images: PREPARED.append(tuple(images.shape))))  # fmt: skip
    unregister("layernorm")


def test_a_strategy_added_through_the_registry_alone_runs_through_adapt(
    layernorm_strategy, hecktor_dir, tmp_path
) -> None:
    """The registry entry is all it takes: the CLI lists and parses it, adapt prepares and trains
    exactly its tensors, the adapter file holds them and loads back onto the base."""
    from safetensors.torch import load_file

    from centerprompt.artifacts import build_adapted_model, load_model, read_adapter_metadata
    from centerprompt.cli import main
    from centerprompt.training.config import PretrainRun
    from centerprompt.runs.pretrain import pretrain

    pretrain(PretrainRun(data_dir=hecktor_dir, out=tmp_path / "base", exclude_center="MDA", preset="tiny", epochs=1,
                         progress=False))  # fmt: skip
    base = tmp_path / "base" / "model.safetensors"
    args = ["adapt", "--data", str(hecktor_dir), "--center", "MDA", "--base", str(base), "--strategy", "layernorm",
            "--shots", "1", "--epochs", "3", "--out", str(tmp_path / "ln")]  # fmt: skip
    assert main([*args, "--option", "blocks=1"]) == 0
    assert PREPARED == [(1, 2, 32, 32, 32)]  # prepared once, with a crop of the one adaptation case
    adapter = tmp_path / "ln" / "adapter.safetensors"
    meta = read_adapter_metadata(adapter)
    assert meta["strategy"] == "layernorm" and meta["options"] == {"blocks": [1]}
    assert meta["tensors"] == sorted(f"vit.blocks.1.{m}.{p}" for m in ("norm1", "norm2") for p in ("weight", "bias"))
    # Exactly the selected tensors trained (the last checkpoint holds the trainable state) and moved.
    last = torch.load(tmp_path / "ln" / "last.pt", weights_only=True)["trainable"]
    assert sorted(last) == meta["tensors"]
    plain = load_model(base).state_dict()
    assert any(not torch.equal(last[n], plain[n]) for n in last)
    adapted, saved = build_adapted_model(base, adapter).state_dict(), load_file(adapter)
    assert all(torch.equal(adapted[n], saved[n]) for n in saved)  # the adapter loads back onto the base
    assert main([*args, "--option", "depth=1"]) == 2  # an option the strategy does not declare
    assert main([*args, "--lora-rank", "4"]) == 2  # another strategy's flag


def test_registry_refuses_a_taken_name_and_lists_tiers(layernorm_strategy) -> None:
    from centerprompt.strategies import QUICK, STANDARD, Strategy, register, strategy_names

    with pytest.raises(ValueError, match="already registered"):
        register(Strategy("deep", "again", _norms))
    assert set(strategy_names(QUICK)) < set(strategy_names(STANDARD)) < set(strategy_names())
    assert "layernorm" in strategy_names() and "layernorm" not in strategy_names(STANDARD)


def test_spt_prompts_start_as_the_new_centers_token_means() -> None:
    """With one prompt per layer, each layer's prototype is the mean of every patch token entering it."""
    from centerprompt.models.prompts import token_prototypes

    torch.manual_seed(0)
    model = model_for("spt").eval()
    images = torch.randn(3, 2, 32, 32, 32)
    one = token_prototypes(model, images, 1)
    with torch.no_grad():
        _, hidden = model.encode(images)
        entering = [model.vit.patch_embedding(images), *hidden[:-1]]
    for layer, tokens in enumerate(entering):
        assert torch.allclose(one[layer, 0], tokens.reshape(-1, tokens.shape[-1]).mean(0), atol=1e-5)
    four = token_prototypes(model, images, 4)
    assert four.shape == model.prompts.tokens.shape
    assert torch.allclose(four.mean(1), one[:, 0], atol=0.2)  # four group means around the overall mean
    STRATEGIES["spt"].prepare(model, images)
    assert torch.equal(model.prompts.tokens, four)  # the strategy's preparation, with the same seed
