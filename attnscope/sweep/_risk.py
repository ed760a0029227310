"""The early warning over a sweep: each run's risk features and risk, and a risk model fitted to a sweep.

:class:`NeglectFeatureRows` and :class:`NeglectRiskRow` are per-trace reductions for ``map_stats``;
:func:`fit_neglect_risk` fits a risk model for your own model and prompts from a sweep whose runs
carry their outcome (on the shapes model, the detector's ``all_present``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AttnscopeError
from ._summaries import Targets, targets_of

__all__ = ["NeglectFeatureRows", "NeglectRiskRow", "fit_neglect_risk"]


@dataclass(frozen=True)
class NeglectFeatureRows:
    """``ats.stats.neglect_features`` of one trace at several steps: one row per step and sample.

    Parameters
    ----------
    targets : list of str, "objects", or a function prompt -> list of str
        One phrase per object; ``"objects"``: each shapes-world prompt's object phrases.
    steps : list of int
        The steps (default 0-9).

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=4)
    >>> rows = NeglectFeatureRows("objects", steps=[0, 1])(tr)
    >>> list(rows.step), list(rows.columns[:4])
    ([0, 1], ['step', 'sample', 'share_min', 'share_ratio'])
    """

    targets: Targets = "objects"
    steps: Sequence[int] = tuple(range(10))

    def __call__(self, trace: Any) -> Any:
        from ..stats import NEGLECT_FEATURES, neglect_features

        ds = neglect_features(trace, targets_of(self.targets, trace), step=list(self.steps))
        df = ds[list(NEGLECT_FEATURES)].to_dataframe().reset_index()
        return df[["step", "sample", *NEGLECT_FEATURES]]


@dataclass(frozen=True)
class NeglectRiskRow:
    """``ats.stats.neglect_risk`` of one trace at one step, as a row ``{"neglect_risk": r}`` (sample 0).

    Parameters
    ----------
    targets : list of str, "objects", or a function prompt -> list of str
        As for :class:`NeglectFeatureRows`.
    step : int
        The decision step (default 5).
    model : dict, optional
        A risk model (:func:`fit_neglect_risk`); default the shipped one.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> tr = ats.capture(ats.load_pipeline("shapes"), "a red circle and a blue square", seed=0,
    ...                  store=tempfile.mkdtemp() + "/a.zarr", num_inference_steps=20)
    >>> row = NeglectRiskRow("objects", step=5)(tr)
    >>> list(row), 0 <= row["neglect_risk"] <= 1
    (['neglect_risk'], True)
    """

    targets: Targets = "objects"
    step: int = 5
    model: Any = None

    def __call__(self, trace: Any) -> dict[str, float]:
        from ..stats import neglect_risk

        risk = neglect_risk(trace, targets_of(self.targets, trace), step=self.step, model=self.model)
        return {"neglect_risk": float(risk.values[0])}


def _outcomes(df: Any, missing: Any) -> Any:
    """Each run's outcome (True: an object lost), indexed by run, from a catalog column's name, a mapping or Series
    run -> bool, a column of ``catalog.df`` itself (``cat.df["lost"]``: its index is the row numbers) or one value
    per row of ``catalog.df``; runs without one (None, NaN, pandas' ``<NA>``) are left out.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"run": ["a", "b", "c"], "lost": [True, False, None]})
    >>> _outcomes(df, "lost").to_dict(), _outcomes(df, df["lost"]).to_dict(), _outcomes(df, [0, 1, 1]).to_dict()
    ({'a': True, 'b': False}, {'a': True, 'b': False}, {'a': False, 'b': True, 'c': True})
    >>> _outcomes(df, {"a": "no"})
    Traceback (most recent call last):
    attnscope.errors.AttnscopeError: missing: 'no' for run 'a'; expected True (an object lost) or False, or 1 / 0
    """
    import numbers

    import numpy as np
    import pandas as pd

    runs = df["run"]
    if missing is None:
        if "all_present" not in df.columns:
            raise AttnscopeError("missing=None: the catalog has no 'all_present' column (only sweeps of the shapes "
                                 "model have one); expected missing= a column name, or a bool per run")
        values = ~df.set_index("run")["all_present"].dropna().astype(bool)
    elif isinstance(missing, str):
        if missing not in df.columns:
            raise AttnscopeError(f"missing={missing!r}: the catalog has no such column; it has {list(df.columns)}")
        values = df.set_index("run")[missing]
    elif isinstance(missing, pd.Series) and not missing.index.isin(runs).any() and missing.index.equals(df.index):
        values = pd.Series(missing.to_numpy(), index=runs.to_numpy())  # a column of catalog.df: aligned by its rows
    elif isinstance(missing, (list, tuple, np.ndarray)):
        if len(missing) != len(df):
            raise AttnscopeError(f"missing: {len(missing)} values for the {len(df)} runs of the catalog; expected one "
                                 f"per row of catalog.df, in its order, or a mapping run -> bool")
        values = pd.Series(list(missing), index=runs.to_numpy())
    else:
        values = pd.Series(missing, dtype=object)
    values = values[[not (v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))) for v in values]]
    for run, v in values.items():
        if not (isinstance(v, (bool, np.bool_)) or (isinstance(v, numbers.Real) and v in (0, 1))):
            raise AttnscopeError(f"missing: {v!r} for run {run!r}; expected True (an object lost) or False, or 1 / 0")
    if len(values) and not values.index.isin(runs).any():
        raise AttnscopeError(f"missing: none of its runs ({', '.join(map(repr, values.index[:3]))}"
                             f"{', …' if len(values) > 3 else ''}) is a run of the catalog; expected run ids as in "
                             f"catalog.df.run (e.g. {runs.iloc[0]!r})")
    return values.astype(bool)


def fit_neglect_risk(catalog: Any, missing: Any = None, *, targets: Targets = "objects", steps: Sequence[int] = range(10),
                     l2: float = 1.0, folds: int = 5, client: Any = None, progress: bool = True) -> dict[str, Any]:
    """Fit an early-warning risk model to a sweep: ``neglect_risk(..., model=fit_neglect_risk(cat))``.

    Computes every complete run's :func:`attnscope.stats.neglect_features` at ``steps`` with
    ``catalog.map_stats`` and fits, per step, the logistic model of
    :func:`attnscope.stats.fit_neglect_model` to each run's outcome. Each step's ``auc_cv`` is its
    ROC AUC by cross-validation over prompts (a prompt's seeds stay in one fold): what to expect on
    prompts the model has not seen. The shipped model was fitted this way on the shapes model
    (studies/early_warning.py).

    Parameters
    ----------
    catalog : Catalog
        A sweep's catalog (:func:`attnscope.open_catalog`), one sample per trace.
    missing : str, mapping run -> bool, pandas.Series, list, optional
        Whether each run lost an object (True / False or 1 / 0; None: no outcome): a catalog column's name,
        a mapping or Series by run, a column of ``catalog.df`` itself, or one value per row of ``catalog.df``.
        Default: ``not all_present`` (the shapes model's detector column).
    targets : list of str, "objects", or a function prompt -> list of str
        One phrase per object (``"objects"``: the shapes prompts' object phrases).
    steps : list of int
        The steps to fit a model for (default 0-9).
    l2, folds
        As for :func:`attnscope.stats.fit_neglect_model`.
    client, progress
        As for :meth:`Catalog.map_stats`.

    Returns
    -------
    dict
        The model (JSON-able), with ``auc_cv`` per step.

    Examples
    --------
    >>> import tempfile, attnscope as ats
    >>> from attnscope.testing import tiny_sd_pipeline
    >>> prompts = ["a red circle and a blue square", "a green square and a red triangle",
    ...            "a blue circle and a blue square", "a yellow triangle and a green circle"]
    >>> cat = ats.sweep(tiny_sd_pipeline(), prompts, seeds="0-2", out=tempfile.mkdtemp() + "/s", progress=False,
    ...                 num_inference_steps=2, height=32, width=32)
    >>> lost = {run: i % 3 == 0 for i, run in enumerate(cat.df.run)}    # your outcomes: True = an object lost
    >>> from distributed import Client
    >>> with Client(processes=False, n_workers=1, dashboard_address=None) as client:
    ...     model = fit_neglect_risk(cat, lost, steps=[0, 1], client=client, progress=False)
    >>> sorted(model["steps"]), model["runs"], 0 <= model["steps"]["1"]["auc_cv"] <= 1
    (['0', '1'], 12, True)
    >>> row = NeglectRiskRow("objects", step=1, model=model)(cat.trace(0))   # a trace's risk under this model
    >>> 0 <= row["neglect_risk"] <= 1
    True
    """
    import pandas as pd

    from ..stats import fit_neglect_model

    df = catalog.df
    outcome = _outcomes(df, missing)
    rows = catalog.map_stats(NeglectFeatureRows(targets, tuple(int(s) for s in steps)), client=client,
                             progress=progress)
    if not isinstance(rows, pd.DataFrame) or not len(rows):
        raise AttnscopeError(f"catalog {str(catalog.location)!r}: no complete run gave features "
                             f"({len(getattr(rows, 'attrs', {}).get('skipped', {}))} skipped)")
    if (rows["sample"] != rows["sample"].iloc[0]).any():
        raise AttnscopeError("fit_neglect_risk: a trace holds several samples; expected one sample per run "
                             "(a sweep's traces) so each run has one outcome")
    rows = rows[rows["run"].isin(outcome.index)]
    if not len(rows):
        raise AttnscopeError(f"missing: no run that gave features has an outcome ({len(outcome)} runs have one); "
                             f"expected True / False for the complete runs of catalog.df")
    prompts = df.set_index("run")["prompt"]
    where = f"sweep {str(catalog.location)!r}"
    return fit_neglect_model(rows, outcome, groups=prompts, l2=l2, folds=folds,
                             fitted_on=f"{where}: {rows['run'].nunique()} runs, targets {targets!r}")
