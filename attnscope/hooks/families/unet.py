"""The UNet family: ``UNet2DConditionModel`` denoisers (Stable Diffusion 1.x, 2.x, SDXL).

Every ``Attention`` module inside ``down_blocks``, ``mid_block`` and ``up_blocks`` whose keys come
from the text encoder (``is_cross_attention``: the transformer blocks' ``attn2``) is a site of kind
``"cross"``; the ``attn1`` modules beside them are the self-attention sites (kind ``"self"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._sites import CrossAttentionSite
from ._common import refuse_perturbed_guidance, timestep_value

__all__ = ["FAMILY", "KERNEL", "STEPS_BY", "SUPPORTS", "TEXT_ENCODERS", "denoiser", "sites", "step_inputs"]

FAMILY = "unet"
SUPPORTS = "UNet2DConditionModel (Stable Diffusion 1.x, 2.x, SDXL)"
#: The text encoder whose token ids make the sites' text axis (alternatives in order: an SDXL refiner has only the second).
TEXT_ENCODERS = (("text_encoder", "text_encoder_2"),)
#: The cross-attention processor is re-implemented (``attnscope.hooks._processors``), not patched.
KERNEL = None
#: Steps are counted by denoiser calls.
STEPS_BY = "call"


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ``unet`` when it is a ``UNet2DConditionModel``, else None.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> type(denoiser(tiny_sd_pipeline())).__name__
    'UNet2DConditionModel'
    """
    from diffusers import UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        return None
    refuse_perturbed_guidance(pipe)  # StableDiffusion(XL)PAGPipeline: one error
    return unet


def sites(unet: torch.nn.Module, cross: bool = True) -> list[CrossAttentionSite]:
    """The cross-attention sites of ``unet`` in module order (``cross=False``: its self-attention modules).

    Blocks are ``down``/``mid``/``up``; the level counts halvings of the latent resolution; the depth
    is the order the forward pass runs them in.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> [(s.block, s.level, s.depth) for s in sites(tiny_sd_pipeline().unet)]
    [('down', 0, 0), ('down', 1, 1), ('up', 1, 3), ('up', 1, 4), ('up', 0, 5), ('up', 0, 6), ('mid', 1, 2)]
    """
    from diffusers.models.attention_processor import Attention

    n_levels = len(unet.down_blocks)
    found = []
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
        found.append(
            CrossAttentionSite(
                name=name, family=FAMILY, kind="cross" if cross else "self", block=block, level=level,
                heads=module.heads, head_dim=inner // module.heads, token_dim=module.to_k.in_features, module=module,
            )
        )
    # depth: the forward pass runs the down blocks, the mid block, then the up blocks (module order within each)
    forward = sorted(range(len(found)), key=lambda i: (("down", "mid", "up").index(found[i].block), i))
    depth = {index: rank for rank, index in enumerate(forward)}
    return [dataclasses.replace(site, depth=depth[i]) for i, site in enumerate(found)]


def step_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch size, timestep, latent (h, w) and text length of one UNet call.

    >>> step_inputs((torch.zeros(2, 4, 8, 6), torch.tensor(981)), {"encoder_hidden_states": torch.zeros(2, 77, 32)})
    {'batch': 2, 'timestep': 981.0, 'latent_shape': (8, 6), 'text_length': 77}
    """
    sample = args[0] if args else kwargs["sample"]
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
    return {"batch": int(sample.shape[0]), "timestep": timestep_value(t),
            "latent_shape": (int(sample.shape[-2]), int(sample.shape[-1])),
            "text_length": None if text is None else int(text.shape[1])}
