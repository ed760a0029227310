"""``ats.stats.region_share``: how much of each object phrase's attention falls inside its layout region.

A *layout* maps object phrases of the prompt to regions in image coordinates ``[0, 1]²`` (x to the
right, y down): a box ``(x0, y0, x1, y1)`` or a centre ``(x, y)``, which means a disk of ``radius``
(0.2) around it — the convention of :class:`attnscope.regulate.SpatialTemporal`. On a map of
``h × w`` pixels a pixel is inside when its centre ``((col + ½) / w, (row + ½) / h)`` is (box edges
included). Per site, step and sample, with ``A`` the stored map (heads averaged), ``T_i`` the
phrase's tokens (its first occurrence in the prompt, leading articles ``a``/``an``/``the`` dropped)
and ``M_i`` its region::

    share_i = Σ_{p ∈ M_i} Σ_{t ∈ T_i} A[p, t] / Σ_p Σ_{t ∈ T_i} A[p, t]

This module never imports :mod:`attnscope.regulate` (stats sits below it); tests check that its
masks and token positions are the ones the control and its attention objective use.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..tokens import prompt_text, target_occurrences, word_occurrences
from ._dominance import sites_and_text
from ._sites import reduce_sites, sites_dataset

__all__ = ["layout_regions", "layout_tokens", "region_mask", "region_share"]

_ARTICLES = {"a", "an", "the"}


def _region(spec: Any, name: str) -> tuple[float, ...]:
    values = tuple(spec) if isinstance(spec, (list, tuple, np.ndarray)) else None
    if values is None or len(values) not in (2, 4) or not all(
            isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in values):
        raise AttnscopeError(f"{name} = {spec!r}: expected a box (x0, y0, x1, y1) or a centre (x, y) in [0, 1]")
    if not all(0.0 <= float(v) <= 1.0 for v in values):
        raise AttnscopeError(f"{name} = {spec!r}: coordinates must lie in [0, 1]")
    if len(values) == 4 and not (values[0] < values[2] and values[1] < values[3]):
        raise AttnscopeError(f"{name} = {spec!r}: an empty box; expected x0 < x1 and y0 < y1")
    return tuple(float(v) for v in values)


def _radius(radius: Any) -> float:
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not 0 < radius <= 1:
        raise AttnscopeError(f"radius={radius!r}: expected a number in (0, 1]")
    return float(radius)


def layout_regions(layout: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """A layout checked: object phrase → box ``(x0, y0, x1, y1)`` or centre ``(x, y)``, as float tuples in [0, 1]².

    The errors name the phrase and repeat its value.

    Examples
    --------
    >>> layout_regions({"a red circle": [0, 0, 0.5, 1], "a blue square": (0.75, 0.5)})
    {'a red circle': (0.0, 0.0, 0.5, 1.0), 'a blue square': (0.75, 0.5)}
    >>> layout_regions({"a red circle": (0.5, 0, 0.2, 1)})
    Traceback (most recent call last):
    ...
    attnscope.errors.AttnscopeError: layout['a red circle'] = (0.5, 0, 0.2, 1): an empty box; expected x0 < x1 and y0 < y1
    """
    if not isinstance(layout, Mapping) or not layout:
        raise AttnscopeError(f"layout={layout!r}: expected a mapping of object phrase to a box (x0, y0, x1, y1) "
                             f"or a centre (x, y) in [0, 1]")
    out = {}
    for phrase, spec in layout.items():
        if not isinstance(phrase, str) or not phrase.split():
            raise AttnscopeError(f"layout key {phrase!r}: expected an object phrase of the prompt (a str)")
        out[phrase] = _region(spec, f"layout[{phrase!r}]")
    return out


def region_mask(region: Sequence[float], shape: tuple[int, int], radius: float = 0.2) -> np.ndarray:
    """``(h, w)`` bool mask of a box, or of a disk of ``radius`` around a centre, on a grid of pixel centres.

    Pixel ``(row, col)`` of an ``h × w`` map has its centre at ``x = (col + ½) / w``, ``y = (row + ½) / h``;
    it is inside a box when ``x0 ≤ x ≤ x1`` and ``y0 ≤ y ≤ y1``, inside a disk when
    ``(x − cx)² + (y − cy)² ≤ radius²`` (in these normalised coordinates: an ellipse in pixels when
    ``h ≠ w``). The same mask as ``attnscope.regulate.region_mask``, which the control applies, reshaped.

    Examples
    --------
    >>> region_mask((0.0, 0.0, 0.5, 1.0), (2, 4)).astype(int).tolist()   # the left half of a 2×4 map
    [[1, 1, 0, 0], [1, 1, 0, 0]]
    >>> region_mask((0.5, 0.5), (4, 4)).astype(int).tolist()              # a disk of radius 0.2
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    region = _region(region, "region")
    radius = _radius(radius)
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise AttnscopeError(f"shape={shape!r}: expected (h, w), two positive ints")
    h, w = int(shape[0]), int(shape[1])
    # float32 throughout, as the control's torch mask: the same pixels on every edge
    f = np.float32
    y = ((np.arange(h, dtype=f) + f(0.5)) / f(h))[:, None]
    x = ((np.arange(w, dtype=f) + f(0.5)) / f(w))[None, :]
    if len(region) == 4:
        x0, y0, x1, y1 = (f(v) for v in region)
        return np.asarray((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
    cx, cy = f(region[0]), f(region[1])
    return np.asarray((x - cx) ** 2 + (y - cy) ** 2 <= f(radius**2))


def _without_articles(occurrence: list[int], words: dict[int, tuple[int, str]]) -> list[int]:
    """``occurrence`` less its leading article *words* (``words``: position → (word number, word)); a word whose
    first piece spells an article (``an`` + ``teater``) is kept whole, and a phrase that is only articles keeps its
    last."""
    groups: list[list[int]] = []
    for p in occurrence:
        if groups and words[p][0] == words[groups[-1][-1]][0]:
            groups[-1].append(p)
        else:
            groups.append([p])
    start = 0
    while start < len(groups) - 1 and words[groups[start][0]][1].lower() in _ARTICLES:
        start += 1
    return [p for group in groups[start:] for p in group]


def layout_tokens(tokens: Sequence[str], phrases: Sequence[str] | Mapping[str, Any],
                  roles: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Each layout phrase's token positions in one prompt: its first occurrence, leading articles dropped.

    The rule :class:`attnscope.regulate.SpatialTemporal` and its attention objective use: the phrase
    is matched word by word (case ignored, word pieces merged, as
    :func:`attnscope.tokens.target_occurrences`), and the leading ``a``/``an``/``the`` tokens are
    dropped (a phrase that is only an article keeps it). A phrase the prompt lacks gets ``[]``.

    Examples
    --------
    >>> toks = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "and</w>", "the</w>", "blue</w>",
    ...         "squ", "are</w>", "<|endoftext|>"]
    >>> layout_tokens(toks, ["a red circle", "the blue square", "circle", "a triangle"])
    {'a red circle': [2, 3], 'the blue square': [6, 7, 8], 'circle': [3], 'a triangle': []}
    """
    words = {p: (k, word) for k, (word, positions) in enumerate(word_occurrences(tokens, roles)) for p in positions}
    out = {}
    for phrase in phrases:
        found = target_occurrences(tokens, phrase, roles)
        out[phrase] = _without_articles(found[0], words) if found else []
    return out


def _not_in_prompt(phrase: str, texts: list[list[str]], roles: list[list[str]]) -> AttnscopeError:
    prompts = list(dict.fromkeys(prompt_text(t, r) for t, r in zip(texts, roles)))
    if not any(prompts):
        return AttnscopeError(f"layout phrase {phrase!r}: the trace has no token text (prompt given as embeddings), "
                              f"so no phrase can be found")
    listed = " | ".join(repr(p) for p in prompts)
    return AttnscopeError(f"layout phrase {phrase!r} is not in the prompt {listed}; every phrase of the layout must be")


def _inside_sums(chunk: np.ndarray, cols: np.ndarray, weights: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """One chunk ``(step, sample, head, y, x, token)`` → ``(step, sample, 2 · phrases)``: mass inside, then total.

    ``weights`` (sample, len(cols), phrase) says which of the columns ``cols`` each phrase sums;
    ``masks`` (y, x, phrase) its region.
    """
    sub = np.asarray(chunk)[..., cols].astype(np.float64).mean(axis=2)  # heads averaged: (step, sample, y, x, C)
    mass = np.einsum("tsyxc,scp->tsyxp", sub, weights)
    inside = np.einsum("tsyxp,yxp->tsp", mass, masks)
    return np.concatenate([inside, mass.sum((2, 3))], axis=-1)


def region_share(source: Any, layout: Mapping[str, Sequence[float]], *, sites: Any = None, steps: Any = None,
                 radius: float = 0.2, tokens: Sequence[str] | None = None) -> Any:
    """The share of each layout phrase's attention mass inside its region, per step, site and sample.

    ``share_i = Σ_{p ∈ M_i} A[p, T_i] / Σ_p A[p, T_i]`` where ``A`` is the stored map with heads
    averaged, ``A[p, T_i]`` the sum over the phrase's tokens ``T_i`` (its first occurrence, leading
    articles dropped: :func:`layout_tokens`) and ``M_i`` its region on the site's grid of pixel centres
    (:func:`region_mask`; a centre means a disk of ``radius``). 1: all of the phrase's attention is in its
    region; a map spread evenly over the image gives ``region_area``. Non-square maps are fine. Read
    like :func:`dominance`: one pass over each site's maps (a small site whole, a large one chunk by chunk),
    reduced to two sums per phrase.

    To average: ``ds.region_share.mean(["step", "site"])`` per sample and phrase (NaN steps, such as
    those TGATE gated, are skipped); adding ``"phrase"`` gives, for a trace of a
    ``SpatialTemporal(layout, objective="attention")`` run with every site and step captured,
    1 − the attention objective's loss.

    Parameters
    ----------
    source : Trace, xarray.DataArray or mapping of site name → DataArray
        As for :func:`dominance`; arrays have dims ``(step, sample, head, y, x, token)``.
    layout : mapping of phrase → box or centre
        ``{"a red circle": (x0, y0, x1, y1), "a blue square": (x, y)}`` in [0, 1]², x to the right, y
        down: what :class:`attnscope.regulate.SpatialTemporal` takes (and
        ``ats.regulate.layout_from_prompt`` makes). Each phrase must be in a prompt of the trace; a
        sample whose prompt lacks it gets NaN.
    sites : glob, list of names/globs or predicate, optional
        Which sites (default all).
    steps : int, list of int or slice, optional
        Which steps of the run (as for :func:`dominance`; default every captured step).
    radius : float
        Radius of the disk around a centre, as a fraction of the image's width and height (the control's 0.2).
    tokens : list of str, optional
        Token strings, for arrays without a ``token_text`` coordinate.

    Returns
    -------
    xarray.Dataset
        ``region_share`` (step, site, sample, phrase) and ``region_area`` (site, phrase): the fraction
        of the site's pixels inside the region. Coordinates ``timestep`` (on step), ``block`` and
        ``depth`` (on site, from a trace), ``phrase_tokens`` (sample, phrase): the token strings
        summed, joined by spaces. ``attrs["layout"]`` holds the regions, ``attrs["radius"]`` the radius.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle to the left of a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=3)
    >>> layout = {"a red circle": (0.05, 0.25, 0.45, 0.75), "a blue square": (0.55, 0.25, 0.95, 0.75)}
    >>> ds = ats.stats.region_share(tr, layout)
    >>> dict(ds.sizes)
    {'step': 3, 'site': 7, 'sample': 1, 'phrase': 2}
    >>> ds.phrase_tokens.values.tolist()
    [['red</w> circle</w>', 'blue</w> square</w>']]
    >>> ds.region_area.sel(site="mid_block.attentions.0.transformer_blocks.0.attn2").values.tolist()  # 4×4 map
    [0.25, 0.25]
    >>> share = ds.region_share.mean(["step", "site"])   # per sample and phrase, in [0, 1]
    >>> bool(((share > 0) & (share < 1)).all())
    True
    """
    regions = layout_regions(layout)
    radius = _radius(radius)
    arrays, _, texts, roles = sites_and_text(source, sites, steps, tokens)
    phrases = list(regions)
    found = [layout_tokens(t, phrases, r) for t, r in zip(texts, roles)]  # per sample
    for phrase in phrases:
        if not any(f[phrase] for f in found):
            raise _not_in_prompt(phrase, texts, roles)

    cols = np.array(sorted({p for f in found for ps in f.values() for p in ps}), dtype=np.intp)
    weights = np.zeros((len(texts), len(cols), len(phrases)))
    for sample, f in enumerate(found):
        for k, phrase in enumerate(phrases):
            weights[sample, np.searchsorted(cols, f[phrase]), k] = 1.0
    masks = {name: np.stack([region_mask(regions[p], (da.sizes["y"], da.sizes["x"]), radius) for p in phrases],
                            axis=-1).astype(np.float64) for name, da in arrays.items()}

    n = len(phrases)
    kernels = {name: (lambda maps, samples, m=masks[name]: _inside_sums(maps, cols, weights[samples], m)) for name in arrays}
    per_site = []
    for name, sums in zip(arrays, reduce_sites(arrays, kernels, 2 * n)):
        with np.errstate(invalid="ignore", divide="ignore"):
            share = sums[..., :n] / sums[..., n:]
        per_site.append({"region_share": (("step", "sample", "phrase"), share),
                         "region_area": (("phrase",), masks[name].mean(axis=(0, 1)))})
    out = sites_dataset(arrays, per_site)
    out["region_share"] = out.region_share.transpose("step", "site", "sample", "phrase")
    out["region_area"] = out.region_area.transpose("site", "phrase")
    summed = [[" ".join(text[p] for p in f[phrase]) for phrase in phrases] for text, f in zip(texts, found)]
    out = out.assign_coords(phrase=phrases, phrase_tokens=(("sample", "phrase"), np.array(summed, dtype=object)))
    out.attrs.update({"layout": {p: list(r) for p, r in regions.items()}, "radius": radius,
                      "heads": "averaged before the statistic",
                      "definition": "share of the phrase's attention mass (its tokens, leading articles dropped) "
                                    "inside its region; docs/analysis.md of attnscope"})
    return out
