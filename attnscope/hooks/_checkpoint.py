"""Activation checkpointing of the denoiser, for clients that backpropagate through a whole sampling run.

Gradients through every step of a generation (SpatialTemporal's λ optimisation) would keep every
activation of every denoiser call. Under :meth:`HookSession.checkpointing` each call keeps only its
inputs; backward recomputes the call, with the hook core's step context set back to the step it ran
at, so the clients' edits are the same tensors again. ``session.recomputing`` is True meanwhile: a
client that accumulates something (an objective, a record) computes the same tensors but must not
add them twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_denoiser"]


@contextlib.contextmanager
def checkpointed_denoiser(session: Any) -> Iterator[None]:
    """Run ``session.denoiser`` with non-reentrant activation checkpointing for the duration of the block."""
    denoiser = session.denoiser
    had_own = "forward" in denoiser.__dict__
    forward = denoiser.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        step, calls = session.step_context, [0]

        def replay(*a: Any, **k: Any) -> Any:
            previous = (session.step_context, session.recomputing)
            session.step_context, session.recomputing = step, calls[0] > 0
            calls[0] += 1
            try:
                return forward(*a, **k)
            finally:
                session.step_context, session.recomputing = previous

        return checkpoint(replay, *args, use_reentrant=False, **kwargs)

    denoiser.forward = run
    try:
        yield
    finally:
        if had_own:
            denoiser.forward = forward
        else:
            del denoiser.forward
