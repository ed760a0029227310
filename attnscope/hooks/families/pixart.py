"""The PixArt family: ``PixArtTransformer2DModel`` denoisers (PixArt-α, PixArt-Σ).

A flat stack of ``BasicTransformerBlock`` layers, all at the patch grid's resolution. Each
``transformer_blocks.N.attn2`` is ordinary cross-attention (``AttnProcessor2_0``) from the image
patches to the T5 tokens (120 for α, 300 for Σ by default), with the padding masked by a bias of
−10000: padding gets zero attention (``exp(−10000)`` underflows), so it counts as padding, never
as a sink. The ``attn1`` modules beside them are the self-attention sites (kind ``"self"``, for
TGATE V2). Sites have no down/mid/up block: their ``block`` is the third of the stack they sit in
(``"early"``, ``"middle"``, ``"late"``) and ``depth`` their layer index.

PixArt's pipelines keep ``do_classifier_free_guidance`` as a local of ``__call__`` (no property),
so :func:`guidance` reads it there.
"""

from __future__ import annotations

from typing import Any

import torch

from .._sites import CrossAttentionSite
from ._common import call_local, flat_stack_sites, latent_step_inputs, transformer_of

__all__ = ["FAMILY", "KERNEL", "STEPS_BY", "SUPPORTS", "TEXT_ENCODERS", "denoiser", "guidance", "sites", "step_inputs"]

FAMILY = "pixart"
SUPPORTS = "PixArtTransformer2DModel (PixArt-α, PixArt-Σ)"
#: The text encoder whose token ids make the sites' text axis (T5).
TEXT_ENCODERS = (("text_encoder",),)
#: Cross-attention: the processor is re-implemented with visible stages (``attnscope.hooks._processors``).
KERNEL = None
#: Steps are counted by denoiser calls (one per step, the CFG halves in one batch).
STEPS_BY = "call"


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ``transformer`` when it is a ``PixArtTransformer2DModel``, else None.

    >>> from attnscope.testing import tiny_pixart_pipeline
    >>> type(denoiser(tiny_pixart_pipeline())).__name__
    'PixArtTransformer2DModel'
    """
    return transformer_of(pipe, "PixArtTransformer2DModel")


def sites(model: torch.nn.Module, cross: bool = True) -> list[CrossAttentionSite]:
    """The ``attn2`` sites of ``model``, one per layer (``cross=False``: the ``attn1`` self-attention modules).

    >>> from attnscope.testing import tiny_pixart_pipeline
    >>> [(s.name, s.kind, s.patch) for s in sites(tiny_pixart_pipeline().transformer, cross=False)][:1]
    [('transformer_blocks.0.attn1', 'self', 2)]
    """
    return flat_stack_sites(model, FAMILY, cross)


def step_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch, timestep, latent (h, w) and text length of one transformer call (the latent is ``(B, C, H, W)``).

    >>> step_inputs((torch.zeros(2, 4, 8, 6),), {"encoder_hidden_states": torch.zeros(2, 120, 32),
    ...                                          "timestep": torch.tensor([999, 999])})
    {'batch': 2, 'timestep': 999.0, 'latent_shape': (8, 6), 'text_length': 120}
    """
    return latent_step_inputs(args, kwargs)


def guidance(pipe: Any) -> bool:
    """Whether the running PixArt call uses classifier-free guidance (its ``guidance_scale > 1``).

    >>> from attnscope.testing import tiny_pixart_pipeline
    >>> guidance(tiny_pixart_pipeline())   # outside a pipeline call
    False
    """
    return bool(call_local(pipe, "do_classifier_free_guidance"))
