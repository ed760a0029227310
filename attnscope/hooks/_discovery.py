"""Finding a pipeline's denoiser and its sites through the family adapters."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AttnscopeError
from ._sites import CrossAttentionSite
from .families import ADAPTERS, text_tokenizer

__all__ = ["discover_self_sites", "discover_sites", "find_adapter", "find_denoiser", "segment_name", "text_segments"]


def find_adapter(pipe: Any) -> tuple[Any, torch.nn.Module]:
    """The family adapter module (:mod:`attnscope.hooks.families`) and the denoiser of ``pipe``, or AttnscopeError."""
    from diffusers import DiffusionPipeline

    supported = "; ".join(adapter.SUPPORTS for adapter in ADAPTERS)
    if _compiled(pipe):
        raise AttnscopeError(
            f"pipe: got a torch.compile'd {type(pipe._orig_mod).__name__}; pass the pipeline, and compile its denoiser "
            f"in place (pipe.unet.compile() or pipe.transformer.compile(): the module stays the same object)")
    if not isinstance(pipe, DiffusionPipeline):
        raise AttnscopeError(
            f"pipe: expected a diffusers pipeline (DiffusionPipeline) with a supported denoiser ({supported}), "
            f"got {type(pipe).__module__}.{type(pipe).__qualname__}"
        )
    _refuse_image_guidance(pipe)
    for adapter in ADAPTERS:
        denoiser = adapter.denoiser(pipe)
        if denoiser is not None:
            return adapter, denoiser
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, name, None)  # `is None` tests: a compiled module refuses truth tests (len())
    if _compiled(denoiser):
        raise AttnscopeError(
            f"pipe.{name}: a torch.compile'd {type(denoiser._orig_mod).__name__} (torch.compile(pipe.{name}) returns a "
            f"wrapper attnscope cannot hook); keep the module and compile it in place instead: pipe.{name} = "
            f"pipe.{name}._orig_mod; pipe.{name}.compile()")
    found = type(denoiser).__name__ if denoiser is not None else "no `unet` or `transformer` component"
    raise AttnscopeError(f"pipe: {type(pipe).__name__} has {found}; supported denoisers: {supported}")


#: pipelines whose guided denoiser batch stacks three copies of the samples, not ``[uncond; cond]``
_THREE_WAY_GUIDANCE = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline")


def _refuse_image_guidance(pipe: Any) -> None:
    """One error for InstructPix2Pix (SD, SDXL): with its text and image guidance the denoiser batch is
    ``[prompt + image; image only; neither]``, which attnscope would take for three samples per image (their maps
    labelled with the prompt, the run failing at its end on one image per sample). Refused before anything runs.

    >>> from diffusers import StableDiffusionInstructPix2PixPipeline
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> _refuse_image_guidance(StableDiffusionInstructPix2PixPipeline(**tiny_sd_pipeline().components))
    Traceback (most recent call last):
    ...
    attnscope.errors.AttnscopeError: pipe: a StableDiffusionInstructPix2PixPipeline (text and image guidance); its denoiser batch stacks three copies of the samples ([prompt + image; image only; neither]) that attnscope cannot map to a trace's samples and CFG branches; supported are pipelines whose guided batch is [uncond; cond] (text-to-image, img2img, inpainting, ControlNet)
    """
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in _THREE_WAY_GUIDANCE)
    if isinstance(pipe, classes):
        raise AttnscopeError(f"pipe: a {type(pipe).__name__} (text and image guidance); its denoiser batch stacks three "
                             f"copies of the samples ([prompt + image; image only; neither]) that attnscope cannot map "
                             f"to a trace's samples and CFG branches; supported are pipelines whose guided batch is "
                             f"[uncond; cond] (text-to-image, img2img, inpainting, ControlNet)")


def _compiled(module: Any) -> bool:
    """Whether ``module`` is ``torch.compile(module)``'s wrapper (``OptimizedModule``; told without importing
    ``torch._dynamo``, which takes seconds).

    >>> _compiled(torch.nn.Linear(1, 1)), _compiled(None)
    (False, False)
    """
    return type(module).__name__ == "OptimizedModule" and isinstance(module, torch.nn.Module) and hasattr(module, "_orig_mod")


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """Return ``(family, denoiser)`` of a diffusers pipeline or raise AttnscopeError.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> find_denoiser(tiny_sd_pipeline())[0]
    'unet'
    """
    adapter, denoiser = find_adapter(pipe)
    return adapter.FAMILY, denoiser


def discover_sites(pipe: Any) -> list[CrossAttentionSite]:
    """All cross-attention sites of a pipeline's denoiser, in module order.

    Examples
    --------
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> import attnscope as ats
    >>> [s.name for s in ats.discover_sites(tiny_sd_pipeline())][:2]
    ['down_blocks.0.attentions.0.transformer_blocks.0.attn2', 'down_blocks.1.attentions.0.transformer_blocks.0.attn2']
    """
    adapter, denoiser = find_adapter(pipe)
    return adapter.sites(denoiser)


def discover_self_sites(pipe: Any) -> list[CrossAttentionSite]:
    """The self-attention modules (``attn1``) of the denoiser's transformer blocks, kind ``"self"``.

    Examples
    --------
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> sites = discover_self_sites(tiny_sd_pipeline())
    >>> sites[0].name, sites[0].kind
    ('down_blocks.0.attentions.0.transformer_blocks.0.attn1', 'self')
    """
    adapter, denoiser = find_adapter(pipe)
    return adapter.sites(denoiser, cross=False)


def text_segments(pipe: Any) -> list[tuple[str | None, Any]]:
    """Per segment of the sites' text axis: ``(text encoder attribute, its tokenizer)``, None where absent.

    The adapter's ``TEXT_ENCODERS`` name the segments; each takes the first alternative the pipeline
    has (an SDXL refiner has only ``text_encoder_2``), and ``text_encoder_N`` is spelled by
    ``tokenizer_N``.

    >>> from attnscope.testing import tiny_sd3_pipeline
    >>> [(name, segment_name(tok)) for name, tok in text_segments(tiny_sd3_pipeline())]
    [('text_encoder', 'clip'), ('text_encoder_3', 't5')]
    """
    adapter, _ = find_adapter(pipe)
    found = []
    for alternatives in adapter.TEXT_ENCODERS:
        name = next((a for a in alternatives if getattr(pipe, a, None) is not None), None)
        found.append((name, getattr(pipe, "tokenizer" + name[len("text_encoder"):], None) if name else None))
    return found


def segment_name(tokenizer: Any) -> str:
    """Short name of a tokenizer's segment: ``"clip"``, ``"t5"``, ``"mistral"`` (a tokenizer with Mistral's ``[INST]``
    token, whatever class transformers loads it as), or its class name without "Tokenizer(Fast)". A processor (FLUX.2
    dev's ``PixtralProcessor``) is named by the tokenizer it holds.

    >>> from attnscope.testing import make_clip_tokenizer, tiny_flux2_dev_pipeline
    >>> import tempfile
    >>> segment_name(make_clip_tokenizer(tempfile.mkdtemp()))
    'clip'
    >>> processor = tiny_flux2_dev_pipeline().tokenizer
    >>> type(processor.tokenizer).__name__, segment_name(processor)
    ('TokenizersBackend', 'mistral')
    """
    tokenizer = text_tokenizer(tokenizer)
    if "[INST]" in getattr(tokenizer, "added_tokens_encoder", {}):
        return "mistral"
    name = type(tokenizer).__name__.lower()
    return "clip" if "clip" in name else "t5" if "t5" in name else name.removesuffix("fast").removesuffix("tokenizer")
