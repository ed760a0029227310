"""``ats.stats.convergence``: how much each site's maps still change from one step to the next."""

from __future__ import annotations

from typing import Any

import numpy as np

from .dominance_dataset import site_arrays

__all__ = ["convergence", "stable_step"]


def stable_step(curve: Any, steps: Any, tol: float) -> int:
    """First step from which ``curve`` stays below ``tol`` (NaN entries at the start are skipped); −1 if never.

    >>> stable_step([float("nan"), 0.5, 0.04, 0.2, 0.03, 0.01], range(6), 0.05)
    4
    >>> stable_step([float("nan"), 0.5, 0.4], range(3), 0.05)
    -1
    """
    c, s = np.asarray(curve, float), np.asarray(steps)
    defined = ~np.isnan(c)
    if not defined.any():
        return -1
    above = np.flatnonzero(defined & (c >= tol))
    start = above[-1] + 1 if len(above) else np.flatnonzero(defined)[0]
    return int(s[start]) if start < len(c) else -1


def convergence(source: Any, *, sites: Any = None, steps: Any = None, tol: float = 0.05) -> Any:
    """Step-to-step change of the attention maps, ``‖C_t − C_{t−1}‖ / ‖C_t‖``, and where it settles.

    ``C_t`` is a site's map at captured step ``t`` (heads averaged; Frobenius norm over pixels and
    tokens), compared with the previous *captured* step. This is the observation TGATE rests on:
    cross-attention converges after a few steps; the step from which the mean over sites stays
    below ``tol`` is a candidate gate step.

    Parameters
    ----------
    source : Trace, xarray.DataArray or mapping of site name → DataArray
    sites, steps : optional
        As in :func:`attnscope.stats.dominance`.
    tol : float
        Tolerance of the relative change for ``stable_step``.

    Returns
    -------
    xarray.Dataset
        ``convergence`` (step, site, sample), NaN at the first step; ``mean_convergence`` (step,
        sample), the mean over sites; ``stable_step`` (sample), −1 if the mean never settles; attrs ``tol``.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
    ...                  num_inference_steps=6)
    >>> ds = ats.stats.convergence(tr, tol=0.1)
    >>> dict(ds.convergence.sizes), bool(ds.convergence.isel(step=0).isnull().all())
    ({'step': 6, 'site': 7, 'sample': 1}, True)
    """
    import dask
    import xarray as xr

    if not tol > 0:
        from ..errors import AttnscopeError

        raise AttnscopeError(f"tol={tol!r}: expected a positive tolerance")
    arrays, _ = site_arrays(source, sites, steps)
    curves = []
    for da in arrays.values():
        c = da.astype(np.float32).mean("head")
        change = np.sqrt((c.diff("step", label="upper") ** 2).sum(["y", "x", "token"]))
        norm = np.sqrt((c ** 2).sum(["y", "x", "token"]))
        curves.append((change / norm).reindex(step=da["step"].values))
    values = dask.compute(*[c.data for c in curves])
    first = next(iter(arrays.values()))
    per_site = xr.DataArray(np.stack([np.asarray(v, float) for v in values], 1), dims=("step", "site", "sample"),
                            coords={"step": first["step"].values, "site": list(arrays),
                                    "sample": first["sample"].values if "sample" in first.coords
                                    else np.arange(first.sizes["sample"])})
    mean = per_site.mean("site")
    stable = [stable_step(mean.isel(sample=s).values, mean["step"].values, tol) for s in range(mean.sizes["sample"])]
    out = xr.Dataset({"convergence": per_site, "mean_convergence": mean,
                      "stable_step": ("sample", np.array(stable, dtype=np.int64))}, coords={"sample": per_site["sample"]})
    if "timestep" in first.coords:
        out = out.assign_coords(timestep=("step", np.asarray(first["timestep"].values, dtype=float)))
    out.attrs["tol"] = tol
    return out
