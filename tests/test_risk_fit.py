"""Fitting an early-warning model: roc_auc against pair counting, the logistic fit against its optimality
condition and known weights, fit_neglect_model's output against neglect_risk, the rank threshold, and
fit_neglect_risk / NeglectFeatureRows on a real sweep."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.stats import NEGLECT_FEATURES, fit_neglect_model, neglect_features, neglect_risk, risk_threshold, roc_auc
from attnscope.stats._risk_fit import fit_logistic, logistic_score
from attnscope.sweep import NeglectFeatureRows, NeglectRiskRow


def _pair_auc(score, positive):
    """The AUC by its definition: over all (positive, negative) pairs, 1 if the positive scores higher, ½ on a tie."""
    pos = [s for s, p in zip(score, positive) if p]
    neg = [s for s, p in zip(score, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_pair_counting_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        score = rng.integers(0, 5, size=17).astype(float)  # many ties
        positive = rng.random(17) < 0.4
        if positive.all() or not positive.any():
            continue
        assert roc_auc(score, positive) == pytest.approx(_pair_auc(score, positive), abs=1e-12)
    assert roc_auc([1, 2, 3], [False, True, True]) == 1.0 and roc_auc([3, 2, 1], [False, True, True]) == 0.0
    assert np.isnan(roc_auc([1, 2], [True, True]))
    with pytest.raises(AttnscopeError, match="1-d arrays of one length"):
        roc_auc([1, 2, 3], [True, False])


def test_fit_logistic_meets_its_optimality_condition_and_recovers_known_weights():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    true = np.array([-0.5, 1.5, -1.0, 0.0])  # on standardised columns
    z = np.c_[np.ones(len(x)), (x - x.mean(0)) / x.std(0)]
    y = rng.random(len(x)) < 1 / (1 + np.exp(-z @ true))
    for l2 in (0.0, 10.0):
        mean, std, w = fit_logistic(x, y, l2=l2)
        p = 1 / (1 + np.exp(-logistic_score((mean, std, w), x)))
        grad = z.T @ (p - y) + np.r_[0.0, np.full(3, l2)] * w  # the penalised log-loss's gradient: zero at the optimum
        assert np.abs(grad).max() < 1e-6
    mean, std, w = fit_logistic(x, y, l2=0.0)
    assert np.allclose(w, true, atol=0.15)  # 4000 samples: the MLE is within a few standard errors


def _feature_table(n=80, seed=3):
    rng = np.random.default_rng(seed)
    rows = []
    for step in (4, 5):
        table = pd.DataFrame({name: rng.normal(size=n) for name in NEGLECT_FEATURES})
        table["run"], table["step"] = [f"r{i}" for i in range(n)], step
        rows.append(table)
    return pd.concat(rows, ignore_index=True)


def test_fit_neglect_model_gives_a_model_neglect_risk_uses():
    table = _feature_table()
    step5 = table[table.step == 5].set_index("run")
    missing = pd.Series(step5["top_min"] + 0.3 * step5["overlap"] < -0.2, index=step5.index)
    groups = {run: f"prompt{i // 4}" for i, run in enumerate(step5.index)}
    model = fit_neglect_model(table, missing, groups=groups, fitted_on="hand-made")
    assert sorted(model["steps"]) == ["4", "5"] and model["fitted_on"] == "hand-made" and model["runs"] == 80
    assert model["missing_rate"] == pytest.approx(missing.mean())
    assert model["steps"]["5"]["auc_cv"] > 0.85 and 0.2 < model["steps"]["4"]["auc_cv"] < 0.8  # step 4 is noise
    # the model drives neglect_risk: the risk of hand-made maps equals σ(w0 + Σ w (x - μ)/σ) of their features
    maps = np.random.default_rng(4).random((6, 2, 1, 4, 4, 4))
    maps /= maps.sum(-1, keepdims=True)
    da = xr.DataArray(maps, dims=("step", "sample", "head", "y", "x", "token"),
                      coords={"token_text": ("token", ["<|startoftext|>", "circle</w>", "square</w>", "and</w>"])})
    feats = neglect_features({"s": da}, ["circle", "square"], step=5)
    x = np.stack([feats[name].values for name in NEGLECT_FEATURES], axis=1)
    m = model["steps"]["5"]
    expected = 1 / (1 + np.exp(-(m["weights"][0] + ((x - m["mean"]) / np.array(m["std"])) @ m["weights"][1:])))
    assert np.allclose(neglect_risk({"s": da}, ["circle", "square"], step=5, model=model).values, expected)


def test_fit_neglect_model_refuses_bad_input():
    table = _feature_table()
    missing = pd.Series(np.arange(80) % 2 == 0, index=[f"r{i}" for i in range(80)])
    with pytest.raises(AttnscopeError, match=r"lacks columns \['top_min'\]"):
        fit_neglect_model(table.drop(columns="top_min"), missing)
    with pytest.raises(AttnscopeError, match="no outcome for runs"):
        fit_neglect_model(table, missing.iloc[:70])
    with pytest.raises(AttnscopeError, match="expected runs of both outcomes"):
        fit_neglect_model(table, missing & False)
    with pytest.raises(AttnscopeError, match="expected a pandas DataFrame"):
        fit_neglect_model(table.to_dict(), missing)


def test_risk_threshold_flags_the_share_asked():
    risks = np.random.default_rng(5).random(37)
    for flag in (0.0, 0.1, 0.4, 0.5, 0.99, 1.0):
        theta = risk_threshold(risks, flag)
        assert (risks > theta).sum() == round(flag * 37)
    # ties at the threshold are not flagged: fewer than asked, never more
    assert (np.array([0.1, 0.5, 0.5, 0.5, 0.9]) > risk_threshold([0.1, 0.5, 0.5, 0.5, 0.9], 0.4)).sum() == 1
    for bad in (-0.1, 1.5, True, "0.4"):
        with pytest.raises(AttnscopeError, match="flag="):
            risk_threshold(risks, bad)
    with pytest.raises(AttnscopeError, match="finite risks"):
        risk_threshold([0.1, float("nan")], 0.5)


def test_neglect_features_of_several_steps_equal_each_step_alone(shapes, tmp_path):
    tr = ats.capture(shapes, "a red circle and a blue square", seed=3, store=tmp_path / "a.zarr", num_inference_steps=20)
    many = neglect_features(tr, ["red circle", "blue square"], step=[2, 5])
    assert many["top_min"].dims == ("step", "sample")
    for k in (2, 5):
        one = neglect_features(tr, ["red circle", "blue square"], step=k)
        for name in NEGLECT_FEATURES:
            assert np.allclose(many[name].sel(step=k).values, one[name].values, equal_nan=True), name
    rows = NeglectFeatureRows("objects", steps=[2, 5])(tr)
    assert list(rows.step) == [2, 5] and rows.loc[1, "top_min"] == pytest.approx(float(many["top_min"].sel(step=5)[0]))
    risk = NeglectRiskRow("objects", step=5)(tr)
    assert risk["neglect_risk"] == pytest.approx(float(neglect_risk(tr, ["red circle", "blue square"], step=5)[0]))


def test_fit_neglect_risk_on_a_real_sweep(tmp_path):
    from distributed import Client

    from attnscope.sweep import fit_neglect_risk
    from attnscope.testing import tiny_sd_pipeline

    prompts = ["a red circle and a blue square", "a green square and a red triangle",
               "a blue circle and a blue square", "a yellow triangle and a green circle"]
    cat = ats.sweep(tiny_sd_pipeline(), prompts, seeds="0-2", out=tmp_path / "s", progress=False,
                    num_inference_steps=3, height=32, width=32)
    runs = list(cat.df.run)
    lost = {run: i % 3 == 0 for i, run in enumerate(runs)}
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        model = fit_neglect_risk(cat, lost, steps=[1, 2], client=client, progress=False)
        # the features it fitted on are each trace's neglect_features: refit from those by hand gives the same model
        table = pd.concat([NeglectFeatureRows("objects", steps=[1, 2])(cat.trace(r)).assign(run=r)
                           for r in runs])
        by_hand = fit_neglect_model(table, lost, groups=dict(zip(cat.df.run, cat.df.prompt)))
        assert np.allclose(model["steps"]["2"]["weights"], by_hand["steps"]["2"]["weights"])
        assert model["runs"] == 12 and "sweep" in model["fitted_on"]
        # a catalog column works as the outcome; a catalog of another model has no all_present to default to
        with pytest.raises(AttnscopeError, match="no 'all_present' column"):
            fit_neglect_risk(cat, steps=[1], client=client, progress=False)
        with pytest.raises(AttnscopeError, match="missing='lost': the catalog has no such column"):
            fit_neglect_risk(cat, "lost", steps=[1], client=client, progress=False)
    risk = NeglectRiskRow("objects", step=2, model=model)(cat.trace(runs[0]))["neglect_risk"]
    assert 0 <= risk <= 1


def test_labels_of_one_kind_fit_without_a_singular_matrix():
    """Every label the same (a tiny sweep): the intercept runs off to infinity and the Newton step's matrix became
    singular (numpy.linalg.LinAlgError); now the fit saturates at that label."""
    from attnscope.stats._risk_fit import fit_logistic, logistic_score

    x = np.zeros((3, 1))
    for label in (0, 1):
        model = fit_logistic(x, np.full(3, label), l2=1.0)
        p = 1 / (1 + np.exp(-logistic_score(model, x)))
        np.testing.assert_allclose(p, label, atol=1e-6)
