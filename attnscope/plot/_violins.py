"""Distributions of per-pixel attention per word: the "one token dominates" violin plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..store import as_trace
from ._layout import new_figure, step_label
from ._select import default_targets, sample_roles, sample_tokens, site_maps, site_names

__all__ = ["violins"]


def violins(trace: Any, steps: Any, sites: str | Sequence[str] | None = None, sample: int = 0,
            words: Sequence[str | int] | str | int | None = None) -> Figure:
    """Violin plot of per-pixel attention values per word, one panel per step.

    >>> import tempfile, attnscope as ats, attnscope.plot
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
    >>> fig = ats.plot.violins(tr, steps=[0, 1])
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['<SOT>', 'a', 'red', 'circle', 'and', 'blue', 'square', '<EOT>']

    Each pixel of each chosen site's map (heads averaged) gives one value per word — the word's
    pieces summed, every occurrence of a repeated word included — and the values of all chosen
    sites are pooled. A word whose violin sits high above the others dominates the attention
    (the figure of Attention Regulation, Zhang et al. 2024).

    Parameters
    ----------
    trace : Trace or path
    steps : int, slice or sequence of int
        One panel per step; each must be captured in the trace.
    sites : str or sequence of str, optional
        Site names or globs (default: every recorded site).
    sample : int
        Which generated image.
    words : str, int or sequence of them, optional
        Words, phrases or token positions; default every prompt word plus the start-of-text
        (``"<SOT>"``) and first end-of-text (``"<EOT>"``) tokens.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per step (shared y axis), words on the x axis in the order given. A step whose maps are NaN
        (gated by TGATE, or NaN maps) has no violins and a note saying so (``ax.texts``).
    """
    trace = as_trace(trace, "trace")
    if words is None:
        targets, labels = default_targets(sample_tokens(trace, sample), sample_roles(trace, sample))
    else:
        targets, labels = words, None
    frames = []
    for site in site_names(trace, sites):
        values = site_maps(trace, site, steps, sample).attn.words(targets).attn.aggregate("head")
        values = values.transpose("step", "word", "y", "x").compute()
        if labels is not None:
            values = values.assign_coords(word=np.array(labels, dtype=object))
        frames.append(values.stack(pixel=("y", "x")).drop_vars(["pixel", "y", "x"])
                      .to_dataframe(name="attention")[["attention"]].reset_index())
    table = pd.concat(frames, ignore_index=True)
    order = list(dict.fromkeys(table["word"]))
    step_values = list(dict.fromkeys(table["step"]))
    fig, axes = new_figure(1, len(step_values), (max(3.0, 0.55 * len(order) + 1.0), 3.2), sharey=True)
    import seaborn as sns

    for ax, step in zip(axes[0], step_values):
        sns.violinplot(data=table[table["step"] == step], x="word", y="attention", hue="word", order=order,
                       hue_order=order, legend=False, cut=0, density_norm="width", inner="quart", linewidth=0.7,
                       ax=ax)
        ax.set_title(step_label(values, step), fontsize=9)
        if not table.loc[table["step"] == step, "attention"].notna().any():  # gated (TGATE) or NaN: say so
            ax.text(0.5, 0.5, "no map here:\nthis step was gated\nor its maps are NaN", ha="center", va="center",
                    fontsize=8, transform=ax.transAxes)
        ax.set_xlabel("")
        if max(map(len, map(str, order))) > 7:  # wider than a violin's slot at this size: slant, anchored at the tick
            ax.tick_params(axis="x", labelrotation=40, labelsize=8)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
                tick.set_rotation_mode("anchor")
        else:
            ax.tick_params(axis="x", labelsize=8)
    axes[0, 0].set_ylabel("attention per pixel")
    return fig
