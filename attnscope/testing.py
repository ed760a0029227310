"""Tiny, random-weight, fully offline diffusers pipelines for tests and benchmarks.

Everything here is built from scratch on the CPU: a miniature byte-level BPE
vocabulary written to disk and loaded by a real :class:`transformers.CLIPTokenizer`,
and text encoders, UNets, VAEs and schedulers created from configs with random
(seeded) weights. Nothing is downloaded and nothing is unpickled.

The models have the *structure* of Stable Diffusion 1.x / 2.x / XL (cross-attention
``attn2`` sites, head layouts, text-time conditioning, VAE scale factors) so that
attention hooks, token bookkeeping and map aggregation can be exercised quickly.
They are **not** meant to produce meaningful images: the output is noise.

Builders
--------
make_clip_tokenizer
    Tiny CLIP BPE tokenizer in which every word of a word list is one token.
tiny_sd_pipeline
    Seconds-fast SD 1.x (or SD 2.x-style with ``linear_projection=True``) pipeline.
tiny_sdxl_pipeline
    Seconds-fast SDXL pipeline (two text encoders, text-time conditioning).
sd15_structure_pipeline
    Full-size SD 1.5 UNet block structure (~860M random parameters) for benchmarks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .models.shapes import make_clip_tokenizer as build_clip_tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "make_clip_tokenizer",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "sd15_structure_pipeline",
]

DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "of", "in", "on", "at", "to", "with", "photo",
    "red", "green", "blue", "yellow", "black", "white",
    "circle", "square", "triangle", "cat", "dog", "elephant", "glasses",
    "left", "right", "above", "below", "big", "small", "painting",
)

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# ----------------------------------------------------------------------------- tokenizer
def make_clip_tokenizer(directory: str | os.PathLike, words: Sequence[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """:func:`attnscope.models.shapes.make_clip_tokenizer` with this module's small vocabulary by default.

    Examples
    --------
    >>> import tempfile
    >>> tok = make_clip_tokenizer(tempfile.mkdtemp())
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']
    """
    return build_clip_tokenizer(directory, words, model_max_length)


@contextmanager
def _tokenizer(tokenizer_dir) -> Iterator:
    """Yield a tiny tokenizer, written to ``tokenizer_dir`` or a throw-away directory."""
    if tokenizer_dir is not None:
        yield make_clip_tokenizer(tokenizer_dir)
        return
    with tempfile.TemporaryDirectory(prefix="attnscope-tok-") as tmp:
        yield make_clip_tokenizer(tmp)  # fully loaded in memory; files no longer needed


# ----------------------------------------------------------------------------- components
def _text_encoder(tokenizer, seed, hidden_size=32, layers=2, heads=4, intermediate=37,
                  projection_dim=None):
    """Random CLIP text encoder sized for ``tokenizer`` (with projection if asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate,
        num_attention_heads=heads, num_hidden_layers=layers,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim or hidden_size,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def _vae(seed, num_blocks=2):
    """Random AutoencoderKL with 4 latent channels and scale factor ``2**(num_blocks-1)``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        block_out_channels=[32] * num_blocks,
        down_block_types=["DownEncoderBlock2D"] * num_blocks,
        up_block_types=["UpDecoderBlock2D"] * num_blocks,
    ).eval()


def _scheduler(name: str):
    """SD-style scheduler: ``"ddim"``, ``"euler"`` or ``"dpm"``."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "euler":
        return EulerDiscreteScheduler(**_BETAS, steps_offset=1, timestep_spacing="leading")
    if name == "dpm":
        return DPMSolverMultistepScheduler(**_BETAS, steps_offset=1)
    raise ValueError(f"scheduler must be 'ddim', 'euler' or 'dpm', got {name!r}")


def _unet(seed, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(in_channels=4, out_channels=4, **config).eval()


def _sd_pipeline(tokenizer, text_encoder, unet, vae, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- pipelines
def tiny_sd_pipeline(tokenizer_dir=None, seed=0, linear_projection=False, scheduler="ddim"):
    """Build a tiny random-weight Stable Diffusion 1.x/2.x pipeline (CPU, fp32).

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_sd_pipeline()
    >>> out = pipe("a red circle", num_inference_steps=2, height=32, width=32,
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images[0].size
    (32, 32)

    Parameters
    ----------
    tokenizer_dir : str or os.PathLike, optional
        Where the tokenizer files are written; a temporary directory (removed
        again) when None.
    seed : int, default 0
        Seed for the random weights (each component is seeded separately; the
        caller's global torch RNG state is restored afterwards).
    linear_projection : bool, default False
        ``use_linear_projection`` of the transformer blocks (True = SD 2.x style).
    scheduler : {"ddim", "euler", "dpm"}, default "ddim"
        DDIM, Euler discrete or DPM-Solver++ multistep, SD beta schedule.

    Returns
    -------
    diffusers.StableDiffusionPipeline
        UNet with blocks of 32 and 64 channels, ``attention_head_dim=8`` (which
        diffusers reads as 8 heads per site: head size 4 at full latent
        resolution and 8 at half), cross-attention dim 32; 2-layer CLIP text
        encoder of width 32; VAE with scale factor 2 (32x32 px -> 16x16 latent).
        ``attn2`` sites sit in ``down_blocks.{0,1}``, ``mid_block`` and
        ``up_blocks.{0,1}`` (full and half latent resolution). No safety checker.
    """
    with torch.random.fork_rng(devices=[]), _tokenizer(tokenizer_dir) as tok:
        unet = _unet(
            seed, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
            use_linear_projection=linear_projection,
        )
        return _sd_pipeline(tok, _text_encoder(tok, seed), unet, _vae(seed), _scheduler(scheduler))


def tiny_sdxl_pipeline(tokenizer_dir=None, seed=0):
    """Build a tiny random-weight Stable Diffusion XL pipeline (CPU, fp32).

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_sdxl_pipeline()
    >>> out = pipe("a red circle", num_inference_steps=2, height=64, width=96,
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images[0].size
    (96, 64)

    Parameters
    ----------
    tokenizer_dir : str or os.PathLike, optional
        Where the tokenizer files are written (``tokenizer`` and ``tokenizer_2``
        are two loads of the same files); a temporary directory when None.
    seed : int, default 0
        Seed for the random weights.

    Returns
    -------
    diffusers.StableDiffusionXLPipeline
        Two CLIP text encoders of width 32 (the second with a 32-dim
        projection), concatenated to a cross-attention dim of 64; UNet with
        ``text_time`` added conditioning, blocks ``DownBlock2D`` (32 ch) and
        ``CrossAttnDownBlock2D`` (64 ch, 2 transformer layers, 4 heads of 16),
        linear projections as in SDXL; VAE with scale factor 2; Euler scheduler;
        ``force_zeros_for_empty_prompt=True``; no watermarker. Cross-attention
        only happens at half latent resolution (``down_blocks.1``,
        ``mid_block``, ``up_blocks.0``).
    """
    from diffusers import StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]), _tokenizer(tokenizer_dir) as tok:
        tok_2 = type(tok).from_pretrained(tok.name_or_path)
        unet = _unet(
            seed, sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
            cross_attention_dim=64, use_linear_projection=True, norm_num_groups=32,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed), text_encoder=_text_encoder(tok, seed),
            text_encoder_2=_text_encoder(tok_2, seed + 1, projection_dim=32),
            tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=_scheduler("euler"),
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_structure_pipeline(seed=0, tokenizer_dir=None):
    """Build a pipeline with the real SD 1.5 UNet structure and random weights.

    Building takes tens of seconds and ~3.5 GB of RAM (860M fp32 parameters).

    Examples
    --------
    >>> pipe = sd15_structure_pipeline()  # doctest: +SKIP
    >>> pipe("a red circle", num_inference_steps=1, height=128, width=128)  # doctest: +SKIP

    Parameters
    ----------
    seed : int, default 0
        Seed for the random weights.
    tokenizer_dir : str or os.PathLike, optional
        Where the tokenizer files are written; a temporary directory when None.

    Returns
    -------
    diffusers.StableDiffusionPipeline
        ``UNet2DConditionModel`` with its SD 1.5 defaults (blocks of 320, 640,
        1280, 1280 channels, 2 layers per block, 8 heads, cross-attention dim 768,
        16 ``attn2`` sites), a 2-layer CLIP text encoder of width 768 on the tiny
        vocabulary, a small VAE with the SD scale factor 8 (256 px -> 32x32
        latent) and the DDIM scheduler.
    """
    with torch.random.fork_rng(devices=[]), _tokenizer(tokenizer_dir) as tok:
        unet = _unet(seed, sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text_encoder = _text_encoder(tok, seed, hidden_size=768, heads=12, intermediate=3072)
        return _sd_pipeline(tok, text_encoder, unet, _vae(seed, num_blocks=4), _scheduler("ddim"))


if __name__ == "__main__":  # python -m attnscope.testing DIR: save the tiny random-weight SD pipeline to DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m attnscope.testing DIR   (saves a tiny random-weight SD pipeline to DIR)")
    tiny_sd_pipeline().save_pretrained(sys.argv[1])
    print(f"saved a tiny random-weight StableDiffusionPipeline to {sys.argv[1]}")
