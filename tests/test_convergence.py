"""Convergence of maps and outputs, output summaries, gated steps and the suggested TGATE gate step,
checked against curves known by hand."""

import json

import numpy as np
import pytest
import torch
import xarray as xr

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.store import SITE_DIMS

from .conftest import RUN, cli

PROMPT = "a red circle"
# mean over the two guidance halves of every site's output is M[t] · X (see Scale); its relative
# step-to-step change is |M[t] − M[t−1]| / |M[t]|
M = np.array([1.0, 2.0, 1.5, 1.53, 1.5147])
CHANGE = np.r_[np.nan, np.abs(np.diff(M)) / np.abs(M[1:])]  # nan, 1/2, 1/3, 0.0196, 0.0101


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


class Gate:
    """Bypasses every cross-attention site from step ``k`` on with zeros shaped like its step k−1 output;
    with ``cut`` it also asks the core for the unconditional half only from step ``k`` (TGATE's CFG cut),
    with ``serve=False`` it keeps no cache (the single-branch steps then attend)."""

    role = "intervention"

    def __init__(self, k, cut=False, serve=True):
        self.k, self.cut, self.serve, self.cache = k, cut, serve, {}

    def stages(self, ctx):
        return ("output",) if ctx.step == self.k - 1 and self.serve else ()

    def on_output(self, ctx, output):
        self.cache[ctx.site.name] = torch.zeros_like(output[: ctx.rows.samples] if self.cut else output)

    def bypass(self, ctx):
        return self.cache.get(ctx.site.name) if ctx.step >= self.k else None

    def branches(self, step_ctx):
        return ("uncond",) if self.cut and step_ctx.step >= self.k else None


class Scale:
    """Replaces every site's output: uncond rows (M[t] − 0.5)·X, cond rows (M[t] + 0.5)·X, X fixed per site."""

    role = "intervention"

    def __init__(self):
        self.x = {}

    def stages(self, ctx):
        return ("output",)

    def on_output(self, ctx, output):
        rows, m = ctx.rows, float(M[ctx.step])
        x = self.x.setdefault(ctx.site.name, torch.randn((rows.samples, *output.shape[1:]),
                                                         generator=torch.Generator().manual_seed(len(self.x))))
        return torch.cat([(m - 0.5) * x, (m + 0.5) * x])


def record(pipe, path, *clients, **options):
    rec = ats.Recorder(path, **options)
    with ats.hooks(pipe, *clients, rec):
        out = pipe(PROMPT, generator=generator(), **{**RUN, "num_inference_steps": 4})
        rec.add_images(out.images)
    return ats.open_trace(path)


@pytest.fixture(scope="module")
def scaled(sd_pipe, tmp_path_factory):
    """A trace whose outputs are known by hand (Scale), two images, with output summaries."""
    scale = Scale()
    rec = ats.Recorder(tmp_path_factory.mktemp("conv") / "scaled.zarr", output_change=True)
    with ats.hooks(sd_pipe, scale, rec):
        out = sd_pipe(PROMPT, generator=generator(), num_images_per_prompt=2, **{**RUN, "num_inference_steps": 5})
        rec.add_images(out.images)
    return ats.open_trace(rec.path), scale


# --- gated steps in the trace ---------------------------------------------------------------------------

def test_gated_steps_are_nan_listed_and_the_rest_is_normal(sd_pipe, tmp_path):
    gated = record(sd_pipe, tmp_path / "g.zarr", Gate(2), branch="both", output_change=True)
    plain = record(sd_pipe, tmp_path / "p.zarr", branch="both")
    assert gated.complete and gated.steps_written == 4 and gated.gated_steps == [2, 3]
    assert plain.gated_steps == []
    for site in gated.sites:
        for branch in ("cond", "uncond"):
            maps = gated.attention(site, branch).values
            assert maps.shape == plain.attention(site, branch).shape
            assert np.isnan(maps[2:]).all() and not np.isnan(maps[:2]).any()
            np.testing.assert_array_equal(maps[:2], plain.attention(site, branch).values[:2])
            np.testing.assert_allclose(maps[:2].astype(np.float32).sum(-1), 1, atol=2e-2)
    summary = gated.output_change()
    assert summary.attrs["gated_steps"] == [2, 3]
    assert np.isnan(summary.output_norm.values[2:]).all() and (summary.output_norm.values[:2] > 0).all()
    assert np.isnan(summary.output_change.values[[0, 2, 3]]).all() and (summary.output_change.values[1] > 0).all()
    # gated steps are excluded from the curve, not counted as converged
    for of in ("maps", "outputs"):
        conv = ats.stats.convergence(gated, of=of)
        assert conv.attrs["of"] == of and conv.attrs["gated_steps"] == [2, 3]
        assert np.isnan(conv.convergence.values[[0, 2, 3]]).all() and (conv.convergence.values[1] > 0).all()


