"""Figures without pyplot's global state, and short labels for sites and steps."""

from __future__ import annotations

import re
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..errors import AttnscopeError

__all__ = ["colour_map", "missing_glyphs_quiet", "new_figure", "short_site", "step_label", "wrapped"]

_PARTS = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid", "attentions": "a",
          "transformer_blocks": "t", "single_transformer_blocks": "st"}


def new_figure(nrows: int, ncols: int, panel: tuple[float, float], **subplots: Any) -> tuple[Figure, Any]:
    """A constrained-layout :class:`~matplotlib.figure.Figure` and its ``(nrows, ncols)`` axes grid."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **subplots)


def wrapped(text: str, width: float, fontsize: float) -> str:
    """``text`` broken at spaces into lines that fit ``width`` inches at ``fontsize`` points (a character taken as
    0.6 em wide, DejaVu Sans' widest common letters), so a long title stays inside its panel.

    >>> print(wrapped("a red circle to the left of a blue square", 1.0, 10))
    a red circle
    to the left
    of a blue
    square
    """
    chars = max(8, int(width * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars)) or text


@contextmanager
def missing_glyphs_quiet() -> Iterator[None]:
    """Draw text without matplotlib's warning for each character its fonts lack (an emoji of a prompt: the text
    shows an empty box there); every other warning is shown as usual."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        yield


def short_site(site: str) -> str:
    """``"up_blocks.1.attentions.0.transformer_blocks.0.attn2"`` → ``"up1.a0.t0"``.

    >>> short_site("mid_block.attentions.0.transformer_blocks.0.attn2")
    'mid.a0.t0'
    """
    site = re.sub(r"\.attn2?$", "", site)
    parts = site.split(".")
    out: list[str] = []
    for part in parts:
        if part.isdigit() and out:
            out[-1] += part
        else:
            out.append(_PARTS.get(part, part))
    return ".".join(out)


def step_label(da: Any, step: int) -> str:
    """``"step 3 (t=749)"`` from the ``timestep`` coordinate when there is one."""
    if "timestep" in da.coords:
        t = float(da["timestep"].sel(step=step))
        if t == t:  # not NaN
            return f"step {step} (t={t:g})"
    return f"step {step}"


def colour_map(values: Any, vmin: float, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """``values`` as RGBA bytes (shape ``(..., 4)``, uint8) on the matplotlib colour map ``cmap`` from ``vmin`` to
    ``vmax`` (clipped); NaN is transparent.

    >>> colour_map([0.0, 1.0, float("nan")], 0.0, 1.0).tolist()
    [[68, 1, 84, 255], [253, 231, 36, 255], [0, 0, 0, 0]]
    """
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise AttnscopeError(f"cmap={cmap!r}: not a matplotlib colour map; e.g. 'viridis', 'magma', 'cividis'")
    values = np.asarray(values, dtype=np.float64)
    span = vmax - vmin if vmax > vmin else 1.0
    with np.errstate(invalid="ignore"):
        scaled = np.clip((values - vmin) / span, 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(scaled), bytes=True)
    rgba[np.isnan(values)] = 0
    return rgba
