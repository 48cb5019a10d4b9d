"""PromptedUNETR: MONAI parity, checkpoint compatibility and prompt bookkeeping."""

from __future__ import annotations

import inspect

import pytest
import torch
from monai.networks.nets import UNETR
from tiny import TINY, tiny_model

from centerprompt import PromptedUNETR
from centerprompt.models import prompted_unetr as pu


def test_constants_match_monai() -> None:
    net = UNETR(**TINY)
    assert net.num_layers == pu.MONAI_NUM_LAYERS
    assert net.patch_size == (pu.MONAI_PATCH_SIZE,) * 3
    src = inspect.getsource(UNETR.forward)
    for i in pu.MONAI_SKIP_LAYERS:
        assert f"hidden_states_out[{i}]" in src
    assert pu.default_skip_layers(12) == pu.MONAI_SKIP_LAYERS


def test_constructor_mirrors_monai_arguments() -> None:
    monai_args = inspect.signature(UNETR.__init__).parameters
    ours = inspect.signature(PromptedUNETR.__init__).parameters
    for name, param in monai_args.items():
        assert name in ours, name
        assert ours[name].default == param.default, name


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_monai_state_dict_loads_and_outputs_match(qkv_bias: bool) -> None:
    torch.manual_seed(0)
    reference = UNETR(**TINY, qkv_bias=qkv_bias).eval()
    model = PromptedUNETR(**TINY, qkv_bias=qkv_bias).eval()
    model.load_state_dict(reference.state_dict())  # strict: no renaming needed
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        diff = (reference(x) - model(x)).abs().max().item()
    assert diff <= 1e-5


def test_prompted_model_loads_monai_backbone() -> None:
    reference = UNETR(**TINY)
    model = PromptedUNETR(**TINY, prompt_mode="deep", num_prompts=3)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}  # as saved under DDP
    model.load_backbone_state_dict(state)
    assert torch.equal(model.vit.blocks[5].mlp.linear1.weight, reference.vit.blocks[5].mlp.linear1.weight)
    wrong = PromptedUNETR(**{**TINY, "hidden_size": 96}, prompt_mode="deep")
    with pytest.raises(ValueError, match="does not match"):
        wrong.load_backbone_state_dict(reference.state_dict())


@pytest.mark.parametrize("mode,sets", [("shallow", 1), ("deep", 4)])
def test_prompt_shapes_and_output_shape(mode: str, sets: int) -> None:
    model = tiny_model(prompt_mode=mode, num_prompts=5)
    assert model.prompts.tokens.shape == (sets, 5, TINY["hidden_size"])
    bound = pu.vpt_init_bound(2, (16, 16, 16), TINY["hidden_size"])
    assert model.prompts.tokens.abs().max() <= bound
    x = torch.randn(1, 2, 32, 32, 32)
    assert model(x).shape == (1, 3, 32, 32, 32)
    out, hidden = model.encode(x)
    n_patches = 2 * 2 * 2
    assert out.shape == (1, n_patches, TINY["hidden_size"])
    assert all(h.shape == (1, n_patches, TINY["hidden_size"]) for h in hidden)


def test_vpt_bound_for_vit_b() -> None:
    assert pu.vpt_init_bound(2, (16, 16, 16), 768) == pytest.approx(0.0259, abs=1e-4)


