"""ats.stats.map_shape: concentration, centre, spread and overlap of targets' maps, against hand computations."""

import math

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.store import SITE_DIMS

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
TOKS = [SOT, "red</w>", "circle</w>", "blue</w>", "square</w>", EOT]


def maps_da(maps, tokens=TOKS):
    """(step=1, sample=1, head=H, y, x, token) DataArray from an (H, y, x, token) array."""
    a = np.asarray(maps, float)[None, None]
    return xr.DataArray(a, dims=SITE_DIMS, coords={"step": [0], "token_text": (("sample", "token"), [tokens])})


def at(ds, var, label):
    dim = "pair" if var == "overlap" else "target"
    return float(ds[var].isel(step=0, site=0, sample=0).sel({dim: label}))


def test_by_hand_on_a_2x3_map_with_two_heads():
    # circle (token 2): head 0 all on pixel (0, 0); head 1 on (0, 0) and (1, 2) -> mean map [[.75, 0, 0], [0, 0, .25]]
    # square (token 4): both heads uniform over the right column -> [[0, 0, .5], [0, 0, .5]]
    maps = np.zeros((2, 2, 3, 6))
    maps[0, 0, 0, 2] = 1.0
    maps[1, 0, 0, 2] = maps[1, 1, 2, 2] = 0.5
    maps[:, :, 2, 4] = 0.5
    ds = ats.stats.map_shape(maps_da(maps), ["circle", "square"])
    assert at(ds, "peak_to_mean", "circle") == pytest.approx(0.75 / (1 / 6))
    assert at(ds, "peak_to_mean", "square") == pytest.approx(0.5 / (1 / 6))
    assert at(ds, "top_share", "circle") == pytest.approx(0.75)  # ⌈0.1·6⌉ = 1 pixel
    # x centres 1/6, 1/2, 5/6; y centres 1/4, 3/4
    cx, cy = 0.75 * (1 / 6) + 0.25 * (5 / 6), 0.75 * 0.25 + 0.25 * 0.75
    assert at(ds, "centre_x", "circle") == pytest.approx(cx) and at(ds, "centre_y", "circle") == pytest.approx(cy)
    assert at(ds, "centre_x", "square") == pytest.approx(5 / 6) and at(ds, "centre_y", "square") == pytest.approx(0.5)
    d2 = 0.75 * ((1 / 6 - cx) ** 2 + (0.25 - cy) ** 2) + 0.25 * ((5 / 6 - cx) ** 2 + (0.75 - cy) ** 2)
    assert at(ds, "spread", "circle") == pytest.approx(math.sqrt(d2))
    assert at(ds, "spread", "square") == pytest.approx(0.25)
    # overlap: min(circle, square) normalised: only pixel (1, 2): min(.25, .5)
    assert at(ds, "overlap", "circle|square") == pytest.approx(0.25)


def test_top_share_counts_the_largest_pixels_and_phrases_sum_their_tokens():
    maps = np.zeros((1, 2, 2, 6))
    maps[0, :, :, 1] = [[0.4, 0.1], [0.3, 0.2]]   # red
    maps[0, :, :, 2] = [[0.0, 0.2], [0.0, 0.0]]   # circle
    ds = ats.stats.map_shape(maps_da(maps), ["red circle", "red"], fraction=0.25)
    # "red circle" = red + circle = [[.4, .3], [.3, .2]]: top 1 of 4 pixels -> .4 / 1.2
    assert at(ds, "top_share", "red circle") == pytest.approx(0.4 / 1.2)
    assert at(ds, "top_share", "red") == pytest.approx(0.4)
    # overlap of red with red circle: Σ min(red/1, rc/1.2)
    expected = np.minimum(np.array([0.4, 0.1, 0.3, 0.2]), np.array([0.4, 0.3, 0.3, 0.2]) / 1.2).sum()
    assert at(ds, "overlap", "red circle|red") == pytest.approx(expected)


def test_a_map_without_mass_is_nan_and_a_single_target_has_no_pair():
    maps = np.zeros((1, 2, 2, 6))
    maps[0, :, :, 2] = 0.25
    ds = ats.stats.map_shape(maps_da(maps), ["circle", "square"])
    for var in ("peak_to_mean", "top_share", "centre_x", "spread"):
        assert math.isnan(at(ds, var, "square")), var
    assert at(ds, "peak_to_mean", "circle") == 1.0 and at(ds, "spread", "circle") == pytest.approx(math.sqrt(0.125))
    assert math.isnan(at(ds, "overlap", "circle|square"))
    assert ats.stats.map_shape(maps_da(maps), ["circle"]).sizes["pair"] == 0


def test_formulas_on_their_own_and_errors():
    a = np.arange(12, dtype=float).reshape(3, 4)
    assert ats.stats.peak_to_mean(a) == pytest.approx(11 / 5.5)
    assert ats.stats.top_share(a, 0.1) == pytest.approx((11 + 10) / 66)  # ⌈1.2⌉ = 2 pixels
    x, y = ats.stats.centre_of_mass(np.eye(4))
    assert x == pytest.approx(0.5) and y == pytest.approx(0.5)
    assert ats.stats.histogram_intersection(a, a) == pytest.approx(1.0)
    assert ats.stats.histogram_intersection(np.eye(2), 1 - np.eye(2)) == 0.0
    with pytest.raises(AttnscopeError, match="fraction=0"):
        ats.stats.map_shape(maps_da(np.zeros((1, 2, 2, 6))), ["circle"], fraction=0)
    with pytest.raises(AttnscopeError, match="cat"):
        ats.stats.map_shape(maps_da(np.zeros((1, 2, 2, 6))), ["cat"])