def test_single_branch_steps_that_attend_are_stored_as_cond(sd_pipe, tmp_path):
    tr = record(sd_pipe, tmp_path / "cut.zarr", Gate(2, cut=True, serve=False), branch="both", output_change=True)
    assert tr.complete and tr.gated_steps == []
    for site in tr.sites:
        cond, uncond = tr.attention(site, "cond").values, tr.attention(site, "uncond").values
        assert not np.isnan(cond).any()
        np.testing.assert_allclose(cond.astype(np.float32).sum(-1), 1, atol=2e-2)
        assert np.isnan(uncond[2:]).all() and not np.isnan(uncond[:2]).any()
    change = tr.output_change().output_change.values
    # step 2 compares one half with the previous steps' two-half mean: not comparable, so NaN
    assert np.isnan(change[[0, 2]]).all() and not np.isnan(change[[1, 3]]).any()
    cut = record(sd_pipe, tmp_path / "cut-gated.zarr", Gate(2, cut=True), output_change=True)
    assert cut.complete and cut.gated_steps == [2, 3] and np.isnan(cut.attention(cut.sites[0]).values[2:]).all()


def test_older_traces_without_the_new_attributes(sd_pipe, tmp_path):
    tr = record(sd_pipe, tmp_path / "old.zarr")
    meta = tr.path / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["gated_steps"]
    meta.write_text(json.dumps(doc))
    old = ats.open_trace(tr.path)
    assert old.gated_steps == [] and old.output_change() is None
    assert ats.stats.convergence(old).attrs["of"] == "maps"
    with pytest.raises(AttnscopeError, match="has no output summaries; capture it with output_change=True"):
        ats.stats.convergence(old, of="outputs")


# --- output summaries -----------------------------------------------------------------------------------

def test_output_summaries_match_the_hand_made_outputs(scaled):
    tr, scale = scaled
    ds = tr.output_change()
    assert tr.manifest["capture"]["output_change"] is True
    assert ds.output_norm.dims == ("step", "site", "sample") and ds.output_norm.dtype == np.float32
    assert list(ds.site.values) == tr.sites and list(ds.step.values) == list(range(5))
    for site in tr.sites:
        x = scale.x[site].flatten(1).double().norm(dim=1).numpy()  # ‖X‖ per sample
        np.testing.assert_allclose(ds.output_norm.sel(site=site).values, np.abs(M)[:, None] * x, rtol=1e-5)
        np.testing.assert_allclose(ds.output_change.sel(site=site).values,
                                   np.r_[np.nan, np.abs(np.diff(M))][:, None] * x, rtol=1e-4)


def test_convergence_of_outputs_and_the_gate_step_from_a_capture(scaled):
    tr, _ = scaled
    conv = ats.stats.convergence(tr, tol=0.05)  # auto: the trace has output summaries
    assert conv.attrs["of"] == "outputs" and dict(conv.convergence.sizes) == {"step": 5, "site": 7, "sample": 2}
    np.testing.assert_allclose(conv.mean_convergence.values, np.repeat(CHANGE[:, None], 2, 1), rtol=1e-4)
    assert conv.stable_step.values.tolist() == [3, 3]
    assert ats.stats.suggest_gate_step(tr, tol=0.05) == 3 and ats.stats.suggest_gate_step(tr, tol=0.4) == 2
    assert ats.stats.suggest_gate_step(tr.path, tol=0.05) == 3 and ats.stats.suggest_gate_step(str(tr.path)) == 3
    assert ats.stats.convergence(tr, of="maps").attrs["of"] == "maps"


# --- statistics on hand-made sequences ------------------------------------------------------------------

def summaries(c, gated=()):
    """output summaries of two sites and two samples whose outputs are c[t, sample] · a fixed tensor."""
    c = np.asarray(c, float)
    norm = np.abs(c)[:, None, :].repeat(2, 1)
    change = np.abs(np.diff(c, axis=0, prepend=np.nan))[:, None, :].repeat(2, 1)
    return xr.Dataset({"output_norm": (("step", "site", "sample"), norm * 3.0),
                       "output_change": (("step", "site", "sample"), change * 3.0)},
                      coords={"step": np.arange(len(c)), "site": ["a.attn2", "b.attn2"]},
                      attrs={"gated_steps": list(gated)})


def test_curve_and_gate_step_by_hand():
    c = np.stack([M, [1.0, 1.1, 1.1, 1.1, 1.1]], 1)  # sample 1: 1/11 at step 1, then 0
    conv = ats.stats.convergence(summaries(c), tol=0.05)
    np.testing.assert_allclose(conv.convergence.sel(site="b.attn2").values, np.stack([CHANGE, [np.nan, 0.1 / 1.1, 0, 0, 0]], 1))
    assert conv.attrs == {"tol": 0.05, "of": "outputs", "gated_steps": []}
    assert conv.stable_step.values.tolist() == [3, 2]
    assert ats.stats.suggest_gate_step(summaries(c), tol=0.05) == 3  # the later of the two samples
    assert ats.stats.suggest_gate_step(summaries(c[:, 1:]), tol=0.05) == 2
    assert ats.stats.suggest_gate_step(conv, tol=0.05) == 3  # a convergence Dataset is reused
    assert ats.stats.suggest_gate_step(conv, tol=0.4) == 2  # ... and judged again at another tol
    sub = ats.stats.convergence(summaries(c), sites="a.*", steps=slice(1, 4))
    assert sub.site.values.tolist() == ["a.attn2"] and sub.step.values.tolist() == [1, 2, 3]


