"""attnscope.plot: every figure renders to PNG with the expected panels; plotted data against numpy; bad input."""

import inspect
import warnings

import numpy as np
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from PIL import Image

import attnscope as ats
import attnscope.plot as plot
from attnscope.errors import AttnscopeError
from attnscope.plot._layout import missing_glyphs_quiet
from tests.test_accessor import bilinear

PROMPT = "a red circle and a blue square"
CAPTURED = [0, 1, 2, 3, 5]  # step 4 of the 6 is not captured
BLUE_SQUARE = [6, 7]  # token positions, by hand
DEFAULT_LABELS = ["<SOT>", "a", "red", "circle", "and", "blue", "square", "<EOT>"]


def panels(fig):
    """The figure's plot panels: its axes except colour bars (matplotlib labels those "<colorbar>")."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def assert_png(fig, path):
    assert isinstance(fig, Figure)
    fig.savefig(path)
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


@pytest.fixture(scope="module")
def trace(shapes, tmp_path_factory):
    """PROMPT, 6 steps of which the CAPTURED ones are recorded, every head kept."""
    return ats.capture(shapes, PROMPT, seed=0, store=tmp_path_factory.mktemp("plot") / "a.zarr",
                       num_inference_steps=6, heads="all", steps=CAPTURED)


@pytest.fixture(scope="module")
def sites(trace):
    """One 8x8 and one 4x4 site."""
    sizes = {s: trace.attention(s).sizes["y"] for s in trace.sites}
    return [next(s for s in trace.sites if sizes[s] == 8), next(s for s in trace.sites if sizes[s] == 4)]


def word_map(trace, site, positions, steps):
    """A word's map of sample 0 at native resolution, heads and steps averaged, from .values with numpy."""
    v = trace.attention(site).values.astype(np.float32)  # step, sample, head, y, x, token
    rows = [CAPTURED.index(s) for s in steps]
    return v[rows][:, 0][..., positions].sum(-1).mean(axis=(0, 1))


# --- heatmaps ---------------------------------------------------------------------------------------------

def test_heatmaps_panels_are_the_image_then_one_per_word(trace, tmp_path):
    fig = plot.heatmaps(trace, ["circle", "blue square", "a"])
    assert_png(fig, tmp_path / "h.png")
    assert [ax.get_title() for ax in panels(fig)] == [PROMPT, "circle", "blue square", "a"]
    (bar,) = colorbars(fig)  # one bar for the word panels, at full strength although the maps are faded
    assert bar.get_ylim() == (0.0, 1.0) and bar.get_ylabel() == "attention, scaled per word"
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0 (least)", "0.5", "1 (most)"]
    np.testing.assert_array_equal(panels(fig)[0].images[0].get_array(), np.asarray(trace.images[0]))


def test_heatmaps_word_map_equals_numpy(trace, sites):
    steps = [1, 3]
    fig = plot.heatmaps(trace, ["circle", "blue square"], sites=sites, steps=steps, alpha=0.4, cmap="magma")
    shown = panels(fig)[2].images[-1]
    up = np.mean([bilinear(word_map(trace, s, BLUE_SQUARE, steps), (32, 32)) for s in sites], axis=0)
    expected = (up - up.min()) / (up.max() - up.min())
    np.testing.assert_allclose(np.asarray(shown.get_array()), expected, atol=1e-5)
    assert shown.get_alpha() == 0.4 and shown.get_cmap().name == "magma"


def test_heatmaps_reads_only_the_chosen_sites_and_steps(trace, sites, monkeypatch):
    opened, read_steps = [], set()
    original = trace.attention

    def spy(site, *args, **kwargs):  # the real maps, one dask chunk per step, noting each chunk computed
        opened.append(site)
        da = original(site, *args, **kwargs).chunk(step=1)
        steps = da["step"].values

        def record(block, block_info=None):
            read_steps.add(int(steps[block_info[0]["chunk-location"][0]]))
            return block

        return da.copy(data=da.data.map_blocks(record, dtype=da.dtype, meta=np.array((), dtype=da.dtype)))

    monkeypatch.setattr(trace, "attention", spy)
    plot.heatmaps(trace, "circle", sites=sites[:1], steps=[1, 3])
    assert set(opened) == {sites[0]} and read_steps == {1, 3}


