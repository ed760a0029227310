"""A trace handle and the store under it stay one run: a store replaced (or removed) after ``open_trace`` is an
error when the old handle reads, never the new run's data under the old manifest; ``overwrite=True`` replaces
traces and never deletes anything else, whatever is at the path by the time the writer gets there."""

import json
import shutil
import time
import warnings

import numpy as np
import pytest
import zarr

import attnscope as ats
from attnscope.store import SiteLayout, StoreLayout, TraceWriter, check_store_path

RUN = dict(num_inference_steps=2, height=32, width=32)


def _layout(steps=2, spatial=(2, 2)):
    return StoreLayout(num_steps=steps, samples=1, prompt_of_sample=(0,), image_of_sample=(0,), token_positions=(0, 1),
                       token_text=[["<|startoftext|>", "<|endoftext|>"]],
                       sites=[SiteLayout("attn2", {}, heads=1, spatial=spatial, branches=("cond",),
                                         steps=tuple(range(steps)))],
                       attrs={"manifest": {"run": {"num_steps": steps, "samples": 1}}, "sites": ["attn2"]})


def _steps_written(path):
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["steps_written"]
    except (OSError, ValueError, KeyError):  # not created yet
        return 0


def _precious(path):
    """A directory of the user's, not a trace."""
    path.mkdir()
    (path / "thesis.tex").write_text("months of work")
    return path


def test_old_handle_refuses_a_store_overwritten_by_another_capture(tmp_path, sd_pipe):
    path = tmp_path / "a.zarr"
    first = ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)
    site = first.sites[0]
    before = first.attention(site).values
    lazy = first.attention(site)  # built before the overwrite, computed after
    untouched = ats.open_trace(path)  # nothing read yet: coordinates and images too are read after the overwrite
    second = ats.capture(sd_pipe, "a blue square", seed=1, store=path, overwrite=True, **RUN)
    after = second.attention(site).values
    assert not np.array_equal(before, after)  # the two runs differ: reading the new one would go unnoticed

    for read in (lambda: lazy.values, lambda: first.attention(site).values, lambda: untouched.images,
                 lambda: untouched.tokens, lambda: ats.stats.dominance(untouched, targets=["circle"]).compute()):
        with pytest.raises(ats.AttnscopeError, match=r"a\.zarr' was overwritten .* since this Trace was opened.*"
                                                     r"reopen it with ats\.open_trace"):
            read()
    reopened = ats.open_trace(path)
    assert reopened.manifest["run"]["prompts"] == ["a blue square"]
    np.testing.assert_array_equal(reopened.attention(site).values, after)
    assert reopened.tokens[:4] == ["<|startoftext|>", "a</w>", "blue</w>", "square</w>"]


def test_old_handle_refuses_a_removed_store(tmp_path, sd_pipe):
    path = tmp_path / "a.zarr"
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)
    shutil.rmtree(path)
    with pytest.raises(ats.AttnscopeError, match=r"a\.zarr' was removed since this Trace was opened"):
        tr.attention(tr.sites[0]).load()


def test_handle_keeps_reading_while_its_own_capture_goes_on(tmp_path):
    """The run id is the same for the whole capture: root rewrites (steps_written, complete) are not a new store."""
    path = tmp_path / "live.zarr"
    writer = TraceWriter(path)
    writer.init(_layout(steps=2, spatial=(256, 512)))  # 512 KiB a step: one step per shard, written at once
    writer.timestep(0, 999.0)
    writer.put("attn2", "cond", 0, np.full((1, 1, 256, 512, 2), 0.25, np.float16))
    deadline = time.monotonic() + 30
    while _steps_written(path) < 1 and time.monotonic() < deadline:
        writer.timestep(1, 998.0)  # any message makes the writer persist steps_written once its interval passed
        time.sleep(0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ats.AttnscopeWarning)
        live = ats.open_trace(path)
    assert live.steps_written >= 1
    writer.put("attn2", "cond", 1, np.full((1, 1, 256, 512, 2), 0.5, np.float16))
    writer.close(complete=True)
    assert json.loads((path / "zarr.json").read_text())["attributes"]["complete"] is True
    assert (live.attention("attn2").values == 0.25).all()  # step 0 only (what was written), read after the run ended


