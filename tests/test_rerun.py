"""``ats.rerun``: regenerating a trace from its manifest (with interventions), ``compare``, ``attnscope rerun``."""

import hashlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import zarr

import attnscope as ats
from attnscope import compare, rerun
from attnscope.regulate import AttentionRegulation, Reweight
from attnscope.testing import tiny_sd_pipeline

from .conftest import cli

PROMPT = "a red circle and a blue square"


class ScaleWord:
    """Test intervention: multiply the post-softmax attention on one word's tokens (cond rows) by ``factor``."""

    role = "intervention"

    def __init__(self, position, factor):
        self.position, self.factor = position, factor

    def describe(self):
        return {"name": "ScaleWord", "params": {"position": self.position, "factor": self.factor}}

    def stages(self, ctx):
        return ("probs",)

    def on_probs(self, ctx, probs):
        out = probs.clone()
        out[ctx.rows.cond, :, :, self.position] *= self.factor
        return out


class ZeroAt:
    """Test intervention: no attention at all (cond rows) at one site and step."""

    role = "intervention"

    def __init__(self, site, step):
        self.site, self.step = site, step

    def stages(self, ctx):
        return ("probs",) if ctx.site.name == self.site and ctx.step == self.step else ()

    def on_probs(self, ctx, probs):
        out = probs.clone()
        out[ctx.rows.cond] = 0
        return out


class Silent:
    """Test intervention without describe(): changes nothing."""

    role = "intervention"

    def stages(self, ctx):
        return ()


def images(tr):
    return np.stack([np.asarray(im) for im in tr.images])


def assert_same_maps(a, b):
    assert a.sites == b.sites
    for site in a.sites:
        np.testing.assert_array_equal(a.attention(site).values, b.attention(site).values, err_msg=site)


def edited_copy(trace, dest, edit):
    """A copy of ``trace`` whose root attributes went through ``edit(attrs)`` (plain zarr)."""
    shutil.copytree(trace.path, dest)
    root = zarr.open_group(str(dest), mode="r+")
    attrs = dict(root.attrs)
    edit(attrs)
    root.attrs.update(attrs)
    return dest


@pytest.fixture(scope="module")
def parent(shapes, tmp_path_factory):
    store = tmp_path_factory.mktemp("parent") / "a.zarr"
    return ats.capture(shapes, PROMPT, seed=3, store=store, num_inference_steps=8)


@pytest.fixture(scope="module")
def steered(parent, tmp_path_factory):
    """A rerun of ``parent`` with the attention on "circle" tripled."""
    circle = parent.words["circle"][0]
    return rerun(parent, [ScaleWord(circle, 3.0)], store=tmp_path_factory.mktemp("steered") / "s.zarr")


# -- reproduction -------------------------------------------------------------------------------------------
def test_rerun_without_interventions_is_bit_identical(parent):
    again = rerun(parent)
    assert again.path == parent.path.with_name("a-rerun.zarr") and again.complete
    assert np.array_equal(images(again), images(parent))
    assert_same_maps(parent, again)
    np.testing.assert_array_equal(again.timesteps, parent.timesteps)
    # a rerun of the rerun reproduces it too, and links to it
    third = rerun(again, store=parent.path.with_name("third.zarr"))
    assert np.array_equal(images(third), images(parent)) and third.manifest["parent"]["path"] == str(again.path)


def test_manifest_records_parent_and_interventions(parent, tmp_path):
    again = rerun(parent, [Silent()], store=tmp_path / "r.zarr")
    digest = hashlib.sha256(json.dumps(parent.manifest, sort_keys=True).encode()).hexdigest()
    assert again.manifest["parent"] == {"path": str(parent.path), "manifest_sha256": digest}
    assert again.manifest["interventions"] == [{"name": "Silent"}]
    for key in ("model", "scheduler", "dtype", "capture"):
        assert again.manifest[key] == parent.manifest[key], key
    run, before = again.manifest["run"], parent.manifest["run"]
    for key in ("prompts", "seed", "generator_device", "num_inference_steps", "guidance_scale", "height", "width",
                "token_ids", "latent_shape", "exact"):
        assert run[key] == before[key], key
    assert np.array_equal(images(again), images(parent))  # an intervention that changes nothing changes nothing


