"""What the family adapters share: a denoiser call's inputs, finding a pipeline's transformer, flat stacks of layers."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["call_local", "depth_band", "flat_stack_sites", "latent_step_inputs", "packed_latent_shape",
           "packed_step_inputs", "refuse_perturbed_guidance", "text_tokenizer", "timestep_value", "transformer_of"]


def timestep_value(t: Any) -> float:
    """The timestep of a denoiser call as a float (a tensor's first element: every row has the same).

    >>> timestep_value(torch.tensor([981, 981])), timestep_value(0.5)
    (981.0, 0.5)
    """
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def text_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer itself, or the one a processor holds (FLUX.2 dev's ``tokenizer`` is a ``PixtralProcessor``).

    A processor is what has no ``convert_ids_to_tokens`` (a tokenizer may keep something else as ``.tokenizer``).

    >>> class Processor:
    ...     tokenizer = "its tokenizer"
    >>> text_tokenizer(Processor()), text_tokenizer(None)
    ('its tokenizer', None)
    """
    if tokenizer is None or hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer
    return getattr(tokenizer, "tokenizer", tokenizer)


def transformer_of(pipe: Any, class_name: str) -> torch.nn.Module | None:
    """The pipeline's ``transformer`` when it is a diffusers ``class_name``, else None.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> transformer_of(tiny_sd_pipeline(), "FluxTransformer2DModel") is None
    True
    """
    import diffusers

    model = getattr(pipe, "transformer", None)
    if not isinstance(model, getattr(diffusers, class_name)):
        return None
    refuse_perturbed_guidance(pipe)
    return model


def refuse_perturbed_guidance(pipe: Any) -> None:
    """One error for a pipeline with perturbed-attention guidance (diffusers' PAG pipelines: ``PAGMixin``).

    Its denoiser batch holds a third, perturbed copy of the samples (``[uncond; cond; perturbed]``) that has
    no place among a trace's samples, and it swaps self-attention processors for the length of a call
    (left swapped when the call is interrupted): refused before anything is installed.

    >>> from diffusers import PixArtSigmaPAGPipeline
    >>> from attnscope.testing import tiny_pixart_pipeline
    >>> refuse_perturbed_guidance(tiny_pixart_pipeline())   # no PAG: nothing to say
    >>> refuse_perturbed_guidance(PixArtSigmaPAGPipeline(**tiny_pixart_pipeline(sigma=True).components))
    Traceback (most recent call last):
    ...
    attnscope.errors.AttnscopeError: pipe: a PixArtSigmaPAGPipeline (perturbed-attention guidance); its denoiser batch stacks perturbed copies of the samples ([uncond; cond; perturbed]) that attnscope cannot map to a trace's samples; use the pipeline without PAG (PixArtSigmaPipeline(**pipe.components))
    """
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    from ...errors import AttnscopeError

    if isinstance(pipe, PAGMixin):
        name = type(pipe).__name__
        base = name.replace("PAG", "") if "PAG" in name else "the pipeline without PAG"
        raise AttnscopeError(
            f"pipe: a {name} (perturbed-attention guidance); its denoiser batch stacks perturbed copies of the samples "
            f"([uncond; cond; perturbed]) that attnscope cannot map to a trace's samples; use the pipeline without "
            f"PAG ({base}(**pipe.components))")


def packed_latent_shape(tokens: int, ids: torch.Tensor | None) -> tuple[int, int]:
    """The VAE latent's (h, w) under a 2×2-packed sequence (Flux.1, Flux.2): twice the packed grid, read from the
    rows and columns of ``img_ids`` (its columns 1 and 2), else a square grid of ``tokens`` positions.

    >>> ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1)
    >>> packed_latent_shape(24, ids.reshape(-1, 3)), packed_latent_shape(16, None)
    ((8, 12), (8, 8))
    """
    if ids is None:
        side = 2 * int(round(tokens**0.5))
        return side, side
    ids = ids[0] if ids.ndim == 3 else ids
    return 2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1)


