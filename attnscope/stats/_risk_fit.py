"""Fitting and judging a risk model: ROC AUC, an L2-regularised logistic regression, a rank threshold.

:func:`fit_neglect_model` turns a table of :func:`attnscope.stats.neglect_features` (one row per run
and step) and each run's outcome into a model :func:`attnscope.stats.neglect_risk` takes as
``model=``: per step, the standardisation and the weights, with the model's ROC AUC by
cross-validation over prompts. :func:`risk_threshold` picks the threshold that flags a given share
of a sweep's runs: a rule that holds when the risk's level shifts between prompt sets, where an
absolute threshold does not (docs/sweep.md, "The early warning").
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import AttnscopeError

__all__ = ["fit_logistic", "fit_neglect_model", "logistic_score", "out_of_fold_scores", "risk_threshold", "roc_auc"]


def roc_auc(score: Any, positive: Any) -> float:
    """ROC AUC of ``score`` for the boolean ``positive``: the chance a positive scores above a negative.

    The Mann-Whitney statistic, ties counted half (``±inf`` rank as the largest and smallest scores). NaN when
    either class is empty. A NaN score ranks nowhere: it is an error (drop those runs first).

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    if score.shape != positive.shape or score.ndim != 1:
        raise AttnscopeError(f"score of shape {score.shape} and labels of shape {positive.shape}: expected two "
                             f"1-d arrays of one length")
    if np.isnan(score).any():
        raise AttnscopeError(f"score: {int(np.isnan(score).sum())} of {len(score)} scores are NaN (at positions "
                             f"{np.flatnonzero(np.isnan(score))[:5].tolist()}); expected numbers: drop those first")
    pos, neg = int(positive.sum()), int((~positive).sum())
    if not pos or not neg:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def fit_logistic(x: Any, y: Any, l2: float = 1.0, iterations: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-regularised logistic regression by Newton steps on standardised columns.

    Returns ``(mean, std, weights)``: the columns' mean and standard deviation and the weights
    ``[w0, w1, …]`` of ``σ(w0 + Σ wᵢ (xᵢ − meanᵢ) / stdᵢ)``; the intercept is not penalised.

    >>> x = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array([0, 0, 1, 1])
    >>> mean, std, w = fit_logistic(x, y, l2=1.0)
    >>> float(mean[0]), bool(w[1] > 0), [round(float(p), 2) for p in 1 / (1 + np.exp(-logistic_score((mean, std, w), x)))]
    (1.5, True, [0.22, 0.4, 0.6, 0.78])
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-12
    z = np.c_[np.ones(len(x)), (x - mean) / std]
    w = np.zeros(z.shape[1])
    penalty = np.r_[0.0, np.full(z.shape[1] - 1, float(l2))]
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:  # separable labels drive the unpenalised intercept's curvature to 0
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return mean, std, w


def logistic_score(model: tuple[Any, Any, Any], x: Any) -> np.ndarray:
    """The logit ``w0 + Σ wᵢ (xᵢ − meanᵢ) / stdᵢ`` of each row of ``x`` under ``model = (mean, std, weights)``."""
    mean, std, w = (np.asarray(v, dtype=np.float64) for v in model)
    return np.c_[np.ones(len(x)), (np.asarray(x, dtype=np.float64) - mean) / std] @ w


def out_of_fold_scores(x: Any, y: Any, groups: Any, folds: int = 5, seed: int = 0, l2: float = 1.0) -> np.ndarray:
    """Each row's logit from a model fitted on the other folds; rows of one group (a prompt) share a fold.

    >>> rng = np.random.default_rng(0); x = rng.normal(size=(40, 2)); y = (x[:, 0] > 0).astype(float)
    >>> roc_auc(out_of_fold_scores(x, y, groups=np.arange(40) // 4), y.astype(bool)) > 0.9
    True
    """
    x, y, groups = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    names = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[i]: j % folds for j, i in enumerate(order)}
    fold = np.array([fold_of[g] for g in groups])
    score = np.empty(len(x))
    for f in range(min(folds, len(names))):
        model = fit_logistic(x[fold != f], y[fold != f], l2)
        score[fold == f] = logistic_score(model, x[fold == f])
    return score


