"""``ats.stats.map_shape``: where and how concentrated each target's attention map is, and how much two targets overlap.

For one map ``a(p) = Σ_{i∈T} A[p, i]`` of a target ``T`` (heads averaged first) over the pixels
``p`` of an ``h × w`` map, with pixel centres ``x_p = (col + ½) / w``, ``y_p = (row + ½) / h`` in
[0, 1] and ``â = a / Σ_p a``:

* **peak-to-mean** ``max_p a / mean_p a`` (1: flat; ``h·w``: all on one pixel);
* **top-10 % share**: the share of the mass in the ``⌈0.1 · h·w⌉`` pixels with the most;
* **centre of mass** ``(Σ_p â x_p, Σ_p â y_p)``;
* **spread** ``sqrt(Σ_p â ((x_p − x̄)² + (y_p − ȳ)²))``, in image widths/heights;
* **overlap** of two targets: the histogram intersection ``Σ_p min(â, b̂)`` (1: the same
  distribution; 0: disjoint);
* **box IoU** of a heat map and a box: the map binarised at ``a ≥ τ · max a`` (τ = 0.4, DAAM's
  threshold), its intersection over union with the box's pixels.

A map without mass gives NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ._dominance import sites_and_text, target_positions
from ._sites import reduce_sites, sites_dataset

__all__ = ["box_iou", "centre_of_mass", "histogram_intersection", "map_shape", "peak_to_mean", "spread", "top_share"]


def _maps(maps: Any, name: str = "maps") -> np.ndarray:
    """``maps`` as float64, checked to be ``(..., y, x)``: at least two axes, the last two the map's rows and columns.

    >>> _maps(np.ones(4))
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: maps of shape (4,): expected (..., y, x) maps, at least 2 dims
    """
    array = np.asarray(maps, dtype=np.float64)
    if array.ndim < 2:
        raise AttnscopeError(f"{name} of shape {array.shape}: expected (..., y, x) maps, at least 2 dims")
    return array


def _check_fraction(value: Any, name: str = "fraction") -> None:
    """Raise unless ``value`` is a number in (0, 1].

    >>> _check_fraction("0.1")
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: fraction='0.1': expected a number in (0, 1]
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise AttnscopeError(f"{name}={value!r}: expected a number in (0, 1]")


def _normalised(maps: np.ndarray) -> np.ndarray:
    """``maps / Σ_pixels maps`` over the last two axes (NaN where there is no mass)."""
    total = maps.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, maps / np.where(total > 0, total, 1), np.nan)


def peak_to_mean(maps: Any) -> np.ndarray:
    """``max / mean`` of each ``(..., h, w)`` map.

    >>> peak_to_mean(np.array([[1.0, 0.0], [0.0, 1.0]])).item(), peak_to_mean(np.ones((3, 3))).item()
    (2.0, 1.0)
    """
    maps = _maps(maps)
    mean = maps.mean(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, maps.max(axis=(-2, -1)) / np.where(mean > 0, mean, 1), np.nan)


def top_share(maps: Any, fraction: float = 0.1) -> np.ndarray:
    """Share of each ``(..., h, w)`` map's mass in its ``⌈fraction · h·w⌉`` largest pixels.

    >>> top_share(np.array([[4.0, 1.0], [3.0, 2.0]]), 0.5).item()   # the 2 largest of 4: (4 + 3) / 10
    0.7
    """
    _check_fraction(fraction)
    maps = _maps(maps)
    flat = maps.reshape(*maps.shape[:-2], -1)
    # 0.07 · 100 is 7.000000000000001 in floats: 7 pixels; and at least one pixel, however small the fraction
    k = max(1, math.ceil(round(fraction * flat.shape[-1], 9)))
    top = -np.sort(-flat, axis=-1)[..., :k].sum(axis=-1)
    total = flat.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, top / np.where(total > 0, total, 1), np.nan)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return x, y


