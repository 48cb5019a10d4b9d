"""The adapter diagnostic: where a change goes inside the model and how much reaches the labels."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from centerprompt.study.diagnostic import adapter_effect
from centerprompt.strategies import STRATEGIES, apply_strategy


def _pair(strategy: str, **kwargs):
    torch.manual_seed(0)
    base = tiny_model().eval()
    adapted = tiny_model(**{**STRATEGIES[strategy].model_fields(3), **kwargs})
    adapted.load_backbone_state_dict(base.state_dict())
    apply_strategy(adapted, strategy)
    return base, adapted.eval()


def test_an_identity_adapter_changes_nothing() -> None:
    base, adapted = _pair("norm")
    effect = adapter_effect(base, adapted, [torch.randn(1, 2, 32, 32, 32)])
    assert effect["prompt_attention_share"] is None  # no prompt tokens
    assert all(s["relative_change"] == 0.0 for s in effect["stages"].values())
    assert effect["logits"]["relative_change"] == 0.0 and effect["label_change_share"] == 0.0


def test_a_channel_offset_is_uniform_where_it_is_added() -> None:
    base, adapted = _pair("norm")
    with torch.no_grad():
        adapted.encoder1.layer.norm2.steer_shift.fill_(1.0)  # the same offset at every position
    effect = adapter_effect(base, adapted, [torch.randn(1, 2, 32, 32, 32)])
    first = effect["stages"]["encoder1"]
    assert first["relative_change"] > 0.1 and first["uniform_share"] > 0.2
    assert effect["stages"]["tokens->encoder2"]["relative_change"] == 0.0  # the ViT is upstream of nothing changed
    assert effect["logits"]["relative_change"] > 0


def test_prompts_take_attention_and_reach_the_token_grids() -> None:
    base, adapted = _pair("deep")
    with torch.no_grad():
        adapted.prompts.tokens.normal_(std=3.0)
    effect = adapter_effect(base, adapted, [torch.randn(1, 2, 32, 32, 32)])
    share = effect["prompt_attention_share"]
    assert len(share) == len(adapted.vit.blocks) and all(0 < s < 1 for s in share)
    assert effect["stages"]["tokens->encoder2"]["relative_change"] > 0
    assert adapted.vit.blocks[0].attn.use_flash_attention  # the measurement put the fused path back


def test_key_value_prompts_count_as_prompt_attention() -> None:
    """Attention on the appended keys counts; the rows their zero queries add do not."""
    from centerprompt.study.diagnostic import _prompt_share

    # 1 prompt token, 2 patches, 1 key-value prompt: queries (prompt, patch, patch, kv row), keys the same.
    att = torch.tensor([[9.0, 9.0, 9.0, 9.0],  # the prompt token's query: not a patch
                        [0.1, 0.5, 0.2, 0.2],  # patch queries: 0.1 on the prompt token + 0.2 on the kv prompt
                        [0.3, 0.1, 0.1, 0.5],
                        [7.0, 7.0, 7.0, 7.0]]).reshape(1, 1, 4, 4)  # fmt: skip  # the kv row: never a query
    assert _prompt_share(att, prompts=1, kv=1) == pytest.approx((0.3 + 0.8) / 2)
    base, adapted = _pair("kv")
    with torch.no_grad():
        adapted.kv_prompts.key.normal_(std=3.0)
        adapted.kv_prompts.value.normal_()
    share = adapter_effect(base, adapted, [torch.randn(1, 2, 32, 32, 32)])["prompt_attention_share"]
    assert len(share) == len(adapted.vit.blocks) and all(0 < s < 1 for s in share)


def test_inspect_with_an_adapter_writes_the_measurements_and_a_figure(world, capsys) -> None:
    import json

    from centerprompt.artifacts import load_model, save_adapter
    from centerprompt.cli import main

    base = world / "runs" / "b" / "model.safetensors"
    model = load_model(base, **STRATEGIES["norm"].model_fields())
    apply_strategy(model, "norm")
    with torch.no_grad():
        model.decoder2.conv_block.norm2.steer_shift.fill_(2.0)  # the last norm: reaches the logits
    adapter = save_adapter(model, world / "norm.safetensors", "norm", extra={"center": "MDA"})
    out = world / "effect.json"
    assert main(["inspect", "--base", str(base), "--adapter", str(adapter), "--data", str(world / "data"),
                 "--split", "all", "--out", str(out)]) == 0  # fmt: skip
    effect = json.loads(out.read_text())
    assert effect["strategy"] == "norm" and effect["centers"] == ["MDA"] and len(effect["cases"]) == 2
    assert effect["logits"]["relative_change"] > 0 and effect["stages"]["decoder3"]["relative_change"] == 0.0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "voxels whose label changes" in capsys.readouterr().out
