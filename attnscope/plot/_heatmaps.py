"""Spatial maps: DAAM-style word heat maps over the image, and the step × site grid of one word."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ..errors import AttnscopeError, AttnscopeWarning
from ..selection import index_positions
from ..stats import image_size, layout_regions, layout_tokens
from ..store import as_trace
from ..tokens import prompt_text, resolve_targets, target_list
from ._layout import colour_map, new_figure, short_site, step_label, wrapped
from ._select import (
    crop_box,
    cropped_generation,
    forward_order,
    sample_index,
    sample_prompt,
    sample_roles,
    sample_tokens,
    site_maps,
    site_names,
    token_positions,
)

__all__ = ["heatmaps", "map_area", "site_step_grid", "word_maps", "word_panels"]


def word_maps(trace: Any, words: Sequence[str | int] | str | int, sites: str | Sequence[str] | None = None,
              steps: Any = None, sample: int = 0, *, per_step: bool = False) -> xr.DataArray:
    """Each word's map at image size (dims ``word, y, x``), not normalised: per chosen site averaged over
    heads and the chosen steps and upsampled bilinearly, then averaged over the sites. Computed.

    ``per_step=True`` keeps the steps apart (dims ``step, word, y, x``): step ``s`` holds what
    ``word_maps(..., steps=[s])`` gives, read with one pass over each site instead of one per step. A step a
    site lacks (a trace opened with ``missing="skip"``) is the mean of the sites that hold it.

    An inpainting run with ``padding_mask_crop`` generated only a crop of its image: its maps are of that crop,
    here upsampled to the image's size all the same; :func:`heatmaps` draws them inside the crop's box
    (manifest ``run.crop_region``, :func:`map_area`).

    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
    ...                  num_inference_steps=2)
    >>> dict(ats.plot.word_maps(tr, ["circle"]).sizes)
    {'word': 1, 'y': 32, 'x': 32}
    >>> dict(ats.plot.word_maps(tr, ["circle"], per_step=True).sizes)
    {'step': 2, 'word': 1, 'y': 32, 'x': 32}
    """
    trace = as_trace(trace, "trace")
    images = trace.images
    size = image_size(images[sample_index(trace, sample)] if images else trace)
    over = ["head"] if per_step else ["step", "head"]
    per_site = [site_maps(trace, site, steps, sample).attn.words(words).attn.aggregate(over)
                .attn.upsample(size) for site in site_names(trace, sites)]
    # join="outer": per step, the sites that hold it (a trace opened with missing="skip" may lack steps at a site)
    maps = xr.concat(per_site, dim="site", coords="minimal", compat="override", join="outer").mean("site")
    return maps.transpose(*(["step"] if per_step else []), "word", "y", "x").compute()


def heatmaps(trace: Any, words: Sequence[str | int] | str | int, sites: str | Sequence[str] | None = None,
             steps: Any = None, sample: int = 0, alpha: float = 0.55, cmap: str = "viridis", *,
             layout: Mapping[str, Sequence[float]] | None = None, radius: float = 0.2) -> Figure:
    """Word heat maps overlaid on the generated image, DAAM-style; optionally a layout's regions, dashed.

    >>> import tempfile, attnscope as ats, attnscope.plot
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=2)
    >>> fig = ats.plot.heatmaps(tr, ["circle", "blue square"])
    >>> [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    ['a red circle and a blue square', 'circle', 'blue square']
    >>> fig = ats.plot.heatmaps(tr, ["circle", "blue square"], layout={"a red circle": (0, 0, 0.5, 1),
    ...                                                                "a blue square": (0.75, 0.5)})
    >>> [[p.get_label() for p in ax.patches] for ax in fig.axes[:3]]   # each phrase on its words' panels
    [[], ['a red circle'], ['a blue square']]

    For each chosen site the map is averaged over heads and the chosen steps and upsampled
    bilinearly to the image size; the sites are averaged; each word's pieces (all occurrences) are
    summed and the word's map is min-max normalised to ``[0, 1]`` (:func:`word_maps`, then
    ``.attn.normalize("minmax")``). Only the chosen sites and steps are read from the store.

    Parameters
    ----------
    trace : Trace or path
        The trace (a path or URL is opened with :func:`attnscope.open_trace`).
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
    layout : mapping of phrase → box or centre, optional
        The regions of :class:`attnscope.regulate.SpatialTemporal` (and of
        :func:`attnscope.stats.region_share`): ``{"a red circle": (x0, y0, x1, y1), "a blue square":
        (x, y)}`` in [0, 1]², x to the right, y down. Each phrase's region is drawn as a dashed white
        outline — a rectangle for a box, a circle of ``radius`` for a centre (an ellipse on a
        non-square image, like the mask) — on the panels of the words that belong to the phrase: a
        panel gets it when its tokens share one with the phrase's (its first occurrence, leading
        articles dropped: :func:`attnscope.stats.layout_tokens`), so ``"circle"`` and ``"red circle"``
        get ``"a red circle"``'s box and ``"a"`` gets none. When the trace has no token text (a
        prompt given as embeddings) this cannot be told and every word panel gets every region. A
        phrase that is not in the sample's prompt is an error. Each patch is labelled with its phrase.
    radius : float
        Radius of a centre's disk, as a fraction of the image's width and height (the control's 0.2).

    Returns
    -------
    matplotlib.figure.Figure
        One row of panels: the image, then one per word titled with the word, and one colour bar for
        all the word panels (its axes labelled ``"<colorbar>"``, from 0, the word's least attended
        pixel, to 1, its most attended). Each word panel holds two images, the picture and the normalised map (``ax.images[-1]``),
        and the layout's patches (``ax.patches``) in image pixel coordinates: pixel ``(row, col)``
        is centred at ``(col, row)``, so a box spans ``x0 · W − ½`` to ``x1 · W − ½``. A word whose map is NaN
        everywhere (every chosen step gated by TGATE, or NaN maps) gets a note saying so (``ax.texts``).
        An inpainting run with ``padding_mask_crop`` generated only a crop of the image, its box recorded by
        capture (manifest ``run.crop_region``, ``[x1, y1, x2, y2]``): each map is drawn inside that box (its
        extent ``x1 − ½`` to ``x2 − ½``, ``y1 − ½`` to ``y2 − ½``), the image around it uncovered, and the
        layout's regions, fractions of the maps, inside the box too. A trace captured before the box was
        recorded draws the maps over the whole image, with an :class:`~attnscope.AttnscopeWarning` that they
        are not aligned with it.
    """
    trace = as_trace(trace, "trace")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not 0 <= alpha <= 1:
        raise AttnscopeError(f"alpha={alpha!r}: expected a number from 0 (image only) to 1 (map only)")
    colour_map([0.0], 0.0, 1.0, cmap)  # an unknown colour map is an error before any map is read
    regions = layout_regions(layout) if layout is not None else None
    if layout is not None and (isinstance(radius, bool) or not isinstance(radius, (int, float))
                               or not 0 < radius <= 1):
        raise AttnscopeError(f"radius={radius!r}: expected a number in (0, 1]")
    sample_index(trace, sample)  # a missing sample is an error before any map is read
    on_panels = None
    if regions is not None:  # which phrase goes on which panel, checked before any map is read
        listed = target_list(words)
        on_panels = _layout_panels(index_positions(listed, token_positions(trace)), regions, sample_tokens(trace, sample),
                                   sample_roles(trace, sample))
    maps = word_maps(trace, words, sites, steps, sample).attn.normalize("minmax")
    if (cropped := cropped_generation(trace)) is not None:
        warnings.warn(f"heatmaps of {str(trace.path)!r}: {cropped}", AttnscopeWarning, stacklevel=2)
    fig, axes = word_panels(trace, maps, sample, alpha, cmap)
    if regions is not None:
        _draw_layout(axes[1:], on_panels, regions, radius, map_area(trace, (maps.sizes["y"], maps.sizes["x"])))
    return fig


def map_area(trace: Any, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where the trace's maps lie on its image, ``(x1, y1, x2, y2)`` in image pixels: the crop's box of an inpainting
    run with ``padding_mask_crop`` (:func:`crop_box`), else the whole image of ``size`` ``(height, width)``."""
    box = crop_box(trace)
    return box if box is not None else (0, 0, size[1], size[0])


def word_panels(trace: Any, maps: xr.DataArray, sample: int = 0, alpha: float = 0.55, cmap: str = "viridis"
                ) -> tuple[Figure, list[Any]]:
    """The figure of :func:`heatmaps` for maps already computed (dims ``word, y, x``, values in ``[0, 1]``): the
    sample's image titled with its prompt, then each word's map over it, and one colour bar for the word panels;
    the figure and its panels' axes (not the colour bar's), in that order. The maps are drawn over the whole image,
    or, for an inpainting run with ``padding_mask_crop``, inside the crop's box (:func:`map_area`)."""
    maps = maps.transpose("word", "y", "x")
    position = sample_index(trace, sample)
    images = trace.images
    picture = np.asarray(images[position]) if images else None
    size, box = (maps.sizes["y"], maps.sizes["x"]), crop_box(trace)
    if box is not None:  # the maps cover the box of the crop, in pixels of the image
        size = picture.shape[:2] if picture is not None else image_size(trace)
    x1, y1, x2, y2 = box if box is not None else (0, 0, size[1], size[0])
    labels = [str(w) for w in maps["word"].values.tolist()]
    panel = (2.6, 2.8)
    fig, axes = new_figure(1, 1 + len(labels), panel)
    titles = [sample_prompt(trace, sample) or f"sample {sample}", *labels]
    shown = None
    for i, (ax, title) in enumerate(zip(axes[0], titles)):
        if picture is not None:
            ax.imshow(picture)
        else:
            ax.text(0.5, 0.5, "no image stored", ha="center", va="center", transform=ax.transAxes)
        if i:
            values = maps.isel(word=i - 1).values
            shown = ax.imshow(values, cmap=cmap, alpha=alpha if picture is not None else 1.0,
                              vmin=0.0, vmax=1.0, extent=(x1 - 0.5, x2 - 0.5, y2 - 0.5, y1 - 0.5))
            ax.set_xlim(-0.5, size[1] - 0.5)  # the whole image, also where the maps cover only a crop of it
            ax.set_ylim(size[0] - 0.5, -0.5)
            if not np.isfinite(values).any():  # every chosen step gated (TGATE) or NaN: say so, not a blank panel
                ax.text(0.5, 0.5, "no map here:\nthe chosen steps were\ngated or their maps NaN", ha="center",
                        va="center", fontsize=8, color="black", backgroundcolor="white", transform=ax.transAxes)
        ax.set_title(wrapped(title, 0.9 * panel[0], 9), fontsize=9)  # a long prompt: lines within its panel
        ax.set_axis_off()
    if shown is not None:  # the bar shows the colours at full strength, as the map's scale (not its opacity)
        bar = fig.colorbar(_opaque(shown), ax=list(axes[0][1:]), shrink=0.85, pad=0.02, aspect=15)
        bar.set_ticks([0.0, 0.5, 1.0], labels=["0 (least)", "0.5", "1 (most)"])
        bar.set_label("attention, scaled per word", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig, list(axes[0])


def _opaque(image: Any) -> Any:
    """A mappable with ``image``'s colour map and limits, for a colour bar that is not faded by its alpha."""
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=image.norm, cmap=image.get_cmap())


def _layout_panels(words: Any, regions: dict[str, tuple[float, ...]], tokens: list[str],
                   roles: list[str] | None) -> list[list[str]]:
    """Per word panel, the layout phrases drawn on it: those whose tokens it shares one of (see :func:`heatmaps`)."""
    targets = target_list(words)
    if not any(tokens):  # a prompt given as embeddings leaves no token text: which panel is whose cannot be told
        return [list(regions)] * len(targets)
    phrase_tokens = layout_tokens(tokens, list(regions), roles)
    for phrase, found in phrase_tokens.items():
        if not found:
            raise AttnscopeError(f"layout phrase {phrase!r} is not in the prompt {prompt_text(tokens, roles)!r}; "
                                 f"every phrase of the layout must be")
    panels = [set(next(iter(resolve_targets(tokens, [t], roles).values()))) for t in targets]
    return [[p for p, found in phrase_tokens.items() if panel & set(found)] for panel in panels]


def _draw_layout(axes: list[Any], on_panels: list[list[str]], regions: dict[str, tuple[float, ...]], radius: float,
                 area: tuple[int, int, int, int]) -> None:
    """Each panel's regions as dashed outlines in image coordinates, the view left on the image. The regions are
    fractions of the maps, which cover ``area`` ``(x1, y1, x2, y2)`` of the image (:func:`map_area`)."""
    from matplotlib.patches import Ellipse, Rectangle

    left, top = area[0] - 0.5, area[1] - 0.5
    h, w = area[3] - area[1], area[2] - area[0]
    for ax, phrases in zip(axes, on_panels):
        limits = ax.get_xlim(), ax.get_ylim()
        for phrase in phrases:
            region = regions[phrase]
            style = dict(fill=False, edgecolor="white", linestyle="--", linewidth=1.5, label=phrase)
            if len(region) == 4:
                x0, y0, x1, y1 = region
                patch = Rectangle((left + x0 * w, top + y0 * h), (x1 - x0) * w, (y1 - y0) * h, **style)
            else:
                patch = Ellipse((left + region[0] * w, top + region[1] * h), 2 * radius * w, 2 * radius * h, **style)
            ax.add_patch(patch)
        ax.set_xlim(limits[0])
        ax.set_ylim(limits[1])


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
    the largest value shown), drawn as a single colour bar. Rows are every chosen step any site holds; a
    site that lacks one (a trace opened with ``missing="skip"``) has a blank panel there, marked ``no map``
    (``gated: no map`` at a step TGATE gated) in ``ax.texts``. Columns run in the order the forward pass
    runs the sites (a UNet's down, mid, then up blocks; each site's stored ``depth``).

    Parameters
    ----------
    trace : Trace or path
        The trace (a path or URL is opened with :func:`attnscope.open_trace`).
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
    trace = as_trace(trace, "trace")
    names = forward_order(trace, site_names(trace, sites))
    lazy = [site_maps(trace, site, steps, sample).attn.words([word]).isel(word=0).attn.aggregate("head")
            for site in names]
    grids = [m.transpose("step", "y", "x").compute() for m in lazy]
    finite = np.concatenate([g.values[np.isfinite(g.values)].ravel() for g in grids])  # no NaN (gated, NaN maps)
    top = (float(finite.max()) if finite.size else 0.0) or 1.0
    # every site's steps (a trace opened with missing="skip" may lack some at a site: a blank panel there)
    step_values = sorted({int(s) for g in grids for s in g["step"].values.tolist()})
    labelled = {s: g for g in reversed(grids) for s in g["step"].values.tolist()}  # a grid holding the step
    grids = [g.reindex(step=step_values) for g in grids]
    fig, axes = new_figure(len(step_values), len(names), (1.7, 1.7))
    shown, gated = None, set(trace.gated_steps)
    for col, (site, grid) in enumerate(zip(names, grids)):
        axes[0, col].set_title(f"{short_site(site)}\n{grid.sizes['y']}×{grid.sizes['x']}", fontsize=8)
        for row, step in enumerate(step_values):
            ax = axes[row, col]
            values = grid.sel(step=step).values
            shown = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
            if not np.isfinite(values).any():  # a blank panel says why, rather than pass for an empty map
                ax.text(0.5, 0.5, "gated:\nno map" if step in gated else "no map", transform=ax.transAxes,
                        ha="center", va="center", fontsize=7, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(step_label(labelled[step], step), fontsize=8)
    fig.colorbar(shown, ax=axes, shrink=0.8, label=f"attention on {word!r}")
    return fig
