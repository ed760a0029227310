"""Spatial maps: DAAM-style word heat maps over the image, and the step × site grid of one word."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ..stats import image_size
from ._layout import new_figure, short_site, step_label
from ._select import sample_index, site_maps, site_names

__all__ = ["heatmaps", "site_step_grid"]


def mean_word_maps(trace: Any, words: Sequence[str | int] | str | int, sites: str | Sequence[str] | None = None,
                   steps: Any = None, sample: int = 0) -> xr.DataArray:
    """Each word's map at image size (dims ``word, y, x``), not normalised: per chosen site averaged over
    heads and the chosen steps and upsampled bilinearly, then averaged over the sites. Computed.

    >>> import tempfile, attnscope as ats, attnscope.plot
    >>> from attnscope.plot._heatmaps import mean_word_maps
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
    ...                  num_inference_steps=2)
    >>> dict(mean_word_maps(tr, ["circle"]).sizes)
    {'word': 1, 'y': 32, 'x': 32}
    """
    images = trace.images
    size = image_size(images[sample_index(trace, sample)] if images else trace)
    per_site = [site_maps(trace, site, steps, sample).attn.words(words).attn.aggregate(["step", "head"])
                .attn.upsample(size) for site in site_names(trace, sites)]
    maps = xr.concat(per_site, dim="site", coords="minimal", compat="override", join="override").mean("site")
    return maps.transpose("word", "y", "x").compute()


def heatmaps(trace: Any, words: Sequence[str | int] | str | int, sites: str | Sequence[str] | None = None,
             steps: Any = None, sample: int = 0, alpha: float = 0.55, cmap: str = "jet") -> Figure:
    """Word heat maps overlaid on the generated image, DAAM-style.

    >>> import tempfile, attnscope as ats, attnscope.plot
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
    >>> fig = ats.plot.heatmaps(tr, ["circle", "blue square"])
    >>> [ax.get_title() for ax in fig.axes]
    ['a red circle and a blue square', 'circle', 'blue square']

    For each chosen site the map is averaged over heads and the chosen steps and upsampled
    bilinearly to the image size; the sites are averaged; each word's pieces (all occurrences) are
    summed and the word's map is min-max normalised to ``[0, 1]`` (``da.attn.heatmap`` per site,
    then the site mean). Only the chosen sites and steps are read from the store.

    Parameters
    ----------
    trace : Trace
    words : str, int or sequence of them
        Words, phrases or token positions (see :func:`attnscope.tokens.resolve_targets`).
    sites : str or sequence of str, optional
        Site names or globs (default: every recorded site).
    steps : int, slice or sequence of int, optional
        Steps to average (default: every captured step).
    sample : int
        Which generated image.
    alpha : float
        Opacity of the heat map over the image.
    cmap : str
        Matplotlib colour map of the heat map.

    Returns
    -------
    matplotlib.figure.Figure
        One row of panels: the image, then one per word titled with the word; no colour bar.
        Each word panel holds two images, the picture and the normalised map (``ax.images[-1]``).
    """
    position = sample_index(trace, sample)
    images = trace.images
    maps = mean_word_maps(trace, words, sites, steps, sample).attn.normalize("minmax").transpose("word", "y", "x")
    size = maps.sizes["y"], maps.sizes["x"]
    labels = [str(w) for w in maps["word"].values.tolist()]
    fig, axes = new_figure(1, 1 + len(labels), (2.6, 2.8))
    picture = np.asarray(images[position]) if images else None
    prompts = trace.manifest.get("run", {}).get("prompts") or []
    prompt_of = int(trace.tree["prompt_index"].values[position])
    titles = [prompts[prompt_of] if prompt_of < len(prompts) else f"sample {sample}", *labels]
    for i, (ax, title) in enumerate(zip(axes[0], titles)):
        if picture is not None:
            ax.imshow(picture)
        else:
            ax.text(0.5, 0.5, "no image stored", ha="center", va="center", transform=ax.transAxes)
        if i:
            ax.imshow(maps.isel(word=i - 1).values, cmap=cmap, alpha=alpha if picture is not None else 1.0,
                      vmin=0.0, vmax=1.0, extent=(-0.5, size[1] - 0.5, size[0] - 0.5, -0.5))
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    return fig


def site_step_grid(trace: Any, word: str | int, sites: str | Sequence[str] | None = None, steps: Any = None,
                   sample: int = 0) -> Figure:
    """One word's map at every chosen step (rows) and site (columns), at each site's native resolution.

    >>> import tempfile, attnscope as ats, attnscope.plot
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
    >>> fig = ats.plot.site_step_grid(tr, "circle", sites="up_blocks.1.*")
    >>> len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"])  # 2 steps x 2 sites
    4

    Heads are averaged; the word's pieces are summed. All panels share one colour scale (from 0 to
    the largest value shown), drawn as a single colour bar.

    Parameters
    ----------
    trace : Trace
    word : str or int
        One word, phrase or token position.
    sites : str or sequence of str, optional
        Site names or globs (default: every recorded site).
    steps : int, slice or sequence of int, optional
        Default: every captured step.
    sample : int
        Which generated image.

    Returns
    -------
    matplotlib.figure.Figure
        ``len(steps) × len(sites)`` panels plus one colour-bar axes (label ``"<colorbar>"``).
    """
    names = site_names(trace, sites)
    lazy = [site_maps(trace, site, steps, sample).attn.words([word]).isel(word=0).attn.aggregate("head")
            for site in names]
    grids = [m.transpose("step", "y", "x").compute() for m in lazy]
    top = max(float(np.nanmax(g.values)) if g.size else 0.0 for g in grids) or 1.0
    step_values = grids[0]["step"].values.tolist()
    fig, axes = new_figure(len(step_values), len(names), (1.7, 1.7))
    shown = None
    for col, (site, grid) in enumerate(zip(names, grids)):
        axes[0, col].set_title(f"{short_site(site)}\n{grid.sizes['y']}×{grid.sizes['x']}", fontsize=8)
        for row, step in enumerate(step_values):
            ax = axes[row, col]
            shown = ax.imshow(grid.sel(step=step).values, cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(step_label(grid, step), fontsize=8)
    fig.colorbar(shown, ax=axes, shrink=0.8, label=f"attention on {word!r}")
    return fig
