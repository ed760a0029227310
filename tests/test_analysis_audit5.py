"""Reading traces of runs that are not the plain "N steps, guidance on, complete" case (audit 5): img2img (steps start
mid-schedule), Heun (2N−1 steps, repeated timesteps), guidance off, a CFG cutoff with both branches, an interrupted run,
one step, every head, every token, TGATE's gated steps, inpainting with ``padding_mask_crop``. The statistics are
checked against a hand computation from the raw zarr arrays (numpy, float64); the figures, report and viewer against
what the run did."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import zarr
from PIL import Image

import attnscope as ats

PROMPT = "a red circle and a blue square"
TARGETS = ["red circle", "blue square"]


def picture(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    """Traces of the shapes model: text-to-image, img2img (strength 0.5), Heun, guidance off, interrupted, and a
    TGATE rerun whose last steps are gated."""
    import diffusers

    d = tmp_path_factory.mktemp("audit5")
    out = {"plain": ats.capture(shapes, PROMPT, seed=0, store=d / "plain.zarr", num_inference_steps=4, heads="all")}
    img2img = quiet(diffusers.StableDiffusionImg2ImgPipeline(**shapes.components))
    out["img2img"] = ats.capture(img2img, PROMPT, seed=0, store=d / "img2img.zarr", image=picture(0), strength=0.5,
                                 num_inference_steps=8)
    heun = quiet(diffusers.StableDiffusionPipeline(**{
        **shapes.components, "scheduler": diffusers.HeunDiscreteScheduler.from_config(shapes.scheduler.config)}))
    out["heun"] = ats.capture(heun, PROMPT, seed=0, store=d / "heun.zarr", num_inference_steps=3)
    out["nocfg"] = ats.capture(shapes, PROMPT, seed=0, store=d / "nocfg.zarr", num_inference_steps=3,
                               guidance_scale=1.0)

    def stop(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ats.AttnscopeWarning)  # "incomplete"
        out["interrupted"] = ats.capture(shapes, PROMPT, seed=0, store=d / "interrupted.zarr", num_inference_steps=4,
                                         callback_on_step_end=stop)
    out["tgate"] = ats.rerun(out["plain"], [ats.regulate.TGate(gate_step=2)], pipe=shapes, store=d / "tgate.zarr")
    return out


def raw_maps(tr, site):
    """The site's stored maps read with zarr alone, float64, heads averaged: (step, sample, y, x, token)."""
    group = zarr.open_group(str(tr.path), mode="r")
    return np.asarray(group["sites"][site]["attention"][:], dtype=np.float64).mean(axis=2)


def hand_statistics(tr, site, targets):
    """docs/analysis.md's definitions by hand on one site: target shares, entropy, Gini, sink share per step (sample 0);
    ``targets`` are lists of token positions."""
    group = zarr.open_group(str(tr.path), mode="r")
    words = np.array(group["token_role"][:].tolist(), dtype=object)[0] == "word"
    maps = raw_maps(tr, site)[:, 0]
    rows = []
    for a in maps.reshape(maps.shape[0], -1, maps.shape[-1]):
        sums = a.sum(0)
        share = np.full(sums.shape, np.nan)
        share[words] = sums[words] / sums[words].sum()
        q = a[:, words] / a[:, words].sum(1, keepdims=True)
        m = share[words]
        rows.append({"target_share": [share[t].sum() for t in targets],
                     "entropy": -(q * np.log(q)).sum(1).mean(),
                     "gini": np.abs(m[:, None] - m[None, :]).sum() / (2 * m.size * m.sum()),
                     "sink_share": 1 - sums[words].sum() / sums.sum()})
    return rows


