"""``ats.rerun`` and ``ats.compare`` on bad or unusual input (audit 2026-12-07): each test failed before its fix."""

import shutil

import numpy as np
import pytest

import attnscope as ats
from attnscope import compare, rerun
from attnscope.regulate import Reweight

from .test_rerun import ZeroAt, edited_copy

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def parent(shapes, tmp_path_factory):
    return ats.capture(shapes, PROMPT, seed=3, store=tmp_path_factory.mktemp("parent") / "a.zarr",
                       num_inference_steps=3)


@pytest.fixture(scope="module")
def batch(shapes, tmp_path_factory):
    """Two prompts, two images each, one seed per image."""
    return ats.capture(shapes, ["a red circle", "a blue square"], seed=[1, 2, 3, 4], num_images_per_prompt=2,
                       store=tmp_path_factory.mktemp("batch") / "b.zarr", num_inference_steps=2)


# -- rerun ------------------------------------------------------------------------------------------------
def test_a_file_url_store_is_that_local_path(parent, shapes, tmp_path, monkeypatch):
    """store='file:///abs/x.zarr' (which capture takes as that path) was written to a relative folder 'file:' in
    the working directory, and the parent's own file:// URL was not recognised as the parent."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "url.zarr"
    done = rerun(parent, pipe=shapes, store=out.as_uri())
    assert done.path == out and done.complete
    with pytest.raises(ats.AttnscopeError, match="is the parent trace"):
        rerun(parent, pipe=shapes, store=parent.path.as_uri(), overwrite=True)
    assert ats.open_trace(parent.path).manifest == parent.manifest  # the parent is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["url.zarr"]


def test_a_remote_store_url_is_refused(parent, shapes, tmp_path, monkeypatch):
    """store='s3://bucket/x.zarr' was silently written to a local folder 's3:/bucket/x.zarr'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ats.AttnscopeError, match=r"store='memory://bucket/x\.zarr': a rerun writes a local "
                                                 r"directory.*upload_trace"):
        rerun(parent, pipe=shapes, store="memory://bucket/x.zarr")
    assert list(tmp_path.iterdir()) == []


def test_an_intervention_class_instead_of_an_instance_is_refused(parent, shapes, tmp_path):
    """Reweight (the class) was taken as a hook client and failed with 'describe() missing 1 required positional
    argument: self' (a TypeError), after the model was loaded."""
    for given in (Reweight, [Reweight]):
        with pytest.raises(ats.AttnscopeError, match=r"interventions\[0\]=<class '.*Reweight'>: a class; expected an "
                                                     r"instance of it, e\.g\. Reweight\(\.\.\.\)"):
            rerun(parent, given, pipe=shapes, store=tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()


def test_a_trace_overwritten_since_it_was_opened_is_refused(shapes, tmp_path):
    """A Trace object whose store another capture replaced was rerun from its stale manifest: the new trace was the
    old generation, its parent link pointing at a store that holds another one."""
    old = ats.capture(shapes, "a red circle", seed=1, store=tmp_path / "a.zarr", num_inference_steps=2)
    ats.capture(shapes, "a blue square", seed=2, store=tmp_path / "a.zarr", num_inference_steps=2, overwrite=True)
    with pytest.raises(ats.AttnscopeError, match=r"a\.zarr' was overwritten .* reopen it"):
        rerun(old, pipe=shapes, store=tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
    fresh = ats.open_trace(tmp_path / "a.zarr")
    shutil.rmtree(tmp_path / "a.zarr")
    with pytest.raises(ats.AttnscopeError, match=r"a\.zarr' was removed"):
        rerun(fresh, pipe=shapes, store=tmp_path / "r.zarr")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda run: run.update(seed=[1, 2, 3]),
     r"seed=\[1, 2, 3\] in its manifest: 3 seeds for 4 images \(2 prompts x 2 images per prompt\)"),
    (lambda run: run["pipeline_kwargs"].update(num_images_per_prompt=0),
     r"num_images_per_prompt=0 in its manifest; expected an int >= 1"),
    (lambda run: run["pipeline_kwargs"].update(num_inference_steps=0),
     r"num_inference_steps=0 in its manifest; expected an int >= 1"),
    (lambda run: run["pipeline_kwargs"].update(num_inference_steps="2"),
     r"num_inference_steps='2' in its manifest; expected an int >= 1"),
    (lambda run: run["pipeline_kwargs"].update(width=-32),
     r"width=-32 in its manifest; expected a positive int"),
    (lambda run: run.update(pipeline_kwargs=[1, 2]),
     r"pipeline_kwargs=\[1, 2\] in its manifest; expected an object of pipeline arguments"),
])
def test_a_manifest_with_impossible_run_settings_is_one_clear_error(batch, shapes, tmp_path, edit, message):
    """A damaged or crafted manifest ran the pipeline with it and failed inside diffusers (ValueError, TypeError,
    ZeroDivisionError, RuntimeError) without naming the trace."""
    copy = edited_copy(batch, tmp_path / "x.zarr", lambda attrs: edit(attrs["manifest"]["run"]))
    with pytest.raises(ats.AttnscopeError, match=message) as err:
        rerun(copy, pipe=shapes, store=tmp_path / "out.zarr")
    assert str(copy) in str(err.value) and not (tmp_path / "out.zarr").exists()


