"""``ats.stats.convergence``: how much each site's cross-attention still changes from one step to the next,
and ``ats.stats.suggest_gate_step``: the TGATE gate step it implies."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import AttnscopeError
from ..selection import check_tol, run_steps, select_captured_steps, select_site_names
from ..store import GATED_STEPS_ATTR, OUTPUT_CHANGE, OUTPUT_NORM, Trace, open_trace
from ._dominance import site_arrays, special_prompt, token_role_rows, token_texts

__all__ = ["convergence", "stable_step", "suggest_gate_step"]

OF = ("auto", "maps", "outputs")
CHANGE_LABELS = {"maps": "‖C_t − C_t−1‖/‖C_t‖", "outputs": "‖O_t − O_t−1‖/‖O_t‖"}


def stable_step(curve: Any, steps: Any, tol: float) -> int:
    """First step from which ``curve`` stays below ``tol``; −1 if never.

    NaN entries (the first step, gated steps) are no evidence either way: they are skipped, and the
    stable step is always a step with a value below ``tol``.

    >>> nan = float("nan")
    >>> stable_step([nan, 0.5, 0.04, 0.2, 0.03, 0.01], range(6), 0.05)
    4
    >>> stable_step([nan, 0.5, 0.04, nan, 0.03], range(5), 0.05)
    2
    >>> stable_step([nan, 0.5, 0.4], range(3), 0.05), stable_step([nan, 0.5, 0.04, 0.2, nan], range(5), 0.05)
    (-1, -1)
    """
    c, s = np.asarray(curve, float), np.asarray(steps)
    defined = np.flatnonzero(~np.isnan(c))
    above = defined[c[defined] >= tol]
    below = defined[defined > above[-1]] if len(above) else defined
    return int(s[below[0]]) if len(below) else -1


def _is_summaries(source: Any) -> bool:
    import xarray as xr

    return isinstance(source, xr.Dataset) and OUTPUT_CHANGE in source.data_vars and OUTPUT_NORM in source.data_vars


def _output_summaries(source: Any, of: str) -> Any:
    """The output summaries to use (an ``xarray.Dataset``), or None to use the maps."""
    if _is_summaries(source):
        if of == "maps":
            raise AttnscopeError("of='maps': the source is a Dataset of output summaries, which has no attention maps; "
                                 "use of='outputs' or pass the Trace")
        return source
    if of == "maps":
        return None
    if hasattr(source, "output_change") and hasattr(source, "attention"):  # a Trace
        summaries = source.output_change()
        if summaries is None and of == "outputs":
            raise AttnscopeError(f"of='outputs': trace {str(source.path)!r} has no output summaries; capture it with "
                                 "output_change=True, or use of='maps'")
        return summaries
    if of == "outputs":
        raise AttnscopeError(f"of='outputs': expected a Trace captured with output_change=True or an xarray.Dataset "
                             f"with {OUTPUT_NORM!r} and {OUTPUT_CHANGE!r}, got {type(source).__name__}")
    return None


def _output_curves(ds: Any, sites: Any, steps: Any, source: Any = None) -> Any:
    """``output_change / output_norm`` per (step, site, sample); a site predicate reads the site descriptions of
    ``source`` when it is a Trace."""
    curve = (ds[OUTPUT_CHANGE].astype(np.float64) / ds[OUTPUT_NORM].astype(np.float64)).transpose("step", "site", "sample")
    if sites is not None:
        names = [str(s) for s in curve["site"].values]
        described = ({n: source.site_description(n) for n in names}
                     if callable(sites) and hasattr(source, "site_description") else None)
        curve = curve.sel(site=select_site_names(sites, names, described))
    if steps is not None:
        captured = curve["step"].values.tolist()
        curve = curve.sel(step=select_captured_steps(steps, captured, run_steps(ds, [curve]), "the output summaries"))
    curve = curve.compute()
    if "sample" not in curve.coords:
        curve = curve.assign_coords(sample=np.arange(curve.sizes["sample"]))
    return curve.assign_coords(site=[str(s) for s in curve["site"].values])


def _map_curves(source: Any, sites: Any, steps: Any) -> Any:
    """``‖C_t − C_{t−1}‖ / ‖C_t‖`` of the head-averaged maps per (step, site, sample), one dask pass."""
    import dask
    import xarray as xr

    arrays, cut = site_arrays(source, sites)  # every captured step: each is compared with the previous captured one
    if not arrays:
        raise AttnscopeError("no sites to analyse")
    curves = []
    total = run_steps(source, arrays.values()) if steps is not None else None
    for name, da in arrays.items():
        if "step" not in da.coords:
            da = arrays[name] = da.assign_coords(step=np.arange(da.sizes["step"]))
        c = da.astype(np.float32).mean("head")
        if cut[name] and "token_text" in da.coords:  # tokens="prompt": a sample's norms leave out the padding columns
            own = special_prompt(token_role_rows(da, token_texts(da, None), None), cut=True)  # a longer prompt kept
            if not own.all():
                c = c.where(xr.DataArray(own, dims=("sample", "token")), 0.0)
        # skipna=False: a NaN (gated) map makes its step and the next one NaN, never a zero change
        change = np.sqrt((c.diff("step", label="upper") ** 2).sum(["y", "x", "token"], skipna=False))
        norm = np.sqrt((c ** 2).sum(["y", "x", "token"], skipna=False))
        curve = (change / norm).reindex(step=da["step"].values)
        if total is not None:  # then the chosen steps (dask reads only them and the steps before them)
            chosen = select_captured_steps(steps, da["step"].values.tolist(), total, name)
            curve, arrays[name] = curve.sel(step=chosen), da.sel(step=chosen)
        curves.append(curve)
    values = dask.compute(*[c.data for c in curves])
    # each site on its own steps, joined on their union (NaN where a site has none), as dominance joins them
    parts = [xr.DataArray(np.asarray(v, float), dims=("step", "sample"),
                          coords={"step": da["step"].values, "sample": da["sample"].values if "sample" in da.coords
                                  else np.arange(da.sizes["sample"])})
             for v, da in zip(values, arrays.values())]
    per_site = xr.concat(parts, dim="site", join="outer").assign_coords(site=list(arrays))
    per_site = per_site.transpose("step", "site", "sample")
    timesteps = {int(s): float(t) for da in arrays.values() if "timestep" in da.coords
                 for s, t in zip(da["step"].values, da["timestep"].values)}
    if timesteps:
        per_site = per_site.assign_coords(timestep=("step", [timesteps.get(int(s), np.nan)
                                                             for s in per_site["step"].values]))
    return per_site


def _gated_steps(source: Any) -> list[int]:
    if hasattr(source, "gated_steps") and hasattr(source, "attention"):  # a Trace
        return list(source.gated_steps)
    attrs = getattr(source, "attrs", None)
    return [int(s) for s in attrs.get(GATED_STEPS_ATTR, [])] if isinstance(attrs, Mapping) else []


def convergence(source: Any, *, sites: Any = None, steps: Any = None, tol: float = 0.05, of: str = "auto") -> Any:
    """Step-to-step change of each site's cross-attention, ``‖C_t − C_{t−1}‖ / ‖C_t‖``, and where it settles.

    ``C_t`` is either a site's map at captured step ``t`` (``of="maps"``: heads averaged, Frobenius
    norm over pixels and tokens; on a token axis cut to the prompt, ``tokens="prompt"``, not over the padding
    columns a longer prompt of the batch kept, so a sample's curve does not depend on its batch) or its attention output (``of="outputs"``: the output averaged over
    the two guidance halves, what TGATE caches; Frobenius over positions and channels, recorded by
    ``ats.capture(..., output_change=True)``). Each step is compared with the previous *captured*
    step. This is the observation TGATE rests on: cross-attention converges after a few steps; the
    step from which the mean over sites stays below ``tol`` is the suggested gate step
    (:func:`suggest_gate_step`). Steps an intervention gated (the trace's ``gated_steps``) are NaN:
    they count neither as converged nor as changing.

    Parameters
    ----------
    source : Trace (or its path), xarray.DataArray, mapping of site name → DataArray, or xarray.Dataset
        Maps as in :func:`attnscope.stats.dominance`; or a Dataset of output summaries with
        ``output_norm`` and ``output_change`` (step, site, sample), as from :meth:`Trace.output_change`.
    sites, steps : optional
        As in :func:`attnscope.stats.dominance`. ``steps`` selects steps of the curve: for maps and
        outputs alike, each value still compares with the previous step that was captured (not the
        previous selected one).
    tol : float
        Tolerance of the relative change for ``stable_step``.
    of : {"auto", "maps", "outputs"}
        What ``C`` is. ``"auto"``: the outputs when the source has output summaries, else the maps.

    Returns
    -------
    xarray.Dataset
        ``convergence`` (step, site, sample), NaN at the first step and at gated steps;
        ``mean_convergence`` (step, sample), the mean over sites; ``stable_step`` (sample), −1 if the
        mean never settles or the trace is incomplete (its run went on past the last written step, so
        whether the change stayed low is unknown); attrs ``tol``, ``of`` (``"maps"`` or ``"outputs"``, what
        was used), ``gated_steps``, and for an incomplete trace ``incomplete`` ("8 of 20 steps written").

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
    ...                  num_inference_steps=6, output_change=True)
    >>> ds = ats.stats.convergence(tr, tol=0.1)
    >>> dict(ds.convergence.sizes), ds.attrs["of"], bool(ds.convergence.isel(step=0).isnull().all())
    ({'step': 6, 'site': 7, 'sample': 1}, 'outputs', True)
    >>> ats.stats.convergence(tr, tol=0.1, of="maps").attrs["of"]
    'maps'
    """
    import xarray as xr

    check_tol(tol)
    if of not in OF:
        raise AttnscopeError(f"of={of!r}: expected one of {', '.join(repr(o) for o in OF)}")
    if isinstance(source, (str, os.PathLike)):
        source = open_trace(source)
    summaries = _output_summaries(source, of)
    if summaries is not None:
        per_site, used, gated = _output_curves(summaries, sites, steps, source), "outputs", _gated_steps(summaries)
    else:
        per_site, used, gated = _map_curves(source, sites, steps), "maps", _gated_steps(source)
    per_site = per_site.where(~per_site["step"].isin(gated))
    mean = per_site.mean("site")
    stable = [stable_step(mean.isel(sample=s).values, mean["step"].values, tol) for s in range(mean.sizes["sample"])]
    cut = _interrupted(source)
    if cut:  # the run went on after the last written step: whether the curve stayed low is unknown
        stable = [-1] * len(stable)
    out = xr.Dataset({"convergence": per_site, "mean_convergence": mean,
                      "stable_step": ("sample", np.array(stable, dtype=np.int64))}, coords={"sample": per_site["sample"]})
    out.attrs.update({"tol": tol, "of": used, GATED_STEPS_ATTR: [int(s) for s in gated]})
    if cut:
        out.attrs["incomplete"] = cut
    return out


def _interrupted(source: Any) -> str | None:
    """"176 of 400 steps written" for a trace whose capture was interrupted, else None."""
    if isinstance(source, Trace) and not source.complete:
        return source.written
    return None


def _is_convergence(source: Any) -> bool:
    import xarray as xr

    return isinstance(source, xr.Dataset) and "mean_convergence" in source.data_vars


def suggest_gate_step(source: Any, tol: float = 0.05, of: str = "auto", *, sites: Any = None) -> int:
    """The TGATE gate step a trace's convergence suggests: how many steps to run in full.

    The mean curve of :func:`convergence` at step ``t`` compares ``t`` with ``t − 1``; if it stays
    below ``tol`` from step ``s`` on, caching the cross-attention at step ``s − 1`` and reusing it
    from step ``s`` is justified, so the gate step is ``s`` (the stable step). With several samples
    the largest is returned (conservative). Pass it as ``ats.regulate.TGate(gate_step=...)``.

    Parameters
    ----------
    source : Trace (or its path), maps, output summaries, or a Dataset from :func:`convergence`
        Anything :func:`convergence` takes; a convergence Dataset is reused (its mean curve is
        judged again at this ``tol``).
    tol : float
        Tolerance of the mean relative change.
    of : {"auto", "maps", "outputs"}
        As in :func:`convergence` (for a convergence Dataset it must match, or be ``"auto"``).
    sites : optional
        Which sites to average (default all).

    Returns
    -------
    int
        The gate step (≥ 1).

    Raises
    ------
    AttnscopeError
        When the mean curve never settles below ``tol``; the message names the smallest tail
        maximum, i.e. the tolerance that would be needed.

    Examples
    --------
    A hand-made curve: each site's output is ``c_t`` times a fixed tensor, so the relative change is
    ``|c_t − c_{t−1}| / |c_t|`` = 1/2, 1/3, 0.0196, 0.0101 at steps 1–4:

    >>> import numpy as np, xarray as xr, attnscope as ats
    >>> c = np.array([1.0, 2.0, 1.5, 1.53, 1.5147])
    >>> norm = np.abs(c)[:, None, None] * np.ones((1, 2, 1))
    >>> change = np.r_[np.nan, np.abs(np.diff(c))][:, None, None] * np.ones((1, 2, 1))
    >>> ds = xr.Dataset({"output_norm": (("step", "site", "sample"), norm),
    ...                  "output_change": (("step", "site", "sample"), change)},
    ...                 coords={"step": range(5), "site": ["s0", "s1"]})
    >>> ats.stats.suggest_gate_step(ds, tol=0.05)
    3
    >>> ats.stats.suggest_gate_step(ds, tol=0.4)
    2
    """
    if _is_convergence(source):
        used = source.attrs.get("of")
        if of != "auto" and used is not None and of != used:
            raise AttnscopeError(f"of={of!r}: this convergence Dataset was computed with of={used!r}")
        check_tol(tol)
        mean = source["mean_convergence"]
        if sites is not None:
            mean = source["convergence"].sel(site=select_site_names(sites, [str(s) for s in source["site"].values]))
            mean = mean.mean("site")
        used = used or "maps"
    else:
        conv = convergence(source, sites=sites, tol=tol, of=of)
        mean, used = conv["mean_convergence"], conv.attrs["of"]
    cut = source.attrs.get("incomplete") if _is_convergence(source) else _interrupted(source)
    if cut:
        raise AttnscopeError(f"no gate step: the trace is incomplete ({cut}); the change after the last written step "
                             f"is unknown, so it cannot show that the attention settled")
    if "sample" not in mean.dims:
        mean = mean.expand_dims(sample=[0])
    steps = mean["step"].values
    stable = [stable_step(mean.isel(sample=s).values, steps, tol) for s in range(mean.sizes["sample"])]
    failing = [s for s, v in enumerate(stable) if v < 0]
    if failing:
        raise AttnscopeError(_never_settles(mean, failing, steps, tol, used))
    return max(stable)


def _never_settles(mean: Any, failing: list[int], steps: Any, tol: float, of: str) -> str:
    """Why no gate step: the tolerance that would be needed (the smallest maximum of a curve's tail)."""
    needed, where = -np.inf, None
    for s in failing:
        curve = np.asarray(mean.isel(sample=s).values, float)
        defined = np.flatnonzero(~np.isnan(curve))
        if not len(defined):
            return (f"no gate step at tol={tol:g}: sample {s}'s mean change of the {of} has no defined value "
                    f"(fewer than two captured, ungated steps)")
        tails = [np.nanmax(curve[i:]) for i in defined]
        best = int(np.argmin(tails))
        if tails[best] > needed:
            needed, where = tails[best], (s, int(steps[defined[best]]))
    return (f"no gate step at tol={tol:g}: the mean step-to-step change of the {of} never stays below it "
            f"(sample {where[0]}); the smallest tail maximum is {needed:.4g} (from step {where[1]} on), so "
            f"tol={_just_above(needed):g} would settle it — or capture more steps, or give the gate step by hand")


def _just_above(value: float) -> float:
    """The smallest number of three significant digits above ``value`` (a tolerance that settles a curve whose
    tail maximum is ``value``: settled means below the tolerance).

    >>> _just_above(0.33333), _just_above(0.0099), _just_above(0.125)
    (0.334, 0.00991, 0.126)
    """
    digits = 2 - int(np.floor(np.log10(value))) if value > 0 else 3
    above = np.ceil(value * 10**digits) / 10**digits
    if above <= value:
        above += 10.0**-digits
    return float(np.round(above, digits))