def _block_inputs(model: PromptedUNETR, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for blk in model.vit.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def test_deep_prompts_replace_previous_prompt_outputs() -> None:
    torch.manual_seed(0)
    model = tiny_model(prompt_mode="deep", num_prompts=3).eval()
    inputs = _block_inputs(model, torch.randn(1, 2, 32, 32, 32))
    for i, tokens in enumerate(inputs):
        assert tokens.shape[1] == 3 + 8
        assert torch.equal(tokens[0, :3], model.prompts.tokens[i].detach())


def test_shallow_prompts_enter_once_and_flow_through() -> None:
    torch.manual_seed(0)
    model = tiny_model(prompt_mode="shallow", num_prompts=3).eval()
    inputs = _block_inputs(model, torch.randn(1, 2, 32, 32, 32))
    assert torch.equal(inputs[0][0, :3], model.prompts.tokens[0].detach())
    assert all(t.shape[1] == 11 for t in inputs)
    assert not torch.equal(inputs[1][0, :3], model.prompts.tokens[0].detach())


def test_prompts_change_the_output_and_per_sample_prompts_match_single_runs() -> None:
    torch.manual_seed(0)
    model = tiny_model(prompt_mode="deep", num_prompts=2).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    other = torch.randn_like(model.prompts.tokens)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x, prompts=other))
        mixed = model(x, prompts=torch.stack([model.prompts.tokens, other]))
        assert torch.allclose(mixed[0], model(x[:1])[0], atol=1e-5)
        assert torch.allclose(mixed[1], model(x[1:], prompts=other)[0], atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="prompt_mode"):
        tiny_model(prompt_mode="middle")
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(img_size=(40, 32, 32))
    with pytest.raises(ValueError, match="skip_layers"):
        tiny_model(skip_layers=(1, 2, 9))
    with pytest.raises(ValueError, match="num_prompts"):
        tiny_model(prompt_mode="deep", num_prompts=0)


def test_patch_8_gives_the_paper_token_grid_with_one_fewer_up_sampling_stage() -> None:
    torch.manual_seed(0)
    model = tiny_model(patch_size=8, img_size=(48, 48, 48), prompt_mode="deep", num_prompts=2).eval()
    assert model.feat_size == (6, 6, 6) and model.skip_layers == pu.default_skip_layers(4, 8) == (1, 2)
    names = dict(model.named_children())
    assert {"encoder2", "encoder3", "decoder4", "decoder3", "decoder2"} <= set(names)
    assert "encoder4" not in names and "decoder5" not in names
    x = torch.randn(1, 2, 48, 48, 48)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 48, 48, 48)
        out, hidden = model.encode(x)
    assert out.shape == (1, 216, TINY["hidden_size"]) and all(h.shape == (1, 216, TINY["hidden_size"]) for h in hidden)
    # Each skip level's resolution: encoder2 at 1/2, encoder3 at 1/4, the ViT output enters decoder4 at 1/8.
    shapes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: shapes.__setitem__(n, o.shape[2:]))
             for n in ("encoder1", "encoder2", "encoder3", "decoder4")]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert shapes == {"encoder1": (48,) * 3, "encoder2": (24,) * 3, "encoder3": (12,) * 3, "decoder4": (12,) * 3}
    assert pu.default_skip_layers(12, 8) == (4, 8) and pu.default_skip_layers(12, 16) == (3, 6, 9)


def test_patch_8_model_round_trips_through_the_checkpoint_and_adapter(tmp_path) -> None:
    from centerprompt.artifacts import build_adapted_model, save_adapter, save_model
    from centerprompt.strategies import apply_strategy

    torch.manual_seed(0)
    base = tiny_model(patch_size=8)
    save_model(base, tmp_path / "model.safetensors")
    adapted = tiny_model(patch_size=8, prompt_mode="deep", num_prompts=3)
    adapted.load_backbone_state_dict(base.state_dict())
    apply_strategy(adapted, "deep")
    with torch.no_grad():
        adapted.prompts.tokens.normal_()
    save_adapter(adapted, tmp_path / "adapter.safetensors", "deep", {})
    rebuilt = build_adapted_model(tmp_path / "model.safetensors", tmp_path / "adapter.safetensors").eval()
    assert rebuilt.config["patch_size"] == 8 and rebuilt.feat_size == (4, 4, 4)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), adapted.eval()(x), atol=1e-5)


def test_bad_patch_size() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        tiny_model(patch_size=4)
    with pytest.raises(ValueError, match="skip_layers must be 2"):
        tiny_model(patch_size=8, skip_layers=(1, 2, 3))
    with pytest.raises(ValueError, match="divisible by the patch size 8"):
        tiny_model(patch_size=8, img_size=(36, 32, 32))
