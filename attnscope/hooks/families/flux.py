"""The Flux.1 family: ``FluxTransformer2DModel`` denoisers (FLUX.1 dev, schnell and their fine-tunes).

Joint sites of two streams, both with the text **first** in the joint sequence:

- ``transformer_blocks.N.attn`` (block ``"double"``): ``FluxAttnProcessor`` concatenates the text
  and image projections, applies RoPE and calls ``dispatch_attention_fn``;
- ``single_transformer_blocks.N.attn`` (block ``"single"``): the block concatenates ``[text,
  image]`` itself and calls attention without ``encoder_hidden_states``; the text length comes
  from the transformer call (its ``encoder_hidden_states``).

The latent is packed 2×2: the transformer sees ``(batch, h/2·w/2, 4·channels)``; the packed grid
comes from ``img_ids`` (row and column of each position), and the sites' ``patch`` is 2, as SD3's
patch size, so ``latent_shape`` is the VAE latent's ``(h, w)`` in both families. There is no attention mask: T5 padding takes
real attention mass.
A reference image (FLUX.1 Kontext's ``image=``) adds tokens that have no place on the latent grid: refused with one
error (:func:`step_inputs`).
"""

from __future__ import annotations

from typing import Any

import torch

from .._sites import CrossAttentionSite
from ._common import packed_step_inputs, transformer_of

__all__ = ["FAMILY", "KERNEL", "PROCESSORS", "STEPS_BY", "SUPPORTS", "TEXT_ENCODERS", "TIMESTEP_SCALE", "denoiser", "sites",
           "step_inputs"]

FAMILY = "flux"
SUPPORTS = "FluxTransformer2DModel (FLUX.1)"
#: The text encoder whose token ids make the sites' text axis (T5).
TEXT_ENCODERS = (("text_encoder_2",),)
#: (module, attribute, layout) of the attention kernel the processor calls.
KERNEL = ("diffusers.models.transformers.transformer_flux", "dispatch_attention_fn", "bshd")
#: Processors whose one kernel call is the joint attention over [text, image] (checked before logits/probs are read).
PROCESSORS = ("FluxAttnProcessor",)
#: Steps are counted by the scheduler's timestep (with ``true_cfg_scale`` the model runs twice per step).
STEPS_BY = "timestep"
#: The pipeline calls the transformer with the scheduler's timestep divided by this; the hook core shows clients (and
#: the store keeps) the scheduler's own value, ``pipe.scheduler.timesteps``.
TIMESTEP_SCALE = 1000


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ``transformer`` when it is a ``FluxTransformer2DModel``, else None.

    >>> from attnscope.testing import tiny_flux_pipeline
    >>> type(denoiser(tiny_flux_pipeline())).__name__
    'FluxTransformer2DModel'
    """
    return transformer_of(pipe, "FluxTransformer2DModel")


def sites(model: torch.nn.Module, cross: bool = True) -> list[CrossAttentionSite]:
    """The joint sites of ``model``: double-stream blocks, then single-stream blocks (``cross=False``: none).

    >>> from attnscope.testing import tiny_flux_pipeline
    >>> [(s.name, s.block) for s in sites(tiny_flux_pipeline().transformer)][::2]
    [('transformer_blocks.0.attn', 'double'), ('single_transformer_blocks.0.attn', 'single')]
    """
    if not cross:
        return []
    found = []
    for stream, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks)):
        prefix = "transformer_blocks" if stream == "double" else "single_transformer_blocks"
        for index, block in enumerate(blocks):
            attn = block.attn
            inner = attn.to_q.out_features
            found.append(CrossAttentionSite(
                name=f"{prefix}.{index}.attn", family=FAMILY, kind="joint", block=stream, level=0,
                heads=attn.heads, head_dim=inner // attn.heads,
                token_dim=int(model.config.joint_attention_dim), module=attn, text_layout="text_first", patch=2,
                depth=len(found),
            ))
    return found


def step_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch size, timestep, latent (h, w) — twice the packed grid — and text length of one transformer call.

    The timestep is the transformer's input, the scheduler's divided by :data:`TIMESTEP_SCALE` (the core undoes it).
    Inputs are read by keyword or by position (``FluxTransformer2DModel.forward(hidden_states,
    encoder_hidden_states, pooled_projections, timestep, img_ids, ...)``). The grid is read from ``img_ids``;
    a reference image (``FluxKontextPipeline``'s ``image=``) adds positions with another time coordinate:
    refused with one error, its tokens have no place on the latent grid.

    >>> ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1)
    >>> step_inputs((), {"hidden_states": torch.zeros(1, 24, 16), "timestep": torch.tensor([0.5]),
    ...                  "img_ids": ids.reshape(-1, 3), "encoder_hidden_states": torch.zeros(1, 16, 32)})
    {'batch': 1, 'timestep': 0.5, 'latent_shape': (8, 12), 'text_length': 16}
    """
    return packed_step_inputs(args, kwargs, (3, 4), "Flux.1 with a reference image (FluxKontextPipeline's image=)")