def test_gated_steps_are_excluded_not_converged():
    c = np.array([1.0, 2.0, 1.5, 1.5, 1.5])[:, None]  # cached from step 3: zero change, looks converged
    conv = ats.stats.convergence(summaries(c, gated=[3, 4]), tol=0.05)
    assert np.isnan(conv.mean_convergence.values[[0, 3, 4], 0]).all()
    assert int(conv.stable_step[0]) == -1  # 1/3 at step 2 is the last computed value
    with pytest.raises(AttnscopeError, match=r"tol=0.05: .* smallest tail maximum is 0.3333 \(from step 2 on\)"):
        ats.stats.suggest_gate_step(summaries(c, gated=[3, 4]), tol=0.05)
    assert ats.stats.convergence(summaries(c), tol=0.05).stable_step.values.tolist() == [3]  # ungated: converged


def test_maps_curve_gate_step_and_errors():
    x = np.random.default_rng(1).random((1, 1, 1, 2, 2, 3))
    seq = np.concatenate([x, 2 * x, 2 * x, 2.02 * x])  # change 0.5, 0, 0.01 / 1.01
    maps = {"moving": xr.DataArray(seq, dims=SITE_DIMS, coords={"step": np.arange(4)})}
    assert ats.stats.convergence(maps).attrs["of"] == "maps"  # auto, no summaries
    assert ats.stats.suggest_gate_step(maps, tol=0.05) == 2
    holed = seq.copy()
    holed[2] = np.nan  # a gated step: it and the step after it are unknown, not a zero change
    curve = ats.stats.convergence({"m": xr.DataArray(holed, dims=SITE_DIMS)}).mean_convergence.values[:, 0]
    np.testing.assert_allclose(curve, [np.nan, 0.5, np.nan, np.nan], rtol=1e-6)
    with pytest.raises(AttnscopeError, match=r"tol=0.001: .*smallest tail maximum is 0.0099"):
        ats.stats.suggest_gate_step(maps, tol=0.001)
    with pytest.raises(AttnscopeError, match="of='outputs': expected a Trace captured with output_change=True"):
        ats.stats.convergence(maps, of="outputs")
    with pytest.raises(AttnscopeError, match="of='maps': the source is a Dataset of output summaries"):
        ats.stats.convergence(summaries(M[:, None]), of="maps")
    with pytest.raises(AttnscopeError, match="of='both': expected one of 'auto', 'maps', 'outputs'"):
        ats.stats.convergence(maps, of="both")
    with pytest.raises(AttnscopeError, match="no defined value"):
        ats.stats.suggest_gate_step({"moving": maps["moving"].isel(step=[0])})
    with pytest.raises(AttnscopeError, match="computed with of='maps'"):
        ats.stats.suggest_gate_step(ats.stats.convergence(maps), of="outputs")


# --- table, plot, command line --------------------------------------------------------------------------

def test_table_plot_and_cli_show_the_gate_step(scaled, sd_pipe, tmp_path):
    tr, _ = scaled
    conv = ats.stats.convergence(tr, tol=0.05)
    table = ats.stats.convergence_table(conv)
    assert "‖O_t − O_t−1‖/‖O_t‖ of the outputs, mean over 7 sites (sample 1)" in table
    assert "stable from step 3 (tol 0.05)" in table
    ax = ats.plot.convergence(conv).axes[0]
    assert ax.get_ylabel() == "‖Oₜ − Oₜ₋₁‖ / ‖Oₜ‖ of the outputs"
    assert "suggested gate step 3" in ax.get_legend_handles_labels()[1]

    gated = record(sd_pipe, tmp_path / "g.zarr", Gate(2), output_change=True)
    maps_table = ats.stats.convergence_table(ats.stats.convergence(gated, of="maps"))
    assert "of the maps" in maps_table.splitlines()[0] and maps_table.splitlines()[3:5] == ["   2  gated", "   3  gated"]
    assert "gated steps 2–3" in ats.plot.convergence(ats.stats.convergence(gated)).axes[0].get_legend_handles_labels()[1]

    run = ["stats", str(tr.path), "--convergence"]
    done = cli(*run, "--tol", "0.05")
    assert done.exit_code == 0, done.stderr
    assert done.stdout.rstrip().endswith("suggested gate step: 3") and "of the outputs" in done.stdout
    done = cli(*run, "--tol", "0.005", "--of", "outputs")
    assert done.exit_code == 0, done.stderr
    assert "suggested gate step: none — no gate step at tol=0.005" in done.stdout and "is 0.0101 (from step 4 on)" in done.stdout
