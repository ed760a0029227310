"""Running one half of a classifier-free-guidance batch: cut the denoiser's inputs, restore its output.

Diffusers pipelines stack ``[uncond; cond]`` rows and, after the denoiser, combine the halves as
``uncond + s · (cond − uncond)``. To run one branch only (TGATE after its gate) the hook core cuts
every batched input of the denoiser to that branch's rows and stacks the prediction twice, so the
combine returns it unchanged (``x + s · 0 = x``) whatever the pipeline family.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["select_rows", "duplicate_prediction"]


def select_rows(value: Any, batch: int, rows: slice | list[int]) -> Any:
    """``value`` with every tensor whose first axis is the batch cut to ``rows`` (nested dicts/lists/tuples too).

    >>> out = select_rows({"sample": torch.zeros(4, 3), "ids": [torch.ones(4)], "t": torch.tensor(5)}, 4, slice(0, 2))
    >>> out["sample"].shape, out["ids"][0].shape, out["t"].shape
    (torch.Size([2, 3]), torch.Size([2]), torch.Size([]))
    """
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: select_rows(v, batch, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(v, batch, rows) for v in value)
    return value


def duplicate_prediction(output: Any) -> Any:
    """The denoiser's output with its prediction stacked twice along the batch (both CFG halves).

    >>> duplicate_prediction((torch.tensor([[1.0]]),))[0].tolist()
    [[1.0], [1.0]]
    """
    if isinstance(output, torch.Tensor):
        return torch.cat([output, output])
    if isinstance(output, tuple):
        return (duplicate_prediction(output[0]), *output[1:])
    key = next(iter(output.keys()))  # a diffusers BaseOutput: the prediction is its first field
    output[key] = duplicate_prediction(output[key])
    return output
