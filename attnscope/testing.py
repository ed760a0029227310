"""Tiny, random-weight, fully offline diffusers pipelines for tests and benchmarks.

Everything here is built from scratch on the CPU: miniature vocabularies written
to disk and loaded by a real :class:`transformers.CLIPTokenizer` (byte-level BPE)
or :class:`transformers.T5TokenizerFast` (SentencePiece-style Unigram), and text
encoders, UNets, diffusion transformers, VAEs and schedulers created from configs
with random (seeded) weights. Nothing is downloaded and nothing is unpickled.

The models have the *structure* of Stable Diffusion 1.x / 2.x / XL (cross-attention
``attn2`` sites, head layouts, text-time conditioning, VAE scale factors) and of
the diffusion transformers SD3 / SD3.5 and Flux.1 (joint text-image attention,
patchified or packed latents, CLIP + T5 text conditioning) so that attention
hooks, token bookkeeping and map aggregation can be exercised quickly. They are
**not** meant to produce meaningful images: the output is noise.

Builders
--------
make_clip_tokenizer
    Tiny CLIP BPE tokenizer in which every word of a word list is one token.
make_t5_tokenizer
    Tiny T5 Unigram tokenizer: one piece per word, except "elephant" (two pieces).
tiny_sd_pipeline
    Seconds-fast SD 1.x (or SD 2.x-style with ``linear_projection=True``) pipeline.
tiny_sdxl_pipeline
    Seconds-fast SDXL pipeline (two text encoders, text-time conditioning).
sd15_structure_pipeline
    Full-size SD 1.5 UNet block structure (~860M random parameters) for benchmarks.
tiny_sd3_pipeline
    Seconds-fast SD3 (or SD3.5-style with ``dual_attention=True``) MMDiT pipeline.
tiny_flux_pipeline
    Seconds-fast Flux.1 pipeline (double- and single-stream transformer blocks).
flux_structure_pipeline, sd3_structure_pipeline
    Flux.1 / SD3 pipelines with benchmark-sized transformers (random weights), FLUX.1 and SD3
    token counts at 512 px for ``height=width=128``.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import MappingProxyType

import torch

from .models.shapes import make_clip_tokenizer as build_clip_tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "sd15_structure_pipeline",
    "flux_structure_pipeline",
    "sd3_structure_pipeline",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
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


_T5_SPLIT = MappingProxyType({"elephant": 3})  # make_t5_tokenizer's default: ▁ele + phant

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_T5_CHARS = string.ascii_letters + string.digits + string.punctuation


def make_t5_tokenizer(directory: str | os.PathLike, words: Sequence[str] = DEFAULT_WORDS,
                      model_max_length: int = 512, split: Mapping[str, int] | None = None):
    """Write a tiny T5 (SentencePiece Unigram) vocabulary into ``directory`` and load it.

    Examples
    --------
    >>> import tempfile
    >>> tok = make_t5_tokenizer(tempfile.mkdtemp())
    >>> enc = tok("a red elephant", padding="max_length", max_length=8)
    >>> tok.convert_ids_to_tokens(enc.input_ids)
    ['▁a', '▁red', '▁ele', 'phant', '</s>', '<pad>', '<pad>', '<pad>']
    >>> enc.attention_mask
    [1, 1, 1, 1, 1, 0, 0, 0]
    >>> tok.convert_ids_to_tokens(tok("two zebras").input_ids)
    ['▁', 't', 'w', 'o', '▁', 'z', 'e', 'b', 'r', 'a', 's', '</s>']

    Parameters
    ----------
    directory : str or os.PathLike
        Where ``tokenizer.json`` (written with the ``tokenizers`` library) and
        ``tokenizer_config.json`` are written (created if missing).
        ``T5TokenizerFast.from_pretrained(directory)`` works on it afterwards.
    words : sequence of str
        Words without whitespace that each become the single piece ``▁word``,
        except those in ``split``.
    model_max_length : int, default 512
        The tokenizer's ``model_max_length`` (T5's 512). The SD3 and Flux
        pipelines pad and truncate T5 prompts to their own
        ``max_sequence_length`` instead.
    split : mapping of str to int, optional
        Words that become two pieces, ``▁`` + their first *n* letters and the
        rest. None means ``{"elephant": 3}`` (``▁ele`` + ``phant``), so that
        merging pieces back into words can be tested; ``{}`` splits nothing.

    Returns
    -------
    transformers.T5TokenizerFast
        ``<pad>`` = 0 (also the padding id), ``</s>`` = 1 (appended to every
        sequence), ``<unk>`` = 2, then ``▁``, the word pieces in order, and the
        single characters ``a-z A-Z 0-9`` and ASCII punctuation, so that unknown
        words split into ``▁`` + letters (a Unigram model prefers the whole-word
        pieces); any other character becomes ``<unk>``. Case-sensitive and
        without normalizer, as T5. No ``<extra_id_*>`` sentinels.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    split = _T5_SPLIT if split is None else split
    bad = [w for w in words if not w or w != "".join(w.split())]
    bad += [w for w, n in split.items() if not 0 < n < len(w)]
    if bad:
        raise ValueError(f"words must be non-empty without whitespace, split points inside the word: {bad}")
    pieces = ["▁"]
    for w in words:
        pieces += [f"▁{w[:split[w]]}", w[split[w]:]] if w in split else [f"▁{w}"]
    vocab = [(t, 0.0) for t in _T5_SPECIALS]
    vocab += [(p, -8.0 if p == "▁" else -5.0) for p in dict.fromkeys(pieces)]
    vocab += [(c, -10.0) for c in _T5_CHARS if c not in dict(vocab)]
    backend = Tokenizer(Unigram(vocab, unk_id=_T5_SPECIALS.index("<unk>"), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _T5_SPECIALS])
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": model_max_length,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
        "additional_special_tokens": [],
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), "utf-8")
    return T5TokenizerFast.from_pretrained(str(directory), model_max_length=model_max_length)


