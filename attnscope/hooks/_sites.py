"""Cross-attention sites: which attention modules read text, named by their diffusers module path.

Discovery is per model family; each family is one small adapter function. Today: UNet2DConditionModel
pipelines (Stable Diffusion 1.x, 2.x, SDXL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import AttnscopeError

__all__ = ["CrossAttentionSite", "find_denoiser", "discover_sites", "discover_self_sites"]


@dataclass(frozen=True)
class CrossAttentionSite:
    """One attention module whose keys and values come from the text encoder.

    Parameters
    ----------
    name : str
        Exact module path inside the denoiser, e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
    family : str
        Model family adapter that found it (``"unet"``).
    kind : str
        ``"cross"`` for UNet/PixArt attn2; ``"joint"`` for the text slice of a joint attention;
        ``"self"`` for a self-attention module (attn1), wrapped only for clients that ask for
        self-attention (TGATE V2's cache, :func:`discover_self_sites`).
    block : str
        ``"down"``, ``"mid"`` or ``"up"``.
    level : int
        Resolution level: 0 is the latent resolution, each level halves it (rounding up).
    heads, head_dim, token_dim : int
        Attention heads, width per head, width of the text features it reads.

    Examples
    --------
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> import attnscope as ats
    >>> site = ats.discover_sites(tiny_sd_pipeline())[0]
    >>> site.name, site.block, site.spatial_shape((16, 16))
    ('down_blocks.0.attentions.0.transformer_blocks.0.attn2', 'down', (16, 16))
    """

    name: str
    family: str
    kind: str
    block: str
    level: int
    heads: int
    head_dim: int
    token_dim: int
    module: torch.nn.Module = field(compare=False, repr=False)

    def spatial_shape(self, latent_shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of this site's attention map for a latent of ``latent_shape`` (h, w)."""
        h, w = latent_shape
        for _ in range(self.level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    def describe(self) -> dict[str, Any]:
        """JSON-able description (stored with each site's array)."""
        return {k: getattr(self, k) for k in ("name", "family", "kind", "block", "level", "heads", "head_dim", "token_dim")}


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """Return ``(family, denoiser)`` of a diffusers pipeline or raise AttnscopeError."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    if not isinstance(pipe, DiffusionPipeline):
        raise AttnscopeError(
            f"pipe: expected a diffusers pipeline (DiffusionPipeline) with a UNet2DConditionModel denoiser, "
            f"got {type(pipe).__module__}.{type(pipe).__qualname__}"
        )
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        return "unet", unet
    denoiser = unet if unet is not None else getattr(pipe, "transformer", None)
    found = type(denoiser).__name__ if denoiser is not None else "no `unet` or `transformer` component"
    raise AttnscopeError(
        f"pipe: {type(pipe).__name__} has {found}; supported denoisers: UNet2DConditionModel "
        f"(Stable Diffusion 1.x, 2.x, SDXL)"
    )


def _unet_sites(unet: torch.nn.Module, cross: bool = True) -> list[CrossAttentionSite]:
    from diffusers.models.attention_processor import Attention

    n_levels = len(unet.down_blocks)
    sites = []
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and bool(module.is_cross_attention) == cross):
            continue
        top = name.split(".")
        if top[0] == "down_blocks":
            block, level = "down", int(top[1])
        elif top[0] == "up_blocks":
            block, level = "up", n_levels - 1 - int(top[1])
        elif top[0] == "mid_block":
            block, level = "mid", n_levels - 1
        else:
            continue
        inner = module.to_q.out_features
        sites.append(
            CrossAttentionSite(
                name=name, family="unet", kind="cross" if cross else "self", block=block, level=level, heads=module.heads,
                head_dim=inner // module.heads, token_dim=module.to_k.in_features, module=module,
            )
        )
    return sites


_ADAPTERS = {"unet": _unet_sites}


def discover_sites(pipe: Any) -> list[CrossAttentionSite]:
    """All cross-attention sites of a pipeline's denoiser, in module order.

    Examples
    --------
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> import attnscope as ats
    >>> [s.name for s in ats.discover_sites(tiny_sd_pipeline())][:2]
    ['down_blocks.0.attentions.0.transformer_blocks.0.attn2', 'down_blocks.1.attentions.0.transformer_blocks.0.attn2']
    """
    family, denoiser = find_denoiser(pipe)
    return _ADAPTERS[family](denoiser)


def discover_self_sites(pipe: Any) -> list[CrossAttentionSite]:
    """The self-attention modules (``attn1``) of the denoiser's transformer blocks, kind ``"self"``.

    Examples
    --------
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> sites = discover_self_sites(tiny_sd_pipeline())
    >>> sites[0].name, sites[0].kind
    ('down_blocks.0.attentions.0.transformer_blocks.0.attn1', 'self')
    """
    family, denoiser = find_denoiser(pipe)
    return _ADAPTERS[family](denoiser, cross=False)
