"""``ats.stats.region_share`` and the layout outlines of ``ats.plot.heatmaps``: values by hand on small made-up
maps, the same masks and token positions as the spatial control, non-square maps, errors, a real rerun."""

import math

import numpy as np
import pytest
import torch
import xarray as xr
from matplotlib.patches import Ellipse, Rectangle

import attnscope as ats
import attnscope.plot as plot
from attnscope.errors import AttnscopeError
from attnscope.regulate import region_mask as control_mask
from attnscope.store import SITE_DIMS

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# positions:  0    1        2          3            4          5        6             7
TOKS = [SOT, "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "square</w>", EOT]
LAYOUT = {"a red circle": (0.0, 0.0, 0.34, 1.0),  # the left column of a 2×3 map
          "a square": (0.8, 0.25)}  # a disk of radius 0.2 holding pixel (row 0, col 2) only


def hand_maps():
    """(step=2, sample=1, head=2, y=2, x=3, token=8): step 0 made up by hand; step 1 has no mass on the circle."""
    a = np.zeros((2, 1, 2, 2, 3, len(TOKS)))
    a[:, 0, :, :, :, 0] = 0.5  # SOT everywhere: not a phrase token
    a[:, 0, :, :, :, 1] = [[0, 5, 5], [0, 5, 5]]  # the article of "a red circle", outside its box: dropped
    a[:, 0, :, :, :, 5] = 7.0  # the other "a": not in the layout
    a[0, 0, :, :, :, 2] = [[1, 0, 0], [0, 0, 1]]  # red, both heads
    a[0, 0, 0, :, :, 3] = [[2, 0, 0], [0, 2, 0]]  # circle, head 0 only: head mean [[1, 0, 0], [0, 1, 0]]
    a[0, 0, 0, :, :, 6] = [[0, 2, 6], [0, 0, 2]]  # square, head 0 only: head mean [[0, 1, 3], [0, 0, 1]]
    a[1, 0, :, :, :, 6] = 1.0  # step 1: the square everywhere, the circle nowhere
    return xr.DataArray(a, dims=SITE_DIMS, name="site",
                        coords={"step": [0, 1], "token_text": (("sample", "token"), [TOKS])})


def test_share_by_hand_on_a_non_square_map():
    ds = ats.stats.region_share(hand_maps(), LAYOUT)
    assert dict(ds.sizes) == {"step": 2, "site": 1, "sample": 1, "phrase": 2}
    assert ds.region_share.dims == ("step", "site", "sample", "phrase")
    assert list(ds.phrase.values) == ["a red circle", "a square"]
    share = ds.region_share.isel(site=0, sample=0)
    # circle: red 1 + circle 1 inside the left column, of red 2 + circle 2; square: 3 of 1 + 3 + 1
    assert share.sel(step=0).values.tolist() == pytest.approx([2 / 4, 3 / 5])
    assert math.isnan(float(share.sel(step=1, phrase="a red circle")))  # no mass: NaN, not 0
    assert float(share.sel(step=1, phrase="a square")) == pytest.approx(1 / 6)
    assert ds.region_area.isel(site=0).values.tolist() == pytest.approx([2 / 6, 1 / 6])
    assert ds.phrase_tokens.values.tolist() == [["red</w> circle</w>", "square</w>"]]
    assert ds.attrs["layout"] == {"a red circle": [0.0, 0.0, 0.34, 1.0], "a square": [0.8, 0.25]}
    # the mean over steps skips the NaN step
    mean = ds.region_share.mean(["step", "site"]).values.tolist()
    assert mean == [[pytest.approx(0.5), pytest.approx((0.6 + 1 / 6) / 2)]]


def test_a_larger_radius_and_a_chunked_array_give_the_same_as_by_hand():
    da = hand_maps()
    # pixel centres x = 1/6, 1/2, 5/6 and y = 1/4, 3/4: distances from (0.8, 0.25) are 0.633, 0.3, 0.033 in row 0
    # and 0.81, 0.58, 0.5 in row 1, so a radius of 0.35 adds pixel (0, 1): the square's 1 + 3 of 5
    wide = ats.stats.region_share(da, {"a square": (0.8, 0.25)}, radius=0.35)
    assert float(wide.region_share.isel(step=0, site=0, sample=0, phrase=0)) == pytest.approx(4 / 5)
    lazy = ats.stats.region_share(da.chunk({"step": 1}), LAYOUT)
    xr.testing.assert_allclose(lazy.region_share, ats.stats.region_share(da, LAYOUT).region_share)


@pytest.mark.parametrize("shape", [(1, 1), (2, 4), (3, 5), (5, 2), (4, 6), (7, 3), (8, 8), (16, 16), (64, 64),
                                   (32, 48)])
def test_masks_are_the_control_s_masks(shape):
    regions = [(0.0, 0.0, 0.5, 1.0), (0.05, 0.25, 0.45, 0.75), (0.55, 0.25, 0.95, 0.75), (0.25, 0.25, 0.75, 0.75),
               (0.0, 0.0, 1.0, 1.0), (0.125, 0.375, 0.625, 0.875), (0.5, 0.5), (0.25, 0.75), (0.1, 0.9), (0.3, 0.3)]
    for region in regions:
        for radius in (0.2, 0.35, 0.125):
            ours = ats.stats.region_mask(region, shape, radius)
            assert ours.shape == shape and ours.dtype == bool
            theirs = control_mask(region, shape, radius).reshape(shape).numpy().astype(bool)
            assert np.array_equal(ours, theirs), (region, shape, radius)


def test_non_square_maps_against_the_control_s_mask_and_a_direct_sum():
    rng = np.random.default_rng(0)
    tokens = [SOT, "a</w>", "blue</w>", "tri", "angle</w>", "above</w>", "the</w>", "red</w>", "circle</w>", EOT, EOT]
    layout = {"a blue triangle": (0.1, 0.0, 0.9, 0.45), "the red circle": (0.5, 0.75)}
    for h, w in ((3, 5), (5, 2), (4, 12)):
        a = rng.random((3, 2, 4, h, w, len(tokens)))  # step, sample, head, y, x, token
        da = xr.DataArray(a, dims=SITE_DIMS,
                          coords={"step": [0, 1, 2], "token_text": (("sample", "token"), [tokens] * 2)})
        ds = ats.stats.region_share(da, layout)
        assert ds.phrase_tokens.values[0].tolist() == ["blue</w> tri angle</w>", "red</w> circle</w>"]
        maps = a.mean(2).reshape(3, 2, h * w, len(tokens))  # heads averaged
        for k, (region, cols) in enumerate(zip(layout.values(), ([2, 3, 4], [7, 8]))):
            mass = torch.from_numpy(maps[..., cols].sum(-1))
            expected = (mass * control_mask(region, (h, w)).double()).sum(-1) / mass.sum(-1)
            np.testing.assert_allclose(ds.region_share.isel(site=0, phrase=k).values, expected.numpy())
            area = float(control_mask(region, (h, w)).mean())
            assert float(ds.region_area.isel(site=0, phrase=k)) == pytest.approx(area)


def test_phrase_tokens_by_hand():
    clip = [SOT, "the</w>", "big</w>", "ele", "phant</w>", "and</w>", "a</w>", "red</w>", "circle</w>", "and</w>",
            "a</w>", "red</w>", "circle</w>", EOT]
    t5 = ["\u2581A", "\u2581red", "\u2581cir", "cle", "\u2581and", "\u2581an", "\u2581apple", "</s>", "<pad>"]
    # the first occurrence, leading articles dropped (a phrase that is only an article keeps it), by hand
    cases = [(clip, {"the big elephant": [2, 3, 4], "a red circle": [7, 8], "red circle": [7, 8], "a": [6],
                     "circle and a": [8, 9, 10]}),
             (t5, {"a red circle": [1, 2, 3], "an apple": [6], "apple": [6], "A": [0]})]
    for tokens, expected in cases:
        assert ats.stats.layout_tokens(tokens, list(expected)) == expected
    assert ats.stats.layout_tokens(clip, ["a red circle"])["a red circle"] == [7, 8]  # the first occurrence
    assert ats.stats.layout_tokens(clip, ["a blue circle"]) == {"a blue circle": []}


def test_samples_whose_prompt_lacks_a_phrase_get_nan():
    other = [SOT, "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "triangle</w>", EOT]
    a = hand_maps().values[:1].repeat(2, axis=1)
    da = xr.DataArray(a, dims=SITE_DIMS, coords={"step": [0], "token_text": (("sample", "token"), [TOKS, other])})
    share = ats.stats.region_share(da, LAYOUT).region_share.isel(step=0, site=0)
    assert share.values[0].tolist() == pytest.approx([0.5, 0.6])
    assert share.values[1][0] == pytest.approx(0.5) and math.isnan(share.values[1][1])


@pytest.mark.parametrize("layout, message", [
    ({"a green triangle": (0, 0, 1, 1)},
     r"layout phrase 'a green triangle' is not in the prompt 'a red circle and a square'"),
    ({"a red circle": (0.5, 0, 0.2, 1)},
     r"layout\['a red circle'\] = \(0.5, 0, 0.2, 1\): an empty box; expected x0 < x1 and y0 < y1"),
    ({"a red circle": (0.1, 0.2, 0.3)}, r"layout\['a red circle'\] = \(0.1, 0.2, 0.3\): expected a box"),
    ({"a red circle": (0, 0, 1.5, 1)},
     r"layout\['a red circle'\] = \(0, 0, 1.5, 1\): coordinates must lie in \[0, 1\]"),
    ({"a red circle": "left"}, r"layout\['a red circle'\] = 'left': expected a box"),
    ({"a red circle": (True, 0.5)}, r"expected a box"),
    ({}, r"layout=\{\}: expected a mapping"),
    (["a red circle"], r"layout=\['a red circle'\]: expected a mapping"),
    ({3: (0, 0, 1, 1)}, r"layout key 3: expected an object phrase"),
])
def test_bad_layouts_raise_one_error_naming_the_input(layout, message):
    with pytest.raises(AttnscopeError, match=message):
        ats.stats.region_share(hand_maps(), layout)


def test_other_bad_input():
    with pytest.raises(AttnscopeError, match=r"radius=0: expected a number in \(0, 1\]"):
        ats.stats.region_share(hand_maps(), LAYOUT, radius=0)
    with pytest.raises(AttnscopeError, match=r"shape=\(2, 0\): expected \(h, w\)"):
        ats.stats.region_mask((0.5, 0.5), (2, 0))
    with pytest.raises(AttnscopeError, match=r"region = \(0.5,\): expected a box"):
        ats.stats.region_mask((0.5,), (2, 2))
    with pytest.raises(AttnscopeError, match=r"tokens: 3 strings for a token axis of 8"):
        ats.stats.region_share(hand_maps(), LAYOUT, tokens=["a", "b", "c"])
    with pytest.raises(AttnscopeError, match=r"not in this trace|no site|matches no"):
        ats.stats.region_share({"s": hand_maps()}, LAYOUT, sites="up_blocks.*")


# --- a real trace ------------------------------------------------------------------------------------------------
PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def pipe(shapes):
    shapes.set_progress_bar_config(disable=True)
    return shapes


@pytest.fixture(scope="module")
def trace(pipe, tmp_path_factory):
    return ats.capture(pipe, PROMPT, seed=0, store=tmp_path_factory.mktemp("regions") / "a.zarr",
                       num_inference_steps=3)


def test_a_trace_has_block_depth_and_timestep_and_equals_its_values_in_memory(trace):
    layout = ats.regulate.layout_from_prompt(PROMPT)
    ds = ats.stats.region_share(trace, layout, sites="up_blocks.1.*", steps=slice(1, None))
    assert ds.site.values.tolist() == [s for s in trace.sites if s.startswith("up_blocks.1.")]
    assert ds.step.values.tolist() == [1, 2] and "timestep" in ds.coords
    assert set(ds.block.values.tolist()) == {"up"} and "depth" in ds.coords
    assert ds.phrase_tokens.values.tolist() == [["red</w> circle</w>", "blue</w> square</w>"]]
    in_memory = {s: trace.attention(s).compute() for s in ds.site.values.tolist()}
    again = ats.stats.region_share(in_memory, layout, steps=slice(1, None))
    np.testing.assert_allclose(again.region_share.values, ds.region_share.values)
    assert ((ds.region_share > 0) & (ds.region_share < 1)).all()


def test_the_spatial_control_moves_attention_into_the_boxes(pipe, tmp_path):
    """The same seeds rerun with SpatialTemporal(layout): the phrases' attention moves into their boxes."""
    layout = ats.regulate.layout_from_prompt(PROMPT)
    before, after = [], []
    for seed in range(3):
        tr = ats.capture(pipe, PROMPT, seed=seed, store=tmp_path / f"s{seed}.zarr", num_inference_steps=10)
        laid_out = ats.rerun(tr, [ats.regulate.SpatialTemporal(layout)], pipe=pipe, store=tmp_path / f"l{seed}.zarr")
        before.append(float(ats.stats.region_share(tr, layout).region_share.mean()))  # over steps, sites, phrases
        after.append(float(ats.stats.region_share(laid_out, layout).region_share.mean()))
    assert all(b > a for a, b in zip(before, after)), (before, after)
    assert np.mean(after) - np.mean(before) > 0.015, (before, after)


def test_the_mean_share_is_one_minus_the_attention_objective(pipe, trace, tmp_path):
    """The control's attention objective measures the same thing from the hook core's maps, in memory: its
    value at the optimised λ is 1 − the mean share over steps, sites and phrases of the rerun's stored maps."""
    control = ats.regulate.SpatialTemporal(objective="attention", epochs=1, lr=0.05)  # layout from the prompt
    laid_out = ats.rerun(trace, [control], pipe=pipe, store=tmp_path / "optimised.zarr")
    last = control.optimisation["objective"][-1][0]  # the pass after the last update, without gradients
    share = ats.stats.region_share(laid_out, ats.regulate.layout_from_prompt(PROMPT)).region_share
    assert 1 - float(share.mean()) == pytest.approx(last, abs=1e-4)  # the store keeps float16


# --- heat maps with a layout -------------------------------------------------------------------------------------
def assert_encloses_the_mask(patch, region, shape, radius=0.2):
    """The patch's outline encloses exactly the image pixels (centres at integer data coordinates) of the
    region's mask at the image's resolution; for a disk, up to pixels within 0.002 of the circle (matplotlib
    draws an ellipse with Bézier curves)."""
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w]
    path = patch.get_path().transformed(patch.get_patch_transform())
    inside = path.contains_points(np.c_[cols.ravel(), rows.ravel()]).reshape(h, w)
    mask = ats.stats.region_mask(region, shape, radius)
    assert mask.any() and not mask.all()
    sure = np.ones(shape, bool)
    if len(region) == 2:
        sure = np.abs(np.hypot((cols + 0.5) / w - region[0], (rows + 0.5) / h - region[1]) - radius) > 0.002
    assert np.array_equal(inside[sure], mask[sure])


def test_heatmaps_draws_each_phrase_on_its_words_panels(trace, tmp_path):
    layout = {"a red circle": (0.05, 0.25, 0.45, 0.75), "a blue square": (0.75, 0.5)}
    fig = plot.heatmaps(trace, ["circle", "blue square", "a", "red circle", "left"], layout=layout)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [[p.get_label() for p in ax.patches] for ax in axes] == [
        [], ["a red circle"], ["a blue square"], [], ["a red circle"], []]
    box, disk = axes[1].patches[0], axes[2].patches[0]
    assert isinstance(box, Rectangle) and isinstance(disk, Ellipse)
    assert box.get_xy() == pytest.approx((0.05 * 32 - 0.5, 0.25 * 32 - 0.5))
    assert (box.get_width(), box.get_height()) == pytest.approx((0.4 * 32, 0.5 * 32))
    assert disk.get_center() == pytest.approx((0.75 * 32 - 0.5, 0.5 * 32 - 0.5))
    assert (disk.get_width(), disk.get_height()) == pytest.approx((0.4 * 32, 0.4 * 32))
    for patch in (box, disk):
        assert patch.get_linestyle() == "--" and not patch.get_fill()
    for ax in axes:  # the outlines do not move the view off the image
        assert ax.get_xlim() == pytest.approx((-0.5, 31.5)) and ax.get_ylim() == pytest.approx((31.5, -0.5))
    # the outlines enclose exactly the pixels the mask holds, at the image's resolution
    for patch, region in ((box, layout["a red circle"]), (disk, layout["a blue square"])):
        assert_encloses_the_mask(patch, region, (32, 32))
    fig.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_heatmaps_layout_on_a_non_square_image(pipe, tmp_path):
    tr = ats.capture(pipe, "a red circle and a blue square", seed=0, store=tmp_path / "wide.zarr",
                     num_inference_steps=2, height=32, width=48)
    assert {(tr.attention(s).sizes["y"], tr.attention(s).sizes["x"]) for s in tr.sites} == {(8, 12), (4, 6)}
    layout = {"a red circle": (0.3, 0.5), "a blue square": (0.55, 0.1, 0.95, 0.9)}
    share = ats.stats.region_share(tr, layout)
    assert share.region_share.notnull().all()
    area = float(share.region_area.sel(site=tr.sites[0], phrase="a blue square"))
    assert area == pytest.approx(4 / 12 * 6 / 8)  # on the 8×12 maps: columns 7-10, rows 1-6
    fig = plot.heatmaps(tr, ["red circle", "square"], layout=layout)
    disk, box = fig.axes[1].patches[0], fig.axes[2].patches[0]
    assert disk.get_center() == pytest.approx((0.3 * 48 - 0.5, 0.5 * 32 - 0.5))
    assert (disk.get_width(), disk.get_height()) == pytest.approx((0.4 * 48, 0.4 * 32))  # the mask's ellipse
    assert box.get_xy() == pytest.approx((0.55 * 48 - 0.5, 0.1 * 32 - 0.5))
    for patch, region in ((disk, layout["a red circle"]), (box, layout["a blue square"])):
        assert_encloses_the_mask(patch, region, (32, 48))


def test_heatmaps_without_token_text_draws_every_region_on_every_panel(trace, monkeypatch):
    import attnscope.plot._heatmaps as heat

    monkeypatch.setattr(heat, "sample_tokens", lambda tr, sample: [""] * len(tr.tokens))
    fig = plot.heatmaps(trace, ["circle", "square"], layout=ats.regulate.layout_from_prompt(PROMPT))
    assert [[p.get_label() for p in ax.patches] for ax in fig.axes if ax.get_label() != "<colorbar>"] == [
        [], ["a red circle", "a blue square"], ["a red circle", "a blue square"]]


def test_heatmaps_bad_layout(trace):
    with pytest.raises(AttnscopeError, match=r"layout phrase 'a green triangle' is not in the prompt "
                                             r"'a red circle to the left of a blue square'"):
        plot.heatmaps(trace, ["circle"], layout={"a green triangle": (0, 0, 1, 1)})
    with pytest.raises(AttnscopeError, match=r"layout\['a red circle'\] = \(0, 0\.5, 1, 0\.2\): an empty box"):
        plot.heatmaps(trace, ["circle"], layout={"a red circle": (0, 0.5, 1, 0.2)})
    with pytest.raises(AttnscopeError, match=r"radius=2: expected a number in \(0, 1\]"):
        plot.heatmaps(trace, ["circle"], layout={"a red circle": (0.5, 0.5)}, radius=2)
