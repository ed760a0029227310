"""Curves over denoising steps from ``attnscope.stats`` Datasets: dominance and convergence."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import AttnscopeError
from ..selection import step_ranges, step_runs
from ._layout import new_figure, short_site, wrapped
from ._select import dataset_variable, select_label

__all__ = ["convergence", "dominance_lines"]

_LINE_DIMS = ("target", "token")


def _line_label(da: xr.DataArray, dim: str, value: Any) -> str:
    """A target's label, or a token's word (``"circle (3)"``) from the ``word``/``token_text`` coordinates."""
    if dim == "target":
        return str(value)
    for name in ("word", "token_text"):
        if name in da.coords and da.coords[name].dims == (dim,):
            text = str(da.coords[name].sel({dim: value}).values)
            if text:
                return f"{text} ({value})"
    return f"token {value}"


def dominance_lines(stats: xr.Dataset, variable: str = "target_share", sample: int = 0,
                    sites: str | list[str] = "mean") -> Figure:
    """One statistic of :func:`attnscope.stats.dominance` over the denoising steps.

    >>> import tempfile, attnscope as ats, attnscope.plot, numpy as np, xarray as xr
    >>> ds = xr.Dataset({"target_share": (("step", "site", "sample", "target"), np.random.rand(4, 2, 1, 2))},
    ...                 coords={"step": range(4), "site": ["s0", "s1"], "sample": [0], "target": ["circle", "square"]})
    >>> fig = ats.plot.dominance_lines(ds)
    >>> [line.get_label() for line in fig.axes[0].get_lines()]
    ['circle', 'square']

    Parameters
    ----------
    stats : xarray.Dataset
        From :func:`attnscope.stats.dominance` (any Dataset with ``step`` and ``site`` dims).
    variable : str
        ``"target_share"`` (one line per target), ``"mass_share"`` or ``"argmax_coverage"`` (one
        line per token, labelled with its word), or a step × site × sample variable such as
        ``"dominance_ratio"``, ``"entropy"``, ``"gini"`` or ``"sink_share"`` (one line).
    sample : int
        Which generated image.
    sites : "mean", str or list of str
        ``"mean"`` averages every site; a site name (or list of names) averages only those.

    Returns
    -------
    matplotlib.figure.Figure
        One axes: ``variable`` against step, a legend when there are several lines.
    """
    da = dataset_variable(stats, variable, ("step",), f"dominance_lines(variable={variable!r})")
    if "sample" in da.dims:
        da = select_label(da, "sample", sample, f"sample={sample!r}")
    if "site" in da.dims:
        if not (isinstance(sites, str) and sites == "mean"):
            chosen = [sites] if isinstance(sites, str) else list(sites) if isinstance(sites, (list, tuple)) else []
            if not chosen or not all(isinstance(s, str) for s in chosen):  # none: a figure of NaN lines
                raise AttnscopeError(f"sites={sites!r}: expected 'mean', a site name or a list of site names")
            da = select_label(da, "site", chosen, f"sites={sites!r}")
        da = da.mean("site", keep_attrs=True)
    extra = [d for d in da.dims if d != "step"]
    if len(extra) > 1 or (extra and extra[0] not in _LINE_DIMS):
        raise AttnscopeError(f"dominance_lines(variable={variable!r}): after choosing the sample and averaging the "
                             f"sites it has dims {list(da.dims)}; expected step plus at most one of {list(_LINE_DIMS)}")
    fig, axes = new_figure(1, 1, (5.5, 3.4))
    ax = axes[0, 0]
    steps = da["step"].values
    missing = _mark_missing(ax, da)
    if extra:
        dim = extra[0]
        for value in da[dim].values.tolist():
            ax.plot(steps, da.sel({dim: value}).values, marker=".", label=_line_label(da, dim, value))
        ax.legend(fontsize=8, title=dim)
    else:
        ax.plot(steps, da.values, marker=".", label=variable)
        if missing:
            ax.legend(fontsize=8)
    where = "mean over sites" if isinstance(sites, str) and sites == "mean" else (
        short_site(sites) if isinstance(sites, str) else f"mean over {len(sites)} sites")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    label = _STAT_LABEL.get(variable, variable)
    title = f"{label.split(' (')[0]} — sample {sample}, {where}"
    ax.set(xlabel="denoising step", ylabel=label, title=wrapped(title, 0.8 * fig.get_figwidth(), ax.title.get_fontsize()))
    return fig


def _mark_missing(ax: Any, da: xr.DataArray) -> list[int]:
    """Grey bands over the steps where ``da`` has no value at all (TGATE's gated steps, NaN maps), on an x axis that
    spans every step: a line that just stops would read as a run that ended there. Returns those steps."""
    steps = np.asarray(da["step"].values)
    if steps.size == 0:
        return []
    values = np.asarray(da.transpose("step", ...).values, dtype=np.float64).reshape(steps.size, -1)
    missing = [int(s) for s, row in zip(steps, values) if np.isnan(row).all()]
    _step_bands(ax, missing, "no maps:", "0.88")
    if missing:
        ax.set_xlim(steps.min() - 0.5, steps.max() + 0.5)
    return missing


def _step_bands(ax: Any, steps: list[int], what: str, color: str) -> None:
    """A grey band over each run of consecutive ``steps`` (the steps need not all be consecutive), the first labelled
    ``"<what> steps 3–5, 8"`` for the legend."""
    for i, (lo, hi) in enumerate(step_runs(steps)):
        ax.axvspan(lo - 0.5, hi + 0.5, color=color, zorder=0,
                   label=f"{what} step{'s' if len(steps) > 1 else ''} {step_ranges(steps)}" if i == 0 else None)

#: axis labels of dominance's statistics, with their units
_STAT_LABEL = {
    "target_share": "share of the prompt's attention (0–1)", "mass_share": "share of the prompt's attention (0–1)",
    "argmax_coverage": "share of pixels where it is the argmax (0–1)", "dominance_ratio": "dominance ratio (top-1 / top-2)",
    "entropy": "per-pixel entropy over the prompt's tokens (nats)", "gini": "Gini of the shares (0–1)",
    "sink_share": "attention on SOT, EOT and padding (0–1)",
}


_YLABEL = {"maps": "‖Cₜ − Cₜ₋₁‖ / ‖Cₜ‖ of the maps", "outputs": "‖Oₜ − Oₜ₋₁‖ / ‖Oₜ‖ of the outputs"}


def convergence(conv: xr.Dataset, sample: int = 0) -> Figure:
    """Step-to-step change of the cross-attention (:func:`attnscope.stats.convergence`): per site, their
    mean, the suggested gate step.

    >>> import attnscope as ats, attnscope.plot, numpy as np, xarray as xr
    >>> c = np.array([[np.nan, np.nan], [0.5, 0.3], [0.04, 0.02], [0.01, 0.01]])[:, :, None]
    >>> ds = xr.Dataset({"convergence": (("step", "site", "sample"), c),
    ...                  "mean_convergence": (("step", "sample"), c.mean(axis=1)),
    ...                  "stable_step": (("sample",), [2])},
    ...                 coords={"step": range(4), "site": ["s0", "s1"], "sample": [0]},
    ...                 attrs={"tol": 0.05, "of": "outputs"})
    >>> fig = ats.plot.convergence(ds)
    >>> fig.axes[0].get_legend_handles_labels()[1]
    ['per site', 'mean over sites', 'tol = 0.05', 'suggested gate step 2']
    >>> fig.axes[0].get_ylabel()
    '‖Oₜ − Oₜ₋₁‖ / ‖Oₜ‖ of the outputs'

    Parameters
    ----------
    conv : xarray.Dataset
        With ``convergence`` (step, site, sample); ``mean_convergence`` (step, sample) is used when
        present (else the site mean is taken), ``stable_step`` (sample) and the attributes ``tol``,
        ``of`` (``"maps"`` or ``"outputs"``: the y label) and ``gated_steps`` when present.
    sample : int
        Which generated image.

    Returns
    -------
    matplotlib.figure.Figure
        One axes with a log-scaled y axis (linear if no value is positive): thin per-site curves,
        the thick mean, a dashed horizontal line at ``tol``, a dotted vertical line at the stable
        step — the suggested TGATE gate step — when it is ≥ 0, and a grey band over gated steps.
    """
    per_site = dataset_variable(conv, "convergence", ("step", "site"), "convergence(conv)")
    if "sample" in per_site.dims:
        per_site = select_label(per_site, "sample", sample, f"sample={sample!r}")
    if "mean_convergence" in conv.data_vars:
        mean = conv["mean_convergence"]
        mean = select_label(mean, "sample", sample, f"sample={sample!r}") if "sample" in mean.dims else mean
    else:
        mean = per_site.mean("site")
    fig, axes = new_figure(1, 1, (5.5, 3.4))
    ax = axes[0, 0]
    steps = per_site["step"].values
    for i, site in enumerate(per_site["site"].values.tolist()):
        ax.plot(steps, per_site.sel(site=site).values, lw=0.8, alpha=0.45, color="tab:blue",
                label="per site" if i == 0 else f"_{short_site(str(site))}")
    ax.plot(mean["step"].values, mean.values, lw=2.5, color="black", label="mean over sites")
    tol = conv.attrs.get("tol")
    if tol is not None:
        ax.axhline(float(tol), ls="--", color="tab:red", lw=1, label=f"tol = {float(tol):g}")
    if "stable_step" in conv.data_vars:
        stable = conv["stable_step"]
        if "sample" in stable.dims:
            stable = select_label(stable, "sample", sample, f"sample={sample!r}")
        stable = int(stable)
        if stable >= 0:
            ax.axvline(stable, ls=":", color="tab:green", lw=1.5, label=f"suggested gate step {stable}")
    gated = [int(s) for s in conv.attrs.get("gated_steps", [])]
    _step_bands(ax, gated, "gated", "0.85")
    if np.any(np.asarray(per_site.values) > 0) or np.any(np.asarray(mean.values) > 0):
        ax.set_yscale("log")
    if not np.isfinite(np.asarray(mean.values, dtype=np.float64)).any():  # one step, or every step gated: no curve
        ax.text(0.5, 0.5, "no step-to-step change: fewer than two\nconsecutive captured steps with maps",
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3")
    if steps.size:
        ax.set_xlim(float(np.min(steps)) - 0.5, float(np.max(steps)) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    of = conv.attrs.get("of", "maps")
    ax.set(xlabel="step", ylabel=_YLABEL.get(of, str(of)), title=f"convergence — sample {sample}")
    ax.legend(fontsize=8)
    return fig
