"""UNETR with learnable prompt tokens in its ViT encoder.

Composed from MONAI's own blocks (``ViT``, ``UnetrBasicBlock``, ``UnetrPrUpBlock``,
``UnetrUpBlock``, ``UnetOutBlock``) under the attribute names of ``monai.networks.nets.UNETR``,
so a MONAI UNETR ``state_dict`` loads as it is. UNETR: Hatamizadeh et al., arXiv 2103.10504;
prompts: VPT, Jia et al., arXiv 2203.12119.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets.vit import ViT
from monai.utils import ensure_tuple_rep
from torch import nn

from centerprompt.models.key_value import KeyValuePrompts, is_key_value
from centerprompt.models.prompts import PROMPT_MODES, CenterPrompts, PromptTokens, vpt_init_bound
from centerprompt.models.steering import ImagePrompt, add_norm_steering, is_steering

# Constants that monai.networks.nets.UNETR hard-codes; tests check them against MONAI.
MONAI_PATCH_SIZE = 16
MONAI_NUM_LAYERS = 12
MONAI_SKIP_LAYERS = (3, 6, 9)  # indices into the per-block hidden states (outputs of blocks 4, 7, 10)

# Parameters MONAI registers but never uses (TransformerBlock.norm_cross_attn without cross-attention).
UNUSED_PARAMETER_MARKERS = ("norm_cross_attn",)


PATCH_SIZES = (8, 16)  # 16: MONAI's UNETR; 8: one fewer up-sampling stage, 4x the tokens per window


def num_skips(patch_size: int) -> int:
    """ViT hidden states feeding the decoder's skip connections: one per level between 1/patch and 1."""
    return int(math.log2(patch_size)) - 1


