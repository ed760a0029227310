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
tiny_pixart_pipeline
    Seconds-fast PixArt-α / PixArt-Σ pipeline (a flat stack of cross-attention layers, masked T5 padding).
make_gemma_tokenizer, tiny_sana_pipeline
    Tiny Gemma BPE tokenizer; seconds-fast Sana pipeline (linear self-attention, Gemma-2 text, instruction prefix).
make_qwen_tokenizer
    Tiny Qwen2/Qwen3 byte-level BPE tokenizer with Qwen3's chat template.
tiny_flux2_pipeline
    Seconds-fast FLUX.2 klein pipeline (Qwen3 text encoder, double- and single-stream blocks).
tiny_flux2_dev_pipeline
    Seconds-fast FLUX.2 dev pipeline (Mistral 3 text encoder in a Pixtral-style processor, guidance-distilled).
flux_structure_pipeline, flux2_structure_pipeline, sd3_structure_pipeline, pixart_structure_pipeline, sana_structure_pipeline
    Flux.1 / Flux.2 / SD3 / PixArt / Sana pipelines with benchmark-sized transformers (random weights) and the
    real models' token counts (FLUX.1, FLUX.2, SD3, PixArt at 512 px for ``height=width=128``; Sana at 1024 px
    for ``height=width=64``).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import string
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import MappingProxyType

import torch

from .errors import AttnscopeError
from .models.shapes import learn_bpe_merges
from .models.shapes import make_clip_tokenizer as build_clip_tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "make_clip_tokenizer",
    "tiny_clip_model",
    "make_t5_tokenizer",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "sd15_structure_pipeline",
    "flux_structure_pipeline",
    "sd3_structure_pipeline",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "make_qwen_tokenizer",
    "tiny_flux2_pipeline",
    "tiny_flux2_dev_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sana_pipeline",
    "make_gemma_tokenizer",
    "flux2_structure_pipeline",
    "pixart_structure_pipeline",
    "sana_structure_pipeline",
]

DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "of", "in", "on", "at", "to", "with", "photo",
    "red", "green", "blue", "yellow", "black", "white",
    "circle", "square", "triangle", "cat", "dog", "elephant", "glasses",
    "left", "right", "above", "below", "big", "small", "painting",
)

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# ----------------------------------------------------------------------------- argument checks
def _int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int (numpy ints too; not a bool, float or str), at least ``minimum``, else one AttnscopeError.

    >>> _int("num_layers", 0, minimum=1)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: num_layers=0: expected an int >= 1
    """
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if minimum is None or number >= minimum:
                return number
    raise AttnscopeError(f"{name}={value!r}: expected an int" + (f" >= {minimum}" if minimum is not None else ""))


def _flag(name: str, value) -> bool:
    """``value`` if it is a bool, else one AttnscopeError (a string such as ``"no"`` would be truthy)."""
    if not isinstance(value, bool):
        raise AttnscopeError(f"{name}={value!r}: expected True or False")
    return value


def _directory(name: str, value) -> Path:
    """``value`` (str or path) as a Path that is a directory or does not exist yet, else one AttnscopeError."""
    if not isinstance(value, (str, os.PathLike)):
        raise AttnscopeError(f"{name}={value!r}: expected a str or os.PathLike directory")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise AttnscopeError(f"{name}={str(value)!r}: is a file; expected a directory (created if missing)")
    return path


def _tokenizer_dir(value):
    """``tokenizer_dir`` checked: None, or a directory that exists or can be created."""
    return None if value is None else _directory("tokenizer_dir", value)


#: Files that ``from_pretrained`` of a tokenizer or processor reads from its directory. A tokenizer maker replaces
#: those another tokenizer left there: a stale ``tokenizer.json`` would be loaded instead of the CLIP vocabulary
#: just written, a stale ``chat_template.jinja`` would become the new tokenizer's chat template.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "spiece.model", "processor_config.json", "preprocessor_config.json")


def _tokenizer_directory(directory) -> Path:
    """``directory`` checked, created, and cleared of the tokenizer files another tokenizer may have left there."""
    directory = _directory("directory", directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)
    return directory


def _words(words: Sequence[str], split: Mapping[str, int] = MappingProxyType({})) -> list[str]:
    """``words`` as a list, checked: a sequence (not a str) of non-empty strings without whitespace; ``split`` maps
    words to a split point inside the word. Else one AttnscopeError naming the bad words."""
    if isinstance(words, str) or not isinstance(words, Sequence):
        raise AttnscopeError(f"words={words!r}: expected a sequence of words (e.g. ['a', 'red', 'circle'])")
    if not isinstance(split, Mapping):
        raise AttnscopeError(f"split={split!r}: expected a mapping of word to split point (e.g. {{'elephant': 3}})")
    bad = [w for w in words if not isinstance(w, str) or not w or w != "".join(w.split())]
    bad += [w for w, n in split.items() if not isinstance(w, str) or isinstance(n, bool) or not isinstance(n, int)
            or not 0 < n < len(w)]
    if bad:
        raise AttnscopeError(f"words must be non-empty strings without whitespace, split points inside the word; "
                             f"got {bad}")
    return list(words)


# ----------------------------------------------------------------------------- tokenizer
def make_clip_tokenizer(directory: str | os.PathLike, words: Sequence[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """:func:`attnscope.models.shapes.make_clip_tokenizer` with this module's small vocabulary by default.

    Examples
    --------
    >>> import tempfile
    >>> tok = make_clip_tokenizer(tempfile.mkdtemp())
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']

    Tokenizer files another tokenizer left in ``directory`` are replaced.
    """
    model_max_length = _int("model_max_length", model_max_length, minimum=1)
    return build_clip_tokenizer(_tokenizer_directory(directory), words, model_max_length)


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
        ``tokenizer_config.json`` are written (created if missing; tokenizer
        files another tokenizer left there are replaced).
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
    words = _words(words, split)
    model_max_length = _int("model_max_length", model_max_length, minimum=1)
    directory = _tokenizer_directory(directory)
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
        tokenizer_dir = _tokenizer_dir(tokenizer_dir)
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


def _structure(seed, num_layers, heads, head_dim, num_single_layers=None) -> tuple:
    """The structure builders' ``seed``, ``num_layers``, ``heads``, ``head_dim`` (at least 1) and, for Flux,
    ``num_single_layers`` (at least 0), checked."""
    counts = (_int("seed", seed), _int("num_layers", num_layers, minimum=1), _int("heads", heads, minimum=1),
              _int("head_dim", head_dim, minimum=1))
    return counts if num_single_layers is None else (*counts, _int("num_single_layers", num_single_layers, minimum=0))


@contextmanager
def _width_errors(heads, head_dim) -> Iterator[None]:
    """diffusers' errors for a transformer width it cannot build (its 2-D sine-cosine position embedding needs an
    even width per axis) as one AttnscopeError naming ``heads`` and ``head_dim``."""
    try:
        yield
    except (ValueError, IndexError) as exc:
        raise AttnscopeError(f"heads={heads}, head_dim={head_dim}: diffusers cannot build a transformer of width "
                             f"heads * head_dim = {heads * head_dim} ({exc})") from exc


def _scheduler(name: str):
    """SD-style scheduler: ``"ddim"``, ``"euler"`` or ``"dpm"``."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "euler":
        return EulerDiscreteScheduler(**_BETAS, steps_offset=1, timestep_spacing="leading")
    if name == "dpm":
        return DPMSolverMultistepScheduler(**_BETAS, steps_offset=1)
    raise AttnscopeError(f"scheduler={name!r}: expected 'ddim', 'euler' or 'dpm'")


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
    seed, linear_projection = _int("seed", seed), _flag("linear_projection", linear_projection)
    if scheduler not in ("ddim", "euler", "dpm"):
        _scheduler(scheduler)  # the error, before anything is built
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

    seed = _int("seed", seed)
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
    seed = _int("seed", seed)
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

    seed, dual_attention = _int("seed", seed), _flag("dual_attention", dual_attention)
    num_layers = _int("num_layers", num_layers, minimum=1)
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

    seed, guidance_embeds = _int("seed", seed), _flag("guidance_embeds", guidance_embeds)
    num_layers = _int("num_layers", num_layers, minimum=1)
    num_single_layers = _int("num_single_layers", num_single_layers, minimum=0)
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
    blocks of 24 × 128; ``head_dim`` a multiple of 32, for its RoPE axes). Its VAE halves the image side, so ``height=width=128`` gives 32×32 = 1024
    packed image tokens, as FLUX.1 at 512 px; with the default ``max_sequence_length=512`` the text
    is FLUX.1's 512 T5 tokens.

    >>> pipe = flux_structure_pipeline(num_layers=1, num_single_layers=1, heads=2, head_dim=32)
    >>> pipe.transformer.config.num_attention_heads, len(pipe.transformer.single_transformer_blocks)
    (2, 1)
    """
    seed, num_layers, heads, head_dim, num_single_layers = _structure(seed, num_layers, heads, head_dim,
                                                                      num_single_layers)
    if head_dim % 32:
        raise AttnscopeError(f"head_dim={head_dim}: expected a multiple of 32 (the RoPE axes are head_dim/8 and two "
                             "halves of the rest, each of an even size)")
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
    seed, num_layers, heads, head_dim = _structure(seed, num_layers, heads, head_dim)
    pipe = tiny_sd3_pipeline(seed=seed)
    with torch.random.fork_rng(devices=[]), _width_errors(heads, head_dim):
        transformer = _dit("SD3Transformer2DModel", seed, **{
            **_SD3, "sample_size": 64, "attention_head_dim": head_dim, "num_attention_heads": heads,
            "caption_projection_dim": heads * head_dim, "num_layers": num_layers})
    pipe.register_modules(transformer=transformer)
    return pipe


# ----------------------------------------------------------------------------- PixArt, Sana
_PIXART = MappingProxyType(dict(
    sample_size=8, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
    in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
))


def tiny_pixart_pipeline(seed=0, tokenizer_dir=None, sigma=False, num_layers=2):
    """Build a tiny random-weight PixArt-α (or PixArt-Σ) pipeline (CPU, fp32).

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_pixart_pipeline()
    >>> out = pipe("a red circle", num_inference_steps=2, height=32, width=48, max_sequence_length=16,
    ...            use_resolution_binning=False, clean_caption=False, generator=torch.Generator().manual_seed(0))
    >>> out.images[0].size, type(pipe).__name__
    ((48, 32), 'PixArtAlphaPipeline')

    Parameters
    ----------
    seed : int, default 0
        Seed for the random weights (the caller's global torch RNG state is restored afterwards).
    tokenizer_dir : str or os.PathLike, optional
        Where the T5 tokenizer files are written; a temporary directory (removed again) when None.
    sigma : bool, default False
        A ``PixArtSigmaPipeline`` (T5 prompts of 300 tokens by default) instead of ``PixArtAlphaPipeline`` (120).
    num_layers : int, default 2
        Number of transformer layers, each with a self-attention ``attn1`` and a cross-attention ``attn2``.

    Returns
    -------
    diffusers.PixArtAlphaPipeline or diffusers.PixArtSigmaPipeline
        ``PixArtTransformer2DModel`` with 3 heads of 8 (width 24), patch size 2, 4 latent channels and
        a learned variance (8 output channels), mirroring diffusers' own PixArt test configuration; a
        2-layer T5 encoder of width 32 on :func:`make_t5_tokenizer`; a VAE with scale factor 2 (32x32
        px -> 16x16 latent -> 8x8 = 64 image tokens); DPM-Solver++ as PixArt ships. The pipelines'
        resolution binning needs PixArt's real sample sizes: pass ``use_resolution_binning=False``.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    seed, sigma, num_layers = _int("seed", seed), _flag("sigma", sigma), _int("num_layers", num_layers, minimum=1)
    with torch.random.fork_rng(devices=[]), _tokenizers(tokenizer_dir, "t5") as (tok,):
        transformer = _dit("PixArtTransformer2DModel", seed, **_PIXART, num_layers=num_layers)
        cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
        pipe = cls(tokenizer=tok, text_encoder=_t5_encoder(tok, seed, d_model=_PIXART["caption_channels"]),
                   vae=_vae(seed), transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- Flux.2 klein
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_THINK = ("<think>", "</think>")
#: A Qwen3-style chat template, enough for ``apply_chat_template(..., add_generation_prompt=True,
#: enable_thinking=False)`` as the klein pipeline calls it (no tools, no reasoning history).
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def _byte_level_bpe(words: Sequence[str], texts: Sequence[str] = ()) -> tuple[list[tuple[str, str]], list[str]]:
    """Merges and vocabulary (the 256 byte symbols, then each merge's result) of a tiny byte-level BPE in which each of
    ``texts`` is one token, and each word one token bare and one after a space (``Ġ``), except "elephant" (two pieces,
    ``ele``/``Ġele`` + ``phant``). Words must be non-empty without whitespace.

    >>> merges, vocab = _byte_level_bpe(["red"])
    >>> merges[-2:], vocab[-2:]
    ([('r', 'ed'), ('Ġ', 'red')], ['red', 'Ġred'])
    """
    from tokenizers import pre_tokenizers

    words = _words(words)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def symbols(text: str) -> list[str]:  # byte-level BPE's printable symbol of each byte: " " -> "Ġ"
        return list(byte_level.pre_tokenize_str(text)[0][0])

    sequences = [symbols(text) for text in texts]
    for word in dict.fromkeys(words):
        first, *rest = ("ele", "phant") if word == "elephant" else (word,)
        sequences += [symbols(first), symbols(" " + first)] + [symbols(piece) for piece in rest]
    merges = learn_bpe_merges(sequences)
    return merges, sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]


def make_qwen_tokenizer(directory: str | os.PathLike, words: Sequence[str] = DEFAULT_WORDS):
    """Write a tiny Qwen2/Qwen3 byte-level BPE tokenizer with Qwen3's chat tokens into ``directory`` and load it.

    Examples
    --------
    >>> import tempfile
    >>> tok = make_qwen_tokenizer(tempfile.mkdtemp())
    >>> text = tok.apply_chat_template([{"role": "user", "content": "a red elephant"}], tokenize=False,
    ...                                add_generation_prompt=True, enable_thinking=False)
    >>> text
    '<|im_start|>user\\na red elephant<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
    >>> tok.convert_ids_to_tokens(tok(text, padding="max_length", max_length=16).input_ids)  # doctest: +NORMALIZE_WHITESPACE
    ['<|im_start|>', 'user', 'Ċ', 'a', 'Ġred', 'Ġele', 'phant', '<|im_end|>', 'Ċ', '<|im_start|>', 'assistant',
     'Ċ', '<think>', 'ĊĊ', '</think>', 'ĊĊ']
    >>> tok.convert_ids_to_tokens(tok(" two zebras").input_ids)
    ['Ġ', 't', 'w', 'o', 'Ġ', 'z', 'e', 'b', 'r', 'as']

    Parameters
    ----------
    directory : str or os.PathLike
        Where ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` are written
        (created if missing; tokenizer files another tokenizer left there are replaced).
        ``Qwen2TokenizerFast.from_pretrained(directory)`` works on it afterwards.
    words : sequence of str
        Words without whitespace that each become one token, bare (a prompt's first word, right
        after the template's ``user\\n``) and with byte-level BPE's space ``Ġ`` in front; "elephant"
        becomes two pieces (``Ġele`` + ``phant``) so that merging pieces into words can be tested.

    Returns
    -------
    transformers.Qwen2TokenizerFast
        Qwen2's own pre-tokenizer (its split pattern, then byte level) over a vocabulary of the 256
        byte symbols and the merges of BPE training on the words (and ``user``, ``assistant``,
        ``\\n\\n``); ``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>`` (end of sequence)
        special, ``<think>`` and ``</think>`` added, as in Qwen3; a chat template that writes
        ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message and, with
        ``add_generation_prompt=True``, ``<|im_start|>assistant\\n``, followed by an empty
        ``<think>\\n\\n</think>\\n\\n`` when ``enable_thinking=False``. Unknown words split into
        smaller pieces (single bytes, pieces learnt from the words), their space into a lone ``Ġ``.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    words = _words(words)
    directory = _tokenizer_directory(directory)
    merges, tokens = _byte_level_bpe([*words, "user", "assistant"], texts=["\n\n"])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + list(_QWEN_SPECIALS + _QWEN_THINK)))}
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", additional_special_tokens=list(_QWEN_SPECIALS[1:]),
                             chat_template=_QWEN_CHAT_TEMPLATE, model_max_length=32768)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN_THINK])
    tok.save_pretrained(str(directory))
    return Qwen2TokenizerFast.from_pretrained(str(directory))


#: The tiny Flux.2 transformer, as diffusers' Flux2Klein test (:func:`tiny_flux2_pipeline` adds the layer counts);
#: its text width is 3 hidden states of the width-16 Qwen3 encoder.
_FLUX2 = MappingProxyType(dict(
    patch_size=1, in_channels=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
    timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
))


def _flux2_pipeline(cls_name, text, seed, tokenizer_dir, num_layers, num_single_layers, guidance_embeds=False):
    """A tiny Flux.2 pipeline ``cls_name``: the transformer (:data:`_FLUX2`), VAE (scale factor 2) and flow-matching
    scheduler of both, each seeded, and the tokenizer and text encoder of ``text(root)`` — ``(tokenizer, a function
    building the text encoder)``, the tokenizer files written under ``root`` (``tokenizer_dir`` or a temporary one)."""
    import diffusers
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    tokenizer_dir = _tokenizer_dir(tokenizer_dir)
    with torch.random.fork_rng(devices=[]), ExitStack() as stack:
        root = tokenizer_dir if tokenizer_dir is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="attnscope-tok-"))
        tokenizer, text_encoder = text(root)
        transformer = _dit("Flux2Transformer2DModel", seed, **{**_FLUX2, "guidance_embeds": guidance_embeds},
                           num_layers=num_layers, num_single_layers=num_single_layers)
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(
            sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4), layers_per_block=1,
            latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        ).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
        pipe = getattr(diffusers, cls_name)(scheduler=scheduler, vae=vae, text_encoder=text_encoder(),
                                            tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux2_counts(seed, num_layers, num_single_layers) -> tuple[int, int, int]:
    """The Flux.2 builders' ``seed``, ``num_layers`` (at least 1) and ``num_single_layers`` (at least 0), checked."""
    return (_int("seed", seed), _int("num_layers", num_layers, minimum=1),
            _int("num_single_layers", num_single_layers, minimum=0))


def _qwen3_encoder(tokenizer, seed, hidden_size=16, layers=28):
    """Random Qwen3 causal LM sized for ``tokenizer``; 28 layers, so the klein pipeline's default
    ``text_encoder_out_layers=(9, 18, 27)`` applies (as Qwen3-0.6B)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=hidden_size // 2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def tiny_flux2_pipeline(seed=0, tokenizer_dir=None, num_layers=2, num_single_layers=2):
    """Build a tiny random-weight FLUX.2 klein pipeline (CPU, fp32).

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_flux2_pipeline()
    >>> out = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=48, max_sequence_length=32,
    ...            generator=torch.Generator().manual_seed(0))  # the first positional parameter is `image`
    >>> out.images[0].size, type(pipe).__name__
    ((48, 32), 'Flux2KleinPipeline')

    Parameters
    ----------
    seed : int, default 0
        Seed for the random weights (each component is seeded separately; the caller's global
        torch RNG state is restored afterwards).
    tokenizer_dir : str or os.PathLike, optional
        Where the tokenizer files are written (:func:`make_qwen_tokenizer`); a temporary directory
        (removed again) when None.
    num_layers : int, default 2
        Number of double-stream ``Flux2TransformerBlock`` layers (``transformer_blocks.*.attn``).
    num_single_layers : int, default 2
        Number of single-stream ``Flux2SingleTransformerBlock`` layers (``single_transformer_blocks.*.attn``).

    Returns
    -------
    diffusers.Flux2KleinPipeline
        Mirrors diffusers' Flux2Klein test configuration: ``Flux2Transformer2DModel`` with 2 heads of
        16 (width 32), RoPE axes (4, 4, 4, 4), 4 input channels (1 latent channel patchified 2x2);
        ``AutoencoderKLFlux2`` with 1 latent channel, here with two blocks (scale factor 2: 32x32 px
        -> 16x16 latent -> 8x8 = 64 packed image tokens); flow-matching Euler scheduler with dynamic
        shifting; a Qwen3 causal LM of width 16 with 28 layers (the pipeline's default hidden states
        9, 18 and 27, joined to the transformer's text width 48) on :func:`make_qwen_tokenizer`. Not
        distilled: ``guidance_scale > 1`` (4.0 by default) runs the negative prompt as a second
        transformer call per step. Every attention sees the ``max_sequence_length`` chat-template
        tokens first, then the image tokens.
    """
    seed, num_layers, num_single_layers = _flux2_counts(seed, num_layers, num_single_layers)

    def qwen(root):
        tok = make_qwen_tokenizer(root)
        return tok, lambda: _qwen3_encoder(tok, seed)

    return _flux2_pipeline("Flux2KleinPipeline", qwen, seed, tokenizer_dir, num_layers, num_single_layers)


def make_gemma_tokenizer(directory: str | os.PathLike, words: Sequence[str] = DEFAULT_WORDS,
                         split: Mapping[str, int] | None = None):
    """Write a tiny Gemma (byte-fallback BPE, ``▁`` for spaces, no prefix space) tokenizer into ``directory`` and load it.

    Examples
    --------
    >>> import tempfile
    >>> tok = make_gemma_tokenizer(tempfile.mkdtemp())
    >>> tok.convert_ids_to_tokens(tok("red and an elephant").input_ids)
    ['<bos>', 'r', 'e', 'd', '▁and', '▁an', '▁ele', 'phant']
    >>> tok.convert_ids_to_tokens(tok("Prompt: a cat").input_ids)[-4:]
    ['t', ':', '▁a', '▁cat']

    Parameters
    ----------
    directory : str or os.PathLike
        Where the files are written (``transformers.GemmaTokenizer.save_pretrained``; created if missing,
        tokenizer files another tokenizer left there are replaced).
    words : sequence of str
        Words that become one piece ``▁word`` (built by a chain of BPE merges), except those in ``split``.
    split : mapping of str to int, optional
        Words that become ``▁`` + their first *n* letters and the rest; None means ``{"elephant": 3}``.

    Returns
    -------
    transformers.GemmaTokenizer
        ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2 (added at the start), ``<unk>`` = 3, ``<mask>`` = 4,
        then ``▁``, the ASCII letters, digits and punctuation, a newline, and the word pieces. Like
        Gemma there is no prefix space: a prompt's first word is spelled without ``▁`` (letters, unless
        it follows a space); any other text falls back to single characters.
    """
    from transformers import GemmaTokenizer

    split = _T5_SPLIT if split is None else split
    words = _words(words, split)
    directory = _tokenizer_directory(directory)
    vocab = {t: i for i, t in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    for c in ["▁", *_T5_CHARS, "\n"]:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []

    def chain(start: str, letters: str) -> None:
        piece = start
        for ch in letters:
            if (piece, ch) not in merges:
                merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))

    for w in words:
        if w in split:
            chain("▁", w[:split[w]])
            chain(w[split[w]], w[split[w] + 1:])
        else:
            chain("▁", w)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(str(directory))
    return GemmaTokenizer.from_pretrained(str(directory))


def tiny_sana_pipeline(seed=0, tokenizer_dir=None, num_layers=2, qk_norm=None):
    """Build a tiny random-weight Sana pipeline (CPU, fp32).

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_sana_pipeline()
    >>> out = pipe("a red circle", num_inference_steps=2, height=32, width=64, max_sequence_length=16,
    ...            use_resolution_binning=False, generator=torch.Generator().manual_seed(0))
    >>> out.images[0].size
    (64, 32)

    Parameters
    ----------
    seed : int, default 0
        Seed for the random weights (the caller's global torch RNG state is restored afterwards).
    tokenizer_dir : str or os.PathLike, optional
        Where the Gemma tokenizer files are written; a temporary directory (removed again) when None.
    num_layers : int, default 2
        Number of ``SanaTransformerBlock`` layers: a linear self-attention ``attn1`` and a softmax
        cross-attention ``attn2`` each.
    qk_norm : str, optional
        ``"rms_norm_across_heads"`` as Sana 1.5 and Sana Sprint: RMS norms of the queries and keys
        over all heads, applied before the heads are split.

    Returns
    -------
    diffusers.SanaPipeline
        ``SanaTransformer2DModel`` (patch size 1, 2 cross-attention heads of 4, 4 latent channels),
        mirroring diffusers' own Sana test configuration; a 1-layer ``Gemma2Model`` of width 8 on
        :func:`make_gemma_tokenizer`; an ``AutoencoderDC`` with scale factor 2 (32x64 px -> 16x32
        latent = 512 image tokens; Sana wants sides divisible by 32); flow-matching Euler with ``shift=3.0``. The pipeline
        prepends its long default instruction to each prompt, as Sana does; its resolution
        binning needs Sana's real sample sizes: pass ``use_resolution_binning=False``.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    seed, num_layers = _int("seed", seed), _int("num_layers", num_layers, minimum=1)
    tokenizer_dir = _tokenizer_dir(tokenizer_dir)
    with torch.random.fork_rng(devices=[]), ExitStack() as stack:
        root = tokenizer_dir if tokenizer_dir is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="attnscope-tok-"))
        tok = make_gemma_tokenizer(root)
        transformer = _dit(
            "SanaTransformer2DModel", seed, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers,
            num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
            cross_attention_dim=8, caption_channels=8, sample_size=32, qk_norm=qk_norm,
        )
        torch.manual_seed(seed)
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
        ).eval()
        torch.manual_seed(seed)
        text_encoder = Gemma2Model(Gemma2Config(
            head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, attn_implementation="eager",
        )).eval()
        pipe = SanaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux2_structure_pipeline(seed=0, num_layers=4, num_single_layers=8, heads=8, head_dim=64):
    """A FLUX.2 klein pipeline whose transformer has a benchmark-sized width (random weights, CPU, fp32).

    :func:`tiny_flux2_pipeline` with ``num_layers`` double-stream and ``num_single_layers`` single-stream
    blocks of ``heads`` × ``head_dim`` (a multiple of 8, for its four RoPE axes). Its VAE halves the image side and the pipeline packs 2×2, so
    ``height=width=128`` gives 32×32 = 1024 image tokens, as FLUX.2 at 512 px; the text is the
    ``max_sequence_length`` (512 by default) chat-template positions.

    >>> pipe = flux2_structure_pipeline(num_layers=1, num_single_layers=1, heads=2, head_dim=16)
    >>> pipe.transformer.config.num_attention_heads, len(pipe.transformer.single_transformer_blocks)
    (2, 1)
    """
    seed, num_layers, heads, head_dim, num_single_layers = _structure(seed, num_layers, heads, head_dim,
                                                                      num_single_layers)
    if head_dim % 8:
        raise AttnscopeError(f"head_dim={head_dim}: expected a multiple of 8 (four RoPE axes of head_dim/4, each of "
                             "an even size)")
    pipe = tiny_flux2_pipeline(seed=seed)
    with torch.random.fork_rng(devices=[]):
        transformer = _dit("Flux2Transformer2DModel", seed, **{
            **_FLUX2, "attention_head_dim": head_dim, "num_attention_heads": heads,
            "axes_dims_rope": (head_dim // 4,) * 4, "num_layers": num_layers, "num_single_layers": num_single_layers})
    pipe.register_modules(transformer=transformer)
    return pipe


# ----------------------------------------------------------------------------- Flux.2 dev
#: Special tokens of Mistral 3's Tekken tokenizer that the dev pipeline and its processor use, in Tekken's order.
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                     "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
#: Tekken's split before byte level, simplified: a letter run with at most one other character in front (a space),
#: single digits, punctuation runs, line breaks, other whitespace.
_MISTRAL_SPLIT = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
#: A chat template of Mistral Small 3's form, enough for the dev pipeline's messages (a system message, then the
#: user's text; contents as strings or lists of text/image blocks): <s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST].
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for block in message['content'] -%}"
    "{%- set text.value = text.value + (block['text'] if block['type'] == 'text' else '[IMG]') -%}"
    "{%- endfor -%}{%- set text = text.value -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST]' + text + '[/INST]' -}}"
    "{%- else -%}{{- text + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


@functools.cache
def _pixtral_text_processor():
    """A ``ProcessorMixin`` with ``PixtralProcessor``'s parts (image processor, tokenizer, chat template).

    transformers' own ``PixtralProcessor`` imports torchvision when its module loads, which attnscope does not need;
    it defines neither ``__call__`` nor ``apply_chat_template``, so on text this class runs the same code.
    """
    from transformers.processing_utils import ProcessorMixin

    class PixtralTextProcessor(ProcessorMixin):
        """``PixtralProcessor`` on text (see :func:`tiny_flux2_dev_pipeline`)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)

    return PixtralTextProcessor


def __getattr__(name: str):
    """``PixtralTextProcessor``, the class of :func:`tiny_flux2_dev_pipeline`'s ``tokenizer``, built on first use (it
    needs transformers, which importing this module does not). A saved dev pipeline names it in ``model_index.json``
    as ``["attnscope.testing", "PixtralTextProcessor"]``; diffusers finds it here, and looks up ``ProcessorMixin``
    in the same module to learn how to load it (``from_pretrained``)."""
    if name == "PixtralTextProcessor":
        return _pixtral_text_processor()
    if name == "ProcessorMixin":
        from transformers.processing_utils import ProcessorMixin

        return ProcessorMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _mistral_processor(directory, words: Sequence[str] = DEFAULT_WORDS):
    """A tiny Tekken-style tokenizer (byte-level BPE over ``words`` and the dev pipeline's system message, Mistral's
    special tokens, left padding with ``<pad>``), written into ``directory`` and loaded back, in a processor with a
    Pixtral image processor (patches of 6) and :data:`_MISTRAL_CHAT_TEMPLATE`."""
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, TokenizersBackend
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    directory = _tokenizer_directory(directory)
    merges, tokens = _byte_level_bpe([*words, *re.findall(r"\w+", SYSTEM_MESSAGE)])
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(dict.fromkeys([*_MISTRAL_SPECIALS, *tokens]))},
                                   merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_MISTRAL_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _MISTRAL_SPECIALS])
    tok = TokenizersBackend(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", padding_side="left", model_max_length=131072)
    tok.save_pretrained(str(directory))
    image_processor = PixtralImageProcessorPil(patch_size={"height": 6, "width": 6}, size={"longest_edge": 24})
    return _pixtral_text_processor()(image_processor, AutoTokenizer.from_pretrained(str(directory)),
                                     chat_template=_MISTRAL_CHAT_TEMPLATE)


def _mistral3_encoder(tokenizer, seed, hidden_size=16, layers=30):
    """Random ``Mistral3ForConditionalGeneration`` sized for ``tokenizer``: a Mistral text model with 30 layers, so the
    dev pipeline's default ``text_encoder_out_layers=(10, 20, 30)`` applies, and a one-layer Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=hidden_size // 2, max_position_embeddings=1024,
                         sliding_window=None, **special),
        vision_config=dict(model_type="pixtral", hidden_size=hidden_size, intermediate_size=hidden_size,
                           num_hidden_layers=1, num_attention_heads=2, head_dim=hidden_size // 2, image_size=24,
                           patch_size=6, num_channels=3),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1, **special,
    )
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_flux2_dev_pipeline(seed=0, tokenizer_dir=None, num_layers=2, num_single_layers=2):
    """Build a tiny random-weight FLUX.2 dev pipeline (CPU, fp32): Mistral 3 text encoder, guidance-distilled.

    Examples
    --------
    >>> import torch
    >>> pipe = tiny_flux2_dev_pipeline()
    >>> out = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=48, max_sequence_length=48,
    ...            generator=torch.Generator().manual_seed(0))  # the first positional parameter is `image`
    >>> out.images[0].size, type(pipe).__name__, type(pipe.text_encoder).__name__
    ((48, 32), 'Flux2Pipeline', 'Mistral3ForConditionalGeneration')

    Parameters
    ----------
    seed, tokenizer_dir, num_layers, num_single_layers
        As :func:`tiny_flux2_pipeline` (the tokenizer's files go to ``tokenizer_dir``).

    Returns
    -------
    diffusers.Flux2Pipeline
        The transformer, VAE and scheduler of :func:`tiny_flux2_pipeline`, the transformer with guidance
        embeddings (dev is guidance-distilled: one transformer call per step, ``guidance_scale`` is an input);
        a ``Mistral3ForConditionalGeneration`` of width 16 with 30 text layers (the pipeline's default hidden
        states 10, 20 and 30, joined to the transformer's text width 48) and a one-layer Pixtral vision tower,
        as diffusers' Flux2 test; as ``tokenizer`` a processor with ``PixtralProcessor``'s parts (nothing from a
        hub): a Pixtral image processor and a Tekken-style byte-level BPE tokenizer (``TokenizersBackend``,
        Mistral's special tokens, ``<pad>`` padding on the left as FLUX.2 dev's) in which each of
        :data:`DEFAULT_WORDS` and of the system message's words is one piece (``Ġred``; "elephant" is
        ``Ġele`` + ``phant``), with a chat template of Mistral Small 3's form. Every attention sees the
        ``max_sequence_length`` positions of ``<pad>``…``<s>[SYSTEM_PROMPT]{system message}[/SYSTEM_PROMPT]
        [INST]{prompt}[/INST]`` first (31 positions before the prompt), then the image tokens.
    """
    seed, num_layers, num_single_layers = _flux2_counts(seed, num_layers, num_single_layers)

    def mistral(root):
        processor = _mistral_processor(root)
        return processor, lambda: _mistral3_encoder(processor.tokenizer, seed)

    return _flux2_pipeline("Flux2Pipeline", mistral, seed, tokenizer_dir, num_layers, num_single_layers,
                           guidance_embeds=True)


