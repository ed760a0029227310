"""Cross-attention sites: which attention modules read text, named by their diffusers module path.

Sites are found per model family by the adapters in :mod:`attnscope.hooks.families`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CrossAttentionSite"]


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
        ``"cross"`` for a UNet's attn2; ``"joint"`` for a transformer's joint attention (SD3, Flux), whose
        cross part is the image-query × text-key block of one softmax over image and text keys;
        ``"self"`` for a self-attention module (attn1), wrapped only for clients that ask for
        self-attention (TGATE V2's cache, :func:`~attnscope.hooks.discover_self_sites`).
    block : str
        ``"down"``, ``"mid"`` or ``"up"`` in a UNet; ``"double"`` or ``"single"`` (the stream) in a joint
        transformer (SD3, Flux); in a flat stack of identical layers (PixArt, Sana) the third of the stack
        the layer sits in: ``"early"``, ``"middle"`` or ``"late"``.
    level : int
        Resolution level: 0 is the latent resolution, each level halves it (rounding up). Transformer sites are all
        level 0.
    depth : int
        Position of the site in the denoiser's forward pass, from 0 (a UNet's down blocks, then its mid
        block, then its up blocks; a transformer's layers in order, Flux's double-stream before its
        single-stream blocks).
    heads, head_dim, token_dim : int
        Attention heads, width per head, width of the text features it reads.
    text_layout : str
        Joint sites: where the text keys sit in the joint sequence, ``"text_first"`` (Flux) or ``"image_first"``
        (SD3); ``""`` for cross-attention sites.
    patch : int
        Latent pixels per side of one query position (a transformer's ``patch_size``; 1 for UNets).

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
    text_layout: str = ""
    patch: int = 1
    depth: int = 0

    def spatial_shape(self, latent_shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of this site's attention map for a latent of ``latent_shape`` (h, w)."""
        h, w = math.ceil(latent_shape[0] / self.patch), math.ceil(latent_shape[1] / self.patch)
        for _ in range(self.level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    def describe(self) -> dict[str, Any]:
        """JSON-able description (stored with each site's array)."""
        keys = ("name", "family", "kind", "block", "level", "depth", "heads", "head_dim", "token_dim")
        extra = ("text_layout", "patch") if self.kind == "joint" else ()
        return {k: getattr(self, k) for k in keys + extra}