def test_heatmaps_bad_input(trace):
    with pytest.raises(AttnscopeError, match=r"'hexagon' is not in the prompt; its words are: a, red, circle, and"):
        plot.heatmaps(trace, ["circle", "hexagon"])
    with pytest.raises(AttnscopeError, match=r"(?s)'up_blocks\.9' matches no cross-attention site.*" + trace.sites[0]):
        plot.heatmaps(trace, "circle", sites="up_blocks.9")
    with pytest.raises(AttnscopeError, match=r"steps \[4\] are not in this trace .*captured steps: \[0, 1, 2, 3, 5\]"):
        plot.heatmaps(trace, "circle", steps=[3, 4])
    with pytest.raises(AttnscopeError, match=r"\[99\] outside this run's steps 0..5"):
        plot.heatmaps(trace, "circle", steps=99)
    with pytest.raises(AttnscopeError, match=r"sample=3 is not in this trace; its samples are \[0\]"):
        plot.heatmaps(trace, "circle", sample=3)


# --- site_step_grid ---------------------------------------------------------------------------------------

def test_site_step_grid_is_steps_by_sites_at_native_resolution(trace, sites, tmp_path):
    fig = plot.site_step_grid(trace, "blue square", sites=sites, steps=[0, 2, 5])
    assert_png(fig, tmp_path / "g.png")
    grid = panels(fig)
    assert len(grid) == 3 * 2 and len(colorbars(fig)) == 1
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in grid] == [(3, 2)] * 6
    for i, step in enumerate([0, 2, 5]):
        for j, site in enumerate(sites):
            shown = np.asarray(grid[i * 2 + j].images[0].get_array())
            assert shown.shape == ((8, 8) if j == 0 else (4, 4))
            np.testing.assert_allclose(shown, word_map(trace, site, BLUE_SQUARE, [step]), atol=1e-6)
    assert grid[0].get_ylabel() == "step 0 (t=999)"


def test_site_step_grid_columns_run_in_forward_order(trace):
    fig = plot.site_step_grid(trace, "circle", steps=[0])
    titles = [ax.get_title().split("\n")[0] for ax in panels(fig)]
    assert titles == ["down1.a0.t0", "down2.a0.t0", "mid.a0.t0", "up0.a0.t0", "up0.a1.t0", "up1.a0.t0", "up1.a1.t0"]
    assert trace.sites[-1].startswith("mid_block")  # registered last by diffusers, drawn between down and up


def test_site_step_grid_bad_word(trace):
    with pytest.raises(AttnscopeError, match="'hexagon' is not in the prompt"):
        plot.site_step_grid(trace, "hexagon")


# --- violins ----------------------------------------------------------------------------------------------

def test_violins_one_panel_per_step_default_words(trace, tmp_path):
    fig = plot.violins(trace, steps=[0, 5])
    assert_png(fig, tmp_path / "v.png")
    assert len(panels(fig)) == 2
    for ax in panels(fig):
        assert [t.get_text() for t in ax.get_xticklabels()] == DEFAULT_LABELS
    assert [ax.get_title() for ax in panels(fig)] == ["step 0 (t=999)", "step 5 (t=166)"]


def test_violins_pool_the_chosen_sites(trace, sites):
    fig = plot.violins(trace, steps=3, sites=sites, words=["blue square", "circle"])
    ax = panels(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["blue square", "circle"]
    violins = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(violins) == 2
    pooled = np.concatenate([word_map_per_pixel(trace, s, BLUE_SQUARE, 3) for s in sites])
    assert pooled.size == 8 * 8 + 4 * 4
    y = violins[0].get_paths()[0].vertices[:, 1]  # cut=0: a violin spans exactly the data's range
    np.testing.assert_allclose([y.min(), y.max()], [pooled.min(), pooled.max()], rtol=1e-5)


def word_map_per_pixel(trace, site, positions, step):
    v = trace.attention(site).sel(step=step).values.astype(np.float32)  # sample, head, y, x, token
    return v[0].mean(axis=0)[..., positions].sum(-1).ravel()


def test_violins_bad_input(trace):
    with pytest.raises(AttnscopeError, match=r"steps \[4\] are not in this trace"):
        plot.violins(trace, steps=[4])
    with pytest.raises(AttnscopeError, match="'hexagon' is not in the prompt"):
        plot.violins(trace, steps=0, words=["hexagon"])


# --- dominance_lines --------------------------------------------------------------------------------------

@pytest.fixture
def dominance_ds():
    rng = np.random.default_rng(0)
    steps, site_names, samples = range(4), ["down_blocks.1.x.attn2", "up_blocks.1.y.attn2", "mid_block.z.attn2"], [0, 1]
    shape = (4, 3, 2)
    return xr.Dataset(
        {"mass_share": (("step", "site", "sample", "token"), rng.random(shape + (3,))),
         "target_share": (("step", "site", "sample", "target"), rng.random(shape + (2,))),
         "entropy": (("step", "site", "sample"), rng.random(shape))},
        coords={"step": steps, "timestep": ("step", [999.0, 749.0, 499.0, 249.0]), "site": site_names,
                "sample": samples, "token": [2, 3, 7], "word": ("token", ["red", "circle", "square"]),
                "target": ["circle", "square"]})


def test_dominance_lines_one_line_per_target_averaged_over_sites(dominance_ds, tmp_path):
    fig = plot.dominance_lines(dominance_ds, "target_share", sample=1)
    assert_png(fig, tmp_path / "d.png")
    (ax,) = panels(fig)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["circle", "square"]
    expected = dominance_ds["target_share"].values[:, :, 1, :].mean(axis=1)
    for k, line in enumerate(lines):
        np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), expected[:, k])


