"""Figures without pyplot's global state, and short labels for sites and steps."""

from __future__ import annotations

import re
from typing import Any

from matplotlib.figure import Figure

__all__ = ["new_figure", "short_site", "step_label"]

_PARTS = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid", "attentions": "a",
          "transformer_blocks": "t", "single_transformer_blocks": "st"}


def new_figure(nrows: int, ncols: int, panel: tuple[float, float], **subplots: Any) -> tuple[Figure, Any]:
    """A constrained-layout :class:`~matplotlib.figure.Figure` and its ``(nrows, ncols)`` axes grid."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **subplots)


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
