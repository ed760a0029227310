"""Sampling with gradients: a pipeline's own call, with autograd on, its weights frozen and its noise replayable.

diffusers pipelines run under ``torch.no_grad()``; :func:`sample_with_gradients` turns gradients back
on inside the pipeline's own call, so the trajectory (its own scheduler, guidance and step logic) is
differentiable with respect to whatever an intervention made trainable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import AttnscopeError

__all__ = ["first_denoiser_call", "frozen", "planned_steps", "replayable", "sample_with_gradients"]


def sample_with_gradients(pipe: Any, denoiser: torch.nn.Module, **call: Any) -> torch.Tensor:
    """``pipe(**call, output_type="latent")`` with autograd on from the first denoiser step: the final latents,
    attached to the graph through every step.

    A pipeline's ``__call__`` runs under ``torch.no_grad()``; a pre-forward hook on ``denoiser`` turns
    gradients back on at the first step (what comes before, prompt encoding and the initial noise, needs
    none), and the decorator puts the caller's mode back when the call returns.
    """
    handle = denoiser.register_forward_pre_hook(_enable_grad)
    try:
        out = pipe(**{**call, "output_type": "latent"})
    finally:
        handle.remove()
    latents = out.images if hasattr(out, "images") else out[0]
    if not isinstance(latents, torch.Tensor) or not latents.requires_grad:
        raise AttnscopeError(f"{type(pipe).__name__} returned {type(latents).__name__} without a graph for "
                             f"output_type='latent', expected the latents tensor attached to the steps")
    return latents


def _enable_grad(module: Any, args: Any) -> None:
    torch.set_grad_enabled(True)  # the function form: stays on until the pipeline's no_grad decorator exits


@contextlib.contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """``requires_grad=False`` on every parameter of ``modules`` (a pipeline: its ``nn.Module`` components) for the
    block, put back exactly afterwards. Gradients then flow to the intervention's tensors only."""
    params: list[torch.nn.Parameter] = []
    for module in modules:
        parts = module.components.values() if hasattr(module, "components") else [module]
        for part in parts:
            if isinstance(part, torch.nn.Module):
                params.extend(p for p in part.parameters() if p.requires_grad)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def replayable(generator: Any) -> Iterator[Any]:
    """Yield ``rewind()``, which puts ``generator`` (a torch.Generator, a list of them, or None) back to its state
    at entry; the state is also put back on exit, so the caller's own run draws the same noise."""
    gens = [generator] if isinstance(generator, torch.Generator) else list(generator or [])
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise AttnscopeError(f"generator={generator!r}: expected a torch.Generator or a list of them")
    states = [g.get_state() for g in gens]

    def rewind() -> None:
        for g, state in zip(gens, states):
            g.set_state(state)

    try:
        yield rewind
    finally:
        rewind()


class _FirstCall(Exception):
    """Stops a pipeline call at its first denoiser call (raised by the pre-hook of :func:`first_denoiser_call`)."""


def first_denoiser_call(pipe: Any, denoiser: torch.nn.Module, call: Mapping[str, Any], who: str
                        ) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of the pipeline's first denoiser call for ``call``: the call is run and stopped there, and the
    generators it drew from (the call's, or torch's global one) are put back. ``who`` names the caller in the error
    for a call that returns without calling its denoiser.

    The stop comes before any other pre-hook of ``denoiser`` (an installed hook core's), so no client sees the call.
    """
    seen: list[tuple[tuple, dict[str, Any]]] = []

    def stop(module: Any, args: tuple, kwargs: dict) -> None:
        seen.append((args, kwargs))
        raise _FirstCall

    device = torch.device(getattr(pipe, "_execution_device", None) or denoiser.device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    handle = denoiser.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:  # without a generator the pipeline draws from torch's global RNG: that draw is given back too
        with replayable(call.get("generator")), torch.random.fork_rng(devices=cuda):
            pipe(**{**call, "output_type": "latent"})
    except _FirstCall:
        pass
    finally:
        handle.remove()
    if not seen:
        raise AttnscopeError(f"{who}: {type(pipe).__name__} returned without calling its denoiser")
    return seen[0]


def planned_steps(pipe: Any, denoiser: torch.nn.Module, call: Mapping[str, Any], who: str) -> int | None:
    """The number of denoiser steps ``pipe(**call)`` runs, as the hook core counts them (``StepContext.num_steps``):
    the pipeline's ``_num_timesteps`` at its first denoiser call, else its scheduler's timesteps then; None when
    neither is there. Not ``num_inference_steps``: Heun and KDPM2 run 2N − 1 denoiser steps, PNDM N + 1, img2img's
    ``strength``, SDXL's ``denoising_end`` and an Euler ``sigmas=`` list (its last sigma is the end) fewer.

    >>> import attnscope as ats, diffusers
    >>> pipe = ats.load_pipeline("shapes")
    >>> pipe.scheduler = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    >>> planned_steps(pipe, pipe.unet, {"prompt": "a red circle", "num_inference_steps": 4}, "TGate")
    7
    """
    if hasattr(pipe, "_num_timesteps"):  # a count left by an earlier call is not this call's
        pipe._num_timesteps = None
    first_denoiser_call(pipe, denoiser, call, who)
    steps = getattr(pipe, "_num_timesteps", None)  # the hook core's reading (hooks/_core.py, _num_steps)
    if steps is None:
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        steps = len(timesteps) if timesteps is not None else None
    return steps