def test_dominance_lines_tokens_single_lines_and_chosen_sites(dominance_ds):
    fig = plot.dominance_lines(dominance_ds, "mass_share")
    assert [line.get_label() for line in panels(fig)[0].get_lines()] == ["red (2)", "circle (3)", "square (7)"]
    fig = plot.dominance_lines(dominance_ds, "entropy", sites="up_blocks.1.y.attn2")
    (line,) = panels(fig)[0].get_lines()
    np.testing.assert_allclose(line.get_ydata(), dominance_ds["entropy"].values[:, 1, 0])
    fig = plot.dominance_lines(dominance_ds, "entropy", sites=["up_blocks.1.y.attn2", "mid_block.z.attn2"])
    np.testing.assert_allclose(panels(fig)[0].get_lines()[0].get_ydata(),
                               dominance_ds["entropy"].values[:, 1:, 0].mean(axis=1))


def test_dominance_lines_bad_input(dominance_ds):
    with pytest.raises(AttnscopeError, match=r"no variable 'gini'; its variables are \['mass_share', 'target_share'"):
        plot.dominance_lines(dominance_ds, "gini")
    with pytest.raises(AttnscopeError, match=r"sample=5: \[5\] not in the Dataset's 'sample' labels \[0, 1\]"):
        plot.dominance_lines(dominance_ds, sample=5)
    with pytest.raises(AttnscopeError, match=r"sites='up_blocks.9': \['up_blocks.9'\] not in .*mid_block.z.attn2"):
        plot.dominance_lines(dominance_ds, sites="up_blocks.9")
    with pytest.raises(AttnscopeError, match="got DataArray, expected an xarray.Dataset"):
        plot.dominance_lines(dominance_ds["entropy"], "entropy")


# --- convergence ------------------------------------------------------------------------------------------

def convergence_ds(stable):
    c = np.array([[np.nan] * 3, [0.9, 0.5, 0.7], [0.2, 0.1, 0.3], [0.04, 0.02, 0.03]])[:, :, None]
    return xr.Dataset({"convergence": (("step", "site", "sample"), c),
                       "mean_convergence": (("step", "sample"), c.mean(axis=1)),
                       "stable_step": (("sample",), [stable])},
                      coords={"step": [0, 1, 2, 3], "site": ["a.attn2", "b.attn2", "c.attn2"]}, attrs={"tol": 0.05})


def test_convergence_curves_tolerance_and_stable_step(tmp_path):
    ds = convergence_ds(3)
    fig = plot.convergence(ds)
    assert_png(fig, tmp_path / "c.png")
    (ax,) = panels(fig)
    assert ax.get_yscale() == "log"
    lines = ax.get_lines()
    thin, mean, tol, stable = lines[:3], lines[3], lines[4], lines[5]
    assert len(lines) == 6 and all(line.get_linewidth() < mean.get_linewidth() for line in thin)
    np.testing.assert_allclose(mean.get_ydata(), ds["mean_convergence"].values[:, 0])
    np.testing.assert_allclose(thin[1].get_ydata(), ds["convergence"].values[:, 1, 0])
    assert list(tol.get_ydata()) == [0.05, 0.05] and list(stable.get_xdata()) == [3, 3]
    assert len(panels(plot.convergence(convergence_ds(-1)))[0].get_lines()) == 5  # no stable step: no marker