def pixart_structure_pipeline(seed=0, num_layers=4, heads=16, head_dim=72, sigma=False):
    """A PixArt pipeline whose transformer has PixArt-α's width (random weights, CPU, fp32).

    :func:`tiny_pixart_pipeline` with ``num_layers`` layers of ``heads`` × ``head_dim`` (PixArt-α/Σ: 28
    layers of 16 × 72). Its VAE halves the image side, so ``height=width=128`` gives 32×32 = 1024 image
    tokens, as PixArt at 512 px; the text is 120 (α) or 300 (Σ) T5 positions.

    >>> pipe = pixart_structure_pipeline(num_layers=1, heads=2, head_dim=8)
    >>> pipe.transformer.config.num_attention_heads, len(pipe.transformer.transformer_blocks)
    (2, 1)
    """
    seed, num_layers, heads, head_dim = _structure(seed, num_layers, heads, head_dim)
    pipe = tiny_pixart_pipeline(seed=seed, sigma=sigma)
    with torch.random.fork_rng(devices=[]), _width_errors(heads, head_dim):
        transformer = _dit("PixArtTransformer2DModel", seed, **{
            **_PIXART, "sample_size": 64, "num_attention_heads": heads, "attention_head_dim": head_dim,
            "cross_attention_dim": heads * head_dim, "num_layers": num_layers})
    pipe.register_modules(transformer=transformer)
    return pipe