@pytest.mark.parametrize("kind", ["plain", "img2img", "heun", "nocfg", "interrupted", "tgate"])
def test_statistics_equal_a_hand_computation_from_the_raw_arrays(runs, kind):
    """Every heads="all" / mid-schedule / repeated-timestep / guidance-off / incomplete / gated trace: the statistics
    and the convergence curve equal the definitions computed from the zarr arrays; the steps are the run's, with their
    timesteps; NaN (gated) steps stay NaN."""
    tr = runs[kind]
    group = zarr.open_group(str(tr.path), mode="r")
    written = [s for s in range(tr.num_steps) if s < tr.steps_written]
    ds = ats.stats.dominance(tr, targets=TARGETS)
    conv = ats.stats.convergence(tr, of="maps")
    assert ds["step"].values.tolist() == written
    np.testing.assert_array_equal(ds["timestep"].values, np.asarray(group["timestep"][:])[written])
    for site in tr.sites:
        for step, row in zip(written, hand_statistics(tr, site, [[2, 3], [6, 7]])):
            got = ds.sel(site=site, step=step, sample=0)
            np.testing.assert_allclose(got.target_share.values, row["target_share"], atol=1e-6)
            for name in ("entropy", "gini", "sink_share"):
                np.testing.assert_allclose(float(got[name]), row[name], atol=1e-6, err_msg=f"{kind} {site} {name}")
        maps = raw_maps(tr, site)[written, 0]
        change = [np.nan] + [np.linalg.norm(maps[t] - maps[t - 1]) / np.linalg.norm(maps[t])
                             for t in range(1, len(written))]
        np.testing.assert_allclose(conv.convergence.sel(site=site, sample=0).values, change, atol=1e-6)
    if kind == "tgate":
        assert np.isnan(ds.target_share.sel(step=[2, 3]).values).all()


def test_compare_refuses_runs_of_another_schedule(runs):
    """A text-to-image run (t = 999, 749, …) and an img2img run of as many steps (strength 0.5: t = 499, …) are two
    runs of the prompt and size, but their step k is another noise level: compare paired them step by step and
    reported the difference as a change. Now one error names the timesteps; a rerun still compares."""
    plain, img2img = runs["plain"], runs["img2img"]
    assert plain.num_steps == img2img.num_steps == 4
    assert plain.timesteps[0] != img2img.timesteps[0]  # 999 vs 499
    with pytest.raises(ats.AttnscopeError, match=r"timesteps differ \(step 0: t=999 vs t=499"):
        ats.compare(plain, img2img, TARGETS)
    pytest.importorskip("anywidget")
    with pytest.raises(ats.AttnscopeError, match=r"compare=.*timesteps differ"):
        ats.view(plain, compare=img2img)
    c = ats.compare(plain, runs["tgate"], TARGETS)  # the same schedule: compared, gated steps left out
    assert c.stats.attrs["compared_steps"] == [0, 1]


def test_neglect_risk_warns_off_the_schedule_its_weights_were_fitted_on(runs, shapes, tmp_path):
    """The shipped weights are per step of the shapes model's 20-step runs; step 2 of a 4-step run (t=499) or of an
    img2img run (t=249) is another point of the schedule, and neglect_risk gave a number without a word. It warns now,
    with the same number; a 20-step run and maps that do not say their timestep (risk_above's live maps) do not."""
    for kind in ("plain", "img2img"):
        tr = runs[kind]
        with pytest.warns(ats.AttnscopeWarning, match=r"fitted at step 2 of the shapes model's 20-step runs \(t=899\)"):
            risk = ats.stats.neglect_risk(tr, TARGETS, step=2)
        with pytest.warns(ats.AttnscopeWarning, match="not calibrated"):
            ats.stats.neglect_risk({s: tr.attention(s) for s in tr.sites}, TARGETS, step=2)
        model = ats.stats.neglect_model()["steps"]["2"]  # the same number as before: σ(w0 + w·z) by hand
        x = ats.stats.neglect_features(tr, TARGETS, step=2)
        z = np.array([(float(x[f][0]) - m) / s for f, m, s in zip(ats.stats.NEGLECT_FEATURES, model["mean"], model["std"])])
        np.testing.assert_allclose(float(risk[0]), 1 / (1 + np.exp(-(model["weights"][0] + z @ model["weights"][1:]))))
    full = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "full.zarr", num_inference_steps=20, steps=[5])
    live = {s: full.attention(s).sel(step=[5]).drop_vars("timestep").assign_attrs(run_steps=None) for s in full.sites}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ats.AttnscopeWarning)
        ats.stats.neglect_risk(full, TARGETS, step=5)
        ats.stats.neglect_risk(live, TARGETS, step=5)


