"""Per-site reductions of a trace's maps, and their results on one ``site`` axis.

Every statistic of :mod:`attnscope.stats` that makes one pass over the maps goes through
:func:`reduce_sites`: a kernel maps a block of whole maps ``(step, sample, head, y, x, token)`` to a few
sums per step and sample. How the maps are read depends on their size, not on the statistic:

* a site whose maps take at most :data:`SMALL_SITE_BYTES` is read whole and reduced in one call (on
  small traces — the shapes model's few kB per site — building a dask task per chunk costs more than
  the arithmetic);
* a larger one is reduced chunk by chunk, one dask task per stored shard of steps with every sample,
  so memory stays one shard's maps however long the run.

Both read everything in one ``dask.compute`` and give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["SMALL_SITE_BYTES", "reduce_sites", "sites_dataset", "site_dataset", "stack_sites"]

#: Maps of at most this many stored bytes per site are read whole; larger ones chunk by chunk.
SMALL_SITE_BYTES = 4 * 2**20

_MAP_DIMS = ("step", "sample", "head", "y", "x", "token")

#: ``kernel(maps, samples)``: ``maps`` (step, sample, head, y, x, token) of the samples ``samples`` (a slice of the
#: sample axis) → an array (step, sample, width).
Kernel = Callable[[np.ndarray, slice], np.ndarray]


def reduce_sites(arrays: Mapping[str, Any], kernel: Kernel | Mapping[str, Kernel], width: int, *,
                 small_bytes: int | None = None) -> list[np.ndarray]:
    """``kernel`` over every site's maps, computed: one ``(step, sample, width)`` array per site, in order.

    ``kernel`` may be a mapping of site name → kernel, for statistics whose kernel depends on the site's
    resolution (a region's mask). ``small_bytes`` (default :data:`SMALL_SITE_BYTES`): the largest site
    read whole.

    >>> import numpy as np, xarray as xr
    >>> maps = xr.DataArray(np.ones((2, 1, 1, 2, 2, 3)) / 3, dims=_MAP_DIMS).chunk(step=1)
    >>> total = lambda m, samples: m.sum(axis=(2, 3, 4))   # each token's mass over heads and pixels
    >>> [r.tolist() for r in reduce_sites({"whole": maps}, total, 3)] == \\
    ...     [r.tolist() for r in reduce_sites({"by chunk": maps}, total, 3, small_bytes=0)]
    True
    """
    import dask

    small_bytes = SMALL_SITE_BYTES if small_bytes is None else small_bytes
    kernels = [kernel[name] if isinstance(kernel, Mapping) else kernel for name in arrays]
    work: list[Any] = []
    whole: list[bool] = []
    for da, k in zip(arrays.values(), kernels):
        data = da.transpose(*_MAP_DIMS).data
        small = not hasattr(data, "map_blocks") or da.nbytes <= small_bytes
        whole.append(small)
        work.append(data if small else _by_chunk(data, k, width))
    computed = dask.compute(*work)
    return [np.asarray(k(np.asarray(c), slice(None)) if small else c) for c, k, small in zip(computed, kernels, whole)]


def _by_chunk(data: Any, kernel: Kernel, width: int) -> Any:
    """``kernel`` of every stored chunk, lazily: one task per step-chunk holding every sample (the writer's shards)."""
    data = data.rechunk({1: -1, **{i: -1 for i in range(2, 6)}})

    def block(chunk: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        lo, hi = block_info[0]["array-location"][1]
        return kernel(chunk, slice(lo, hi))

    return data.map_blocks(block, drop_axis=[2, 3, 4, 5], new_axis=[2], chunks=(*data.chunks[:2], (width,)),
                           dtype=np.float64, meta=np.empty((0, 0, 0)))


def sites_dataset(arrays: Mapping[str, Any], variables: list[dict[str, tuple[tuple[str, ...], Any]]]) -> Any:
    """Each site's statistics (``variables[i]``: name → (dims, values) of the i-th site of ``arrays``) as one Dataset
    with a leading ``site`` axis, the maps' ``step`` and ``sample`` (with ``timestep``), and where each site sits
    (``block``, ``depth``) where every site says.

    Sites that share their steps and samples (the usual case) are stacked directly; otherwise they are joined
    on the union of their steps (:func:`stack_sites`), NaN where a site has none.

    >>> import numpy as np, xarray as xr
    >>> maps = xr.DataArray(np.zeros((2, 1, 1, 1, 1, 1)), dims=_MAP_DIMS, coords={"step": [0, 5]})
    >>> ds = sites_dataset({"a": maps, "b": maps}, [{"v": (("step",), np.array([1.0, 2.0]))},
    ...                                             {"v": (("step",), np.array([3.0, 4.0]))}])
    >>> ds.v.dims, ds.v.sel(site="b").values.tolist()
    (('site', 'step'), [3.0, 4.0])
    """
    import xarray as xr

    named = list(arrays.items())
    first = named[0][1]
    steps, samples = _labels(first, "step"), _labels(first, "sample")
    if not all(np.array_equal(_labels(da, "step"), steps) and np.array_equal(_labels(da, "sample"), samples)
               for _, da in named[1:]):
        return stack_sites([site_dataset(name, da, v) for (name, da), v in zip(named, variables)], arrays)
    data = {key: (("site", *dims), np.stack([np.asarray(v[key][1]) for v in variables]))
            for key, (dims, _) in variables[0].items()}
    coords: dict[str, Any] = {"site": [name for name, _ in named], "step": steps, "sample": samples}
    if "timestep" in first.coords:
        coords["timestep"] = ("step", np.asarray(first["timestep"].values, dtype=float))
    return _with_places(xr.Dataset(data, coords=coords), arrays)


def _labels(da: Any, dim: str) -> np.ndarray:
    return np.asarray(da[dim].values) if dim in da.coords else np.arange(da.sizes[dim])


def site_dataset(name: str, da: Any, variables: dict[str, Any]) -> Any:
    """One site's statistics as a Dataset over its maps' ``step``/``sample`` (with ``timestep``), on a ``site`` axis."""
    import xarray as xr

    ds = xr.Dataset(variables, coords={"step": da["step"].values, "sample": _labels(da, "sample")})
    if "timestep" in da.coords:
        ds = ds.assign_coords(timestep=("step", np.asarray(da["timestep"].values, dtype=float)))
    return ds.expand_dims(site=[name])


def stack_sites(per_site: list[Any], arrays: Mapping[str, Any]) -> Any:
    """:func:`site_dataset` results joined along ``site``, with where each site sits (``block``, ``depth``) where
    every site says: down/mid/up, double/single, or a flat stack's third."""
    import xarray as xr

    return _with_places(xr.concat(per_site, dim="site", join="outer", coords="minimal", compat="override"), arrays)


def _with_places(out: Any, arrays: Mapping[str, Any]) -> Any:
    described = [da.attrs.get("site", {}) for da in arrays.values()]
    for key in ("block", "depth"):
        if all(key in d for d in described):
            out = out.assign_coords({key: ("site", [d[key] for d in described])})
    return out
