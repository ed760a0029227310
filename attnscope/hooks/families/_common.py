"""What the family adapters share: reading a denoiser call's timestep, finding a pipeline's transformer."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["timestep_value", "transformer_of"]


def timestep_value(t: Any) -> float:
    """The timestep of a denoiser call as a float (a tensor's first element: every row has the same).

    >>> timestep_value(torch.tensor([981, 981])), timestep_value(0.5)
    (981.0, 0.5)
    """
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def transformer_of(pipe: Any, class_name: str) -> torch.nn.Module | None:
    """The pipeline's ``transformer`` when it is a diffusers ``class_name``, else None.

    >>> from attnscope.testing import tiny_sd_pipeline
    >>> transformer_of(tiny_sd_pipeline(), "FluxTransformer2DModel") is None
    True
    """
    import diffusers

    model = getattr(pipe, "transformer", None)
    return model if isinstance(model, getattr(diffusers, class_name)) else None
