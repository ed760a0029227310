"""Readable and JSON forms of a :func:`~attnscope.stats.dominance` Dataset (``attnscope stats``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from ..errors import AttnscopeError
from ..tokens import BYTE_SPACE, T5_SPACE
from ._convergence import CHANGE_LABELS

__all__ = ["convergence_table", "dominance_json", "dominance_table"]

_SUMMARY = ("dominance_ratio", "entropy", "gini", "sink_share")
_SHORT = {"dominance_ratio": "top1/top2", "entropy": "entropy", "gini": "gini", "sink_share": "sink"}
_BY = ("word", "step", "site", "block")


def _num(x: float, pct: bool = False) -> str:
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "inf"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def dominance_table(ds: Any, by: str = "word") -> str:
    """A plain-text table of a dominance Dataset, per sample, averaged over what ``by`` does not name.

    ``by="word"``: mass share and argmax coverage per prompt token (mean over steps and sites), then
    the summary statistics. ``by="step"`` / ``by="site"``: target shares and summary statistics per
    step (mean over sites; the step's timestep last, ``t``) or per site (mean over steps). ``by="block"``: per block of sites (a
    UNet's down/mid/up, a joint transformer's double/single stream, a flat stack's early/middle/late
    third), in the order the forward pass reaches them, mean over steps and the block's sites.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.stats import dominance_table
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=4)
    >>> print(dominance_table(ats.stats.dominance(tr, targets=["circle", "square"])))  # doctest: +ELLIPSIS
    sample 0: 'a red circle and a blue square'
    pos  token        word      mass share  argmax coverage  target
    ...
      3  circle</w>   circle    ...
    """
    if by not in _BY:
        raise AttnscopeError(f"by={by!r}: expected one of {', '.join(_BY)}")
    _check_dataset(ds, ("mass_share", "argmax_coverage", "target_share", *_SUMMARY), ("step", "site", "sample"),
                   "dominance_table", "ats.stats.dominance")
    lines: list[str] = []
    for s in range(ds.sizes["sample"]):
        one = ds.isel(sample=s)
        words = one["word"].values if "word" in one.coords else np.array([""] * one.sizes["token"])
        texts = [str(t) for t in one["token_text"].values] if "token_text" in one.coords else None
        prompt = " ".join(w for i, w in enumerate(words) if w and _starts_word(words, texts, i))
        lines.append(f"sample {_sample_label(ds, s)}: {prompt!r}")
        if by == "word":
            mean = one.mean(["step", "site"])
            targets = _target_of(one)
            lines.append(f"{'pos':>3}  {'token':<12} {'word':<9} {'mass share':>10}  {'argmax coverage':>15}  target")
            for i, pos in enumerate(one["token"].values):
                text = str(one["token_text"].values[i]) if "token_text" in one.coords else ""
                lines.append(f"{int(pos):>3}  {text:<12} {str(words[i]):<9} {_num(float(mean.mass_share[i]), True):>10}  "
                             f"{_num(float(mean.argmax_coverage[i]), True):>15}  {targets.get(int(pos), '')}")
            lines.append("targets: " + ", ".join(f"{t} {_num(float(v), True)}" for t, v in
                                                  zip(one["target"].values, mean.target_share.values)))
            lines.append("; ".join(f"{v.replace('_', ' ')} {_num(float(mean[v]))}" for v in _SUMMARY)
                         + "  (mean over steps and sites)")
        else:
            if by == "block":
                if "block" not in one.coords:
                    raise AttnscopeError("by='block': this Dataset has no 'block' coordinate (sites given as arrays, "
                                         "or a trace written before sites recorded their block); use by='site'")
                order = list(dict.fromkeys(one.sortby("depth")["block"].values.tolist() if "depth" in one.coords
                                           else one["block"].values.tolist()))
                mean = one.mean("step").groupby("block").mean().sel(block=order)
            else:
                mean = one.mean("site" if by == "step" else "step")
            labels = [str(t) for t in one["target"].values]
            head = f"{by:<52}" if by in ("site", "block") else f"{by:>4}"
            # per step, the step's timestep last: an img2img run's step 0 is mid-schedule, Heun repeats timesteps
            timed = by == "step" and "timestep" in mean.coords and mean["timestep"].dims == ("step",)
            lines.append(head + "".join(f"{t[:12]:>13}" for t in labels) + "".join(f"{_SHORT[v]:>11}" for v in _SUMMARY)
                         + (f"{'t':>8}" if timed else ""))
            for k, key in enumerate(mean[by].values):
                row = f"{str(key):<52}" if by in ("site", "block") else f"{int(key):>4}"
                row += "".join(f"{_num(float(x), True):>13}" for x in mean.target_share.values[k])
                row += "".join(f"{_num(float(mean[v].values[k])):>11}" for v in _SUMMARY)
                row += f"{float(mean['timestep'].values[k]):>8g}" if timed else ""
                lines.append(row)
        lines.append("")
    return "\n".join(lines).rstrip()


def _sample_label(ds: Any, s: int) -> Any:
    """The ``s``-th sample's label: its ``sample`` coordinate (the trace's sample after ``.isel(sample=[2])``), else ``s``.

    >>> _sample_label(xr.Dataset(coords={"sample": [2, 3]}), 1), _sample_label(xr.Dataset(), 1)
    (3, 1)
    """
    return ds["sample"].values[s].item() if "sample" in ds.coords else s


def _starts_word(words: Any, texts: list[str] | None, i: int) -> bool:
    """Whether token ``i`` begins a word: its word differs from the token before's, or the pieces say so (the token
    before ends a CLIP word, ``</w>``; this one opens a T5 or byte-level word), so "red red" stays two words.

    >>> [_starts_word(["red", "red", "big", "big"], ["red</w>", "red</w>", "bi", "g</w>"], i) for i in range(4)]
    [True, True, True, False]
    """
    if i == 0 or words[i - 1] != words[i]:
        return True
    return texts is not None and (texts[i - 1].endswith("</w>") or texts[i].startswith((T5_SPACE, BYTE_SPACE)))


def convergence_table(ds: Any) -> str:
    """A plain-text table of a :func:`~attnscope.stats.convergence` Dataset: the mean curve per sample
    and the stable step (the suggested TGATE gate step). Gated steps are marked ``gated``.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.stats import convergence_table
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle", seed=0, store=tempfile.mkdtemp() + "/a.zarr",
    ...                  num_inference_steps=4)
    >>> print(convergence_table(ats.stats.convergence(tr, tol=0.2)))  # doctest: +ELLIPSIS
    step  ‖C_t − C_t−1‖/‖C_t‖ of the maps, mean over 7 sites (sample 0)
       0  —
    ...
    stable from step 3 (tol 0.2)
    """
    _check_dataset(ds, ("mean_convergence", "stable_step"), ("step", "site", "sample"), "convergence_table",
                   "ats.stats.convergence")
    lines = []
    tol = ds.attrs.get("tol", float("nan"))
    of = ds.attrs.get("of", "maps")
    gated = {int(s) for s in ds.attrs.get("gated_steps", [])}
    for s in range(ds.sizes["sample"]):
        curve = ds.mean_convergence.isel(sample=s)
        lines.append(f"step  {CHANGE_LABELS.get(of, of)} of the {of}, mean over {ds.sizes['site']} sites "
                     f"(sample {_sample_label(ds, s)})")
        top = np.nanmax(curve.values) if np.isfinite(curve.values).any() else 1.0
        for step, v in zip(curve["step"].values, curve.values):
            bar = "" if math.isnan(v) else "#" * int(round(30 * v / top)) if top > 0 else ""
            text = "gated" if int(step) in gated else _num(float(v))
            lines.append(f"{int(step):>4}  {text:<8} {bar}".rstrip())
        stable = int(ds.stable_step.values[s])
        lines.append(f"stable from step {stable} (tol {tol:g})" if stable >= 0 else f"never below tol {tol:g}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _check_dataset(ds: Any, variables: tuple[str, ...], dims: tuple[str, ...], what: str, source: str) -> None:
    """An error naming what ``ds`` lacks, unless it is a Dataset with ``variables`` and ``dims`` (as ``source`` makes)."""
    if not isinstance(ds, xr.Dataset):
        raise AttnscopeError(f"{what}: got {type(ds).__name__}, expected the xarray.Dataset of {source}(...)")
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise AttnscopeError(f"{what}: the Dataset has no variable {missing[0]!r} (its variables are "
                             f"{list(ds.data_vars)}); expected the Dataset of {source}(...)")
    absent = [d for d in dims if d not in ds.dims]
    if absent:
        raise AttnscopeError(f"{what}: the Dataset has dims {list(ds.dims)}, expected {list(dims)} among them "
                             f"(select with a list to keep a dim: .isel({absent[0]}=[0]), not .isel({absent[0]}=0))")


def _target_of(one: Any) -> dict[int, str]:
    """Token position → the first target it belongs to (from the ``target_tokens`` mask)."""
    out: dict[int, str] = {}
    if "target_tokens" not in one:
        return out
    for k, label in enumerate(one["target"].values):
        for pos in one["token"].values[one["target_tokens"].values[k]]:
            out.setdefault(int(pos), str(label))
    return out


def _clean(value: Any) -> Any:
    """Nested lists of plain values: NaN → None, ±inf → "inf"/"-inf"."""
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def dominance_json(ds: Any) -> dict[str, Any]:
    """The Dataset as plain JSON-able data: dims, coordinates, variables (NaN → null, inf → "inf").

    >>> import numpy as np, xarray as xr
    >>> from attnscope.stats import dominance_json
    >>> dominance_json(xr.Dataset({"gini": (("step",), np.array([0.5, np.nan]))}, coords={"step": [0, 1]}))
    {'dims': {'step': 2}, 'coords': {'step': {'dims': ['step'], 'data': [0, 1]}}, 'data_vars': {'gini': {'dims': ['step'], 'data': [0.5, None]}}, 'attrs': {}}
    """
    def var(v: Any) -> dict[str, Any]:
        return {"dims": list(v.dims), "data": _clean(np.asarray(v.values).tolist())}

    return {"dims": {k: int(v) for k, v in ds.sizes.items()},
            "coords": {k: var(v) for k, v in ds.coords.items()},
            "data_vars": {k: var(v) for k, v in ds.data_vars.items()},
            "attrs": {k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in ds.attrs.items()}}
