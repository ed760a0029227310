"""Audit of the figures and tables: defects a user met, each checked against numbers computed here from the store."""

import shutil
import warnings

import numpy as np
import pytest
import zarr

import attnscope as ats
import attnscope.plot as plot
from attnscope.errors import AttnscopeError
from attnscope.plot._select import forward_order

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def trace(shapes, tmp_path_factory):
    return ats.capture(shapes, PROMPT, seed=0, store=tmp_path_factory.mktemp("audit") / "a.zarr", num_inference_steps=3)


def panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_heatmaps_bad_alpha_or_cmap_is_one_clear_error_before_any_map_is_read(trace, monkeypatch):
    """alpha=2 or an unknown colour map gave matplotlib's ValueError/TypeError, after every map had been read."""
    read = []
    monkeypatch.setattr(trace, "attention", lambda *a, **k: read.append(a) or pytest.fail("a map was read"))
    for kwargs, message in [
        (dict(alpha=2), "alpha=2: expected a number from 0"),
        (dict(alpha="x"), "alpha='x': expected a number from 0"),
        (dict(alpha=True), "alpha=True: expected a number from 0"),
        (dict(cmap="nope"), "cmap='nope': not a matplotlib colour map"),
    ]:
        with pytest.raises(AttnscopeError) as caught:
            plot.heatmaps(trace, ["circle"], **kwargs)
        assert message in str(caught.value), str(caught.value)
    assert not read


def test_figures_take_a_trace_path_and_name_a_wrong_trace(trace):
    """A path gave AttributeError: 'str' object has no attribute 'coords' (ats.report and ats.view take paths)."""
    path = str(trace.path)
    np.testing.assert_array_equal(plot.word_maps(path, ["circle"]).values, plot.word_maps(trace, ["circle"]).values)
    shown = panels(plot.heatmaps(path, ["circle"]))[1].images[-1].get_array()
    np.testing.assert_array_equal(shown, panels(plot.heatmaps(trace, ["circle"]))[1].images[-1].get_array())
    assert len(panels(plot.site_step_grid(path, "circle", steps=[0]))) == len(trace.sites)
    assert len(panels(plot.violins(path, steps=[0, 2]))) == 2
    for call in (
        lambda t: plot.heatmaps(t, ["circle"]),
        lambda t: plot.word_maps(t, ["circle"]),
        lambda t: plot.site_step_grid(t, "circle"),
        lambda t: plot.violins(t, 0),
    ):
        with pytest.raises(AttnscopeError, match=r"trace=None: expected an attnscope Trace or the path"):
            call(None)


def test_dominance_lines_with_no_site_is_an_error(trace):
    """sites=[] drew a figure of NaN lines without a word."""
    ds = ats.stats.dominance(trace, targets=["circle", "square"])
    with pytest.raises(AttnscopeError, match=r"sites=\[\]: expected 'mean', a site name or a list of site names"):
        plot.dominance_lines(ds, sites=[])


def test_dominance_table_spells_a_repeated_word_twice(shapes, tmp_path):
    """The header of 'a red red circle …' read 'a red circle …': consecutive tokens of the same word were merged."""
    prompt = "a red red circle and a blue blue square"
    tr = ats.capture(shapes, prompt, seed=0, store=tmp_path / "r.zarr", num_inference_steps=1)
    ds = ats.stats.dominance(tr, targets=["circle"])
    for by in ("word", "step", "site"):
        assert ats.stats.dominance_table(ds, by=by).splitlines()[0] == f"sample 0: {prompt!r}"


def test_site_step_grid_scale_ignores_a_site_of_nan_maps(trace, tmp_path):
    """When the first site (forward order) had only NaN maps at the steps shown, the shared colour scale became
    (0, NaN) for every panel: the whole grid was blank, with a RuntimeWarning. The scale is the largest finite value."""
    copy = tmp_path / "nan.zarr"
    shutil.copytree(trace.path, copy)
    names = forward_order(trace, trace.sites)
    array = zarr.open_group(str(copy), mode="r+", use_consolidated=False)[f"sites/{names[0]}/attention"]
    values = np.full(array.shape, np.nan, array.dtype)
    values[..., 0, 0, 0] = 0  # not all fill value: the shards stay written
    array[...] = values
    tr = ats.open_trace(copy)
    circle = tr.words["circle"]
    top = max(
        float(tr.attention(s).values.astype(np.float32)[:, 0][..., circle].sum(-1).mean(1).max()) for s in names[1:]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot.site_step_grid(tr, "circle")
    clims = {ax.images[0].get_clim() for ax in panels(fig)}
    assert len(clims) == 1
    np.testing.assert_allclose(clims.pop(), (0.0, top), rtol=1e-6)


def test_text_tables_of_a_wrong_input_say_what_they_expected(trace):
    """dominance_table(trace) gave AttributeError "'Trace' object has no attribute 'sizes'", a Dataset of one sample
    (.sel(sample=0)) KeyError 'sample', convergence_table of a dominance Dataset AttributeError."""
    ds = ats.stats.dominance(trace, targets=["circle"])
    cases = [
        (
            lambda: ats.stats.dominance_table(trace),
            r"dominance_table: got Trace, expected the xarray\.Dataset of "
            r"ats\.stats\.dominance",
        ),
        (
            lambda: ats.stats.dominance_table(ds.sel(sample=0)),
            r"has dims \[.*\], expected \['step', 'site', "
            r"'sample'\] among them .*isel\(sample=\[0\]\)",
        ),
        (
            lambda: ats.stats.convergence_table(ds),
            r"convergence_table: the Dataset has no variable "
            r"'mean_convergence'",
        ),
        (lambda: ats.stats.convergence_table(trace), r"convergence_table: got Trace"),
    ]
    for call, message in cases:
        with pytest.raises(AttnscopeError, match=message):
            call()
    one = ats.stats.dominance_table(ds.isel(sample=[0]))  # a list keeps the dim: the same table
    assert one == ats.stats.dominance_table(ds)


def test_plots_and_compare_take_the_site_predicates_capture_takes(shapes, tmp_path):
    """capture and the statistics take `sites=lambda site: site.block == "up"`; the figures refused it ("expected a site
    name, a glob or a list of them") and compare gave it the site's name only. Both now see each site's stored
    description and draw what the same glob draws."""
    tr = ats.capture(shapes, "a red circle and a blue square", seed=0, store=tmp_path / "p.zarr",
                     num_inference_steps=2)
    up = [s for s in tr.sites if s.startswith("up_blocks")]
    pick = lambda site: site.block == "up"  # noqa: E731
    for draw in (lambda s: ats.plot.heatmaps(tr, ["circle"], sites=s),
                 lambda s: ats.plot.site_step_grid(tr, "circle", sites=s)):
        with_glob, with_predicate = draw("up_blocks.*"), draw(pick)
        images = [[np.asarray(im.get_array()) for ax in fig.axes for im in ax.get_images()]
                  for fig in (with_glob, with_predicate)]
        assert len(images[0]) == len(images[1]) > 0
        for a, b in zip(*images):
            np.testing.assert_array_equal(a, b)
    c = ats.compare(tr, tr, ["circle"], sites=pick)
    assert c.sites == up
