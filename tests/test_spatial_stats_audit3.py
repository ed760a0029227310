"""Audit of the spatial statistics and the early-warning risk: hand-computed numbers and one clear error per bad input."""

import numpy as np
import pandas as pd
import pytest

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.stats import NEGLECT_FEATURES


def _feature_table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = pd.DataFrame({name: rng.normal(size=n) for name in NEGLECT_FEATURES})
    rows["run"], rows["step"] = [f"r{i}" for i in range(n)], 5
    missing = pd.Series(rows["top_min"].to_numpy() < -0.3, index=rows["run"])
    return rows, missing


def test_spatial_statistics_on_a_non_square_map_by_hand():
    a = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])   # 2 rows × 3 columns, 4 of mass
    # pixel centres: x = 1/6, 1/2, 5/6; y = 1/4, 3/4
    assert ats.stats.peak_to_mean(a).item() == pytest.approx(3.0 / (4.0 / 6))
    assert ats.stats.top_share(a, 0.1).item() == pytest.approx(3.0 / 4)      # ⌈0.1 · 6⌉ = 1 pixel: 3 of 4
    assert ats.stats.top_share(a, 0.2).item() == pytest.approx(1.0)          # ⌈0.2 · 6⌉ = 2 pixels: 3 + 1 of 4
    x, y = ats.stats.centre_of_mass(a)
    assert (x.item(), y.item()) == pytest.approx((0.25 * 0.5 + 0.75 * 5 / 6, 0.25 * 0.25 + 0.75 * 0.75))
    d2 = 0.25 * ((0.5 - x) ** 2 + (0.25 - y) ** 2) + 0.75 * ((5 / 6 - x) ** 2 + (0.75 - y) ** 2)
    assert ats.stats.spread(a).item() == pytest.approx(float(np.sqrt(d2)))
    gated = np.stack([a, np.zeros_like(a), np.full_like(a, np.nan)])   # a map, one without mass, a gated step
    assert np.isnan(ats.stats.peak_to_mean(gated)[1:]).all() and np.isnan(ats.stats.spread(gated)[1:]).all()
    heat = np.zeros((3, 4))
    heat[:, 3] = 1.0                                                   # the right column, touching the border
    assert ats.stats.box_iou(heat, (2, 0, 4, 3)).item() == pytest.approx(3 / 6)
    with pytest.raises(AttnscopeError, match=r"box=\(3, 0, 5, 3\): expected 0 ≤ x0 < x1 ≤ 4"):
        ats.stats.box_iou(heat, (3, 0, 5, 3))                          # outside the map
    with pytest.raises(AttnscopeError, match="expected 0 ≤ x0 < x1"):
        ats.stats.box_iou(heat, (2, 0, 2, 3))                          # degenerate


def test_fit_neglect_model_refuses_outcomes_that_are_not_bools():
    rows, missing = _feature_table()
    # 1 / 0 are the same outcomes as True / False: the same model
    as_bool = ats.stats.fit_neglect_model(rows, missing)
    as_int = ats.stats.fit_neglect_model(rows, missing.astype(int))
    assert as_int["steps"]["5"]["weights"] == pytest.approx(as_bool["steps"]["5"]["weights"])
    assert as_int["missing_rate"] == pytest.approx(missing.mean())
    unknown = missing.astype(float)
    unknown.iloc[:10] = np.nan                       # runs without an outcome were counted as lost (NaN → True)
    with pytest.raises(AttnscopeError, match=r"missing has no outcome for runs \['r0', 'r1', 'r2'\] …"):
        ats.stats.fit_neglect_model(rows, unknown)
    with pytest.raises(AttnscopeError, match=r"missing: 'False' for run 'r0'; expected True"):
        ats.stats.fit_neglect_model(rows, missing.map({True: "True", False: "False"}))   # "False" was True


def test_fit_neglect_model_groups_and_folds_are_checked():
    rows, missing = _feature_table()
    with pytest.raises(AttnscopeError, match=r"groups has no label for runs \['r1', 'r10', 'r11'\]"):
        ats.stats.fit_neglect_model(rows, missing, groups={"r0": "a red circle and a blue square"})
    for folds in (0, 1, 2.5):
        with pytest.raises(AttnscopeError, match=rf"folds={folds!r}: expected an int ≥ 2"):
            ats.stats.fit_neglect_model(rows, missing, folds=folds)
    twice = pd.concat([missing, missing.iloc[:1]])
    with pytest.raises(AttnscopeError, match=r"several outcomes for runs \['r0'\]"):
        ats.stats.fit_neglect_model(rows, twice)


def test_risk_threshold_takes_numpy_scalars():
    risks = [0.05, 0.3, 0.1, 0.6, 0.2]
    # round(0.4 · 5) = 2 flagged: 0.6 and 0.3 lie above 0.2
    assert ats.stats.risk_threshold(risks, np.float32(0.4)) == 0.2
    assert ats.stats.risk_threshold(np.array(risks), np.float64(0.0)) == 0.6          # none above the largest
    theta = ats.stats.risk_threshold(risks, np.int64(1))                              # every run flagged
    assert all(r > theta for r in risks) and theta < 0.05
    with pytest.raises(AttnscopeError, match="flag=np.float32"):
        ats.stats.risk_threshold(risks, np.float32(1.5))


def test_upsample_maps_checks_size():
    maps = np.array([[0.0, 1.0]])
    out = ats.stats.upsample_maps(maps, (np.int64(1), np.int64(4)))   # numpy ints, as from an array's shape
    assert out.tolist() == [[0.0, 0.25, 0.75, 1.0]]                     # align_corners=False by hand
    for size in [(32,), (0, 4), (1.0, 4.0), "32x32", (True, 4)]:
        with pytest.raises(AttnscopeError, match=r"size=.*expected \(height, width\), two positive ints"):
            ats.stats.upsample_maps(maps, size)
    with pytest.raises(AttnscopeError, match=r"size=\(4,\)"):
        ats.stats.upsample_maps(np.zeros((0, 2, 2)), (4,))              # no maps: was [] of the wrong shape


def test_histogram_intersection_leading_axes_must_broadcast():
    a = np.ones((3, 2, 2))
    b = np.zeros((2, 2, 2))
    b[:, 0, 0] = 1.0
    assert ats.stats.histogram_intersection(a, b[0]).tolist() == [0.25, 0.25, 0.25]   # min(¼, 1) + 3·min(¼, 0)
    with pytest.raises(AttnscopeError, match=r"a of shape \(3, 2, 2\) and b of shape \(2, 2, 2\): expected leading"):
        ats.stats.histogram_intersection(a, b)


def test_a_risk_model_with_int_step_keys(shapes, tmp_path):
    tr = ats.capture(shapes, "a red circle and a blue square", seed=0, store=tmp_path / "a.zarr",
                     num_inference_steps=6)
    shipped = ats.stats.neglect_model()
    built = {"features": list(NEGLECT_FEATURES), "steps": {5: shipped["steps"]["5"]}}   # a dict made in Python
    risk = ats.stats.neglect_risk(tr, ["circle", "square"], step=5, model=built)
    feats = ats.stats.neglect_features(tr, ["circle", "square"], step=5)
    p = shipped["steps"]["5"]
    x = np.array([float(feats[name][0]) for name in NEGLECT_FEATURES])
    z = p["weights"][0] + np.dot((x - p["mean"]) / np.array(p["std"]), p["weights"][1:])
    assert float(risk[0]) == pytest.approx(1 / (1 + np.exp(-z)))
