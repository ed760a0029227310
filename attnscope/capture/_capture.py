"""``capture``: run a pipeline with a fixed seed and record its cross-attention maps into a new trace."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from ..errors import AttnscopeError
from ..hooks import find_denoiser, hooks, segment_name, text_segments
from ..selection import SiteSpec, StepSpec
from ..store import Trace, jsonable, open_trace
from ._recorder import Recorder

__all__ = ["capture"]


def _call_default(pipe: Any, name: str) -> Any:
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _check_prompt_lengths(pipe: Any, prompts: list[str], pipeline_kwargs: dict) -> None:
    """A prompt longer than ``max_sequence_length`` T5 (Gemma; Qwen or Mistral with its chat template) tokens would be
    cut silently: refuse it, naming the count. Sana's Gemma prompt has room for ``max_sequence_length − 2`` tokens after its instruction (the
    pipeline keeps ``<bos>`` and the last ``max_sequence_length − 1`` positions), ``− 1`` without one."""
    limit = pipeline_kwargs.get("max_sequence_length", _call_default(pipe, "max_sequence_length"))
    if not isinstance(limit, int):
        return
    for _, tokenizer in text_segments(pipe):
        kind = segment_name(tokenizer) if tokenizer is not None else None
        if kind not in ("t5", "gemma", "qwen2", "mistral"):
            continue
        instruction = pipeline_kwargs.get("complex_human_instruction", _call_default(pipe, "complex_human_instruction"))
        room = limit - (2 if instruction else 1) if kind == "gemma" else limit
        for prompt in prompts:
            if kind == "qwen2":  # Flux.2 klein: the prompt inside Qwen3's chat template
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=False)
                count = len(tokenizer(text).input_ids)
            elif kind == "mistral":  # Flux.2 dev: the system message and the prompt in Mistral 3's chat template
                from diffusers.pipelines.flux2.pipeline_flux2 import format_input

                count = len(tokenizer.apply_chat_template(format_input([prompt], pipe.system_message), tokenize=True)[0])
            else:
                count = len(tokenizer(prompt, add_special_tokens=kind == "t5").input_ids)
            if count > room:
                what = {"t5": "T5 tokens (with </s>)", "gemma": "Gemma tokens",
                        "qwen2": "Qwen tokens with the chat template",
                        "mistral": "Mistral tokens with the system message and chat template"}[kind]
                raise AttnscopeError(f"prompt {prompt!r}: {count} {what}, more than the {room} that "
                                     f"max_sequence_length={limit} leaves; the pipeline would cut it. Shorten the "
                                     f"prompt or raise max_sequence_length")


def capture(pipe: Any, prompt: str | list[str], *, seed: int | list[int], store: str | Path, sites: SiteSpec = None,
            steps: StepSpec = None, heads: str = "mean", tokens: str = "auto", branch: str = "cond",
            overwrite: bool = False, exact: bool = False, output_change: bool = False,
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
        ``branch``, ``overwrite`` and ``output_change`` (also keep the per-step norms of each site's
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
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise AttnscopeError(f"prompt={prompt!r}: expected a string or a non-empty list of strings")
    if "generator" in pipeline_kwargs or "prompt" in pipeline_kwargs:
        raise AttnscopeError("pipeline_kwargs: pass `prompt` and `seed` to capture() instead of `prompt`/`generator`")
    _check_prompt_lengths(pipe, prompts, pipeline_kwargs)
    output_type = pipeline_kwargs.get("output_type", "pil")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise AttnscopeError(f"output_type={output_type!r}: expected 'pil', 'np', 'pt' or 'latent'")
    per_prompt = pipeline_kwargs.get("num_images_per_prompt") or 1
    batch = len(prompts) * per_prompt
    if isinstance(seed, bool) or not (isinstance(seed, int) or (isinstance(seed, (list, tuple)) and len(seed) == batch
                                                                and all(isinstance(s, int) for s in seed))):
        raise AttnscopeError(f"seed={seed!r}: expected an int or a list of {batch} ints (one per image)")
    generator: Any = (torch.Generator("cpu").manual_seed(seed) if isinstance(seed, int)
                      else [torch.Generator("cpu").manual_seed(s) for s in seed])
    recorded, unrecorded = {}, []
    for key, value in pipeline_kwargs.items():
        try:
            recorded[key] = jsonable(value)
        except TypeError:
            unrecorded.append(key)
    run_info = {
        "prompts": prompts, "negative_prompt": pipeline_kwargs.get("negative_prompt"),
        "seed": seed if isinstance(seed, int) else list(seed), "generator_device": "cpu",
        "num_images_per_prompt": per_prompt,
        "num_inference_steps": pipeline_kwargs.get("num_inference_steps", _call_default(pipe, "num_inference_steps")),
        "guidance_scale": pipeline_kwargs.get("guidance_scale", _call_default(pipe, "guidance_scale")),
        "pipeline_kwargs": recorded, "unrecorded_kwargs": unrecorded, "reproducible": not unrecorded,
        "exact": exact,
    }
    recorder = Recorder(store, sites=sites, steps=steps, heads=heads, tokens=tokens, branch=branch,
                        overwrite=overwrite, output_change=output_change, run_info=run_info)
    with hooks(pipe, recorder, exact=exact):
        out = pipe(prompt=prompts if len(prompts) > 1 else prompts[0], generator=generator, **pipeline_kwargs)
        if output_type != "latent":
            recorder.add_images(out.images)
    return open_trace(recorder.path)
