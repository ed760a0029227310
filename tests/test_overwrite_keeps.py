"""``overwrite=True`` replaces a trace only by a complete one: the new run is written beside the old trace and put in
its place when it completes; a run that fails keeps the old trace and leaves its partial trace readable beside it.
And an image size the pipeline would take as "its default" (0, negative, not an int) is refused before anything is
written."""

import json
import warnings

import numpy as np
import pytest

import attnscope as ats
from attnscope.store import SiteLayout, StoreLayout, TraceWriter

from .conftest import RUN, cli

PROMPT = "a red circle and a blue square"


class Boom(RuntimeError):
    pass


def fail_at(step):
    """A ``callback_on_step_end`` that raises at the end of ``step``: a real failure of the run mid-way."""
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Boom(f"stopped at step {i}")
        return kwargs
    return callback


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def open_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ats.AttnscopeWarning)
        return ats.open_trace(path)


def test_a_failed_overwrite_keeps_the_old_trace_and_its_partial_run_beside_it(sd_pipe, tmp_path):
    path = tmp_path / "a.zarr"
    old = ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)
    site = old.sites[0]
    before = old.attention(site).values
    with pytest.raises(Boom) as caught:
        ats.capture(sd_pipe, "a blue square", seed=1, store=path, overwrite=True, callback_on_step_end=fail_at(1), **RUN)
    [staging] = siblings(path)
    assert staging.startswith("a.zarr.attnscope-new-") and len(staging) == len("a.zarr.attnscope-new-") + 8
    note = " ".join(getattr(caught.value, "__notes__", []))
    assert f"the old trace at '{path}' is kept" in note and f"partial trace is at '{path.parent / staging}'" in note
    assert "ats.open_trace" in note
    kept = ats.open_trace(path)  # untouched: complete, the first run's, and the old handle still reads it
    assert kept.complete and kept.manifest["run"]["prompts"] == ["a red circle"]
    np.testing.assert_array_equal(old.attention(site).values, before)
    partial = open_quietly(path.parent / staging)  # the interrupted run, readable
    assert not partial.complete and partial.manifest["run"]["prompts"] == ["a blue square"]
    assert partial.steps_written >= 1 and not np.isnan(partial.attention(site).sel(step=0).values).any()
    # a later overwrite that completes replaces the old trace; the earlier partial run stays where it was
    new = ats.capture(sd_pipe, "a blue square", seed=1, store=path, overwrite=True, **RUN)
    assert new.path == path and new.complete and new.manifest["run"]["prompts"] == ["a blue square"]
    assert siblings(path) == [staging]
    with pytest.raises(ats.AttnscopeError, match="was overwritten"):
        old.attention(site).load()


def test_the_recorder_points_at_the_staging_trace_while_replacing_and_at_the_path_once_swapped(sd_pipe, tmp_path):
    path = tmp_path / "r.zarr"
    ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)
    seen = {}

    def look(pipe, i, t, kwargs):  # during the run: the old trace is whole at the path, the new one beside it
        seen[i] = (rec.path, ats.open_trace(path).complete)
        return kwargs

    rec = ats.Recorder(path, overwrite=True)
    with ats.hooks(sd_pipe, rec):
        out = sd_pipe("a blue square", callback_on_step_end=look, **RUN)
        rec.add_images(out.images)
    assert all(where.parent == tmp_path and where.name.startswith("r.zarr.attnscope-new-") and complete
               for where, complete in seen.values())
    assert rec.path == path and siblings(path) == []  # swapped, the old trace deleted
    tr = ats.open_trace(rec.path)
    assert tr.complete and tr.images and len(tr.timesteps) == RUN["num_inference_steps"]
    swapped = _run_id(path)

    rec = ats.Recorder(path, overwrite=True)  # an exception inside the block: the old trace stays
    with pytest.raises(Boom):
        with ats.hooks(sd_pipe, rec):
            sd_pipe("a green triangle", callback_on_step_end=fail_at(0), **RUN)
    assert rec.path != path and siblings(path) == [rec.path.name]
    assert open_quietly(rec.path).manifest["capture"] == tr.manifest["capture"] and not open_quietly(rec.path).complete
    assert _run_id(path) == swapped and ats.open_trace(path).complete


def test_a_run_that_returns_without_finishing_warns_that_the_old_trace_is_kept(sd_pipe, tmp_path):
    """The pipeline's own interrupt flag: the call returns, with steps not run."""
    path = tmp_path / "i.zarr"
    ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)

    def interrupt(pipe, i, t, kwargs):
        pipe._interrupt = True
        return kwargs

    with pytest.warns(ats.AttnscopeWarning, match=r"the old trace at '.*i\.zarr' is kept.*partial trace is at"):
        tr = ats.capture(sd_pipe, "a blue square", seed=1, store=path, overwrite=True, callback_on_step_end=interrupt,
                         **RUN)
    assert not tr.complete and tr.path != path and tr.path.name.startswith("i.zarr.attnscope-new-")
    assert ats.open_trace(path).complete and ats.open_trace(path).manifest["run"]["prompts"] == ["a red circle"]