def test_convergence_bad_input():
    with pytest.raises(AttnscopeError, match=r"no variable 'convergence'; its variables are \['mean_convergence'"):
        plot.convergence(convergence_ds(1).drop_vars("convergence"))
    with pytest.raises(AttnscopeError, match=r"sample=2: \[2\] not in the Dataset's 'sample' labels \[0\]"):
        plot.convergence(convergence_ds(1), sample=2)


# --- real statistics, public surface ----------------------------------------------------------------------

def test_plots_of_real_statistics(trace, tmp_path):
    from attnscope import stats

    dom = stats.dominance(trace, targets=["circle", "square"])
    fig = plot.dominance_lines(dom)
    assert_png(fig, tmp_path / "dom.png")
    assert [line.get_label() for line in panels(fig)[0].get_lines()] == ["circle", "square"]
    np.testing.assert_allclose(panels(fig)[0].get_lines()[0].get_ydata(),
                               dom["target_share"].sel(target="circle", sample=0).mean("site").values)
    conv = stats.convergence(trace)
    fig = plot.convergence(conv)
    assert_png(fig, tmp_path / "conv.png")
    assert len(panels(fig)[0].get_lines()) >= len(trace.sites) + 2  # per site, mean, tol


def test_exports_are_documented_functions_returning_figures():
    assert sorted(plot.__all__) == ["TraceViewer", "comparison", "convergence", "dominance_lines", "heatmaps", "report",
                                    "report_words", "site_step_grid", "view", "violins", "word_maps"]
    for name in set(plot.__all__) - {"TraceViewer"}:  # the viewer's widget class
        func = getattr(plot, name)
        assert inspect.isfunction(func) and func.__module__.startswith("attnscope.plot.")
        assert ">>>" in func.__doc__.split("Parameters")[0]
        assert "Returns" in func.__doc__ or name in ("word_maps", "report_words", "view")  # not figures


def test_word_maps_are_the_numbers_heatmaps_draw(trace):
    maps = plot.word_maps(trace, ["circle", "square"])
    assert maps.dims == ("word", "y", "x") and maps.shape[1:] == (32, 32)
    column = list(trace.tokens).index("circle</w>")
    by_site = [bilinear(np.asarray(trace.attention(s).isel(sample=0).values, np.float64).mean(axis=(0, 1))[..., column],
                        (32, 32)) for s in trace.sites]  # steps and heads averaged, upsampled, then sites averaged
    np.testing.assert_allclose(maps.sel(word="circle"), np.mean(by_site, axis=0), rtol=1e-4, atol=1e-6)


# --- text: long titles, characters the fonts lack ---------------------------------------------------------

LONG_PROMPT = "a red circle to the left of a blue square above a green triangle"


def drawn_title(fig, ax):
    """The pixel box of ``ax``'s title once ``fig`` is drawn (constrained layout done)."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return ax.title.get_window_extent(fig.canvas.get_renderer())


def test_long_titles_are_wrapped_inside_their_panel_and_the_figure(shapes, tmp_path):
    tr = ats.capture(shapes, LONG_PROMPT, seed=0, store=tmp_path / "long.zarr", num_inference_steps=2)
    fig = plot.heatmaps(tr, ["circle", "square"])
    first, second = panels(fig)[:2]
    box = drawn_title(fig, first)
    assert 0 <= box.x0 and box.x1 <= second.get_window_extent().x0  # the prompt does not run over the next panel
    assert first.get_title().count("\n") >= 1 and " ".join(first.get_title().split()) == LONG_PROMPT  # every word
    dom = ats.stats.dominance(tr, targets=["red circle", "blue square", "green triangle"])
    fig = plot.dominance_lines(dom, sites=tr.sites[:3])
    (ax,) = panels(fig)
    box = drawn_title(fig, ax)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)
    assert " ".join(ax.get_title().split()) == "share of the prompt's attention — sample 0, mean over 3 sites"


def test_a_missing_glyph_is_quiet_and_other_warnings_are_not():
    def smiling():
        fig = Figure()
        fig.suptitle("a circle \N{SLIGHTLY SMILING FACE}")
        FigureCanvasAgg(fig)
        return fig

    with pytest.warns(UserWarning, match="missing from font"):  # what the context manager quiets
        smiling().canvas.draw()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with missing_glyphs_quiet():
            smiling().canvas.draw()
            warnings.warn("another warning", UserWarning, stacklevel=1)
        smiling().canvas.draw()  # quiet only inside the block
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and messages[0] == "another warning" and "missing from font" in messages[1], messages
