"""Sampling with gradients: a pipeline's own call, with autograd on, its weights frozen and its noise replayable.

diffusers pipelines run under ``torch.no_grad()``; :func:`sample_with_gradients` turns gradients back
on inside the pipeline's own call, so the trajectory (its own scheduler, guidance and step logic) is
differentiable with respect to whatever an intervention made trainable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import AttnscopeError

__all__ = ["frozen", "replayable", "sample_with_gradients"]


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
