"""The SD3 family: ``SD3Transformer2DModel`` denoisers (Stable Diffusion 3 and 3.5).

Every ``transformer_blocks.N.attn`` is a joint site (kind ``"joint"``, block ``"double"``): its
processor (``JointAttnProcessor2_0``) concatenates **[image, text]** and calls
``torch.nn.functional.scaled_dot_product_attention``. The text is 77 CLIP positions (CLIP-L and
CLIP-G joined on the feature axis) followed by the T5 positions. SD3.5's ``attn2`` in dual-attention
blocks is image-only self-attention: not a site.
"""

from __future__ import annotations

from typing import Any

import torch

from .._sites import CrossAttentionSite
from ._common import timestep_value, transformer_of

__all__ = ["FAMILY", "KERNEL", "PROCESSORS", "STEPS_BY", "SUPPORTS", "TEXT_ENCODERS", "denoiser", "sites", "step_inputs"]

FAMILY = "sd3"
SUPPORTS = "SD3Transformer2DModel (Stable Diffusion 3, 3.5)"
#: The text encoders whose token ids make the sites' text axis, in order (CLIP segment, T5 segment).
TEXT_ENCODERS = (("text_encoder",), ("text_encoder_3",))
#: (module, attribute, layout) of the attention kernel the processor calls.
KERNEL = ("torch.nn.functional", "scaled_dot_product_attention", "bhsd")
#: Processors whose one kernel call is the joint attention over [image, text] (checked before logits/probs are read).
PROCESSORS = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")
#: Steps are counted by the scheduler's timestep.
STEPS_BY = "timestep"


def denoiser(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's ``transformer`` when it is an ``SD3Transformer2DModel``, else None.

    >>> from attnscope.testing import tiny_sd3_pipeline
    >>> type(denoiser(tiny_sd3_pipeline())).__name__
    'SD3Transformer2DModel'
    """
    return transformer_of(pipe, "SD3Transformer2DModel")


def sites(model: torch.nn.Module, cross: bool = True) -> list[CrossAttentionSite]:
    """The joint sites of ``model`` in module order (``cross=False``: none, self-attention is not wrapped).

    >>> from attnscope.testing import tiny_sd3_pipeline
    >>> [(s.name, s.kind, s.text_layout) for s in sites(tiny_sd3_pipeline().transformer)][:1]
    [('transformer_blocks.0.attn', 'joint', 'image_first')]
    """
    if not cross:
        return []
    patch = int(model.config.patch_size)
    found = []
    for index, block in enumerate(model.transformer_blocks):
        attn = block.attn
        inner = attn.to_q.out_features
        found.append(CrossAttentionSite(
            name=f"transformer_blocks.{index}.attn", family=FAMILY, kind="joint", block="double", level=0,
            heads=attn.heads, head_dim=inner // attn.heads, token_dim=attn.add_k_proj.in_features, module=attn,
            text_layout="image_first", patch=patch, depth=index,
        ))
    return found


def step_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch size, timestep, latent (h, w) and text length of one transformer call.

    >>> step_inputs((), {"hidden_states": torch.zeros(2, 4, 8, 6), "timestep": torch.tensor([900.0, 900.0]),
    ...                  "encoder_hidden_states": torch.zeros(2, 93, 32)})
    {'batch': 2, 'timestep': 900.0, 'latent_shape': (8, 6), 'text_length': 93}
    """
    sample = args[0] if args else kwargs["hidden_states"]
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
    return {"batch": int(sample.shape[0]), "timestep": timestep_value(t),
            "latent_shape": (int(sample.shape[-2]), int(sample.shape[-1])),
            "text_length": None if text is None else int(text.shape[1])}