def sana_structure_pipeline(seed=0, num_layers=4, heads=20, head_dim=112):
    """A Sana pipeline whose transformer has Sana 1600M's width (random weights, CPU, fp32).

    :func:`tiny_sana_pipeline` with ``num_layers`` layers of width ``heads × head_dim`` (Sana 1600M: 20
    layers of 2240, cross-attention 20 × 112; linear self-attention 70 × 32). Its VAE halves the image
    side, so ``height=width=64`` gives 32×32 = 1024 image tokens, as Sana at 1024 px on its 32× DC-AE;
    the text is 300 Gemma positions.

    >>> pipe = sana_structure_pipeline(num_layers=1, heads=2, head_dim=8)
    >>> pipe.transformer.config.num_cross_attention_heads, len(pipe.transformer.transformer_blocks)
    (2, 1)
    """
    seed, num_layers, heads, head_dim = _structure(seed, num_layers, heads, head_dim)
    pipe = tiny_sana_pipeline(seed=seed)
    width = heads * head_dim
    linear_heads = max(1, width // 32)  # Sana's linear self-attention: heads of 32
    with torch.random.fork_rng(devices=[]):
        transformer = _dit(
            "SanaTransformer2DModel", seed, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers,
            num_attention_heads=linear_heads, attention_head_dim=width // linear_heads, num_cross_attention_heads=heads,
            cross_attention_head_dim=head_dim, cross_attention_dim=width, caption_channels=8, sample_size=32,
        )
    pipe.register_modules(transformer=transformer)
    return pipe


if __name__ == "__main__":  # python -m attnscope.testing DIR: save the tiny random-weight SD pipeline to DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m attnscope.testing DIR   (saves a tiny random-weight SD pipeline to DIR)")
    tiny_sd_pipeline().save_pretrained(sys.argv[1])
    print(f"saved a tiny random-weight StableDiffusionPipeline to {sys.argv[1]}")


def tiny_clip_model(tokenizer, seed: int = 0, image_size: int = 32, hidden_size: int = 32):
    """A random ``transformers.CLIPModel`` built from config and its ``CLIPProcessor``, around ``tokenizer`` (a CLIP
    tokenizer: ``make_clip_tokenizer`` or a pipeline's own): for testing CLIP-based objectives offline.

    Examples
    --------
    >>> import tempfile
    >>> model, processor = tiny_clip_model(make_clip_tokenizer(tempfile.mkdtemp()))
    >>> model.config.vision_config.image_size, processor.image_processor.image_mean[0]
    (32, 0.48145466)
    """
    import warnings

    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise AttnscopeError(f"tokenizer={tokenizer!r}: expected a transformers CLIP tokenizer (make_clip_tokenizer)")
    seed, image_size = _int("seed", seed), _int("image_size", image_size, minimum=8)
    hidden_size = _int("hidden_size", hidden_size, minimum=4)
    if image_size % 8 or hidden_size % 4:
        raise AttnscopeError(f"image_size={image_size}, hidden_size={hidden_size}: expected an image_size divisible "
                             "by the patch size 8 and a hidden_size divisible by the 4 attention heads")
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=hidden_size, intermediate_size=37,
                  num_attention_heads=4, num_hidden_layers=2)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state stays as it was
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden_size)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers import CLIPImageProcessorPil as ImageProcessor  # without torchvision (transformers 5)
        except ImportError:  # pragma: no cover - transformers 4
            from transformers import CLIPImageProcessor as ImageProcessor
        images = ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
        processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    return model, processor
