"""An early warning of a missing object: features of one step's maps and a logistic risk over them.

:func:`neglect_features` reduces one denoising step's cross-attention maps to eleven numbers per
sample (each statistic averaged over the sites first); :func:`neglect_risk` turns them into the
probability that an object will be missing, with a logistic model fitted on the embedded shapes
model (studies/early_warning.py: fitted on its tuning split, scored on a held-out split; the
numbers are in docs/sweep.md). The same functions serve a stored trace and the live maps of a
running generation (``ats.regulate.risk_above``), so a decision taken during a run can be
recomputed from its trace.
"""

from __future__ import annotations

import functools
import itertools
import json
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np

from ..errors import AttnscopeError, AttnscopeWarning
from ..tokens import target_list
from ._dominance import dominance
from ._shape import map_shape

__all__ = ["NEGLECT_FEATURES", "neglect_features", "neglect_model", "neglect_risk"]

#: the features of :func:`neglect_features`, in the order of the risk model's weights
NEGLECT_FEATURES = ("share_min", "share_ratio", "dominance_ratio", "entropy", "gini", "sink_share", "p2m_min",
                    "top_min", "spread_min", "overlap", "centre_dist")


def neglect_features(source: Any, targets: Sequence[str | int], *, step: int | Sequence[int], sites: Any = None,
                     tokens: Sequence[str] | None = None) -> Any:
    """The early-warning features of step ``step``, per sample: each statistic averaged over the sites.

    With the targets' mass shares ``s`` (:func:`dominance`'s ``target_share``) and map statistics
    (:func:`map_shape`), all means over the chosen sites at that step:

    * ``share_min`` = min s; ``share_ratio`` = min s / max s;
    * ``dominance_ratio``, ``entropy``, ``gini``, ``sink_share``: :func:`dominance`'s;
    * ``p2m_min``, ``top_min``, ``spread_min``: the smallest target's peak-to-mean, top-10 % share, spread;
    * ``overlap``: the largest histogram intersection of two targets' maps;
    * ``centre_dist``: the smallest distance between two targets' centres of mass (image units: x in widths,
      y in heights).

    Parameters
    ----------
    source : Trace, xarray.DataArray or mapping of site name → DataArray
        As for :func:`dominance`.
    targets : two or more words, phrases or token positions
        One per object. Two objects named by the same word need phrases (``["red circle", "blue
        circle"]``): a word listed once names all its occurrences. Two identical objects ("a red circle
        and a red circle") are the phrase listed twice: the k-th listing is the k-th occurrence.
    step : int or list of int
        The step (an index into the run's steps; ``-1`` is the last), or several: one pass over the trace
        for all of them.

    Returns
    -------
    xarray.Dataset
        One variable per feature of :data:`NEGLECT_FEATURES`, dims ``(sample,)`` — ``(step, sample)``
        when ``step`` is a list, its ``step`` coordinate the run's steps in run order (as every statistic:
        ``[5, -1]`` of a 20-step run is ``[5, 19]``, repeats merged); ``attrs["step"]``: the one step.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> maps = np.zeros((1, 1, 1, 2, 2, 4))            # step, sample, head, y, x, token
    >>> maps[..., 0] = 0.5                            # SOT
    >>> maps[..., 0, 0, 1], maps[..., 1, 1, 2] = 0.5, 0.5    # "circle" top-left, "square" bottom-right
    >>> maps[..., 0, 1, 3] = maps[..., 1, 0, 3] = 0.5        # "and" elsewhere
    >>> da = xr.DataArray(maps, dims=("step", "sample", "head", "y", "x", "token"),
    ...                   coords={"token_text": ("token", ["<|startoftext|>", "circle</w>", "square</w>", "and</w>"])})
    >>> f = neglect_features({"site": da}, ["circle", "square"], step=0)
    >>> [round(float(f[name][0]), 4) for name in ("share_min", "share_ratio", "top_min", "overlap", "centre_dist")]
    [0.25, 1.0, 1.0, 0.0, 0.7071]
    """
    import xarray as xr

    items = target_list(targets)
    if len(items) < 2:
        raise AttnscopeError(f"targets={targets!r}: the early warning compares objects; expected two or more")
    several = not _is_step(step)
    steps = [step] if not several else _step_list(step)
    if not steps or not all(_is_step(s) for s in steps):
        raise AttnscopeError(f"step={step!r}: expected a step (an int) or a list of steps")
    steps = [int(s) for s in steps]
    dom = dominance(source, targets=items, sites=sites, steps=steps, tokens=tokens).mean("site")
    shape = map_shape(source, items, sites=sites, steps=steps, tokens=tokens).mean("site")
    order = ("step", "sample")
    shares = dom["target_share"].transpose(*order, "target").values
    cx = shape["centre_x"].transpose(*order, "target").values
    cy = shape["centre_y"].transpose(*order, "target").values
    pairs = list(itertools.combinations(range(len(items)), 2))
    dist = np.stack([np.hypot(cx[..., a] - cx[..., b], cy[..., a] - cy[..., b]) for a, b in pairs], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {
            "share_min": shares.min(-1), "share_ratio": shares.min(-1) / shares.max(-1),
            "dominance_ratio": dom["dominance_ratio"].transpose(*order).values,
            "entropy": dom["entropy"].transpose(*order).values,
            "gini": dom["gini"].transpose(*order).values, "sink_share": dom["sink_share"].transpose(*order).values,
            "p2m_min": shape["peak_to_mean"].transpose(*order, "target").values.min(-1),
            "top_min": shape["top_share"].transpose(*order, "target").values.min(-1),
            "spread_min": shape["spread"].transpose(*order, "target").values.min(-1),
            "overlap": shape["overlap"].transpose(*order, "pair").values.max(-1), "centre_dist": dist.min(-1),
        }
    # the steps the statistics computed, in run order (negative ones counted from the end, repeats merged)
    ds = xr.Dataset({k: (order, np.asarray(v, dtype=np.float64)) for k, v in values.items()},
                    coords={"step": dom["step"].values, "sample": dom["sample"].values})
    ds.attrs.update(targets=[str(t) for t in items])
    if several:
        return ds
    ds.attrs.update(step=int(ds["step"].values[0]))
    return ds.isel(step=0, drop=True)


def _is_step(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _step_list(value: Any) -> list[Any]:
    """The items of a list of steps; ``[]`` for what is not one (a string, a float, a 0-d array)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return []
    try:
        return list(value)
    except TypeError:
        return []


#: the runs the shipped weights were fitted on: the shapes model's 20-step plan (DDIM, trailing spacing), t = 999 … 49
_SHIPPED_STEPS = 20
_SHIPPED_TIMESTEPS = tuple(999 - 50 * k for k in range(_SHIPPED_STEPS))


def _run_schedule(source: Any) -> tuple[int | None, np.ndarray | None]:
    """The number of steps of the run behind ``source`` and its timesteps, where the source says (a trace, or arrays
    from one: their ``run_steps`` attribute and ``timestep`` coordinate); ``None`` for what it does not say (the live
    maps ``risk_above`` judges)."""
    manifest = getattr(source, "manifest", None)
    if isinstance(manifest, Mapping):
        steps = manifest.get("run", {}).get("num_steps") if isinstance(manifest.get("run"), Mapping) else None
        timesteps = getattr(source, "timesteps", None)
        return (int(steps) if steps else None), (None if timesteps is None else np.asarray(timesteps, np.float64))
    first = next(iter(source.values()), None) if isinstance(source, Mapping) else source
    attrs = getattr(first, "attrs", {}) if first is not None else {}
    coords = getattr(first, "coords", {}) if first is not None else {}
    n_steps = int(attrs["run_steps"]) if attrs.get("run_steps") else None
    if "timestep" not in coords or "step" not in coords or coords["step"].size == 0:
        return n_steps, None
    try:
        steps = np.asarray(coords["step"].values, dtype=np.int64).ravel()
        times = np.full(max(n_steps or 0, int(steps.max()) + 1), np.nan)
        times[steps] = np.asarray(coords["timestep"].values, np.float64).ravel()
    except (TypeError, ValueError, IndexError):  # odd coordinates: the statistics will say what is wrong with them
        return n_steps, None
    return n_steps, times


def _warn_if_uncalibrated(source: Any, step: int) -> None:
    """Warn when the shipped weights judge a step they were not fitted at: step ``step`` of a run of another length
    or another schedule (an img2img run starts mid-schedule, Heun runs 2N−1 steps) sits at another noise level than
    step ``step`` of the shapes model's 20-step runs, so its risk is not the calibrated one."""
    n_steps, timesteps = _run_schedule(source)
    index = step if step >= 0 else (n_steps or 0) + step
    at = timesteps[index] if timesteps is not None and 0 <= index < len(timesteps) else np.nan
    fitted = _SHIPPED_TIMESTEPS[step] if 0 <= step < _SHIPPED_STEPS else np.nan
    if np.isfinite(at) and np.isfinite(fitted):  # the timestep decides: step 0 of any plan from t=999 is step 0's maps
        uncalibrated = abs(at - fitted) > 0.5
    else:
        uncalibrated = n_steps is not None and n_steps != _SHIPPED_STEPS
    if uncalibrated:
        run = (f"a run of {n_steps} steps" if n_steps else "this run") + (f", at t={at:g}" if np.isfinite(at) else "")
        warnings.warn(f"neglect_risk(step={step}): the shipped weights were fitted at step {step} of the shapes model's "
                      f"{_SHIPPED_STEPS}-step runs (t={fitted:g}); this is step {step} of {run}, another point of the "
                      f"schedule, so the risk is not calibrated here (fit a model on your own runs: "
                      f"attnscope.sweep.fit_neglect_risk, and pass model=)", AttnscopeWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def _shipped_model() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("neglect_risk.json").read_text())


def neglect_model() -> dict[str, Any]:
    """The shipped risk model: per step, the standardisation and logistic weights over :data:`NEGLECT_FEATURES`,
    and where it was fitted and how it scored.

    >>> m = neglect_model()
    >>> m["features"] == list(NEGLECT_FEATURES), sorted(m["steps"], key=int)[:3]
    (True, ['0', '1', '2'])
    """
    return json.loads(json.dumps(_shipped_model()))  # a copy: the cached one stays as shipped


def check_neglect_model(model: Mapping[str, Any], step: int) -> dict[str, np.ndarray]:
    """The standardisation and weights of ``model`` for step ``step``, or one AttnscopeError saying what is wrong.

    A risk model is what :func:`neglect_model` or :func:`fit_neglect_model` gives: ``features`` equal to
    :data:`NEGLECT_FEATURES` and, per step, finite ``mean`` and positive ``std`` of one value per feature and
    ``weights`` (intercept first) of one more.

    >>> p = check_neglect_model(neglect_model(), 5)
    >>> sorted(p), p["weights"].shape
    (['mean', 'std', 'weights'], (12,))
    >>> check_neglect_model(neglect_model(), 12)
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: step=12: the risk model has weights for steps ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']
    """
    if not isinstance(model, Mapping):
        raise AttnscopeError(f"model={model!r}: expected a risk model: a dict with 'features' and 'steps', as "
                             f"neglect_model() or fit_neglect_model() gives (json.load a saved one)")
    steps = model.get("steps")
    if isinstance(steps, Mapping):  # keys as JSON gives them (str); a dict built in Python may use ints
        steps = {str(k): v for k, v in steps.items()}
    if not isinstance(steps, Mapping) or str(step) not in steps:
        have = sorted(steps, key=lambda k: int(k) if str(k).isdigit() else -1) if isinstance(steps, Mapping) else []
        raise AttnscopeError(f"step={step!r}: the risk model has weights for steps {have}")
    if list(model.get("features", [])) != list(NEGLECT_FEATURES):
        raise AttnscopeError(f"model['features'] = {model.get('features')!r}: expected {list(NEGLECT_FEATURES)}")
    entry = steps[str(step)]
    if not (isinstance(entry, Mapping) and {"mean", "std", "weights"} <= set(entry)):
        raise AttnscopeError(f"risk model step {step}: expected 'mean', 'std' and 'weights' (a dict), got {entry!r}")
    try:
        out = {k: np.asarray(entry[k], dtype=np.float64) for k in ("mean", "std", "weights")}
    except (TypeError, ValueError) as exc:
        raise AttnscopeError(f"risk model step {step}: expected numbers in 'mean', 'std' and 'weights' ({exc})") from None
    n = len(NEGLECT_FEATURES)
    if out["mean"].shape != (n,) or out["std"].shape != (n,) or out["weights"].shape != (n + 1,):
        raise AttnscopeError(f"risk model step {step}: expected mean and std of {n} values and {n + 1} weights")
    if not all(np.isfinite(v).all() for v in out.values()):
        raise AttnscopeError(f"risk model step {step}: its mean, std or weights are not finite")
    if not (out["std"] > 0).all():
        raise AttnscopeError(f"risk model step {step}: its std must be positive and finite")
    return out


def neglect_risk(source: Any, targets: Sequence[str | int], *, step: int = 5, sites: Any = None,
                 tokens: Sequence[str] | None = None, model: Mapping[str, Any] | None = None) -> Any:
    """Probability, per sample, that an object of ``targets`` will be missing, from the maps of step ``step``.

    ``risk = σ(w₀ + Σᵢ wᵢ (xᵢ − μᵢ) / σᵢ)`` over the :func:`neglect_features` ``x`` of that step. The
    shipped weights (:func:`neglect_model`, one set per step 0-9 of a 20-step run) were fitted on the
    embedded shapes model's two-object prompts (tuning split of studies/early_warning.py); on the
    held-out split the risk at step 5 ranks generations with a missing object with the ROC AUC in
    docs/sweep.md. On another model the weights are not calibrated; fit your own on a sweep with
    :func:`attnscope.sweep.fit_neglect_risk` (or :func:`fit_neglect_model`) and pass it as ``model``.

    Parameters
    ----------
    source, targets, sites, tokens
        As for :func:`neglect_features`.
    step : int
        The step whose maps decide (default 5, the sixth of 20).
    model : dict, optional
        ``{"features": [...], "steps": {"5": {"mean": [...], "std": [...], "weights": [w0, w1, ...]}}}``.

    Returns
    -------
    xarray.DataArray
        ``neglect_risk``, dims ``(sample,)``, in [0, 1].

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue circle", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=20)
    >>> risk = ats.stats.neglect_risk(tr, ["red circle", "blue circle"], step=5)
    >>> risk.dims, 0 <= float(risk[0]) <= 1
    (('sample',), True)
    """
    if not _is_step(step):
        raise AttnscopeError(f"step={step!r}: expected an int")
    step = int(step)  # numpy's ints too, as neglect_features takes them
    params = check_neglect_model(_shipped_model() if model is None else model, step)
    if model is None:
        _warn_if_uncalibrated(source, step)
    feats = neglect_features(source, targets, sites=sites, step=step, tokens=tokens)
    x = np.stack([feats[name].values for name in NEGLECT_FEATURES], axis=1)
    z = params["weights"][0] + ((x - params["mean"]) / params["std"]) @ params["weights"][1:]
    risk = feats["share_min"].copy(data=1 / (1 + np.exp(-z))).rename("neglect_risk")
    risk.attrs = {"step": int(step), "targets": feats.attrs["targets"],
                  "model": (model or _shipped_model()).get("fitted_on", "given")}
    return risk
