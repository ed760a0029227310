"""``capture``: run a pipeline with a fixed seed and record its cross-attention maps into a new trace."""

from __future__ import annotations

import inspect
import math
import numbers
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AttnscopeError, AttnscopeWarning
from ..hooks import find_adapter, find_denoiser, hooks, segment_name, text_segments
from ..selection import TOKENS, SiteSpec, StepSpec, check_choice, check_seed
from ..store import Trace, jsonable, open_trace
from ._recorder import Recorder

__all__ = ["capture", "check_images_per_prompt", "check_num_steps", "check_size"]


def _call_default(pipe: Any, name: str) -> Any:
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


#: names diffusers' pipelines read from ``**kwargs`` (SD 1.x/2.x, SDXL: the deprecated step callback)
_KWARGS_READ = ("callback", "callback_steps")
#: the prompt's embeddings (and PixArt's and Sana's mask of them), which diffusers takes instead of ``prompt``
#: the pipeline arguments that are counts or sizes
_COUNTS = ("num_inference_steps", "num_images_per_prompt", "height", "width", "max_sequence_length")
_PROMPT_EMBEDDINGS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


def check_call_kwargs(pipe: Any, pipeline_kwargs: dict) -> None:
    """Refuse a keyword the pipeline's ``__call__`` does not take: diffusers' UNet pipelines swallow unknown
    keywords in ``**kwargs`` (a typo such as ``guidence_scale=9`` would run at the default and be recorded as if it
    had acted), the others raise a TypeError mid-call.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> check_call_kwargs(tiny_sd_pipeline(), {"guidance_scale": 9.0, "callback_steps": 1})
    >>> check_call_kwargs(tiny_sd_pipeline(), {"guidence_scale": 9.0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: pipeline argument 'guidence_scale': StableDiffusionPipeline does not take it (did you mean guidance_scale?); it takes: ...
    """
    import difflib

    named, takes_more = _call_parameters(type(pipe))
    for key in pipeline_kwargs:
        if key in named or (takes_more and key in _KWARGS_READ):
            continue
        close = difflib.get_close_matches(key, named, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise AttnscopeError(f"pipeline argument {key!r}: {type(pipe).__name__} does not take it{hint}; it takes: "
                             f"{', '.join(n for n in named if n not in ('prompt', 'generator'))}")


def _call_parameters(cls: type) -> tuple[list[str], bool]:
    """The named parameters of ``cls.__call__`` and, while a ``__call__`` passes ``**kwargs`` on to its base's (the
    shapes pipeline's to StableDiffusionPipeline's), of the bases'; and whether the last one still takes ``**kwargs``."""
    named: list[str] = []
    for base in cls.__mro__:
        if "__call__" not in vars(base) or base is object:
            continue
        params = inspect.signature(vars(base)["__call__"]).parameters.values()
        named += [p.name for p in params if p.name != "self" and p.name not in named
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return named, False
    return named, True


def _t5_prompt_tokens(tokenizer: Any, prompt: str, pipe: Any, setting: Any) -> tuple[int, int, str] | None:
    """A T5 segment's count of ``prompt`` (with ``</s>``); other tokenizers: None (their family adapter counts)."""
    if segment_name(tokenizer) != "t5":
        return None
    return len(tokenizer(prompt).input_ids), 0, "T5 tokens (with </s>)"


def _check_prompt_lengths(pipe: Any, prompts: list[str], pipeline_kwargs: dict) -> None:
    """A prompt the pipeline would cut at ``max_sequence_length`` tokens: refuse it, naming the count.

    The count and the room are the family adapter's ``prompt_tokens`` where it has one (a chat template or an
    instruction around the prompt: Sana, Flux.2), else the T5 tokens of a T5 segment (SD3, Flux.1, PixArt)."""
    def setting(name: str) -> Any:  # a pipeline argument as this call will see it
        return pipeline_kwargs.get(name, _call_default(pipe, name))

    limit = setting("max_sequence_length")
    if not isinstance(limit, int):
        return
    adapter, _ = find_adapter(pipe)
    count_tokens = getattr(adapter, "prompt_tokens", _t5_prompt_tokens)
    for name, tokenizer in text_segments(pipe):
        if tokenizer is None:
            continue
        key, texts = _encoder_texts(name, prompts, pipeline_kwargs)
        for prompt in texts:
            found = count_tokens(tokenizer, prompt, pipe, setting)
            if found is not None and found[0] > limit - found[1]:
                count, reserved, what = found
                raise AttnscopeError(f"{key} {prompt!r}: {count} {what}, more than the {limit - reserved} that "
                                     f"max_sequence_length={limit} leaves; the pipeline would cut it. Shorten the "
                                     f"prompt or raise max_sequence_length")


def _encoder_texts(encoder: str | None, prompts: list[str], pipeline_kwargs: dict) -> tuple[str, list[str]]:
    """The texts ``encoder`` reads and the argument that gave them: diffusers gives ``text_encoder_N`` the
    ``prompt_N`` argument where one is passed (Flux's T5 reads ``prompt_2``, SD3's ``prompt_3``), else ``prompt``.

    >>> _encoder_texts("text_encoder_2", ["a", "b"], {"prompt_2": "c"}), _encoder_texts("text_encoder", ["a"], {})
    (('prompt_2', ['c', 'c']), ('prompt', ['a']))
    """
    key = "prompt" + (encoder or "text_encoder")[len("text_encoder"):]
    value = pipeline_kwargs.get(key) if key != "prompt" else None
    if value is None:
        return "prompt", prompts
    if isinstance(value, str):
        return key, [value] * len(prompts)
    if not isinstance(value, (list, tuple)) or len(value) != len(prompts) or not all(isinstance(v, str) for v in value):
        raise AttnscopeError(f"{key}={value!r}: expected a string or one string per prompt ({len(prompts)})")
    return key, list(value)


def _check_joined_texts(pipe: Any, prompts: list[str], pipeline_kwargs: dict, tokens: str) -> None:
    """``prompt_N`` other than the prompt for a text encoder whose features are joined to the labelled segment's at
    each position (SDXL's and SD3's CLIP-G beside CLIP-L): the keys then mix two texts, labelled by ``prompt``'s
    tokens. Kept with a warning over the whole axis (``tokens="all"``); refused when only the prompt's positions
    would be stored, as ``prompt_N``'s words past ``prompt``'s end would be lost."""
    segments = text_segments(pipe)
    labelled = {name for name, _ in segments if name}
    if tokens == "auto":  # as the Recorder resolves it: the prompt's positions where a T5 segment pads the axis
        tokens = "prompt" if any(segment_name(t) != "clip" for _, t in segments if t is not None) else "all"
    for n in (2, 3):
        encoder = f"text_encoder_{n}"
        if encoder in labelled or getattr(pipe, encoder, None) is None:
            continue  # its own labelled segment (Flux's and SD3's T5), or no such encoder
        key, texts = _encoder_texts(encoder, prompts, pipeline_kwargs)
        if key == "prompt" or texts == prompts:
            continue
        if tokens != "all":
            raise AttnscopeError(f"{key}={pipeline_kwargs[key]!r} differs from the prompt: {encoder}'s features of "
                                 f"it are joined to those of the prompt at each text position, so the keys mix the "
                                 f"two texts and tokens={tokens!r} would keep only the prompt's positions, dropping "
                                 f"{key}'s words past its end. Pass tokens='all' (the labels are the prompt's tokens) "
                                 f"or leave {key} out")
        warnings.warn(f"{key} differs from the prompt: each text position joins the prompt's token and {key}'s; the "
                      f"token labels and words are the prompt's", AttnscopeWarning, stacklevel=3)


def _check_clip_lengths(pipe: Any, prompts: list[str]) -> None:
    """On a pipeline whose text is CLIP's alone (SD 1.x/2.x, SDXL, the shapes model): a prompt longer than the
    tokenizer keeps (``model_max_length``, 77 for CLIP) is refused, naming the count and what would be cut. The
    prompt is counted as the pipeline tokenizes it: a textual-inversion token of n vectors is n tokens.

    Pipelines with a T5 segment beside CLIP (SD3, Flux) give the T5 encoder the whole prompt; there
    :func:`_check_prompt_lengths` checks the T5 count against ``max_sequence_length``.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> _check_clip_lengths(tiny_sd_pipeline(), ["a red circle " * 30])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: prompt 'a red circle ...': 92 CLIP tokens (with the start and end tokens), more than the 77 the tokenizer keeps; the pipeline would cut the last 15. Shorten the prompt
    """
    tokenizers = [tokenizer for _, tokenizer in text_segments(pipe) if tokenizer is not None]
    if not tokenizers or any(segment_name(t) != "clip" for t in tokenizers):
        return
    convert = getattr(pipe, "maybe_convert_prompt", None)  # a textual inversion of n vectors: its token n times
    for tokenizer in tokenizers:
        keep = getattr(tokenizer, "model_max_length", None)
        if not isinstance(keep, int):
            continue
        for prompt in prompts:
            text = convert(prompt, tokenizer) if callable(convert) else prompt
            count = len(tokenizer(text, truncation=False, verbose=False).input_ids)
            if count > keep:
                raise AttnscopeError(f"prompt {prompt!r}: {count} CLIP tokens (with the start and end tokens), more "
                                     f"than the {keep} the tokenizer keeps; the pipeline would cut the last "
                                     f"{count - keep}. Shorten the prompt")


def _check_text_model(pipe: Any, pipeline_kwargs: dict) -> None:
    """``clip_skip``, and ``cross_attention_kwargs={"scale": …}`` without peft, on a pipeline whose ``encode_prompt``
    then reads ``text_encoder.text_model`` (SD 1.x/2.x, the shapes model), which transformers 5's ``CLIPTextModel`` no
    longer has: diffusers would fail inside the call with an AttributeError. One error naming the argument instead.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> _check_text_model(tiny_sd_pipeline(), {"clip_skip": 1})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: clip_skip=1: StableDiffusionPipeline's encode_prompt reads text_encoder.text_model, ...
    """
    scale = pipeline_kwargs.get("cross_attention_kwargs")
    clip_skip, scaled = pipeline_kwargs.get("clip_skip"), isinstance(scale, dict) and "scale" in scale
    encoder, method = getattr(pipe, "text_encoder", None), getattr(type(pipe), "encode_prompt", None)
    if not (clip_skip is not None or scaled) or encoder is None or hasattr(encoder, "text_model") or method is None:
        return  # the usual call: encode_prompt's source is not read
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return
    given = []
    if clip_skip is not None and "text_encoder.text_model" in source:
        given.append(("clip_skip", clip_skip, "leave clip_skip out"))
    peft = getattr(sys.modules.get(method.__module__), "USE_PEFT_BACKEND", True)
    if scaled and not peft and "adjust_lora_scale_text_encoder" in source:
        given.append(("cross_attention_kwargs", scale, "install peft (pip install peft), which diffusers' LoRA needs"))
    if given:
        name, value, fix = given[0]
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
        raise AttnscopeError(f"{name}={value!r}: {type(pipe).__name__}'s encode_prompt reads text_encoder.text_model, "
                             f"which this {type(encoder).__name__} (transformers {version}) does not have, so the "
                             f"pipeline would fail with an AttributeError; {fix}")


def capture(pipe: Any, prompt: str | list[str], *, seed: int | list[int], store: str | Path, sites: SiteSpec = None,
            steps: StepSpec = None, heads: str = "mean", tokens: str = "auto", branch: str = "cond",
            overwrite: bool = False, exact: bool = False, output_change: bool = False, keep_bits: int | None = None,
            **pipeline_kwargs: Any) -> Trace:
    """Run ``pipe`` on ``prompt`` with a fixed seed and record its cross-attention maps into ``store``.

    Parameters
    ----------
    pipe : diffusers pipeline
        With a supported denoiser: UNet2DConditionModel (SD 1.x, 2.x, SDXL), SD3Transformer2DModel (SD3,
        SD3.5), FluxTransformer2DModel (FLUX.1), Flux2Transformer2DModel (FLUX.2), PixArtTransformer2DModel
        (PixArt-α/Σ) or SanaTransformer2DModel (Sana); see docs/model-families.md.
    prompt : str or list of str
        One prompt, or several (each gets ``num_images_per_prompt`` samples).
    seed : int or list of int
        One seed for the whole batch (a CPU ``torch.Generator``) or one per image.
    store : path
        Zarr store to create; see :class:`Recorder` for ``sites``, ``steps``, ``heads``, ``tokens``,
        ``branch``, ``overwrite``, ``keep_bits`` (lossy maps: that many mantissa bits kept, for smaller
        stores) and ``output_change`` (also keep the per-step norms of each site's
        output and of its change, for ``ats.stats.convergence(tr, of="outputs")``).
    exact : bool
        Make the image bit-identical to a run without capture (see :func:`attnscope.hooks`);
        by default it equals it up to float rounding and capture is faster.
    **pipeline_kwargs
        Passed to the pipeline (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``,
        ``negative_prompt``, ``num_images_per_prompt``, …) and recorded in the manifest.

    Returns
    -------
    Trace
        The trace, reopened lazily from the store.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> tr = ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
    ...                  num_inference_steps=3, height=32, width=32)
    >>> tr.attention(tr.sites[0]).dims
    ('step', 'sample', 'head', 'y', 'x', 'token')
    """
    find_denoiser(pipe)
    prompts = _prompts(prompt)
    if "generator" in pipeline_kwargs or "prompt" in pipeline_kwargs:
        raise AttnscopeError("pipeline_kwargs: pass `prompt` and `seed` to capture() instead of `prompt`/`generator`")
    for name in _PROMPT_EMBEDDINGS:
        if pipeline_kwargs.get(name) is not None:
            raise AttnscopeError(
                f"{name}: capture runs the pipeline on `prompt` (diffusers takes a prompt or its embeddings, not both, "
                f"and encodes the prompt over embeddings given beside it) and labels the maps with the prompt's tokens. "
                f"To record a run on embeddings, call the pipeline inside `with ats.hooks(pipe, rec)` with "
                f"rec = ats.Recorder(store) (its maps have no token labels)")
    check_call_kwargs(pipe, pipeline_kwargs)
    pipeline_kwargs = _plain_counts(pipeline_kwargs)
    if pipeline_kwargs.get("return_dict", True) is not True:
        raise AttnscopeError(f"return_dict={pipeline_kwargs['return_dict']!r}: capture reads the images from the "
                             f"pipeline's output object; leave return_dict out")
    pipeline_kwargs = _negative_prompts(prompts, pipeline_kwargs)
    _check_negative_is_read(pipe, pipeline_kwargs)
    check_num_steps(pipeline_kwargs.get("num_inference_steps"))
    _check_strength(pipe, pipeline_kwargs)
    for name in ("height", "width"):
        check_size(name, pipeline_kwargs.get(name))
    for name in ("guidance_scale", "true_cfg_scale"):
        check_scale(name, pipeline_kwargs.get(name))
    _check_prompt_lengths(pipe, prompts, pipeline_kwargs)
    _check_clip_lengths(pipe, prompts)
    _check_text_model(pipe, pipeline_kwargs)
    check_choice("tokens", tokens, TOKENS)  # before the joined-text check reads it (an array: one error, not numpy's)
    _check_joined_texts(pipe, prompts, pipeline_kwargs, tokens)
    output_type = pipeline_kwargs.get("output_type", "pil")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise AttnscopeError(f"output_type={output_type!r}: expected 'pil', 'np', 'pt' or 'latent'")
    per_prompt = check_images_per_prompt(pipeline_kwargs.get("num_images_per_prompt"))
    seed = _seeds(seed, len(prompts) * per_prompt)
    generator = _generator(seed)
    recorded, unrecorded = {}, []
    for key, value in pipeline_kwargs.items():
        try:
            recorded[key] = jsonable(_schedule_list(key, value))
        except TypeError:
            unrecorded.append(key)
    run_info = {
        "prompts": prompts, "negative_prompt": pipeline_kwargs.get("negative_prompt"),
        "seed": seed, "generator_device": "cpu",
        "num_images_per_prompt": per_prompt,
        "num_inference_steps": _planned_steps(pipe, pipeline_kwargs),
        "guidance_scale": pipeline_kwargs.get("guidance_scale", _call_default(pipe, "guidance_scale")),
        "pipeline_kwargs": recorded, "unrecorded_kwargs": unrecorded, "reproducible": not unrecorded,
        "exact": exact,
    }
    recorder = Recorder(store, sites=sites, steps=steps, heads=heads, tokens=tokens, branch=branch,
                        overwrite=overwrite, output_change=output_change, run_info=run_info,
                        keep_bits=keep_bits)
    cropping = pipeline_kwargs.get("padding_mask_crop") is not None
    with hooks(pipe, recorder, exact=exact), (_recording_crop(pipe, recorder.run_info) if cropping else nullcontext()):
        out = pipe(prompt=prompts if len(prompts) > 1 else prompts[0], generator=generator, **pipeline_kwargs)
        if output_type != "latent":
            recorder.add_images(out.images)
    if recorder.writer is None:  # the denoiser never ran: there is no store to open
        raise AttnscopeError(f"store={str(store)!r}: nothing was written, the pipeline ran no denoising step "
                             f"(num_inference_steps={run_info['num_inference_steps']!r})")
    return open_trace(recorder.path)


@contextmanager
def _recording_crop(pipe: Any, run_info: dict) -> Iterator[None]:
    """While an inpainting pipeline runs with ``padding_mask_crop``: the box it crops, generates and pastes back,
    as ``run_info["crop_region"] = [x1, y1, x2, y2]`` (plain ints, pixels of the mask and image, x2 and y2
    exclusive), read from the pipeline's own call of ``mask_processor.get_crop_region`` (diffusers' inpainting
    pipelines compute the box there). Nothing is recorded for a pipeline without that processor."""
    processor = getattr(pipe, "mask_processor", None)
    find = getattr(processor, "get_crop_region", None)
    if not callable(find):
        yield
        return
    own = processor.__dict__.get("get_crop_region")  # an instance attribute to restore (normally the class's)

    def recording(*args: Any, **kwargs: Any) -> Any:
        box = find(*args, **kwargs)
        run_info["crop_region"] = [int(v) for v in box]
        return box

    processor.get_crop_region = recording
    try:
        yield
    finally:
        if own is None:
            del processor.get_crop_region
        else:
            processor.get_crop_region = own


def _schedule_list(name: str, value: Any) -> Any:
    """A 1-d torch tensor given as ``sigmas=`` or ``timesteps=`` as the list of its values (the pipeline gets the tensor
    as given; diffusers' schedulers read a tensor, a numpy array and a list of the same values alike), so the manifest
    records it as it does a numpy array; anything else as it is.

    >>> _schedule_list("sigmas", torch.tensor([14.5, 1.0, 0.0])), _schedule_list("latents", 1)
    ([14.5, 1.0, 0.0], 1)
    """
    if name in ("sigmas", "timesteps") and isinstance(value, torch.Tensor) and value.ndim == 1 and not value.is_complex():
        return value.detach().cpu().tolist()
    return value


def _planned_steps(pipe: Any, pipeline_kwargs: dict) -> Any:
    """The run's number of steps as the call sets it: ``num_inference_steps``, else the length of ``timesteps=`` or
    ``sigmas=`` (diffusers then ignores ``num_inference_steps`` and runs exactly those), else the pipeline's default.

    >>> _planned_steps(None, {"timesteps": [999, 500, 1]}), _planned_steps(None, {"num_inference_steps": 4})
    (3, 4)
    """
    if pipeline_kwargs.get("num_inference_steps") is not None:
        return pipeline_kwargs["num_inference_steps"]
    for name in ("timesteps", "sigmas"):
        given = pipeline_kwargs.get(name)
        if given is not None:
            return len(given)
    return _call_default(pipe, "num_inference_steps")


def _check_strength(pipe: Any, pipeline_kwargs: dict) -> None:
    """An img2img or inpainting ``strength`` that leaves no step (``strength=0.1`` of 4 steps on SD): diffusers then
    fails inside the pipeline (a reshape of 0 elements). ``denoising_start`` (SDXL's refiner) sets the steps instead.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> _check_strength(tiny_sd_pipeline(), {"strength": 0.1, "num_inference_steps": 4})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: strength=0.1 with num_inference_steps=4: StableDiffusionPipeline would run 0 of the 4 steps, so nothing would be denoised or recorded; raise strength to 0.25 or num_inference_steps to 10

    A strength not given is the pipeline's default (``StableDiffusionImg2ImgPipeline``: 0.8, which leaves no step of
    ``num_inference_steps=1``).
    """
    strength = pipeline_kwargs.get("strength", _call_default(pipe, "strength"))  # img2img's default: 0.8 on SD
    if (pipeline_kwargs.get("denoising_start") is not None or isinstance(strength, (bool, np.bool_))
            or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1):  # out of [0, 1]: the pipeline's error
        return
    steps = _planned_steps(pipe, pipeline_kwargs)
    family = find_adapter(pipe)[0].FAMILY
    if not isinstance(steps, int) or _strength_steps(family, steps, strength) >= 1:
        return
    least = next(k / 1000 for k in range(1, 1001) if _strength_steps(family, steps, k / 1000) >= 1)
    more = next((n for n in range(steps, 100 * steps + 1) if _strength_steps(family, n, strength) >= 1), None)
    default = "" if "strength" in pipeline_kwargs else " (the pipeline's default)"
    raise AttnscopeError(f"strength={strength!r}{default} with num_inference_steps={steps}: {type(pipe).__name__} would run 0 "
                         f"of the {steps} steps, so nothing would be denoised or recorded; raise strength to {least:g}"
                         + (f" or num_inference_steps to {more}" if more else ""))


def _strength_steps(family: str, steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img or inpainting pipeline runs at ``strength``: diffusers' UNet pipelines (SD,
    SDXL) the last ``int(steps * strength)``, its transformer pipelines (SD3, Flux) all but the first
    ``int(steps - steps * strength)``.

    >>> _strength_steps("unet", 4, 0.1), _strength_steps("flux", 4, 0.1), _strength_steps("unet", 4, 0.5)
    (0, 1, 2)
    """
    if family == "unet":
        return min(int(steps * strength), steps)
    return steps - int(max(steps - min(steps * strength, steps), 0))


def _negative_prompts(prompts: list[str], pipeline_kwargs: dict) -> dict:
    """One negative prompt for several prompts serves each of them (diffusers would raise a TypeError); a list
    must have one per prompt.

    >>> _negative_prompts(["a", "b"], {"negative_prompt": "blurry"})
    {'negative_prompt': ['blurry', 'blurry']}
    >>> _negative_prompts(["a", "b"], {"negative_prompt": ["x"]})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: negative_prompt=['x']: 1 negative prompts for 2 prompts; expected one string or one per prompt
    """
    out = dict(pipeline_kwargs)
    for key in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
        value = out.get(key)
        if isinstance(value, str) and len(prompts) > 1:
            out[key] = [value] * len(prompts)
        elif isinstance(value, (list, tuple)) and len(value) != len(prompts):
            raise AttnscopeError(f"{key}={list(value)!r}: {len(value)} negative prompts for {len(prompts)} prompts; "
                                 f"expected one string or one per prompt")
        elif isinstance(value, (list, tuple)) and len(prompts) == 1:
            out[key] = value[0]  # the one prompt goes to the pipeline as a string: so does its negative
    return out


def _check_negative_is_read(pipe: Any, pipeline_kwargs: dict) -> None:
    """A negative prompt the pipeline would drop without a word — guidance off: ``guidance_scale <= 1``, or on a
    pipeline with true CFG (FLUX.1) ``true_cfg_scale <= 1`` — is refused: the trace would record it as the run's.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> _check_negative_is_read(tiny_sd_pipeline(), {"negative_prompt": "blurry", "guidance_scale": 1.0})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: negative_prompt='blurry': StableDiffusionPipeline reads a negative prompt only with guidance_scale > 1 (classifier-free guidance), got guidance_scale=1.0, so it would not act and the trace would record it as the run's; raise guidance_scale or leave negative_prompt out
    """
    negative = pipeline_kwargs.get("negative_prompt")
    texts = [negative] if isinstance(negative, str) else negative if isinstance(negative, (list, tuple)) else []
    if not any(isinstance(text, str) and text.strip() for text in texts):
        return
    name = "true_cfg_scale" if "true_cfg_scale" in _call_parameters(type(pipe))[0] else "guidance_scale"
    scale = pipeline_kwargs.get(name, _call_default(pipe, name))
    if isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool) and scale <= 1:
        raise AttnscopeError(f"negative_prompt={negative!r}: {type(pipe).__name__} reads a negative prompt only with "
                             f"{name} > 1 (classifier-free guidance), got {name}={scale}, so it would not act and the "
                             f"trace would record it as the run's; raise {name} or leave negative_prompt out")


def _prompts(prompt: Any) -> list[str]:
    """``prompt`` as a list of non-empty strings, else AttnscopeError naming the one at fault.

    >>> _prompts("a red circle"), _prompts(["a", "b"])
    (['a red circle'], ['a', 'b'])
    >>> _prompts(["a red circle", " "])
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: prompt[1]=' ': the prompt is empty; expected some text (an empty prompt has no words to measure attention on)
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise AttnscopeError(f"prompt={prompt!r}: expected a string or a non-empty list of strings")
    for i, text in enumerate(prompts):
        if not text.strip():
            name = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
            raise AttnscopeError(f"{name}={text!r}: the prompt is empty; expected some text (an empty prompt has no "
                                 f"words to measure attention on)")
    return prompts


def _plain_counts(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's counts and sizes given as numpy's ints (an ``np.arange`` item) as Python's: the checks take them,
    the manifest records them as the ints they are. Anything else as it is.

    >>> _plain_counts({"num_inference_steps": np.int64(4), "height": True, "guidance_scale": np.float32(5)})
    {'num_inference_steps': 4, 'height': True, 'guidance_scale': np.float32(5.0)}
    """
    return {k: int(v) if k in _COUNTS and isinstance(v, np.integer) else v for k, v in kwargs.items()}


def check_num_steps(value: Any) -> None:
    """A ``num_inference_steps`` given to a pipeline must be an int >= 1 (0 divides by zero in the scheduler, a
    negative count runs nothing).

    >>> check_num_steps(20), check_num_steps(None)
    (None, None)
    >>> check_num_steps(0)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: num_inference_steps=0: expected an int >= 1 (the number of denoising steps)
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise AttnscopeError(f"num_inference_steps={value!r}: expected an int >= 1 (the number of denoising steps)")


def check_images_per_prompt(value: Any) -> int:
    """``num_images_per_prompt`` as the pipeline takes it (None: 1), else AttnscopeError unless an int >= 1.

    >>> check_images_per_prompt(None), check_images_per_prompt(2)
    (1, 2)
    >>> check_images_per_prompt(0)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: num_images_per_prompt=0: expected an int >= 1
    """
    value = 1 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttnscopeError(f"num_images_per_prompt={value!r}: expected an int >= 1")
    return value


def check_size(name: str, value: Any) -> None:
    """An image ``height``/``width`` must be an int >= 1 or None (the pipeline's default): diffusers takes
    ``height or default``, so 0 would run at the default size and be recorded as 0. A size its VAE cannot take (not a
    multiple of what the pipeline needs) is left to the pipeline, which refuses it (SD) or rounds it (Flux) before
    the first step, so before anything is written.

    >>> check_size("height", 512), check_size("width", None)
    (None, None)
    >>> check_size("height", 0)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: height=0: expected a positive int (the image's height in pixels), or leave it out for the pipeline's default
    """
    if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
                              or value < 1):
        raise AttnscopeError(f"{name}={value!r}: expected a positive int (the image's {name} in pixels), or leave it "
                             f"out for the pipeline's default")


def check_scale(name: str, value: Any) -> None:
    """A guidance scale (``guidance_scale``, ``true_cfg_scale``) must be a finite number or None: ``nan > 1`` is false, so NaN would turn guidance off without a
    word and be recorded as the run's scale.

    >>> check_scale("guidance_scale", 7.5), check_scale("guidance_scale", None)
    (None, None)
    >>> check_scale("guidance_scale", float("nan"))
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: guidance_scale=nan: expected a finite number (1 or less: no classifier-free guidance), or leave it out for the pipeline's default
    """
    if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
                              or not math.isfinite(value)):
        raise AttnscopeError(f"{name}={value!r}: expected a finite number (1 or less: no classifier-free guidance), or "
                             f"leave it out for the pipeline's default")


def _seeds(seed: Any, batch: int) -> int | list[int]:
    """``seed`` as one plain int, or a list of ``batch`` of them (numpy's ints and arrays too); else AttnscopeError.

    >>> _seeds(np.int64(3), 2), _seeds(np.arange(2), 2)
    (3, [0, 1])
    """
    many = list(seed) if isinstance(seed, (list, tuple)) or (isinstance(seed, np.ndarray) and seed.ndim == 1) else None
    if many is not None and len(many) == batch:
        return [check_seed(f"seed[{i}]", s) for i, s in enumerate(many)]
    if many is not None or isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise AttnscopeError(f"seed={seed!r}: expected an int or a list of {batch} ints (one per image)")
    return check_seed("seed", seed)


def _generator(seed: int | list[int]) -> Any:
    """A CPU ``torch.Generator`` for one seed, or one per image for a list of seeds."""
    if isinstance(seed, list):
        return [torch.Generator("cpu").manual_seed(s) for s in seed]
    return torch.Generator("cpu").manual_seed(seed)