def test_rerun_with_an_intervention_changes_image_and_maps(parent, steered):
    circle = parent.words["circle"][0]
    assert steered.manifest["interventions"] == [{"name": "ScaleWord", "params": {"position": circle, "factor": 3.0}}]
    assert not np.array_equal(images(steered), images(parent))
    site = parent.sites[0]
    before = parent.attention(site).isel(step=0).sel(token=circle).values.astype(np.float64)
    after = steered.attention(site).isel(step=0).sel(token=circle).values.astype(np.float64)
    # step 0 starts from the same latents: the recorder sees the intervention's tripled probabilities
    np.testing.assert_allclose(after, 3 * before, rtol=2e-3, atol=1e-4)


def test_rerun_with_reweight(parent, tmp_path):
    done = rerun(parent, [Reweight("circle", 2.0)], store=tmp_path / "rw.zarr")
    assert done.manifest["interventions"] == [Reweight("circle", 2.0).describe()]
    assert not np.array_equal(images(done), images(parent))
    shares = compare(parent, done, ["circle"]).stats.target_share
    assert float(shares.isel(step=0).mean()) > 0


def test_rerun_restores_a_changed_scheduler(shapes, tmp_path):
    from diffusers import EulerDiscreteScheduler

    original = shapes.scheduler
    shapes.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        tr = ats.capture(shapes, "a green triangle", seed=1, store=tmp_path / "e.zarr", num_inference_steps=4)
    finally:
        shapes.scheduler = original
    assert tr.manifest["scheduler"]["class"] == "EulerDiscreteScheduler"
    again = rerun(tr, pipe=shapes)  # the pipe has DDIM again: the rerun must use Euler, then give DDIM back
    assert again.manifest["scheduler"] == tr.manifest["scheduler"]
    assert np.array_equal(images(again), images(tr))
    assert shapes.scheduler is original


def test_capture_options_override_the_parent_spec(parent, tmp_path):
    again = rerun(parent, store=tmp_path / "o.zarr", sites="up_blocks.*", steps=[0, 7], heads="all", exact=True)
    spec = again.manifest["capture"]
    assert spec["steps"] == [0, 7] and spec["heads"] == "all" and all(s.startswith("up_blocks.") for s in spec["sites"])
    assert again.manifest["run"]["exact"] is True
    assert again.attention(again.sites[0]).sizes["head"] > 1
    with pytest.raises(ats.AttnscopeError, match="{'colour': ...}\\): unknown capture option; expected one of sites"):
        rerun(parent, store=tmp_path / "x.zarr", colour="red")


def test_unrecorded_pipeline_arguments_warn(shapes, tmp_path):
    tr = ats.capture(shapes, PROMPT, seed=5, store=tmp_path / "cb.zarr", num_inference_steps=3,
                     callback_on_step_end=lambda pipe, step, t, kw: {})
    assert tr.manifest["run"]["reproducible"] is False
    with pytest.warns(UserWarning, match="callback_on_step_end"):
        again = rerun(tr, pipe=shapes)
    assert np.array_equal(images(again), images(tr)) and again.manifest["run"]["reproducible"] is True


def test_local_directory_model(tmp_path):
    model = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(model)
    pipe = ats.load_pipeline(model)
    tr = ats.capture(pipe, ["a red circle", "a blue square"], seed=[11, 12], store=tmp_path / "t.zarr",
                     num_inference_steps=3, height=32, width=48, negative_prompt=["green", "red"], branch="both")
    assert tr.manifest["model"]["reference"] == str(model)
    again = rerun(tr)  # loads the directory named in the manifest
    assert again.manifest["model"]["reference"] == str(model) and again.manifest["capture"]["branch"] == "both"
    assert np.array_equal(images(again), images(tr)) and images(tr).shape == (2, 32, 48, 3)
    assert_same_maps(tr, again)
    for site in tr.sites[:2]:
        np.testing.assert_array_equal(tr.attention(site, "uncond").values, again.attention(site, "uncond").values)