def test_dominance_lines_keep_steps_without_maps_on_the_axis(runs):
    """On a TGATE trace the lines stop at the gate; the x axis ended there too, so the gated steps were not in the
    figure at all. Now the axis spans every step and a band labels the steps without maps; the entropy's axis says
    what the statistic is (per pixel, not of the shares)."""
    tr = runs["tgate"]
    fig = ats.plot.dominance_lines(ats.stats.dominance(tr, targets=TARGETS))
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo <= 0 and hi >= tr.num_steps - 1
    assert "no maps: steps 2–3" in ax.get_legend_handles_labels()[1]
    assert ax.get_legend().get_title().get_text() == "target"
    entropy = ats.plot.dominance_lines(ats.stats.dominance(runs["plain"], targets=TARGETS), "entropy")
    assert "per-pixel" in entropy.axes[0].get_ylabel()
    assert not [p for p in entropy.axes[0].patches]  # every step has maps: no band


def test_report_says_which_steps_ran(runs, tmp_path):
    """An img2img run's summary said "steps 4": not that 8 were asked with strength 0.5, nor that they start at
    t=499; Heun's said 5 for num_inference_steps=3. The steps row now gives both and the timesteps (from the trace)."""
    from attnscope.plot._report import _summary_rows

    rows = dict(_summary_rows(runs["img2img"]))
    t = runs["img2img"].timesteps
    assert rows["steps"].startswith(f"4 (num_inference_steps 8, strength 0.5), t = {t[0]:g} … {t[-1]:g}")
    assert rows["pipeline arguments"] == "not recorded: image"
    assert dict(_summary_rows(runs["heun"]))["steps"].startswith("5 (num_inference_steps 3)")
    assert "guidance off" in dict(_summary_rows(runs["nocfg"]))["steps"]


def test_inpainting_crop_maps_are_drawn_inside_the_crop_box(sd_pipe, tmp_path):
    """With padding_mask_crop the maps cover the crop the pipeline generated, not the stored image: heatmaps, the
    viewer and the report drew them stretched over the whole image without a word (then: with a warning). Capture now
    records the crop's box and each draws the maps inside it, without a warning; the report says so. An inpainting
    run without the crop is drawn over the whole image. (tests/test_crop_audit5.py checks the placement by hand.)"""
    import diffusers
    from diffusers.image_processor import VaeImageProcessor

    pipe = quiet(diffusers.StableDiffusionInpaintPipeline(**sd_pipe.components))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:24, 36:60] = 255
    kw = dict(image=picture(1, 64), mask_image=Image.fromarray(mask), num_inference_steps=2)
    crop = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "crop.zarr", height=32, width=32, padding_mask_crop=4, **kw)
    whole = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "whole.zarr", height=64, width=64, **kw)
    assert crop.images[0].size == (64, 64)  # the pasted-back image; the maps are of the 32 px crop
    x1, y1, x2, y2 = box = crop.manifest["run"]["crop_region"]
    assert box == list(VaeImageProcessor.get_crop_region(Image.fromarray(mask), 32, 32, pad=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ats.AttnscopeWarning)
        fig = ats.plot.heatmaps(crop, ["circle"])
        path = ats.report(crop, tmp_path / "crop.html", words=["circle"])
        assert ats.plot.heatmaps(whole, ["circle"]).axes[1].images[-1].get_extent() == [-0.5, 63.5, 63.5, -0.5]
    assert fig.axes[1].images[-1].get_extent() == [x1 - 0.5, x2 - 0.5, y2 - 0.5, y1 - 0.5]
    assert "Maps of a crop." in path.read_text()
    pytest.importorskip("anywidget")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ats.AttnscopeWarning)
        shown = ats.view(crop).current_map()
    inside = np.zeros(shown.shape[1:], bool)
    inside[y1:y2, x1:x2] = True
    assert (x1, y1, x2, y2) != (0, 0, 64, 64) and np.isnan(shown[:, ~inside]).all()
    assert np.isfinite(shown[:, inside]).all()