def centre_of_mass(maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` centre of mass of each ``(..., h, w)`` map, pixel centres at ``(col + ½) / w``, ``(row + ½) / h``.

    >>> x, y = centre_of_mass(np.array([[0.0, 1.0], [0.0, 3.0]]))   # all in the right column, 3/4 of it below
    >>> x.item(), y.item()
    (0.75, 0.625)
    """
    maps = _maps(maps)
    x, y = _grid(*maps.shape[-2:])
    p = _normalised(maps)
    return (p * x).sum(axis=(-2, -1)), (p * y).sum(axis=(-2, -1))


def spread(maps: Any) -> np.ndarray:
    """Root-mean-square distance of each ``(..., h, w)`` map's mass from its centre of mass (image units).

    >>> round(spread(np.array([[1.0, 0.0], [0.0, 1.0]])).item(), 6)   # two corners' centres, ½√2 apart / 2
    0.353553
    """
    maps = _maps(maps)
    x, y = _grid(*maps.shape[-2:])
    cx, cy = centre_of_mass(maps)
    p = _normalised(maps)
    d2 = (x - cx[..., None, None]) ** 2 + (y - cy[..., None, None]) ** 2
    return np.sqrt((p * d2).sum(axis=(-2, -1)))


def histogram_intersection(a: Any, b: Any) -> np.ndarray:
    """``Σ_p min(â, b̂)`` of two ``(..., h, w)`` maps, each normalised to sum 1.

    >>> histogram_intersection(np.array([[1.0, 1.0]]), np.array([[1.0, 3.0]])).item()   # min(.5,.25)+min(.5,.75)
    0.75
    """
    a, b = _maps(a, "a"), _maps(b, "b")
    if a.shape[-2:] != b.shape[-2:]:
        raise AttnscopeError(f"a of shape {a.shape} and b of shape {b.shape}: expected maps on the same (y, x) grid")
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise AttnscopeError(f"a of shape {a.shape} and b of shape {b.shape}: expected leading axes that broadcast "
                             f"(as many maps in a as in b, or one)") from None
    return np.minimum(_normalised(a), _normalised(b)).sum(axis=(-2, -1))


def box_iou(maps: Any, box: Sequence[float], threshold: float = 0.4) -> np.ndarray:
    """IoU of each ``(..., h, w)`` map binarised at ``≥ threshold · its max`` with ``box = (x0, y0, x1, y1)``, pixel
    coordinates of the map's grid, ``x1``/``y1`` exclusive (the shapes detector's boxes). NaN for a map without mass.

    >>> heat = np.zeros((4, 4)); heat[1:3, 1:3] = 1.0; heat[0, 0] = 0.2    # a 2×2 blob, a faint corner
    >>> box_iou(heat, (1, 1, 3, 3)).item(), box_iou(heat, (1, 1, 3, 4)).item()
    (1.0, 0.6666666666666666)
    """
    _check_fraction(threshold, "threshold")
    maps = _maps(maps)
    h, w = maps.shape[-2:]
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        raise AttnscopeError(f"box={box!r}: expected (x0, y0, x1, y1) in pixels") from None
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise AttnscopeError(f"box={tuple(box)!r}: expected 0 ≤ x0 < x1 ≤ {w} and 0 ≤ y0 < y1 ≤ {h} (the map's pixels)")
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    peak = maps.max(axis=(-2, -1), keepdims=True)
    hot = (maps >= threshold * peak) & (peak > 0)
    union = (hot | inside).sum(axis=(-2, -1))
    iou = (hot & inside).sum(axis=(-2, -1)) / union
    return np.where(peak[..., 0, 0] > 0, iou, np.nan)


def map_shape(source: Any, targets: Sequence[str | int] | str, *, sites: Any = None, steps: Any = None,
              fraction: float = 0.1, tokens: Sequence[str] | None = None) -> Any:
    """Concentration, position and overlap of each target's attention map, per step, site and sample.

    Each target's map is the sum of its tokens' maps (heads averaged first; targets resolved on each
    sample's prompt as in :func:`dominance`); the formulas are in this module's functions and
    docs/analysis.md. The store is read as by :func:`dominance`: small sites whole, larger ones one
    stored shard of steps at a time, so memory stays one shard's maps however long the run.

    Parameters
    ----------
    source : Trace, xarray.DataArray or mapping of site name → DataArray
    targets : words, phrases or token positions, e.g. ``["circle", "square"]``
    sites, steps, tokens
        As in :func:`dominance`.
    fraction : float
        Of the pixels, for ``top_share`` (default the top 10 %).

    Returns
    -------
    xarray.Dataset
        ``peak_to_mean``, ``top_share``, ``centre_x``, ``centre_y``, ``spread`` (step, site, sample,
        target) and ``overlap`` (step, site, sample, pair), one ``pair`` per two targets, labelled
        ``"circle|square"``.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle to the left of a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=3)
    >>> ds = ats.stats.map_shape(tr, ["circle", "square"])
    >>> dict(ds.sizes), ds.pair.values.tolist()
    ({'step': 3, 'site': 7, 'sample': 1, 'target': 2, 'pair': 1}, ['circle|square'])
    >>> bool(((ds.top_share >= 0.1) & (ds.top_share <= 1)).all())
    True
    """
    _check_fraction(fraction)
    arrays, _, texts, roles = sites_and_text(source, sites, steps, tokens)
    first = next(iter(arrays.values()))
    stored = first["token"].values if "token" in first.coords else np.arange(first.sizes["token"])
    labels, positions = target_positions(texts, roles, targets, stored)
    weights = np.zeros((len(texts), len(stored), len(labels)))  # sample, token (index on the axis), target
    for sample, row in enumerate(positions):
        for k, cols in enumerate(row):
            weights[sample, cols, k] = 1.0
    pairs = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    k, names = len(labels), ("peak_to_mean", "top_share", "centre_x", "centre_y", "spread")

    def shape_of(maps: np.ndarray, samples: slice) -> np.ndarray:  # → (step, sample, 5 K + pairs)
        per_target = np.einsum("nshyxt,stk->nskyx", maps.astype(np.float64), weights[samples]) / maps.shape[2]
        cx, cy = centre_of_mass(per_target)
        overlap = [histogram_intersection(per_target[:, :, i], per_target[:, :, j]) for i, j in pairs]
        return np.concatenate([peak_to_mean(per_target), top_share(per_target, fraction), cx, cy,
                               spread(per_target), *[o[..., None] for o in overlap]], -1)

    per_site = []
    for packed in reduce_sites(arrays, shape_of, len(names) * k + len(pairs)):
        site = {name: (("step", "sample", "target"), packed[..., i * k:(i + 1) * k]) for i, name in enumerate(names)}
        site["overlap"] = (("step", "sample", "pair"), packed[..., len(names) * k:])
        per_site.append(site)
    out = sites_dataset(arrays, per_site).transpose("step", "site", "sample", "target", "pair")
    out = out.assign_coords(target=labels, pair=[f"{labels[i]}|{labels[j]}" for i, j in pairs])
    out.attrs.update({"targets": labels, "heads": "averaged before the statistics", "top_fraction": fraction,
                      "definitions": "docs/analysis.md of attnscope (map shape)"})
    return out