def packed_step_inputs(args: tuple, kwargs: dict, positions: tuple[int, int], reference: str) -> dict[str, Any]:
    """Batch size, timestep, latent (h, w) and text length of a call of a 2×2-packed transformer (Flux.1, Flux.2).

    ``timestep`` and ``img_ids`` are read by keyword or at ``positions`` among the positional arguments; the grid
    comes from ``img_ids`` (:func:`packed_latent_shape`). Image tokens with another time coordinate than the first
    (a reference image's) have no place on the latent grid: one error, ``reference`` naming that input.

    >>> ids = torch.stack(torch.meshgrid(torch.arange(2.0), torch.arange(2.0), torch.arange(2.0), indexing="ij"), -1)
    >>> packed_step_inputs((torch.zeros(1, 8, 4),), {"img_ids": ids.reshape(-1, 3)}, (3, 4), "Flux.1 with image=")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: Flux.1 with image=: 4 of the transformer's 8 image tokens are reference-image tokens, which have no place on the latent's grid; attnscope records pipelines whose transformer sees the latent's own tokens only (text-to-image, img2img, inpainting, Fill, ControlNet: docs/model-families.md)
    """
    from ...errors import AttnscopeError

    sample = args[0] if args else kwargs["hidden_states"]
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    at_t, at_ids = positions
    t = kwargs.get("timestep", args[at_t] if len(args) > at_t else None)
    ids = kwargs.get("img_ids", args[at_ids] if len(args) > at_ids else None)
    if ids is not None:
        ids = ids[0] if ids.ndim == 3 else ids
        latent = ids[:, 0] == ids[0, 0]
        if not bool(latent.all()):
            raise AttnscopeError(f"{reference}: {int((~latent).sum())} of the transformer's {len(latent)} image tokens "
                                 f"are reference-image tokens, which have no place on the latent's grid; attnscope records "
                                 f"pipelines whose transformer sees the latent's own tokens only (text-to-image, img2img, "
                                 f"inpainting, Fill, ControlNet: docs/model-families.md)")
    return {"batch": int(sample.shape[0]), "timestep": timestep_value(t),
            "latent_shape": packed_latent_shape(int(sample.shape[1]), ids),
            "text_length": None if text is None else int(text.shape[1])}


def depth_band(depth: int, layers: int) -> str:
    """The third of a flat stack of ``layers`` layers that layer ``depth`` sits in.

    >>> [depth_band(d, 28) for d in (0, 9, 10, 18, 19, 27)]
    ['early', 'early', 'middle', 'middle', 'late', 'late']
    """
    return ("early", "middle", "late")[min(2, 3 * depth // max(1, layers))]


def flat_stack_sites(model: torch.nn.Module, family: str, cross: bool) -> list[Any]:
    """The ``transformer_blocks.N.attn2`` (``cross``) or ``attn1`` sites of a flat stack of transformer blocks.

    Every layer has the same resolution (the patch grid, level 0); the block is the layer's
    third of the stack (:func:`depth_band`) and the depth its index.

    >>> from attnscope.testing import tiny_pixart_pipeline
    >>> [(s.name, s.block, s.depth) for s in flat_stack_sites(tiny_pixart_pipeline().transformer, "pixart", True)]
    [('transformer_blocks.0.attn2', 'early', 0), ('transformer_blocks.1.attn2', 'middle', 1)]
    """
    from .._sites import CrossAttentionSite

    patch = int(model.config.patch_size)
    blocks = model.transformer_blocks
    found = []
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn2" if cross else "attn1", None)
        if attn is None:
            continue
        inner = attn.to_q.out_features
        found.append(CrossAttentionSite(
            name=f"transformer_blocks.{index}.{'attn2' if cross else 'attn1'}", family=family,
            kind="cross" if cross else "self", block=depth_band(index, len(blocks)), level=0,
            heads=attn.heads, head_dim=inner // attn.heads, token_dim=attn.to_k.in_features, module=attn,
            patch=patch, depth=index,
        ))
    return found


def latent_step_inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Batch, timestep, latent (h, w) and text length of a transformer called on an unpacked ``(B, C, H, W)`` latent.

    >>> latent_step_inputs((torch.zeros(2, 4, 8, 6),), {"encoder_hidden_states": torch.zeros(2, 120, 32),
    ...                                                 "timestep": torch.tensor([999, 999])})
    {'batch': 2, 'timestep': 999.0, 'latent_shape': (8, 6), 'text_length': 120}
    """
    sample = args[0] if args else kwargs["hidden_states"]
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
    return {"batch": int(sample.shape[0]), "timestep": timestep_value(t),
            "latent_shape": (int(sample.shape[-2]), int(sample.shape[-1])),
            "text_length": None if text is None else int(text.shape[1])}


def call_local(pipe: Any, name: str) -> Any:
    """A local variable of the running pipeline call (``pipe.__call__``'s frame), or None outside one.

    For pipelines that keep a per-call setting only as a local (PixArt's ``do_classifier_free_guidance``).

    >>> call_local(object(), "do_classifier_free_guidance") is None
    True
    """
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is pipe and name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    return None