def test_convergence_figure_of_one_step_says_there_is_no_curve(shapes, tmp_path):
    """A one-step trace has no step-to-step change (its curve is NaN): the figure was an empty axes over x = ±0.05.
    It now spans the run's step and says why there is no curve."""
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "one.zarr", num_inference_steps=1)
    conv = ats.stats.convergence(tr)
    assert np.isnan(conv.mean_convergence.values).all()
    ax = ats.plot.convergence(conv).axes[0]
    assert ax.get_xlim() == (-0.5, 0.5)
    assert any("no step-to-step change" in t.get_text() for t in ax.texts)


def test_comparison_with_an_incomplete_trace_says_so(runs):
    """Comparing a run with an interrupted one compared the steps it wrote and said nothing of why the rest were
    left out (the table's note spoke of gated steps only). The note now names the incomplete trace."""
    c = ats.compare(runs["plain"], runs["interrupted"], TARGETS)
    written = runs["interrupted"].steps_written
    assert c.stats.attrs["compared_steps"] == list(range(written))
    assert c.table().splitlines()[-1] == (f"compared steps 0–{written - 1} (trace b is incomplete: {written} of "
                                          f"{runs['interrupted'].num_steps} steps written)")


def test_grid_marks_the_panels_of_gated_steps(runs):
    """The step × site grid of a TGATE trace drew its gated rows as empty white panels labelled only with the step,
    which read as no attention; each such panel now says it was gated, and the computed ones say nothing."""
    tr = runs["tgate"]
    fig = ats.plot.site_step_grid(tr, "circle")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    n_sites = len(tr.sites)
    for row, step in enumerate(range(tr.num_steps)):
        texts = [[t.get_text() for t in ax.texts] for ax in panels[row * n_sites:(row + 1) * n_sites]]
        assert texts == [["gated:\nno map"] if step in tr.gated_steps else []] * n_sites, step


def test_map_curve_follows_the_stored_tokens_and_the_output_curve_does_not(sd_pipe, tmp_path):
    """docs/analysis.md: one run captured with tokens="all" and tokens="prompt" gives two map curves (the norm runs
    over the stored positions: by hand here), and one output curve."""
    traces = {tokens: ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / f"{tokens}.zarr", tokens=tokens,
                                  num_inference_steps=2, height=32, width=32, output_change=True)
              for tokens in ("all", "prompt")}
    site = traces["all"].sites[0]
    kept = traces["prompt"].attention(site).sizes["token"]
    maps = raw_maps(traces["all"], site)[:, 0]
    for tokens, cols in (("all", slice(None)), ("prompt", slice(0, kept))):
        change = np.linalg.norm(maps[1][..., cols] - maps[0][..., cols]) / np.linalg.norm(maps[1][..., cols])
        got = ats.stats.convergence(traces[tokens], of="maps").convergence.sel(site=site, sample=0, step=1)
        np.testing.assert_allclose(float(got), change, rtol=1e-3)
    outputs = [ats.stats.convergence(t, of="outputs").convergence.values for t in traces.values()]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_step_table_gives_each_step_its_timestep(runs):
    """`attnscope stats --by step` numbered the steps only: an img2img run's step 0 (t=499) read as the start of the
    denoising. The table ends each row with the step's timestep, from the trace."""
    tr = runs["img2img"]
    lines = ats.stats.dominance_table(ats.stats.dominance(tr, targets=TARGETS), by="step").splitlines()
    assert lines[1].split()[-1] == "t"
    assert [float(line.split()[-1]) for line in lines[2:]] == [float(t) for t in tr.timesteps]
