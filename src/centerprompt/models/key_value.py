"""Key-value prompts inside attention (E2VPT, Han et al., arXiv 2307.13770).

Why: a prompt token (VPT) reaches attention only through its block's LayerNorm and the frozen
query/key/value projection, so its key and value are tied to one direction of the residual
stream. Key-value prompts are P learned keys and values appended to each layer's own: the patch
tokens attend to them, nothing queries from them, so the token count stays and with it the token
grids the decoder reads.

How, without touching MONAI's code or state-dict names: MONAI's ``SABlock`` computes q, k and v
with one linear layer, ``attn.qkv``, whose output is laid out as (q|k|v, heads, head_dim), and
attends over whatever rows it gets. A forward hook on ``attn.qkv`` appends P rows
``[0 | key | value]``; a forward hook on ``attn`` drops the P outputs those rows produce (their
zero queries attend uniformly and are never used). MONAI's attention does the rest, its fused
path included.

Not the identity at initialisation (as VPT's prompts are not): the values start at zero, but the
keys take a share of each query's attention, which scales that query's attention output by
``1 - share`` (the share is small at the start, ``P / (P + sum_j exp(q.k_j / sqrt(d)))``).

Measured on the cpu preset's UNETR (benchmarks/RESULTS.md): they gain nothing there, because its
attention is sharp (a query's best content key scores 13-26 before the softmax), so keys that
start small get almost no attention and almost no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

KV_NAME = "kv_prompts"  # the PromptedUNETR attribute, so the state-dict names are kv_prompts.key / .value


class KeyValuePrompts(nn.Module):
    """``num_prompts`` keys and values per transformer layer, shape (layers, P, width) each.

    Args:
        num_layers: transformer layers (one key set and one value set each).
        num_prompts: P, the keys (and values) each layer's tokens may attend to.
        width: the attention's inner width (heads x head_dim).
        init_bound: keys are drawn from U(-bound, bound), which makes the P prompts differ; values start at 0.
    """

    def __init__(self, num_layers: int, num_prompts: int, width: int, init_bound: float) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"key-value prompts need at least 1 per layer, got {num_prompts}.")
        self.key = nn.Parameter(torch.empty(num_layers, num_prompts, width))
        nn.init.uniform_(self.key, -init_bound, init_bound)
        self.value = nn.Parameter(torch.zeros(num_layers, num_prompts, width))
        self.values: dict[str, torch.Tensor] = {}  # per-sample values for one forward (see PromptedUNETR.forward)

    @property
    def num_prompts(self) -> int:
        return self.key.shape[1]

    def attach(self, blocks: Sequence[nn.Module]) -> None:
        """Hook into the attention of each of ``blocks`` (MONAI ``TransformerBlock``s, one per layer).

        The hooks are ``functools.partial`` objects holding this module, so a deep copy of the model
        hooks into its own copy of the prompts.
        """
        if len(blocks) != self.key.shape[0]:
            raise ValueError(f"{len(blocks)} transformer blocks for key-value prompts of {self.key.shape[0]} layers.")
        for layer, block in enumerate(blocks):
            attn = block.attn
            if not getattr(attn, "use_combined_linear", False) or attn.qkv.out_features != 3 * self.key.shape[2]:
                raise ValueError("key-value prompts need MONAI's combined qkv projection of width 3 x "
                                 f"{self.key.shape[2]}.")  # fmt: skip
            attn.qkv.register_forward_hook(partial(_append_key_values, self, layer))
            attn.register_forward_hook(partial(_drop_prompt_outputs, self))

    def rows(self, layer: int, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, P, 3 x width) rows ``[0 | key | value]`` for ``layer``'s qkv output."""
        key, value = (self.values.get(k, getattr(self, k)) for k in ("key", "value"))
        key, value = key[..., layer, :, :], value[..., layer, :, :]  # (P, W) or per sample (B, P, W)
        if key.dim() == 2:
            key, value = key.expand(batch_size, -1, -1), value.expand(batch_size, -1, -1)
        return torch.cat((torch.zeros_like(key), key, value), dim=-1).to(dtype)


def _append_key_values(
    prompts: KeyValuePrompts, layer: int, module: nn.Module, args: tuple, output: torch.Tensor
) -> torch.Tensor:
    """Forward hook on ``attn.qkv``: (B, N, 3W) -> (B, N + P, 3W)."""
    return torch.cat((output, prompts.rows(layer, output.shape[0], output.dtype)), dim=1)


def _drop_prompt_outputs(prompts: KeyValuePrompts, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on ``attn``: (B, N + P, C) -> (B, N, C)."""
    return output[:, : output.shape[1] - prompts.num_prompts]


def is_key_value(name: str) -> bool:
    """Whether a state-dict name is a key-value prompt tensor."""
    return name.startswith(KV_NAME + ".")