def fit_neglect_model(features: Any, missing: Any, *, groups: Any = None, l2: float = 1.0, folds: int = 5,
                      fitted_on: str = "") -> dict[str, Any]:
    """Fit a :func:`neglect_risk` model: per step, a logistic regression of ``missing`` on the features.

    Parameters
    ----------
    features : pandas.DataFrame
        One row per run and step: a ``run`` and a ``step`` column and one column per name of
        :data:`NEGLECT_FEATURES` (what :class:`attnscope.sweep.NeglectFeatureRows` gives through
        ``map_stats``).
    missing : mapping run → bool, or pandas.Series indexed by run
        Whether the run lost an object (True) — the outcome the risk predicts.
    groups : mapping run → label, optional
        Runs that share a label (their prompt) stay in one fold of the cross-validation, so the
        reported AUC is for prompts the model has not seen. Default: each run its own group.
    l2 : float
        Penalty on the standardised weights (the shipped model: 1).
    folds : int
        Folds of the cross-validation that scores each step's model (``auc_cv``).
    fitted_on : str
        A description stored in the model (what it was fitted on).

    Returns
    -------
    dict
        ``{"features": [...], "steps": {"k": {"mean", "std", "weights", "auc_cv"}}, "fitted_on", "runs",
        "missing_rate"}``, JSON-able: ``json.dump`` it and pass it back as ``neglect_risk(..., model=…)``.

    Examples
    --------
    >>> import pandas as pd
    >>> from attnscope.stats import NEGLECT_FEATURES
    >>> rng = np.random.default_rng(0)
    >>> rows = pd.DataFrame({name: rng.normal(size=60) for name in NEGLECT_FEATURES})
    >>> rows["run"], rows["step"] = [f"r{i}" for i in range(60)], 5
    >>> missing = pd.Series(rows["top_min"].to_numpy() < -0.3, index=rows["run"])   # lost when the weaker map is diffuse
    >>> model = fit_neglect_model(rows, missing)
    >>> list(model["steps"]), model["steps"]["5"]["auc_cv"] > 0.8, model["runs"]
    (['5'], True, 60)
    """
    import pandas as pd

    from ._risk import NEGLECT_FEATURES

    if not isinstance(features, pd.DataFrame):
        raise AttnscopeError(f"features={type(features).__name__}: expected a pandas DataFrame with run, step and "
                             f"{list(NEGLECT_FEATURES)} columns")
    lacking = [c for c in ("run", "step", *NEGLECT_FEATURES) if c not in features.columns]
    if lacking:
        raise AttnscopeError(f"features lacks columns {lacking}: expected run, step and {list(NEGLECT_FEATURES)}")
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral) or folds < 2:
        raise AttnscopeError(f"folds={folds!r}: expected an int ≥ 2 (the cross-validation's folds)")
    outcome = pd.Series(missing) if not isinstance(missing, pd.Series) else missing
    runs = sorted(set(features["run"]))
    twice = sorted(set(outcome.index[outcome.index.duplicated()]) & set(runs))
    if twice:
        raise AttnscopeError(f"missing has several outcomes for runs {twice[:3]}: expected one bool per run")
    unknown = [r for r in runs if r not in outcome.index or pd.isna(outcome.loc[r])]
    if unknown:
        raise AttnscopeError(f"missing has no outcome for runs {unknown[:3]}{' …' if len(unknown) > 3 else ''}: "
                             f"expected one bool per run of features")
    for run in runs:  # "False" or 0.5 would pass astype(bool) as True: the outcome must be a bool or 1 / 0
        value = outcome.loc[run]
        if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Real) and value in (0, 1))):
            raise AttnscopeError(f"missing: {value!r} for run {run!r}; expected True (an object lost) or False, or 1 / 0")
    group_of = pd.Series(groups) if groups is not None else None
    if group_of is not None:
        ungrouped = [r for r in runs if r not in group_of.index]
        if ungrouped:
            raise AttnscopeError(f"groups has no label for runs {ungrouped[:3]}{' …' if len(ungrouped) > 3 else ''}: "
                                 f"expected one label (the run's prompt) per run of features")
    steps: dict[str, Any] = {}
    for step, table in sorted(features.groupby("step"), key=lambda kv: int(kv[0])):
        table = table.drop_duplicates("run").set_index("run")
        x = table[list(NEGLECT_FEATURES)].to_numpy(np.float64)
        keep = np.isfinite(x).all(1)
        x, index = x[keep], table.index[keep]
        y = outcome.loc[index].astype(bool).to_numpy()
        if y.all() or not y.any():
            raise AttnscopeError(f"step {step}: all {len(y)} runs have missing={bool(y[0]) if len(y) else None}; "
                                 f"expected runs of both outcomes to fit a risk")
        mean, std, w = fit_logistic(x, y, l2)
        g = group_of.loc[index].to_numpy() if group_of is not None else np.arange(len(index))
        cv = roc_auc(out_of_fold_scores(x, y, g, folds=int(folds), l2=l2), y)
        steps[str(int(step))] = {"mean": mean.tolist(), "std": std.tolist(), "weights": w.tolist(), "auc_cv": cv,
                                 "runs": int(len(y)), "dropped_non_finite": int((~keep).sum())}
    return {"features": list(NEGLECT_FEATURES), "steps": steps, "fitted_on": fitted_on or f"{len(runs)} runs",
            "runs": len(runs), "missing_rate": float(outcome.loc[runs].astype(bool).mean())}


def risk_threshold(risks: Sequence[float] | Any, flag: float) -> float:
    """The threshold θ above which the share ``flag`` of ``risks`` lie: regulate the riskiest ``flag`` of a sweep.

    ``risk > θ`` holds for ``round(flag · n)`` of the ``n`` risks (fewer when risks tie at θ). A rank
    rule like this carries over between prompt sets where an absolute θ does not: the risk's level
    shifts with the prompts (docs/sweep.md).

    >>> risk_threshold([0.05, 0.3, 0.1, 0.6, 0.2], flag=0.4)
    0.2
    >>> [r > 0.2 for r in [0.05, 0.3, 0.1, 0.6, 0.2]]
    [False, True, False, True, False]
    """
    values = np.asarray(risks, dtype=np.float64).ravel()
    if isinstance(flag, (bool, np.bool_)) or not isinstance(flag, numbers.Real) or not 0 <= flag <= 1:
        raise AttnscopeError(f"flag={flag!r}: expected the share of runs to flag, in [0, 1]")
    if not len(values) or not np.isfinite(values).all():
        raise AttnscopeError(f"risks: expected one or more finite risks, got {len(values)} values "
                             f"({int((~np.isfinite(values)).sum())} not finite)")
    ordered = np.sort(values)[::-1]
    n = int(round(flag * len(values)))
    if n >= len(values):
        return float(np.nextafter(ordered[-1], -np.inf))
    return float(ordered[n])