def test_a_batched_trace_with_images_per_prompt_reruns_bit_identically(batch, shapes):
    again = rerun(batch, pipe=shapes)
    assert len(again.images) == 4
    for x, y in zip(again.images, batch.images):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_exact_must_be_a_bool(parent, shapes, tmp_path):
    """exact='false' went through bool() and ran (and recorded) an exact rerun."""
    with pytest.raises(ats.AttnscopeError, match=r"exact='false': expected True or False"):
        rerun(parent, pipe=shapes, store=tmp_path / "e.zarr", exact="false")
    assert not (tmp_path / "e.zarr").exists()


# -- compare ----------------------------------------------------------------------------------------------
def test_shares_of_a_sample_not_in_the_runs_is_one_clear_error(batch, shapes, tmp_path):
    """Comparison.shares(9) raised xarray's KeyError 'not all values found in index'."""
    c = compare(batch, rerun(batch, pipe=shapes, store=tmp_path / "r.zarr"), ["circle"])
    with pytest.raises(ats.AttnscopeError, match=r"sample=9 is not in the compared runs; their samples are "
                                                 r"\[0, 1, 2, 3\]"):
        c.shares(9)
    assert c.shares(3).loc["circle"].isna().all() and c.shares(0).loc["circle", "change"] == 0


def test_named_steps_one_trace_did_not_capture_name_that_trace(parent, shapes, tmp_path):
    """steps= with a step only one trace captured said 'not in this trace' (which of the two?), the same message
    whichever trace lacked it."""
    sub = rerun(parent, pipe=shapes, store=tmp_path / "sub.zarr", steps=[1, 2])
    with pytest.raises(ats.AttnscopeError, match=r"at steps=\[0, 1\]: trace b \('.*sub\.zarr'\) did not capture "
                                                 r"step 0; the steps both captured: 1–2"):
        compare(parent, sub, ["circle"], steps=[0, 1])
    with pytest.raises(ats.AttnscopeError, match=r"trace a \('.*sub\.zarr'\) did not capture step 0"):
        compare(sub, parent, ["circle"], steps=slice(0, 2))
    assert compare(parent, sub, ["circle"], steps=[1, 2]).stats.attrs["compared_steps"] == [1, 2]




def test_the_figures_bars_are_the_tables_shares(parent, shapes, tmp_path):
    """The bar chart averaged each run over its own non-NaN shares: a share NaN in one run only (no attention to
    divide) left that run's mean alone, so the bars showed a change the table (0 everywhere) did not."""
    last = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"  # the last attention call of the UNet's pass
    zeroed = rerun(parent, [ZeroAt(last, 2)], pipe=shapes, store=tmp_path / "z.zarr")  # at the last step
    c = compare(parent, zeroed, ["circle", "square"])
    assert (c.shares()["change"] == 0).all()
    bars = next(ax for ax in c.figure().axes if ax.get_legend() is not None)
    heights = [p.get_height() for p in bars.patches]
    expected = [*c.shares(0)["before"], *c.shares(0)["after"]]
    assert heights == pytest.approx(expected, abs=1e-9)
    assert heights[:2] == pytest.approx(heights[2:], abs=1e-9)


def test_the_figure_of_a_sample_of_another_prompt_shows_the_targets_its_prompt_has(batch):
    """compare(...) defaults to the first prompt's words; figure(sample=2), an image of "a blue square", failed with
    "target 'red' is not in the prompt". It now draws the targets that prompt has, and says which are left out."""
    c = compare(batch, batch)
    assert c.targets == ["a", "red", "circle"]
    fig = c.figure(sample=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert "a (before)" in titles and not any(t.startswith(("red", "circle")) for t in titles)
    assert "not in this sample's prompt: red, circle" in fig.texts[0].get_text()
    with pytest.raises(ats.AttnscopeError, match=r"sample 2's prompt 'a blue square' has none of the targets "
                                                 r"\['red', 'circle'\]"):
        compare(batch, batch, ["red", "circle"]).figure(sample=2)
