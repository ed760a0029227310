"""Audit of attnscope.stats (third pass): each test checks a defect found by using the statistics on real shapes
traces (two prompts × two images, both guidance branches) against numbers computed here by hand with numpy."""

import numpy as np
import pytest

import attnscope as ats
from attnscope.errors import AttnscopeError

PROMPTS = ["a red circle and a blue square", "a green triangle above a yellow circle"]


@pytest.fixture(scope="module")
def trace(shapes, tmp_path_factory):
    """Two prompts × two images, 4 steps, both branches (no negative prompt: the uncond branch's prompt is "")."""
    return ats.capture(shapes, PROMPTS, seed=[0, 1, 2, 3], num_images_per_prompt=2, branch="both",
                       store=tmp_path_factory.mktemp("audit3") / "t.zarr", num_inference_steps=4)


def _maps(da):
    """Head-averaged maps (step, sample, y, x, token) in float64, and per sample the token strings and roles."""
    n, t = da.sizes["sample"], da.sizes["token"]
    texts = np.broadcast_to(np.asarray(da["token_text"].values), (n, t))
    roles = np.broadcast_to(np.asarray(da["token_role"].values), (n, t))
    return da.values.astype(np.float64).mean(2), texts, roles


def _target_shares_by_hand(trace, step, words):
    """(sample, target) mean over sites of Σ_{i∈target} S_i / Σ_{j∈words} S_j at ``step``."""
    per_site = []
    for site in trace.sites:
        a, texts, roles = _maps(trace.attention(site).sel(step=[step]))
        s = a[0].sum((1, 2))  # sample, token
        out = np.zeros((len(s), len(words)))
        for n in range(len(s)):
            prompt = roles[n] == "word"
            for k, w in enumerate(words):
                out[n, k] = s[n][(texts[n] == f"{w}</w>") & prompt].sum() / s[n][prompt].sum()
        per_site.append(out)
    return np.mean(per_site, 0)


def test_early_warning_features_of_several_steps_are_labelled_with_the_steps_they_were_computed_at(trace):
    # the steps were given out of run order and counted from the end: each row must still be its own step's
    features = ats.stats.neglect_features(trace, ["circle", "a"], step=[3, -3])
    assert features["step"].values.tolist() == [1, 3]  # run order, as every statistic (-3 of 4 steps is 1)
    for step in (1, 3):
        by_hand = _target_shares_by_hand(trace, step, ["circle", "a"]).min(1)
        np.testing.assert_allclose(features["share_min"].sel(step=step).values, by_hand, rtol=1e-5)
    one = ats.stats.neglect_features(trace, ["circle", "a"], step=-1)
    assert one.attrs["step"] == 3
    np.testing.assert_allclose(one["share_min"].values, _target_shares_by_hand(trace, 3, ["circle", "a"]).min(1),
                               rtol=1e-5)
    twice = ats.stats.neglect_features(trace, ["circle", "a"], step=[2, 2])  # repeats merged, not a crash
    assert twice["step"].values.tolist() == [2]


def test_convergence_joins_sites_captured_at_different_steps_on_their_union(trace):
    first, second = trace.sites[0], trace.sites[-1]
    arrays = {first: trace.attention(first).sel(step=[0, 1, 2]), second: trace.attention(second).sel(step=[1, 2, 3])}
    conv = ats.stats.convergence(arrays)
    assert conv["step"].values.tolist() == [0, 1, 2, 3]
    for name, da in arrays.items():
        a = _maps(da)[0]
        steps = da["step"].values.tolist()
        for i in range(1, len(steps)):
            change = np.sqrt(((a[i] - a[i - 1]) ** 2).sum((1, 2, 3))) / np.sqrt((a[i] ** 2).sum((1, 2, 3)))
            np.testing.assert_allclose(conv.convergence.sel(site=name, step=steps[i]).values, change, rtol=1e-4)
        absent = sorted({0, 1, 2, 3} - set(steps[1:]))  # a site's first step and the steps it lacks
        assert np.isnan(conv.convergence.sel(site=name, step=absent).values).all()
    np.testing.assert_allclose(conv.timestep.values, trace.attention(first)["timestep"].values)
    # sites of different lengths: a result, not a numpy shape error
    uneven = ats.stats.convergence({first: trace.attention(first).sel(step=[0, 1]), second: trace.attention(second)})
    assert uneven["step"].values.tolist() == [0, 1, 2, 3]
    assert np.isnan(uneven.convergence.sel(site=first, step=[2, 3]).values).all()


def test_an_empty_prompt_has_nan_statistics_over_p_and_all_its_mass_on_the_sink(trace):
    # the uncond branch of a run without a negative prompt: SOT, EOT and padding only, no word
    arrays = {site: trace.attention(site, "uncond") for site in trace.sites}
    ds = ats.stats.dominance(arrays, targets=[0, 1])
    assert ds.sizes["token"] == 0
    for name in ("target_share", "dominance_ratio", "entropy", "gini"):
        assert np.isnan(ds[name].values).all(), name
    np.testing.assert_allclose(ds.sink_share.values, 1.0)  # no word: 1 − 0 / total
    # with the specials counted, P is every position: the statistics exist and match the maps
    a, _, _ = _maps(arrays[trace.sites[0]])
    special = ats.stats.dominance(arrays, targets=[0, 1], include_special=True).sel(site=trace.sites[0])
    s = a.sum((2, 3))
    np.testing.assert_allclose(special.target_share.transpose("step", "sample", "target").values,
                               s[..., :2] / s.sum(-1, keepdims=True), rtol=1e-5)


def test_map_sums_of_a_map_with_no_prompt_token_count_no_pixel():
    a = np.array([[0.7, 0.3], [0.4, 0.6]]).reshape(1, 1, 2, 2)  # head, y, x, token: two pixels, SOT and EOT
    none = np.array([False, False])
    sums = ats.stats.map_sums(a, none, none)
    np.testing.assert_allclose(sums, [1.1, 0.9, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0])  # S, no argmax or entropy or pixel on P
    assert np.isnan(ats.stats.entropy(sums)) and ats.stats.sink_share(sums, none) == 1.0


def test_roc_auc_refuses_nan_scores_instead_of_ranking_them_first():
    # a NaN score (a run whose features are undefined) used to rank above every other score: AUC 1.0 here
    with pytest.raises(AttnscopeError, match=r"score: 1 of 4 scores are NaN \(at positions \[0\]\)"):
        ats.stats.roc_auc([np.nan, 0.2, 0.3, 0.1], [True, False, True, False])
    assert ats.stats.roc_auc([np.inf, 0.2, 0.3, -np.inf], [True, False, True, False]) == 1.0  # infinities rank


def test_tables_name_each_sample_by_its_coordinate(trace):
    ds = ats.stats.dominance(trace, targets=["circle"])
    table = ats.stats.dominance_table(ds.isel(sample=[2]))
    assert table.splitlines()[0] == f"sample 2: {PROMPTS[1]!r}"
    assert ats.stats.dominance_table(ds).splitlines()[0] == f"sample 0: {PROMPTS[0]!r}"
    conv = ats.stats.convergence(trace, tol=0.5).isel(sample=[3])
    assert "(sample 3)" in ats.stats.convergence_table(conv).splitlines()[0]