def test_a_failed_first_capture_still_leaves_its_partial_trace_at_the_path(sd_pipe, tmp_path):
    """Nothing to keep: the run is written in place, as before (readable during and after the run)."""
    path = tmp_path / "n.zarr"
    path.mkdir()  # an empty directory is written in place too
    with pytest.raises(Boom) as caught:
        ats.capture(sd_pipe, PROMPT, seed=0, store=path, overwrite=True, callback_on_step_end=fail_at(1), **RUN)
    assert not getattr(caught.value, "__notes__", None) and siblings(path) == []
    assert not open_quietly(path).complete and open_quietly(path).steps_written >= 1


def _layout(steps=2):
    return StoreLayout(num_steps=steps, samples=1, prompt_of_sample=(0,), image_of_sample=(0,), token_positions=(0, 1),
                       token_text=[["<|startoftext|>", "<|endoftext|>"]],
                       sites=[SiteLayout("attn2", {}, heads=1, spatial=(2, 2), branches=("cond",),
                                         steps=tuple(range(steps)))],
                       attrs={"manifest": {"run": {"num_steps": steps, "samples": 1}}, "sites": ["attn2"]})


def _write(writer, steps=2, value=0.5, complete=True):
    writer.init(_layout(steps))
    for step in range(steps):
        writer.timestep(step, 999.0 - step)
        writer.put("attn2", "cond", step, np.full((1, 1, 2, 2, 2), value, np.float16))
    writer.close(complete=complete)


def _run_id(path):
    return json.loads((path / "zarr.json").read_text())["attributes"]["run_id"]


def test_a_replacing_writer_holds_the_old_trace_against_a_second_writer(tmp_path):
    path = tmp_path / "t.zarr"
    _write(TraceWriter(path))
    first = _run_id(path)
    replacing = TraceWriter(path, overwrite=True)
    replacing.init(_layout())
    replacing.timestep(0, 999.0)
    other = TraceWriter(path, overwrite=True)  # meanwhile: refused, and nothing of the two runs is touched
    other.init(_layout())
    with pytest.raises(ats.AttnscopeError, match="is being written by another process"):
        other.close(complete=False)
    assert _run_id(path) == first and replacing.location != path and replacing.location.exists()
    for step in range(2):
        replacing.put("attn2", "cond", step, np.full((1, 1, 2, 2, 2), 0.25, np.float16))
    replacing.timestep(1, 998.0)
    replacing.close(complete=True)
    assert replacing.location == path and _run_id(path) == replacing.run_id != first and siblings(path) == []
    assert (ats.open_trace(path).attention("attn2").values == 0.25).all()


def test_a_replacing_writer_that_is_not_complete_keeps_the_old_trace(tmp_path):
    path = tmp_path / "t.zarr"
    _write(TraceWriter(path))
    first = _run_id(path)
    writer = TraceWriter(path, overwrite=True)
    _write(writer, steps=3, complete=False)
    assert _run_id(path) == first and writer.location.name.startswith("t.zarr.attnscope-new-")
    assert not open_quietly(writer.location).complete and _run_id(writer.location) == writer.run_id


def test_cli_capture_overwrite_that_fails_says_the_old_trace_is_kept_and_where_the_partial_run_is(shapes, tmp_path):
    out = tmp_path / "c.zarr"
    done = cli("capture", "--prompt", PROMPT, "--steps", "2", "--out", out)
    assert done.exit_code == 0, done.output
    failed = cli("capture", "--prompt", PROMPT, "--steps", "2", "--out", out, "--overwrite", "--set", "eta=abc")
    assert failed.exit_code == 2 and "Traceback" not in failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the pipeline failed: TypeError") and "check the --set values: eta=abc" in line
    [staging] = siblings(out)
    assert f"the old trace at '{out}' is kept" in line and f"'{out.parent / staging}'" in line
    assert "pass --overwrite" not in line
    assert ats.open_trace(out).complete


def test_rerun_into_its_own_trace_is_refused_and_the_trace_kept(shapes, tmp_path):
    parent = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "p.zarr", num_inference_steps=2)
    with pytest.raises(ats.AttnscopeError, match="is the parent trace .*choose another path"):
        ats.rerun(parent, pipe=shapes, store=parent.path, overwrite=True)
    assert ats.open_trace(parent.path).complete and siblings(parent.path) == []


# -- defect 2: an image size the pipeline reads as "use the default" ------------------------------------------------
@pytest.mark.parametrize("size", [dict(height=0), dict(width=0), dict(height=-32), dict(width=32.0),
                                  dict(height=True), dict(width="32")])
def test_a_size_that_is_not_a_positive_int_is_refused_before_anything_is_written(sd_pipe, tmp_path, size):
    [(name, value)] = size.items()
    path = tmp_path / "s.zarr"
    with pytest.raises(ats.AttnscopeError, match=rf"^{name}={value!r}: expected a positive int"):
        ats.capture(sd_pipe, PROMPT, seed=0, store=path, **{**RUN, **size})
    assert not path.exists()


def test_a_size_the_vae_cannot_take_is_the_pipelines_error_before_anything_is_written(sd_pipe, tmp_path):
    path = tmp_path / "v.zarr"
    with pytest.raises(ValueError, match="divisible by 8"):
        ats.capture(sd_pipe, PROMPT, seed=0, store=path, **{**RUN, "height": 36})
    assert not path.exists()
    assert ats.capture(sd_pipe, PROMPT, seed=0, store=path, **{**RUN, "height": np.int64(40)}).manifest["run"]["height"] == 40