_TOKENIZERS = {"clip": make_clip_tokenizer, "t5": make_t5_tokenizer}


@contextmanager
def _tokenizers(tokenizer_dir, *kinds: str) -> Iterator[tuple]:
    """Yield one tiny tokenizer per kind (``"clip"``, ``"t5"``), written under ``tokenizer_dir``.

    A single kind is written into ``tokenizer_dir`` itself, several each into a sub-directory named
    after the kind (``clip/``, ``t5/``). When ``tokenizer_dir`` is None a throw-away directory is used
    and removed afterwards: the tokenizers are fully loaded in memory, the files are no longer needed.
    """
    with ExitStack() as stack:
        root = tokenizer_dir if tokenizer_dir is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="attnscope-tok-"))
        yield tuple(_TOKENIZERS[kind](root if len(kinds) == 1 else os.path.join(root, kind)) for kind in kinds)


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


def _vae(seed, num_blocks=2, **config):
    """Random AutoencoderKL with 4 latent channels and scale factor ``2**(num_blocks-1)``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        block_out_channels=[32] * num_blocks,
        down_block_types=["DownEncoderBlock2D"] * num_blocks,
        up_block_types=["UpDecoderBlock2D"] * num_blocks, **config,
    ).eval()


def _t5_encoder(tokenizer, seed, d_model=32, layers=2, heads=4, d_kv=8, d_ff=37):
    """Random T5 v1.1-style encoder (gated-GELU feed-forward, as T5-XXL) sized for ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


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