def default_skip_layers(num_layers: int, patch_size: int = MONAI_PATCH_SIZE) -> tuple[int, ...]:
    """Skip connections spread evenly over the encoder: (3, 6, 9) for MONAI's 12 layers at patch 16."""
    n = num_skips(patch_size)
    if num_layers < n:
        raise ValueError(f"num_layers must be at least {n} for {n} skip connections, got {num_layers}.")
    return tuple((i * num_layers) // (n + 1) for i in range(1, n + 1))


class PromptedUNETR(nn.Module):
    """MONAI's UNETR whose ViT encoder takes learnable prompt tokens.

    Args:
        in_channels, out_channels, img_size, feature_size, hidden_size, mlp_dim, num_heads, proj_type,
        norm_name, conv_block, res_block, dropout_rate, spatial_dims, qkv_bias, save_attn:
            as in ``monai.networks.nets.UNETR`` (same names and defaults).
        num_layers: transformer depth. Defaults to 12 (MONAI's UNETR); smaller for CPU demos and tests.
        skip_layers: hidden-state indices feeding the decoder's skip connections (three at patch 16,
            two at patch 8). Defaults to ``default_skip_layers(num_layers, patch_size)``, which is
            MONAI's (3, 6, 9) at 12 layers and patch 16.
        patch_size: ViT patch edge, 16 (MONAI's UNETR, parity kept) or 8. At 8 the token grid of a
            window is 8x larger and the decoder has one up-sampling stage fewer (no ``encoder4`` and
            ``decoder5``; ``decoder4`` takes the ViT output), so a 48^3 window gives the 6^3 tokens
            that a 96^3 window gives MONAI's UNETR.
        prompt_mode: ``"none"``, ``"shallow"`` (P tokens inserted after patch and position embedding,
            before layer 1) or ``"deep"`` (a fresh set of P tokens at the input of every layer; the
            previous layer's prompt outputs are dropped). Defaults to ``"none"``.
        num_prompts: tokens per set (P). Defaults to 10.
        prompt_dropout: dropout on prompt tokens while training. Defaults to 0.0.
        center_prompts: names of the centers that get their own prompt set besides the default
            (shared) one, for prompt-aware pretraining (``models.prompts.CenterPrompts``); needs a
            ``prompt_mode``. ``forward(centers=...)`` picks each sample's set. Defaults to none.
        steer_norms: put a per-channel scale and shift (identity until trained) after every
            affine-free instance norm of the convolutional path (``models.steering``). Defaults to False.
        image_prompt: edge of a learned per-channel image-space map (scale and shift, identity until
            trained) applied to the input before everything else; 0 for none. Defaults to 0.
        kv_prompts: learned keys and values appended to every layer's attention (E2VPT,
            ``models.key_value``); 0 for none. Independent of ``prompt_mode``. Defaults to 0.
        use_flash_attention: use PyTorch's fused scaled-dot-product attention in MONAI's attention
            blocks. It is numerically equivalent and only used when ``save_attn`` is off and
            ``dropout_rate`` is 0 (MONAI's fused path would apply attention dropout in eval too).
            Defaults to True.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        proj_type: str = "conv",
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        qkv_bias: bool = False,
        save_attn: bool = False,
        num_layers: int = MONAI_NUM_LAYERS,
        skip_layers: Sequence[int] | None = None,
        patch_size: int = MONAI_PATCH_SIZE,
        prompt_mode: str = "none",
        num_prompts: int = 10,
        prompt_dropout: float = 0.0,
        center_prompts: Sequence[str] = (),
        steer_norms: bool = False,
        image_prompt: int = 0,
        kv_prompts: int = 0,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}.")
        if not 0 <= dropout_rate <= 1:
            raise ValueError("dropout_rate should be between 0 and 1.")
        if hidden_size % num_heads != 0:
            raise ValueError("hidden_size should be divisible by num_heads.")
        if center_prompts and prompt_mode == "none":
            raise ValueError("center_prompts need a prompt_mode ('shallow' or 'deep').")
        if isinstance(image_prompt, bool) or not isinstance(image_prompt, int) or image_prompt < 0:
            raise ValueError(f"image_prompt must be a grid edge >= 1, or 0 for none; got {image_prompt!r}.")
        if isinstance(kv_prompts, bool) or not isinstance(kv_prompts, int) or kv_prompts < 0:
            raise ValueError(f"kv_prompts must be a count >= 1, or 0 for none; got {kv_prompts!r}.")
        if patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {patch_size}.")
        img_size = ensure_tuple_rep(img_size, spatial_dims)
        patch = ensure_tuple_rep(patch_size, spatial_dims)
        if any(i % p for i, p in zip(img_size, patch)):
            raise ValueError(f"img_size {img_size} must be divisible by the patch size {patch_size}.")
        n_skips = num_skips(patch_size)
        skip_layers = tuple(skip_layers) if skip_layers is not None else default_skip_layers(num_layers, patch_size)
        if len(skip_layers) != n_skips or not all(0 <= s < num_layers for s in skip_layers):
            raise ValueError(
                f"skip_layers must be {n_skips} indices below num_layers={num_layers} at patch size {patch_size}, "
                f"got {skip_layers}."
            )

        # The arguments that rebuild this model; saved with every checkpoint and artifact.
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, img_size=list(img_size),
            feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
            proj_type=proj_type, norm_name=norm_name if isinstance(norm_name, str) else list(norm_name),
            conv_block=conv_block, res_block=res_block, dropout_rate=dropout_rate, spatial_dims=spatial_dims,
            qkv_bias=qkv_bias, num_layers=num_layers, skip_layers=list(skip_layers), patch_size=patch_size,
            prompt_mode=prompt_mode, num_prompts=num_prompts, prompt_dropout=prompt_dropout,
            steer_norms=steer_norms, image_prompt=image_prompt,
        )  # fmt: skip
        if center_prompts:  # only then: the configurations of every other model stay as they were
            self.config["center_prompts"] = list(center_prompts)
        if kv_prompts:
            self.config["kv_prompts"] = kv_prompts
        self.num_layers = num_layers
        self.skip_layers = skip_layers
        self.patch_size = patch
        self.feat_size = tuple(i // p for i, p in zip(img_size, patch))
        self.hidden_size = hidden_size
        self.prompt_mode = prompt_mode

        self.vit = ViT(
            in_channels=in_channels, img_size=img_size, patch_size=patch, hidden_size=hidden_size,
            mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, proj_type=proj_type,
            classification=False, dropout_rate=dropout_rate, spatial_dims=spatial_dims,
            qkv_bias=qkv_bias, save_attn=save_attn,
        )  # fmt: skip
        if use_flash_attention and not save_attn and dropout_rate == 0:
            for blk in self.vit.blocks:
                blk.attn.use_flash_attention = True

        def up(in_ch: int, out_ch: int, num_layer: int) -> UnetrPrUpBlock:
            return UnetrPrUpBlock(
                spatial_dims=spatial_dims, in_channels=in_ch, out_channels=out_ch, num_layer=num_layer,
                kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm_name,
                conv_block=conv_block, res_block=res_block,
            )  # fmt: skip

        def dec(in_ch: int, out_ch: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                spatial_dims=spatial_dims, in_channels=in_ch, out_channels=out_ch, kernel_size=3,
                upsample_kernel_size=2, norm_name=norm_name, res_block=res_block,
            )  # fmt: skip

        # Level l (1 .. n_skips) sits at 1/2^l of the input: encoder{l+1} up-samples hidden state
        # skip_layers[l-1] from 1/patch to it, decoder{l+1} brings level l to level l-1. At patch 16
        # these are MONAI's encoder2-4 and decoder2-5 with its channel widths.
        fs = feature_size
        self.encoder1 = UnetrBasicBlock(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=fs, kernel_size=3, stride=1,
            norm_name=norm_name, res_block=res_block,
        )  # fmt: skip
        for level in range(1, n_skips + 1):
            self.add_module(f"encoder{level + 1}", up(hidden_size, fs * 2**level, num_layer=n_skips - level))
        self.add_module(f"decoder{n_skips + 2}", dec(hidden_size, fs * 2**n_skips))
        for level in range(n_skips, 0, -1):
            self.add_module(f"decoder{level + 1}", dec(fs * 2**level, fs * 2 ** (level - 1)))
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=fs, out_channels=out_channels)

        bound = vpt_init_bound(in_channels, patch, hidden_size)  # every prompt kind starts as VPT's
        self.prompts: PromptTokens | None = None
        if prompt_mode != "none":
            num_sets = 1 if prompt_mode == "shallow" else num_layers
            self.prompts = PromptTokens(num_sets, num_prompts, hidden_size, bound, prompt_dropout)
        self.center_prompts = (
            CenterPrompts(center_prompts, self.prompts.tokens.shape, bound) if center_prompts else None
        )
        if steer_norms:
            for name, module in self.named_children():
                if name not in ("vit", "prompts"):
                    add_norm_steering(module)
        self.image_prompt = ImagePrompt(in_channels, image_prompt) if image_prompt else None
        self.kv_prompts: KeyValuePrompts | None = None
        if kv_prompts:
            self.kv_prompts = KeyValuePrompts(num_layers, kv_prompts, self.vit.blocks[0].attn.qkv.out_features // 3, bound)
            self.kv_prompts.attach(self.vit.blocks)

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompts is None else self.prompts.num_prompts

    def encode(
        self, x_in: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the ViT with prompts; return the normed output and the per-block hidden states.

        Prompt tokens are stripped from everything returned, so each tensor is (B, N, C) with N the
        number of patches and can be reshaped to the 3D grid. ``prompts`` overrides the learned
        tokens: (S, P, C) for the whole batch or (B, S, P, C) per sample.
        """
        x = self.vit.patch_embedding(x_in)  # (B, N, C), position embedding added
        p = self.num_prompts
        tokens = None if self.prompts is None else self.prompts.expand(x.shape[0], prompts)  # (B, S, P, C)
        if tokens is None and prompts is not None:
            raise ValueError("prompts were given to a model built with prompt_mode='none'.")
        hidden_states: list[torch.Tensor] = []
        for i, blk in enumerate(self.vit.blocks):
            if tokens is not None and i == 0:
                x = torch.cat((tokens[:, 0], x), dim=1)  # (B, P+N, C)
            elif tokens is not None and self.prompt_mode == "deep":
                x = torch.cat((tokens[:, i], x[:, p:]), dim=1)  # replace last layer's prompt outputs
            x = blk(x)
            hidden_states.append(x[:, p:])  # (B, N, C)
        return self.vit.norm(x[:, p:]), hidden_states

    def proj_feat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> (B, C, *feat_size) grid for the convolutional decoder."""
        x = x.reshape(x.shape[0], *self.feat_size, self.hidden_size)  # (B, D, H, W, C)
        return x.movedim(-1, 1).contiguous()  # (B, C, D, H, W)

    def forward(
        self, x_in: torch.Tensor, prompts: torch.Tensor | None = None, adapter: Mapping[str, torch.Tensor] | None = None,
        centers: Sequence[str | None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Logits (B, out_channels, *img_size); ``prompts`` as in :meth:`encode`.

        ``adapter`` overrides steering tensors (``models.steering``) by state-dict name for this pass:
        a value of the parameter's shape for the whole batch, or (B, *shape) per sample (a batch
        mixing centers, served from a bank). ``centers`` (one name or None per sample, or one for
        the batch) picks each sample's prompt set of a model with ``center_prompts``; None and
        centers without their own set take the default set.
        """
        if centers is not None:
            if self.center_prompts is None:
                raise ValueError("centers were given to a model built without center_prompts.")
            if prompts is not None:
                raise ValueError("give prompts or centers, not both.")
            if len(centers) == 1:  # one center for the whole batch (a case's sliding windows)
                centers = list(centers) * x_in.shape[0]
            if len(centers) != x_in.shape[0]:
                raise ValueError(f"{len(centers)} centers for a batch of {x_in.shape[0]}.")
            prompts = self.center_prompts.select(centers, self.prompts.tokens)
        if not adapter:
            return self._forward(x_in, prompts)
        modules = {}
        for name, value in adapter.items():
            owner, _, leaf = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            if not hasattr(module, "values") or not isinstance(getattr(module, leaf, None), nn.Parameter):
                raise ValueError(f"{name} is not a steering tensor of this model.")
            module.values[leaf] = value
            modules[id(module)] = module
        try:
            return self._forward(x_in, prompts)
        finally:
            for module in modules.values():
                module.values.clear()

    def _forward(self, x_in: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        if self.image_prompt is not None:
            x_in = self.image_prompt(x_in)
        x, hidden_states = self.encode(x_in, prompts)
        skips = [self.encoder1(x_in)]
        for level, layer in enumerate(self.skip_layers, start=1):
            skips.append(getattr(self, f"encoder{level + 1}")(self.proj_feat(hidden_states[layer])))
        out = self.proj_feat(x)
        for level in range(len(self.skip_layers), -1, -1):  # decoder5 (patch 16) ... decoder2
            out = getattr(self, f"decoder{level + 2}")(out, skips[level])
        return self.out(out)

    def token_consumers(self) -> list[nn.Module]:
        """The decoder modules whose first input is a ViT token grid (hidden state or output).

        ``encoder2`` .. ``encoder{n+1}`` take the skip hidden states, the top decoder the normed ViT
        output; hooks on them see every path from the transformer to the segmentation.
        """
        n = len(self.skip_layers)
        return [getattr(self, f"encoder{level + 1}") for level in range(1, n + 1)] + [getattr(self, f"decoder{n + 2}")]

    def train(self, mode: bool = True) -> PromptedUNETR:
        """Like ``nn.Module.train``, but subtrees with no trainable parameter stay in eval mode.

        Frozen backbone parts then keep their dropout off and their normalisation statistics fixed
        while prompts (or other adapted parts) train, as VPT does.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                params = list(module.parameters())
                if module is not self and params and not any(p.requires_grad for p in params):
                    module.eval()  # the whole frozen subtree, its parameter-free dropouts included
        return self

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a backbone checkpoint (e.g. from ``monai.networks.nets.UNETR``) into a prompted model.

        Prompt tokens (center prompts and key-value prompts included) and steering tensors (``models.steering``) may be
        absent from ``state_dict``; any other missing or unexpected key is an error. A ``module.``
        prefix (DDP) is removed and stale ``cross_attn`` keys of MONAI < 1.6 are dropped, so
        checkpoints load as they are.
        """
        cleaned = {k.removeprefix("module."): v for k, v in state_dict.items()}
        cleaned = {k: v for k, v in cleaned.items() if ".cross_attn." not in k}
        own = self.state_dict()
        missing = [k for k in own if k not in cleaned and not k.startswith(("prompts.", "center_prompts."))
                   and not is_steering(k) and not is_key_value(k)]  # fmt: skip
        unexpected = [k for k in cleaned if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this UNETR configuration: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
            )
        shapes = [k for k, v in cleaned.items() if own[k].shape != v.shape]
        if shapes:
            k = shapes[0]
            raise ValueError(
                f"checkpoint does not match this UNETR configuration: {k} has shape "
                f"{tuple(cleaned[k].shape)}, the model expects {tuple(own[k].shape)}."
            )
        self.load_state_dict(cleaned, strict=False)