# -- refusals ---------------------------------------------------------------------------------------------
def test_weight_mismatch_is_refused(parent, tmp_path):
    pipe = ats.load_pipeline("shapes")
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] += 0.5  # element 0 is in the fingerprint's strided sample
    with pytest.raises(ats.AttnscopeError, match=r"the weights of unet differ .*model 'shapes'") as err:
        rerun(parent, pipe=pipe, store=tmp_path / "w.zarr")
    assert str(parent.path) in str(err.value)
    assert not (tmp_path / "w.zarr").exists()

    def corrupt(attrs):
        attrs["manifest"]["model"]["weights_fingerprint"]["vae"] = "0" * 64

    copy = edited_copy(parent, tmp_path / "fp.zarr", corrupt)
    with pytest.raises(ats.AttnscopeError, match=r"the weights of vae differ .*trace 000000000000"):
        rerun(copy, store=tmp_path / "w2.zarr")


def test_dtype_mismatch_of_a_given_pipe_is_refused(parent, tmp_path):
    pipe = ats.load_pipeline("shapes", dtype="bfloat16")
    with pytest.raises(ats.AttnscopeError, match="its dtype is bfloat16, the trace was captured in float32"):
        rerun(parent, pipe=pipe, store=tmp_path / "d.zarr")


def test_incomplete_trace_is_refused(parent, tmp_path):
    copy = edited_copy(parent, tmp_path / "inc.zarr", lambda attrs: attrs.update(complete=False))
    with pytest.raises(ats.AttnscopeError, match="is incomplete") as err:
        rerun(copy)
    assert str(copy) in str(err.value) and not (tmp_path / "inc-rerun.zarr").exists()


def test_missing_model_is_refused(parent, tmp_path):
    def elsewhere(attrs):
        attrs["manifest"]["model"]["reference"] = str(tmp_path / "gone")

    copy = edited_copy(parent, tmp_path / "m.zarr", elsewhere)
    with pytest.raises(ats.AttnscopeError, match="its model cannot be loaded: model=.*gone.*unknown model") as err:
        rerun(copy)
    assert str(copy) in str(err.value)

    def nameless(attrs):
        attrs["manifest"]["model"]["reference"] = None

    copy = edited_copy(parent, tmp_path / "n.zarr", nameless)
    with pytest.raises(ats.AttnscopeError, match="names no model .*pass the pipeline itself with pipe="):
        rerun(copy)


def test_bad_store_and_interventions_are_refused(parent, shapes, tmp_path):
    with pytest.raises(ats.AttnscopeError, match="is the parent trace"):
        rerun(parent, store=parent.path, overwrite=True)
    rerun(parent, pipe=shapes, store=tmp_path / "x.zarr")
    with pytest.raises(ats.AttnscopeError, match="exists; pass overwrite=True"):
        rerun(parent, pipe=shapes, store=tmp_path / "x.zarr")
    assert rerun(parent, pipe=shapes, store=tmp_path / "x.zarr", overwrite=True).complete
    with pytest.raises(ats.AttnscopeError, match=r"interventions\[0\]='circle': expected a hook client"):
        rerun(parent, ["circle"], pipe=shapes, store=tmp_path / "y.zarr")
    with pytest.raises(ats.AttnscopeError, match="got role='observer'"):
        rerun(parent, [ats.Recorder(tmp_path / "z.zarr")], pipe=shapes, store=tmp_path / "y.zarr")
    with pytest.raises(ats.AttnscopeError, match="expected an attnscope Trace or the path"):
        rerun(42)


def test_recorder_extra_manifest_cannot_replace_built_fields(tmp_path):
    with pytest.raises(ats.AttnscopeError, match=r"keys \['run'\] are built by attnscope"):
        ats.Recorder(tmp_path / "r.zarr", extra_manifest={"run": {}, "note": 1})
    with pytest.raises(ats.AttnscopeError, match="not JSON-able"):
        ats.Recorder(tmp_path / "r.zarr", extra_manifest={"note": object()})