def _dit(cls_name: str, seed, **config):
    """Random diffusers transformer ``cls_name`` built from ``config``."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**config).eval()


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
    with torch.random.fork_rng(devices=[]), _tokenizers(tokenizer_dir, "clip") as (tok,):
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

    with torch.random.fork_rng(devices=[]), _tokenizers(tokenizer_dir, "clip") as (tok,):
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
    with torch.random.fork_rng(devices=[]), _tokenizers(tokenizer_dir, "clip") as (tok,):
        unet = _unet(seed, sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text_encoder = _text_encoder(tok, seed, hidden_size=768, heads=12, intermediate=3072)
        return _sd_pipeline(tok, text_encoder, unet, _vae(seed, num_blocks=4), _scheduler("ddim"))


#: The tiny SD3 transformer (:func:`tiny_sd3_pipeline` adds ``num_layers``, ``dual_attention_layers``, ``qk_norm``).
_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
)
#: The tiny Flux.1 transformer (:func:`tiny_flux_pipeline` adds the layer counts and ``guidance_embeds``).
_FLUX = dict(
    patch_size=1, in_channels=16, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
)


def tiny_sd3_pipeline(seed=0, tokenizer_dir=None, dual_attention=False, num_layers=2):
    """Build a tiny random-weight Stable Diffusion 3 (or SD3.5-style) pipeline (CPU, fp32).

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_sd3_pipeline()
    >>> out = pipe("a red circle", num_inference_steps=2, height=32, width=48, guidance_scale=2.0,
    ...            max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    >>> out.images[0].size
    (48, 32)
    >>> [b.context_pre_only for b in pipe.transformer.transformer_blocks]
    [False, True]

    Parameters
    ----------
    seed : int, default 0
        Seed for the random weights (each component is seeded separately; the
        caller's global torch RNG state is restored afterwards).
    tokenizer_dir : str or os.PathLike, optional
        Where the tokenizer files are written: the CLIP vocabulary in ``clip/``
        (``tokenizer`` and ``tokenizer_2`` are two loads of it), the T5 one in
        ``t5/``; a temporary directory (removed again) when None.
    dual_attention : bool, default False
        SD3.5 Medium-style: block 0 gets a second, image-only self-attention
        ``attn2`` (``dual_attention_layers=(0,)``) and every attention RMS-norms
        its queries and keys (``qk_norm="rms_norm"``).
    num_layers : int, default 2
        Number of ``JointTransformerBlock`` layers; the last one is
        ``context_pre_only`` (its attention updates only the image tokens).

    Returns
    -------
    diffusers.StableDiffusion3Pipeline
        ``SD3Transformer2DModel`` with 4 heads of 8 (width 32), patch size 2,
        4 latent channels, text input width 64 and pooled width 64; two 2-layer
        CLIP text encoders of width 32 with 32-dim projections (their
        penultimate hidden states, concatenated to width 64, fill the 77 CLIP
        token rows); a 2-layer T5 encoder of width 64 on :func:`make_t5_tokenizer`;
        VAE with scale factor 2 (32x32 px -> 16x16 latent -> 8x8 = 64 image
        tokens), no quant convs, SD3's scaling and shift factors; flow-matching
        Euler scheduler with SD3's ``shift=3.0``. The joint attention ``attn``
        of each block sees the image tokens first, then the text tokens
        (77 CLIP + ``max_sequence_length`` T5).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]), _tokenizers(tokenizer_dir, "clip", "t5") as (tok, t5_tok):
        tok_2 = type(tok).from_pretrained(tok.name_or_path)
        transformer = _dit(
            "SD3Transformer2DModel", seed, **_SD3, num_layers=num_layers,
            dual_attention_layers=(0,) if dual_attention else (),
            qk_norm="rms_norm" if dual_attention else None,
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(seed, use_quant_conv=False, use_post_quant_conv=False,
                     scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=_text_encoder(tok, seed, projection_dim=32), tokenizer=tok,
            text_encoder_2=_text_encoder(tok_2, seed + 1, projection_dim=32), tokenizer_2=tok_2,
            text_encoder_3=_t5_encoder(t5_tok, seed, d_model=_SD3["joint_attention_dim"]), tokenizer_3=t5_tok,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed=0, tokenizer_dir=None, num_layers=2, num_single_layers=2, guidance_embeds=False):
    """Build a tiny random-weight Flux.1 pipeline (CPU, fp32).

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_flux_pipeline()
    >>> out = pipe("a red circle", num_inference_steps=2, height=32, width=48,
    ...            max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    >>> out.images[0].size
    (48, 32)

    Parameters
    ----------
    seed : int, default 0
        Seed for the random weights (each component is seeded separately; the
        caller's global torch RNG state is restored afterwards).
    tokenizer_dir : str or os.PathLike, optional
        Where the tokenizer files are written: the CLIP vocabulary in ``clip/``,
        the T5 one in ``t5/``; a temporary directory (removed again) when None.
    num_layers : int, default 2
        Number of double-stream ``FluxTransformerBlock`` layers
        (``transformer_blocks.*.attn``: separate image and text projections).
    num_single_layers : int, default 2
        Number of single-stream ``FluxSingleTransformerBlock`` layers
        (``single_transformer_blocks.*.attn``: one sequence, text then image).
    guidance_embeds : bool, default False
        True gives a FLUX.1-dev-style guidance-distilled model (``guidance_scale``
        is embedded with the timestep); False is FLUX.1-schnell-style.

    Returns
    -------
    diffusers.FluxPipeline
        ``FluxTransformer2DModel`` with 2 heads of 16 (width 32), RoPE axes
        (4, 4, 8), 16 input channels (4 latent channels packed 2x2), text input
        width 32; a 2-layer CLIP text encoder of width 32 (pooled output only)
        and a 2-layer T5 encoder of width 32 on :func:`make_t5_tokenizer`; VAE
        with scale factor 2 (32x32 px -> 16x16 latent -> 8x8 = 64 packed image
        tokens), no quant convs, Flux's scaling and shift factors; flow-matching
        Euler scheduler with Flux's resolution-dependent shift. Every attention
        sees the ``max_sequence_length`` T5 tokens first, then the image tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    with torch.random.fork_rng(devices=[]), _tokenizers(tokenizer_dir, "clip", "t5") as (tok, t5_tok):
        transformer = _dit(
            "FluxTransformer2DModel", seed, **_FLUX, num_layers=num_layers,
            num_single_layers=num_single_layers, guidance_embeds=guidance_embeds,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
        pipe = FluxPipeline(
            transformer=transformer, scheduler=scheduler,
            vae=_vae(seed, use_quant_conv=False, use_post_quant_conv=False,
                     scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=_text_encoder(tok, seed), tokenizer=tok,
            text_encoder_2=_t5_encoder(t5_tok, seed, d_model=_FLUX["joint_attention_dim"]), tokenizer_2=t5_tok,
            image_encoder=None, feature_extractor=None,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_structure_pipeline(seed=0, num_layers=4, num_single_layers=8, heads=8, head_dim=64):
    """A Flux.1 pipeline whose transformer has a benchmark-sized width (random weights, CPU, fp32).

    :func:`tiny_flux_pipeline` with its transformer replaced by ``num_layers`` double-stream and
    ``num_single_layers`` single-stream blocks of ``heads`` × ``head_dim`` (FLUX.1 itself: 19 + 38
    blocks of 24 × 128). Its VAE halves the image side, so ``height=width=128`` gives 32×32 = 1024
    packed image tokens, as FLUX.1 at 512 px; with the default ``max_sequence_length=512`` the text
    is FLUX.1's 512 T5 tokens.

    >>> pipe = flux_structure_pipeline(num_layers=1, num_single_layers=1, heads=2, head_dim=32)
    >>> pipe.transformer.config.num_attention_heads, len(pipe.transformer.single_transformer_blocks)
    (2, 1)
    """
    pipe = tiny_flux_pipeline(seed=seed)
    rope = (head_dim // 8, (head_dim - head_dim // 8) // 2, head_dim - head_dim // 8 - (head_dim - head_dim // 8) // 2)
    with torch.random.fork_rng(devices=[]):
        transformer = _dit("FluxTransformer2DModel", seed, **{
            **_FLUX, "attention_head_dim": head_dim, "num_attention_heads": heads, "axes_dims_rope": rope,
            "num_layers": num_layers, "num_single_layers": num_single_layers, "guidance_embeds": False})
    pipe.register_modules(transformer=transformer)
    return pipe


def sd3_structure_pipeline(seed=0, num_layers=6, heads=8, head_dim=64):
    """An SD3 pipeline whose transformer has a benchmark-sized width (random weights, CPU, fp32).

    :func:`tiny_sd3_pipeline` with ``num_layers`` joint blocks of ``heads`` × ``head_dim`` (SD3
    Medium: 24 blocks of 24 × 64). ``height=width=128`` gives 32×32 = 1024 image tokens (patch 2
    on a 64×64 latent), as SD3 at 512 px; the text is 77 CLIP + ``max_sequence_length`` T5 tokens.

    >>> pipe = sd3_structure_pipeline(num_layers=1, heads=2, head_dim=32)
    >>> pipe.transformer.config.num_attention_heads, len(pipe.transformer.transformer_blocks)
    (2, 1)
    """
    pipe = tiny_sd3_pipeline(seed=seed)
    with torch.random.fork_rng(devices=[]):
        transformer = _dit("SD3Transformer2DModel", seed, **{
            **_SD3, "sample_size": 64, "attention_head_dim": head_dim, "num_attention_heads": heads,
            "caption_projection_dim": heads * head_dim, "num_layers": num_layers})
    pipe.register_modules(transformer=transformer)
    return pipe


if __name__ == "__main__":  # python -m attnscope.testing DIR: save the tiny random-weight SD pipeline to DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m attnscope.testing DIR   (saves a tiny random-weight SD pipeline to DIR)")
    tiny_sd_pipeline().save_pretrained(sys.argv[1])
    print(f"saved a tiny random-weight StableDiffusionPipeline to {sys.argv[1]}")