@pytest.mark.parametrize("fraction", ["0.1", None, True, 1.5, -0.1])
def test_a_fraction_that_is_not_a_number_in_range_is_one_clear_error(fraction):
    """fraction="0.1" raised a raw TypeError from the comparison."""
    da = maps_da(np.ones((1, 2, 2, 6)))
    with pytest.raises(AttnscopeError, match=rf"fraction={fraction!r}: expected a number in \(0, 1\]"):
        ats.stats.map_shape(da, ["circle"], fraction=fraction)
    with pytest.raises(AttnscopeError, match=rf"fraction={fraction!r}: expected a number in \(0, 1\]"):
        ats.stats.top_share(np.ones((2, 2)), fraction)
    with pytest.raises(AttnscopeError, match=r"threshold='0.4': expected a number in \(0, 1\]"):
        ats.stats.box_iou(np.ones((2, 2)), (0, 0, 1, 1), threshold="0.4")
    assert ats.stats.top_share(np.array([[3.0, 1.0]]), np.float32(0.5)) == pytest.approx(0.75)


@pytest.mark.parametrize("formula", [
    lambda m: ats.stats.peak_to_mean(m),                 # was numpy's AxisError
    lambda m: ats.stats.top_share(m, 0.5),               # was a silent 0.25 (the 1-D map read as 4 maps of 1 pixel)
    lambda m: ats.stats.centre_of_mass(m),
    lambda m: ats.stats.spread(m),
    lambda m: ats.stats.histogram_intersection(m, np.ones((2, 2))),
    lambda m: ats.stats.box_iou(m, (0, 0, 1, 1)),        # was a raw ValueError unpacking the shape
])
def test_a_map_without_y_and_x_axes_is_one_clear_error(formula):
    with pytest.raises(AttnscopeError, match=r"of shape \(4,\): expected \(\.\.\., y, x\) maps, at least 2 dims"):
        formula(np.array([4.0, 3.0, 2.0, 1.0]))
    with pytest.raises(AttnscopeError, match=r"of shape \(\): expected \(\.\.\., y, x\) maps"):
        formula(np.float64(1.0))


def test_on_a_captured_trace_the_spatial_control_moves_the_centres_apart(shapes, tmp_path):
    """With a layout putting the circle left and the square right, the circle's centre of mass ends left of the
    square's at the last step (mean over sites), on seeds where it was not before."""
    prompt = "a red circle to the left of a blue square"
    layout = ats.regulate.layout_from_prompt(prompt)
    gaps = []
    for seed in (0, 1):
        tr = ats.capture(shapes, prompt, seed=seed, store=tmp_path / f"p{seed}.zarr", num_inference_steps=8)
        laid = ats.rerun(tr, [ats.regulate.SpatialTemporal(layout)], pipe=shapes, store=tmp_path / f"l{seed}.zarr")
        for run in (tr, laid):
            cx = ats.stats.map_shape(run, ["circle", "square"]).centre_x.isel(step=-1, sample=0).mean("site")
            gaps.append(float(cx.sel(target="square") - cx.sel(target="circle")))
    plain, controlled = gaps[0::2], gaps[1::2]
    assert all(c > 0 for c in controlled), gaps
    assert sum(controlled) > sum(plain), gaps


def test_box_iou_by_hand_and_errors():
    heat = np.zeros((4, 6))
    heat[1:3, 2:5] = [[1.0, 0.5, 0.3], [0.9, 0.45, 0.1]]   # at τ = 0.4: 4 hot pixels, columns 2–3
    assert ats.stats.box_iou(heat, (2, 1, 4, 3)) == pytest.approx(1.0)
    assert ats.stats.box_iou(heat, (2, 1, 5, 3)) == pytest.approx(4 / 6)
    assert ats.stats.box_iou(heat, (0, 0, 2, 4)) == 0.0
    assert ats.stats.box_iou(heat, (2, 1, 5, 3), threshold=0.25) == pytest.approx(5 / 6)
    assert math.isnan(float(ats.stats.box_iou(np.zeros((2, 2)), (0, 0, 1, 1))))
    with pytest.raises(AttnscopeError, match="expected 0 ≤ x0 < x1 ≤ 6"):
        ats.stats.box_iou(heat, (3, 1, 3, 2))
    with pytest.raises(AttnscopeError, match="threshold=0"):
        ats.stats.box_iou(heat, (2, 1, 4, 3), threshold=0)


def test_heat_maps_sit_on_their_own_objects_on_the_shapes_model(shapes, tmp_path):
    """The IoU of each word's heat map with its own object's box beats the IoU with the other object's box."""
    from attnscope.models import heatmap_iou
    from attnscope.models.shapes import detect

    own, other = [], []
    for seed in range(4):
        tr = ats.capture(shapes, "a red circle and a blue square", seed=seed, store=tmp_path / f"{seed}.zarr",
                         num_inference_steps=10)
        table = heatmap_iou(tr)
        found = {(o.colour, o.shape): o.box for o in detect(tr.images[0])}
        if not table.detected.all():
            continue
        for (_, row), swap in zip(table.iterrows(), [("blue", "square"), ("red", "circle")]):
            own.append(row.iou)
            heat = ats.plot.word_maps(tr, [row.word]).values[0]
            other.append(float(ats.stats.box_iou(heat, found[swap])))
    assert len(own) >= 4, own
    assert np.mean(own) > np.mean(other) + 0.1, (own, other)
