"""The Gaussian bumps Attention Regulation builds its logit edits from."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AttnscopeError
from ._scope import is_integer

__all__ = ["basis_centres", "gaussian_basis"]


def basis_centres(side: int, name: str = "side") -> tuple[int, list[int]]:
    """σ and the bump centres along one axis: ``σ = max(1, ⌊side/16⌋)``, centres ``2σ, 4σ, … < side``.

    The official code uses ``σ = ⌊w/16⌋``, which is 0 (and crashes) below 16 pixels; σ ≥ 1 here. An
    axis too short for any centre gets one in its middle.

    >>> basis_centres(64), basis_centres(16), basis_centres(8), basis_centres(4), basis_centres(2)
    ((4, [8, 16, 24, 32, 40, 48, 56]), (1, [2, 4, 6, 8, 10, 12, 14]), (1, [2, 4, 6]), (1, [2]), (1, [1]))
    """
    if not is_integer(side) or side < 1:
        raise AttnscopeError(f"{name}={side!r}: expected a map side in pixels, an int >= 1")
    sigma = max(1, side // 16)
    centres = list(range(2 * sigma, side, 2 * sigma))
    return sigma, centres or [side // 2]


def gaussian_basis(height: int, width: int, *, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``G_k(y, x) = exp(−(y − y_k)² / 2σ_y² − (x − x_k)² / 2σ_x²)`` on the grid of centres, shape (K, h, w).

    Square maps of 16, 32 or 64 pixels get the official 7 × 7 = 49 bumps; non-square maps do the
    same per axis.

    >>> g = gaussian_basis(16, 16)
    >>> tuple(g.shape), float(g[0, 2, 2]), round(float(g[0, 2, 3]), 4)   # peak 1 at (2, 2); exp(-1/2) next to it
    ((49, 16, 16), 1.0, 0.6065)
    """
    (sy, cy), (sx, cx) = basis_centres(height, "height"), basis_centres(width, "width")  # else one error naming it
    y = torch.arange(height, device=device, dtype=dtype)
    x = torch.arange(width, device=device, dtype=dtype)
    gy = torch.exp(-((y[None, :] - torch.tensor(cy, device=device, dtype=dtype)[:, None]) ** 2) / (2 * sy**2))
    gx = torch.exp(-((x[None, :] - torch.tensor(cx, device=device, dtype=dtype)[:, None]) ** 2) / (2 * sx**2))
    return (gy[:, None, :, None] * gx[None, :, None, :]).reshape(len(cy) * len(cx), height, width)
