"""Audit of the figures, the viewer and the trace reader on odd but legal traces: a trace opened with
missing="skip" whose sites hold different steps, and steps gated by TGATE; each checked against numbers
computed here from the stored maps."""

import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

import attnscope as ats
import attnscope.plot as plot
from attnscope.plot._select import forward_order
from attnscope.regulate import TGate

H, W = 64, 48


def panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def upsampled(native):
    """Bilinear, align_corners=False, as the docs say, in float64."""
    t = torch.from_numpy(np.ascontiguousarray(native, dtype=np.float64))[None, None]
    return F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.fixture(scope="module")
def skipped(sd_pipe, tmp_path_factory):
    """A trace whose first site lost the shard of its last step, opened with missing="skip"."""
    path = tmp_path_factory.mktemp("skip") / "a.zarr"
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=path, num_inference_steps=3, height=H, width=W,
                     heads="all")
    site = tr.sites[0]  # the largest site: one step per shard
    per_shard = zarr.open_array(str(path / "sites" / site / "attention"), mode="r").shards[0]
    shard = path / "sites" / site / "attention" / "c" / str(2 // per_shard)
    shutil.rmtree(shard) if shard.is_dir() else shard.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ats.AttnscopeWarning)
        out = ats.open_trace(path, missing="skip")
        lacking = out.attention(site)["step"].values.tolist()
    assert 2 not in lacking and 0 in lacking, lacking
    return out, site, lacking


def word_map(tr, site, step, word="circle"):
    """One site's map of ``word`` at one step, heads averaged, at native resolution (float64)."""
    maps = tr.attention(site).sel(sample=0, step=step).values.astype(np.float64)  # head, y, x, token
    return maps[..., tr.words[word]].sum(-1).mean(0)


def test_plots_and_viewer_of_a_trace_whose_sites_lost_different_steps(skipped):
    """missing='skip' (documented: those steps left out of that site) crashed word_maps(per_step=True) with xarray's
    AlignmentError, site_step_grid and ats.view with KeyError 'not all values found in index step'."""
    tr, site, lacking = skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ats.AttnscopeWarning)
        others = [s for s in tr.sites if s != site]
        per_step = plot.word_maps(tr, ["circle"], per_step=True)
        assert per_step["step"].values.tolist() == [0, 1, 2]
        for step in (0, 2):  # step 2: the mean of the sites that hold it; step 0: of every site
            holders = tr.sites if step in lacking else others
            expected = np.mean([upsampled(word_map(tr, s, step)) for s in holders], axis=0)
            np.testing.assert_allclose(per_step.sel(step=step, word="circle").values, expected, atol=1e-5)

        fig = plot.site_step_grid(tr, "circle")
        names = forward_order(tr, tr.sites)
        axes = panels(fig)
        assert len(axes) == 3 * len(names)
        for row, step in enumerate([0, 1, 2]):
            assert axes[row * len(names)].get_ylabel().startswith(f"step {step} (t=")
            for col, name in enumerate(names):
                shown = np.asarray(axes[row * len(names) + col].images[0].get_array(), dtype=np.float64)
                if name == site and step not in lacking:
                    assert np.isnan(shown).all()  # a blank panel: the step is not on disk at this site
                else:
                    np.testing.assert_allclose(shown, word_map(tr, name, step).astype(np.float32), atol=1e-6)

        v = ats.view(tr, words=["circle"], site=site, step=2)
        assert np.isnan(v.current_map()).all() and v.panels[0]["maps"][0]["mean"] is None
        v.step = 0
        np.testing.assert_allclose(v.current_map()[0], upsampled(word_map(tr, site, 0)), atol=1e-5)
        v.site, v.step = "all", 2
        expected = np.mean([upsampled(word_map(tr, s, 2)) for s in others], axis=0)
        np.testing.assert_allclose(v.current_map()[0], expected, atol=1e-5)
        share = v.statistics["rows"][0]["values"][0]
        dom = ats.stats.dominance(tr, targets=["circle"], sites=others, steps=[2])
        assert share == pytest.approx(float(dom.target_share.sel(sample=0).mean()), rel=1e-5)


def test_heatmaps_of_gated_steps_say_so_instead_of_a_blank_panel(sd_pipe, tmp_path):
    """heatmaps(steps=<steps TGATE gated>) drew the picture alone under a 0–1 colour bar, nothing saying why."""
    kw = dict(num_inference_steps=4, height=32, width=32)
    parent = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "p.zarr", **kw)
    gated = ats.rerun(parent, [TGate(2)], store=tmp_path / "g.zarr", pipe=sd_pipe)
    assert gated.gated_steps == [2, 3]
    fig = plot.heatmaps(gated, ["red", "circle"], steps=[2, 3])
    notes = [[t.get_text() for t in ax.texts] for ax in panels(fig)[1:]]
    assert all(len(n) == 1 and "gated" in n[0] for n in notes), notes
    fig = plot.heatmaps(gated, ["circle"], steps=[1, 2])  # one computed step: a map, no note
    shown = np.asarray(panels(fig)[1].images[-1].get_array(), dtype=np.float64)
    assert not panels(fig)[1].texts and np.isfinite(shown).all()
    assert shown.min() == pytest.approx(0.0) and shown.max() == pytest.approx(1.0)


def test_violins_of_a_gated_step_say_so(sd_pipe, tmp_path):
    """violins(steps=[a computed step, a gated step]) drew an empty panel for the gated one, nothing saying why."""
    kw = dict(num_inference_steps=3, height=32, width=32)
    parent = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "p.zarr", **kw)
    gated = ats.rerun(parent, [TGate(2)], store=tmp_path / "g.zarr", pipe=sd_pipe)
    fig = plot.violins(gated, steps=[1, 2], words=["red", "circle"])
    assert [[t.get_text() for t in ax.texts] for ax in fig.axes][0] == []
    assert "gated" in " ".join(t.get_text() for t in fig.axes[1].texts)
