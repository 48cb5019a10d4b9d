"""Learnable prompt tokens for a ViT encoder (visual prompt tuning, Jia et al., arXiv 2203.12119)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

PROMPT_MODES = ("none", "shallow", "deep")


def vpt_init_bound(in_channels: int, patch_size: Sequence[int], hidden_size: int) -> float:
    """VPT's uniform (Xavier-style) bound: sqrt(6 / (in_channels * prod(patch) + hidden)).

    For 2 channels, 16^3 patches and hidden 768 this is 0.0259.
    """
    return math.sqrt(6.0 / (in_channels * math.prod(patch_size) + hidden_size))


class PromptTokens(nn.Module):
    """``num_sets`` sets of ``num_prompts`` tokens of width ``hidden_size``.

    Shallow prompting uses one set (inserted before layer 1); deep prompting uses one set per
    transformer layer. The tokens get no position embedding, as in VPT.

    Args:
        num_sets: 1 for shallow prompts, the number of transformer layers for deep prompts.
        num_prompts: tokens per set (P).
        hidden_size: token width.
        init_bound: tokens are drawn from U(-bound, bound) (see :func:`vpt_init_bound`).
        dropout: dropout on the prompt tokens during training (VPT uses 0.1 for deep runs). Defaults to 0.0.
    """

    def __init__(
        self, num_sets: int, num_prompts: int, hidden_size: int, init_bound: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {num_prompts}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"prompt dropout must be in [0, 1), got {dropout}.")
        self.tokens = nn.Parameter(torch.empty(num_sets, num_prompts, hidden_size))
        nn.init.uniform_(self.tokens, -init_bound, init_bound)
        self.dropout = nn.Dropout(dropout)

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[1]

    def expand(self, batch_size: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens for a batch, shape (B, S, P, C); ``tokens`` overrides the learned ones.

        An override of shape (S, P, C) is shared by the batch; (B, S, P, C) gives each sample its
        own prompts (a batch mixing centers, served from a prompt bank).
        """
        t = self.tokens if tokens is None else tokens
        if t.dim() == 3:
            t = t.unsqueeze(0).expand(batch_size, -1, -1, -1)
        if t.shape[0] != batch_size or t.shape[1:] != self.tokens.shape:
            raise ValueError(
                f"prompt tokens of shape {tuple(t.shape)} do not fit a batch of {batch_size} "
                f"with prompts of shape {tuple(self.tokens.shape)}."
            )
        return self.dropout(t)


class CenterPrompts(nn.Module):
    """One prompt set per pretraining center, for prompt-aware pretraining (DoPrompt, arXiv 2208.08914).

    The backbone learns with each center's own prompts and, on part of the steps, with the model's
    default set (``PromptedUNETR.prompts``, the shared set), so it learns to read prompts: a new
    center then has something to steer with, and starts from the shared set.

    Args:
        names: the centers, in order.
        shape: the shape of one set, (S, P, C) as ``PromptTokens.tokens``.
        init_bound: tokens are drawn from U(-bound, bound).
    """

    def __init__(self, names: Sequence[str], shape: Sequence[int], init_bound: float) -> None:
        super().__init__()
        if not names or len(set(names)) != len(names):
            raise ValueError(f"center prompts need distinct center names, got {list(names)}.")
        self.names = tuple(names)
        self.tokens = nn.Parameter(torch.empty(len(names), *shape))
        nn.init.uniform_(self.tokens, -init_bound, init_bound)

    def select(self, centers: Sequence[str | None], default: torch.Tensor) -> torch.Tensor:
        """Per-sample prompts (B, S, P, C): each center's own set; ``default`` (S, P, C) for ``None``
        and for a center without its own set (a new or unknown center)."""
        index = {name: i for i, name in enumerate(self.names)}
        return torch.stack([self.tokens[index[c]] if c in index else default for c in centers])


@torch.no_grad()
def token_prototypes(model: nn.Module, images: torch.Tensor, num_prompts: int, seed: int = 0) -> torch.Tensor:
    """Deep prompts from the new center's own tokens (Self-Prompt Tuning, arXiv 2402.02382): for each
    layer, the patch tokens that enter it on ``images`` (B, C, *img_size), split at random into
    ``num_prompts`` groups and averaged. Returns (layers, P, C) for ``model.prompts.tokens``.

    The tokens come from ``model.encode`` with the model's current prompts, as the layer will see
    them; each prototype then starts inside the distribution the layer's attention already reads.
    """
    x = model.vit.patch_embedding(images)  # the tokens entering layer 1
    _, hidden = model.encode(images)  # the patch tokens leaving layers 1 .. L
    inputs = [x, *hidden[:-1]]
    generator = torch.Generator().manual_seed(seed)
    prototypes = []
    for tokens in inputs:
        flat = tokens.reshape(-1, tokens.shape[-1]).float().cpu()
        if flat.shape[0] < num_prompts:
            raise ValueError(f"{flat.shape[0]} tokens cannot make {num_prompts} prototypes: give more images.")
        groups = torch.randperm(flat.shape[0], generator=generator).tensor_split(num_prompts)
        prototypes.append(torch.stack([flat[g].mean(0) for g in groups]))
    return torch.stack(prototypes)
