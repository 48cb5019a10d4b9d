"""Key-value prompts (E2VPT): what they train, that the patch tokens attend to them exactly as to
their own keys and values, and that a copy of the model keeps its own prompts."""

from __future__ import annotations

import copy

import torch
from tiny import tiny_model

from centerprompt.models.prompted_unetr import PromptedUNETR
from centerprompt.training.presets import get_preset
from centerprompt.strategies import STRATEGIES, apply_strategy, parameter_report


def test_kv_trains_a_key_and_a_value_per_prompt_and_layer() -> None:
    model = PromptedUNETR(in_channels=2, out_channels=3, **{**get_preset("cpu").model, **STRATEGIES["kv"].model_fields()})
    trained = apply_strategy(model, "kv")
    # cpu preset: 6 layers x 10 prompts x (a key and a value of width 192).
    assert sum(p.numel() for p in trained) == 6 * 10 * 2 * 192
    assert parameter_report(model)["trainable_fraction"] < 0.01
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"kv_prompts.key", "kv_prompts.value"}


def _attention_by_hand(attn: torch.nn.Module, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention of x's queries over x's keys and values followed by the prompts' (P, width) ones."""
    b, n, _ = x.shape
    heads = attn.num_heads
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)  # not through the hook
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (B, heads, N, d) each
    k = torch.cat((k, key.reshape(1, -1, heads, k.shape[-1]).transpose(1, 2).expand(b, -1, -1, -1)), dim=2)
    v = torch.cat((v, value.reshape(1, -1, heads, v.shape[-1]).transpose(1, 2).expand(b, -1, -1, -1)), dim=2)
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(b, n, -1))


def test_patch_tokens_attend_to_the_prompts_as_to_their_own_keys() -> None:
    torch.manual_seed(0)
    model = tiny_model(kv_prompts=3).eval()
    with torch.no_grad():
        model.kv_prompts.key.normal_()
        model.kv_prompts.value.normal_()
        x = torch.randn(2, 7, 48)
        for layer in (0, 2):
            attn = model.vit.blocks[layer].attn
            hooked = attn(x)  # MONAI's attention with the hooks (its fused path)
            handles = (attn._forward_hooks.copy(), attn.qkv._forward_hooks.copy())
            attn._forward_hooks.clear(), attn.qkv._forward_hooks.clear()
            plain = attn(x)
            attn._forward_hooks.update(handles[0]), attn.qkv._forward_hooks.update(handles[1])
            expected = _attention_by_hand(attn, x, model.kv_prompts.key[layer], model.kv_prompts.value[layer])
            assert hooked.shape == x.shape
            torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(hooked, plain, atol=1e-3)


def test_kv_prompts_start_apart_and_every_one_gets_a_gradient() -> None:
    """Values start at 0 and keys at distinct small values: identical prompts would get identical
    gradients and never come apart."""
    torch.manual_seed(0)
    model = tiny_model(kv_prompts=3)
    prompts = model.kv_prompts
    assert torch.count_nonzero(prompts.value) == 0
    assert all(torch.unique(prompts.key[layer], dim=0).shape[0] == 3 for layer in range(prompts.key.shape[0]))
    model(torch.randn(2, 2, 32, 32, 32)).square().mean().backward()
    for grad in (prompts.key.grad, prompts.value.grad):
        per_prompt = grad.abs().sum(-1)  # (layers, P)
        assert torch.all(per_prompt > 0)
        assert not torch.allclose(grad[:, 0], grad[:, 1])


def test_a_copy_of_the_model_attends_to_its_own_prompts() -> None:
    torch.manual_seed(0)
    model = tiny_model(kv_prompts=2).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        before = model(x)
        twin.kv_prompts.value.normal_()
        torch.testing.assert_close(model(x), before)  # the original's hooks do not read the twin's prompts
        assert not torch.allclose(twin(x), before, atol=1e-3)