def test_trace_of_a_bare_recorder_is_refused(shapes, tmp_path):
    rec = ats.Recorder(tmp_path / "bare.zarr")
    with ats.hooks(shapes, rec):
        rec.add_images(shapes(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images)
    with pytest.raises(ats.AttnscopeError, match="no prompts/seed .*bare Recorder"):
        rerun(rec.path, pipe=shapes)


# -- compare ----------------------------------------------------------------------------------------------
def test_compare_is_after_minus_before(parent, steered):
    c = compare(parent, steered)
    assert c.targets == ["a", "red", "circle", "and", "blue", "square"]
    before = ats.stats.dominance(ats.open_trace(parent.path))
    after = ats.stats.dominance(ats.open_trace(steered.path))
    assert set(c.stats.data_vars) == set(before.data_vars) and dict(c.stats.sizes) == dict(before.sizes)
    for name in before.data_vars:
        with np.errstate(invalid="ignore"):
            expected = after[name].values - before[name].values
        np.testing.assert_array_equal(c.stats[name].values, expected, err_msg=name)
        np.testing.assert_array_equal(c.before[name].values, before[name].values, err_msg=name)
    circle = c.stats.target_share.sel(target="circle")
    assert float(circle.isel(step=0).min()) > 0  # tripling its attention raises its share
    table = c.table()
    assert table.splitlines()[0].split() == ["target", "before", "after", "change"] and "circle" in table
    sub = compare(parent.path, steered.path, ["circle", "blue square"], sites="up_blocks.1.*", steps=[0, 1])
    assert dict(sub.stats.sizes) == {"step": 2, "site": 2, "sample": 1, "token": 7, "target": 2}


def test_compare_figure_renders(parent, steered):
    c = compare(parent, steered, ["circle", "square"])
    fig = c.figure()
    assert len(fig.axes) == 2 * 3 + 1 + 2  # two rows of image and two maps, the bars, a colour bar per target
    assert [ax.get_title() for ax in fig.axes[:3]] == ["before: a.zarr", "circle (before)", "square (before)"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert [b.get_xlabel() for b in bars] == ["attention on circle", "attention on square"]
    maps = [ax for ax in fig.axes if ax.get_title().startswith(("circle (", "square ("))]
    for word, bar in zip(["circle", "square"], bars):  # a target's before and after share its bar's scale, from 0
        before, after = (ax.images[0] for ax in maps if ax.get_title().startswith(word))
        top = max(float(np.max(before.get_array())), float(np.max(after.get_array())))
        assert before.get_clim() == after.get_clim() == (0.0, pytest.approx(top))
        assert bar.get_xlim() == pytest.approx((0.0, top))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    square = parent.words["square"][0]  # a token position as target
    by_position = compare(parent, steered, [square], sites="mid_block.*")
    assert by_position.targets == [str(square)] and len(by_position.figure().axes) == 2 * 2 + 1 + 1


def test_compare_refuses_different_generations(parent, shapes, tmp_path):
    other = ats.capture(shapes, "a green triangle", seed=3, store=tmp_path / "o.zarr", num_inference_steps=2)
    with pytest.raises(ats.AttnscopeError, match="prompts differ .*'a green triangle'"):
        compare(parent, other)
    wide = ats.capture(shapes, PROMPT, seed=3, store=tmp_path / "w.zarr", num_inference_steps=2, width=40)
    with pytest.raises(ats.AttnscopeError, match="their width differs \\(32 vs 40\\)"):
        compare(parent, wide)


# -- command line -----------------------------------------------------------------------------------------
def test_rerun_command(parent, tmp_path):
    out = tmp_path / "cli.zarr"
    done = cli("rerun", str(parent.path), "-o", str(out))
    assert done.exit_code == 0, done.stderr
    assert f"trace: {out}" in done.stdout and "interventions: none" in done.stdout
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["target"])
    assert [line.split()[0] for line in lines[header + 1:]] == ["a", "red", "circle", "and", "blue", "square"]
    # on another number of CPU threads (a separate process may use one) a rerun is equal up to float rounding;
    # the command runs in this process, on the parent's own thread count: bit for bit
    assert all(line.split()[-1] in ("+0.000", "-0.000") for line in lines[header + 1:])
    assert np.abs(images(ats.open_trace(out)).astype(int) - images(parent)).max() <= 2
    assert torch.get_num_threads() == parent.manifest["cpu_threads"]
    assert np.array_equal(images(ats.open_trace(out)), images(parent))
    assert_same_maps(parent, ats.open_trace(out))


def test_rerun_command_with_interventions(parent, tmp_path):
    out = tmp_path / "reg.zarr"
    done = cli("rerun", str(parent.path), "-o", str(out), "--regulate", "circle,blue square",
               "--reweight", "red=2.0", "--reweight", "blue square=0.5")
    assert done.exit_code == 0, done.stderr
    assert "interventions: AttentionRegulation, Reweight, Reweight" in done.stdout
    rows = [line.rsplit(None, 3)[0] for line in done.stdout.splitlines()[-3:]]
    assert rows == ["circle", "blue square", "red"]
    described = ats.open_trace(out).manifest["interventions"]
    assert described[0] == AttentionRegulation(targets=["circle", "blue square"]).describe()
    assert described[1:] == [Reweight("red", 2.0).describe(), Reweight("blue square", 0.5).describe()]


def test_rerun_command_with_attend_and_excite(parent, tmp_path):
    out = tmp_path / "excite.zarr"
    done = cli("rerun", str(parent.path), "-o", str(out), "--excite", "circle,square")
    assert done.exit_code == 0, done.stderr
    assert "interventions: AttendAndExcite" in done.stdout and "image change" in done.stdout
    assert [line.rsplit(None, 3)[0] for line in done.stdout.splitlines()[-2:]] == ["circle", "square"]
    again = ats.open_trace(out)
    assert again.manifest["interventions"][0]["params"]["targets"] == ["circle", "square"]
    assert not np.array_equal(images(again), images(parent))


def test_rerun_command_errors(parent, tmp_path):
    done = cli("rerun", str(parent.path), "--reweight", "circle", "--reweight", "square=x")
    assert done.exit_code == 2 and "error: --reweight 'circle': expected WORD=FACTOR" in done.stderr
    done = cli("rerun", str(tmp_path / "missing.zarr"))
    assert done.exit_code == 2 and "error:" in done.stderr and "missing.zarr" in done.stderr
    assert "is not an attnscope trace" in done.stderr
    done = cli("rerun", str(parent.path), "-o", str(parent.path))
    assert done.exit_code == 2 and "is the parent trace" in done.stderr


def test_rerun_command_help_shows_an_example():
    done = cli("rerun", "--help")
    text = " ".join(done.stdout.split())
    assert done.exit_code == 0 and "Example: attnscope rerun runs/demo.zarr --regulate 'circle,square'" in text


def test_another_cpu_thread_count_warns_and_names_the_fix(parent, tmp_path):
    recorded = parent.manifest["cpu_threads"]
    assert recorded == torch.get_num_threads()
    other = 1 if recorded != 1 else 2
    torch.set_num_threads(other)
    try:
        with pytest.warns(UserWarning, match=rf"captured with {recorded} CPU threads, this rerun uses {other}.*"
                                             rf"torch.set_num_threads\({recorded}\)"):
            rerun(parent, store=tmp_path / "t.zarr")
    finally:
        torch.set_num_threads(recorded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same count: no warning
        rerun(parent, store=tmp_path / "same.zarr")


def test_a_plain_rerun_of_a_steered_trace_warns_that_its_interventions_are_not_reapplied(parent, steered, tmp_path):
    with pytest.warns(UserWarning, match=r"was made with interventions \(ScaleWord; .* not a copy of this trace"):
        again = rerun(steered, store=tmp_path / "again.zarr")
    assert np.array_equal(images(again), images(parent)) and not np.array_equal(images(again), images(steered))
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # given again, it reproduces the steered trace: no warning
        same = rerun(steered, [ScaleWord(parent.words["circle"][0], 3.0)], store=tmp_path / "same.zarr")
    assert np.array_equal(images(same), images(steered))


def test_compare_takes_before_and_after_over_the_same_steps(parent, tmp_path):
    """A rerun that captured fewer steps: before was the mean over all 8 steps, after over 2, so a plain rerun's
    table showed changes of ±0.01 while its stats were 0."""
    sub = rerun(parent, store=tmp_path / "sub.zarr", steps=[1, 5])
    c = compare(parent, sub, ["circle", "square"])
    assert c.before.step.values.tolist() == c.after.step.values.tolist() == [1, 5]
    # ~0, not 0: recording other steps than the parent runs other kernels at the steps before them (docs/rerun.md,
    # "another capture spec"; 1e-9 on some CPUs, 0 on others) — the bug gave ±0.01
    assert (c.shares()["change"].abs() < 1e-6).all() and float(abs(c.stats.target_share).max()) < 1e-6
    by_hand = ats.stats.dominance(parent, ["circle"], steps=[1, 5]).target_share.mean().item()
    assert c.shares().loc["circle", "before"] == pytest.approx(by_hand)


def test_compare_refuses_runs_of_other_lengths(parent, shapes, tmp_path):
    short = ats.capture(shapes, PROMPT, seed=3, store=tmp_path / "short.zarr", num_inference_steps=4)
    with pytest.raises(ats.AttnscopeError, match=r"their num_steps differs \(8 vs 4\)"):
        compare(parent, short)


def test_shares_of_one_sample_and_the_reports_table_follow_sample(shapes, tmp_path):
    """The report's before/after table averaged every sample although sample= picked one image."""
    two = ats.capture(shapes, [PROMPT, "a green triangle and a yellow circle"], seed=[0, 1], store=tmp_path / "m.zarr",
                      num_inference_steps=3)
    steered = rerun(two, [ScaleWord(3, 3.0)], store=tmp_path / "s.zarr")  # position 3: "circle" in the first prompt
    c = compare(two, steered, ["circle"])
    for sample in (0, 1):
        by_hand = ats.stats.dominance(two, ["circle"]).target_share.sel(sample=sample).mean().item()
        assert c.shares(sample).loc["circle", "before"] == pytest.approx(by_hand)
    assert c.shares(0).loc["circle", "before"] != pytest.approx(c.shares().loc["circle", "before"])
    page = ats.report(two, tmp_path / "r.html", compare=steered, sample=1, words=["circle"]).read_text()
    row = c.shares(1).loc["circle"]
    assert f"{100 * row.before:.1f} %" in page and f"{100 * row.change:+.1f} pt" in page


# -- compare: gated steps, NaN shares, sites one trace lacks, repeated targets (audit 2027-01) ---------------------
def test_compare_refuses_named_steps_that_a_run_gated(parent, tmp_path):
    """A gated step's maps are NaN (TGATE reused its cache): named in steps=, it fell out of the after mean only and
    the table showed a change the runs did not make."""
    gated = rerun(parent, [ats.regulate.TGate(5)], store=tmp_path / "g.zarr")
    assert gated.gated_steps == [5, 6, 7]
    with pytest.raises(ats.AttnscopeError, match=r"at steps=\[0, 6\]: trace b \('.*g\.zarr'\) gated step 6 \(TGATE"):
        compare(parent, gated, ["circle"], steps=[0, 6])
    with pytest.raises(ats.AttnscopeError, match=r"trace a \('.*g\.zarr'\) gated steps 5–7 .*steps=None"):
        compare(gated, parent, ["circle"], steps=slice(3, None))
    # before its gate TGATE computes the plain run's attention: named steps there compare equal
    c = compare(parent, gated, ["circle", "square"], steps=[0, 4])
    assert c.stats.attrs["compared_steps"] == [0, 4] and (c.shares()["change"] == 0).all()


def test_shares_average_only_where_both_runs_have_a_share(parent, tmp_path):
    """A share that is NaN in one run only (no attention there to divide) was left out of that run's mean but not
    the other's, so shares() showed a change where every other share was equal."""
    last = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"  # the last attention call of the UNet's pass
    zeroed = rerun(parent, [ZeroAt(last, 7)], store=tmp_path / "z.zarr")  # ... at the last step: nothing else changes
    c = compare(parent, zeroed, ["circle", "square"])
    assert np.isnan(c.after.target_share.sel(step=7, site=last).values).all()
    assert np.isnan(c.stats.target_share.values).sum() == c.stats.sizes["target"]  # only there
    assert np.nanmax(np.abs(c.stats.target_share.values)) == 0
    shares = c.shares()
    assert (shares["change"] == 0).all()
    by_hand = ats.stats.dominance(parent, ["circle"]).target_share.sel(target="circle")
    by_hand = by_hand.where(~((by_hand.step == 7) & (by_hand.site == last)))
    assert shares.loc["circle", "before"] == pytest.approx(float(np.nanmean(by_hand.values)))


def test_compare_names_the_trace_that_lacks_a_site(parent, tmp_path):
    """A site only one trace recorded gave 'no step was captured and computed in both'."""
    sub = rerun(parent, store=tmp_path / "sub.zarr", sites="up_blocks.1.*")
    down = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(ats.AttnscopeError, match=rf"trace b \('.*sub\.zarr'\) did not record {down}; the sites "
                                                 r"both recorded: up_blocks\.1\.attentions\.0"):
        compare(parent, sub, ["circle"], sites=[down, "up_blocks.1.*"])
    with pytest.raises(ats.AttnscopeError, match=r"trace a \('.*sub\.zarr'\) did not record down_blocks\.1.*, "
                                                 r"down_blocks\.2"):
        compare(sub, parent, ["circle"], sites="down_blocks.*")
    with pytest.raises(ats.AttnscopeError, match=r"'nowhere\.\*' matches no cross-attention site"):
        compare(parent, sub, ["circle"], sites="nowhere.*")
    c = compare(parent, sub, ["circle"], sites="up_blocks.1.*")
    assert c.stats["site"].values.tolist() == sub.sites  # recording fewer sites changes the maps by rounding only
    assert c.shares()["change"].abs().max() < 1e-6


def test_a_repeated_target_is_measured_once(parent, steered, tmp_path):
    """words=["circle", "circle"] failed in the report (TypeError) and gave two rows of one target in compare."""
    once, twice = compare(parent, steered, ["circle"]), compare(parent, steered, ["circle", "square", "circle"])
    assert twice.targets == ["circle", "square"]
    assert twice.shares().loc["circle"].tolist() == pytest.approx(once.shares().loc["circle"].tolist(), abs=1e-12)
    page = tmp_path / "r.html"
    expected = ats.report(parent, page, compare=steered, words=["circle"]).read_text()
    assert ats.report(parent, page, compare=steered, words=["circle", "circle"], overwrite=True).read_text() == expected
    result = cli("report", parent.path, "--compare", steered.path, "--words", "circle,circle", "-o", page, "--overwrite")
    assert result.exit_code == 0, result.output
    assert page.read_text() == expected


def test_a_numpy_int_is_one_token_position_everywhere_a_target_is_taken(parent, steered, tmp_path):
    """A token position read off an array (np.int64) is one target, as a Python int is: compare, the report, the
    heat maps and the interventions took only `int` as a single target and tried to iterate np.int64."""
    circle = parent.words["circle"][0]
    as_int, as_numpy = compare(parent, steered, circle), compare(parent, steered, np.int64(circle))
    assert as_numpy.shares().equals(as_int.shares())
    assert as_numpy.shares().index.tolist() == [str(circle)]
    assert Reweight(np.int64(circle), 3.0).describe() == Reweight(circle, 3.0).describe()
    assert AttentionRegulation(np.int64(circle)).describe() == AttentionRegulation(circle).describe()
    fig = ats.plot.heatmaps(parent, np.int64(circle))
    assert len(fig.axes) == len(ats.plot.heatmaps(parent, circle).axes)
    ats.report(parent, tmp_path / "r.html", words=np.int64(circle))
    assert (tmp_path / "r.html").stat().st_size > 0
    with pytest.raises(ats.AttnscopeError, match="target True"):
        compare(parent, steered, [True])