def test_writer_overwrite_never_deletes_a_directory_that_is_not_a_trace(tmp_path):
    path = _precious(tmp_path / "data")
    writer = TraceWriter(path, overwrite=True)
    writer.init(_layout())
    with pytest.raises(ats.AttnscopeError, match=r"data' exists and is not an attnscope trace or an empty directory"):
        writer.close(complete=False)
    assert (path / "thesis.tex").read_text() == "months of work"


def test_recorder_rechecks_the_path_when_it_starts_writing(tmp_path, sd_pipe):
    """The path was free when the Recorder was made; by the time the run starts, a user's directory is there."""
    path = tmp_path / "run.zarr"
    recorder = ats.Recorder(path, overwrite=True)
    _precious(path)
    with pytest.raises(ats.AttnscopeError, match=r"run\.zarr' exists and is not an attnscope trace"):
        with ats.hooks(sd_pipe, recorder):
            sd_pipe("a red circle", **RUN)
    assert (path / "thesis.tex").read_text() == "months of work"


def test_overwrite_takes_only_a_root_attnscope_format_for_a_trace(tmp_path):
    """A Zarr group of the user's that merely mentions attnscope_format (a nested key) is not a trace."""
    path = tmp_path / "project.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=3, attributes={"notes": {"attnscope_format": "see attnscope"}})
    group.create_array("measurements", shape=(3,), dtype="float64")[...] = [1.0, 2.0, 3.0]
    with pytest.raises(ats.AttnscopeError, match=r"project\.zarr' exists and is not an attnscope trace"):
        check_store_path(path, overwrite=True)
    assert zarr.open_group(path, mode="r")["measurements"][...].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("run_id", [123, "../../escape", "A" * 32, ["x"]])
def test_crafted_run_id_is_refused(tmp_path, sd_pipe, run_id):
    path = tmp_path / "a.zarr"
    ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["run_id"] = run_id
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(ats.AttnscopeError, match=r"a\.zarr': root attribute 'run_id' is .*expected 32 lowercase hex"):
        ats.open_trace(path)


@pytest.mark.parametrize("steps", [[0, 7], ["x"], [True], "0,1"])
def test_crafted_manifest_capture_steps_is_refused_at_open(tmp_path, sd_pipe, steps):
    """``manifest.capture.steps`` picks the steps of the output summaries: outside the run it was a raw KeyError."""
    path = tmp_path / "a.zarr"
    ats.capture(sd_pipe, "a red circle", seed=0, store=path, output_change=True, **RUN)
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["manifest"]["capture"]["steps"] = steps
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(ats.AttnscopeError, match=r"a\.zarr': manifest capture\.steps is .*expected a list of steps "
                                                 r"from 0 to 1"):
        ats.open_trace(path).output_change()


@pytest.mark.parametrize("path", [123, None, b"/tmp/a.zarr"])
def test_open_trace_names_a_path_of_the_wrong_type(path):
    with pytest.raises(ats.AttnscopeError, match=r"path=.*: expected the path or URL of a trace store"):
        ats.open_trace(path)


def test_a_store_under_a_file_is_refused_before_the_run(sd_pipe, tmp_path):
    """A store path whose parent is a file failed in the writer thread, mid-run, as a raw NotADirectoryError."""
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ats.AttnscopeError, match=r"store '.*notes.txt/sub/a.zarr': '.*notes.txt' is a file, not a "
                                                 r"directory"):
        ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "notes.txt" / "sub" / "a.zarr",
                    num_inference_steps=2, height=32, width=32)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_old_handle_refuses_its_tree_after_an_overwrite(tmp_path, sd_pipe):
    """`tr.tree` was opened once and cached: after an overwrite, the old handle's tree read the new run's arrays."""
    path = tmp_path / "a.zarr"
    first = ats.capture(sd_pipe, "a red circle", seed=0, store=path, **RUN)
    assert "images" in first.tree
    ats.capture(sd_pipe, "a blue square", seed=1, store=path, overwrite=True, **RUN)
    with pytest.raises(ats.AttnscopeError, match=r"a\.zarr' was overwritten .* since this Trace was opened"):
        first.tree["images"].to_dataset().load()
