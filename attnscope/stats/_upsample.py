"""Bilinear upsampling of attention maps to image size, shared by the ``.attn`` accessor and the plots."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..errors import AttnscopeError

__all__ = ["image_size", "upsample_maps"]


def image_size(size: Any) -> tuple[int, int]:
    """``(height, width)`` from a ``(H, W)`` pair, a PIL image or a :class:`~attnscope.Trace`.

    A PIL image's ``.size`` is ``(width, height)``; a trace gives the size its images were generated at.

    Examples
    --------
    >>> from PIL import Image
    >>> image_size((32, 48)), image_size(Image.new("RGB", (48, 32)))
    ((32, 48), (32, 48))
    """
    manifest = getattr(size, "manifest", None)
    if isinstance(manifest, dict):  # a Trace
        run = manifest.get("run", {})
        if run.get("height") and run.get("width"):
            return int(run["height"]), int(run["width"])
        images = size.images
        if not images:
            raise AttnscopeError(f"size={size!r}: the trace records no image size and stores no image; pass (H, W)")
        size = images[0]
    if hasattr(size, "size") and hasattr(size, "mode"):  # a PIL image
        width, height = size.size
        return int(height), int(width)
    if (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)):
        return int(size[0]), int(size[1])
    raise AttnscopeError(f"size={size!r}: expected (height, width) as two positive ints, a PIL image or a Trace")


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes ``(y, x)`` of ``maps`` to ``size`` bilinearly (``align_corners=False``).

    Uses ``torch.nn.functional.interpolate``; computes and returns float32 (float64 input stays float64).

    Examples
    --------
    >>> upsample_maps(np.array([[0.0, 1.0]]), (1, 4)).tolist()
    [[0.0, 0.25, 0.75, 1.0]]
    >>> upsample_maps(np.zeros((2, 2)), (32,))
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: size=(32,): expected (height, width), two positive ints
    """
    import torch
    import torch.nn.functional as F

    if (not isinstance(size, (tuple, list, np.ndarray)) or len(size) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) and v > 0 for v in size)):
        raise AttnscopeError(f"size={size!r}: expected (height, width), two positive ints")
    size = (int(size[0]), int(size[1]))
    maps = np.asarray(maps)
    if maps.ndim < 2:
        raise AttnscopeError(f"maps of shape {maps.shape}: expected at least two axes (..., y, x)")
    dtype = np.float64 if maps.dtype == np.float64 else np.float32
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    if maps.size == 0:
        return np.zeros(lead + tuple(size), dtype=dtype)
    flat = torch.from_numpy(np.ascontiguousarray(maps, dtype=dtype).reshape(-1, 1, h, w))
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(lead + tuple(size)).numpy()
