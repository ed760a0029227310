"""Audit of the trace store as a user who streams traces to disk and reads them later, or while they are written."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import attnscope as ats
from attnscope.store import SiteLayout, StoreLayout, TraceWriter

from .conftest import RUN

PAUSING_CHILD = r"""
import sys, time
import attnscope as ats
from attnscope.testing import tiny_sd_pipeline

def pause(pipe, i, t, kwargs):
    if i == 8:  # steps 0..8 ran; the first shard (8 steps) of every site is complete
        print("paused", flush=True)
        time.sleep(120)
    return kwargs

ats.capture(tiny_sd_pipeline(), "a red circle and a blue square", seed=5, store=sys.argv[1],
            num_inference_steps=16, height=32, width=32, callback_on_step_end=pause)
"""


def _persisted_steps(path) -> int:
    return json.loads((path / "zarr.json").read_text())["attributes"]["steps_written"]


def test_steps_on_disk_are_counted_while_the_writer_idles(tmp_path):
    layout = StoreLayout(
        num_steps=10,
        samples=1,
        prompt_of_sample=(0,),
        image_of_sample=(0,),
        token_positions=(0, 1),
        token_text=[["<sot>", "<eot>"]],
        timesteps=tuple(999.0 - i for i in range(10)),
        sites=[SiteLayout("attn2", {}, heads=1, spatial=(512, 512), branches=("cond",), steps=tuple(range(10)))],
    )  # 1 MiB a step: one step per shard
    w = TraceWriter(tmp_path / "t.zarr")
    w.init(layout)
    for step in range(3):
        w.put("attn2", "cond", step, np.full((1, 1, 512, 512, 2), 0.5, np.float16))
        w.steps_done(step + 1)
    time.sleep(1.5)  # the run pauses (a slow step): the three steps on disk must be counted meanwhile
    try:
        assert w.steps_written == 3
        assert _persisted_steps(tmp_path / "t.zarr") == 3
    finally:
        w.close(complete=False)


def test_a_capture_killed_while_it_pauses_keeps_every_step_it_got_past(tmp_path, sd_pipe):
    path = tmp_path / "paused.zarr"
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in child.stdout:
            if line.strip() == "paused":
                break
        time.sleep(1.5)  # the run is past step 8 and idle; then it dies
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    tr = ats.open_trace(path)
    assert not tr.complete
    assert tr.steps_written >= 8, tr.written  # the first shard of every site is on disk: only step 8 was in flight
    reference = ats.capture(
        sd_pipe,
        "a red circle and a blue square",
        seed=5,
        store=tmp_path / "ref.zarr",
        num_inference_steps=16,
        height=32,
        width=32,
    )
    for site in tr.sites:
        got = tr.attention(site)
        assert got.step.values.tolist() == list(range(tr.steps_written))
        want = reference.attention(site).isel(step=slice(0, tr.steps_written))
        np.testing.assert_allclose(got.values.astype(np.float32), want.values.astype(np.float32), atol=1e-3)


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    from attnscope.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("small") / "a.zarr"
    ats.capture(tiny_sd_pipeline(), "a red circle and a blue square", seed=0, store=path, **RUN)
    return path


def _crafted(small_trace, tmp_path, name, values):
    """A copy of the trace whose root array ``name`` holds ``values`` (written with plain zarr, as a crafter would)."""
    import zarr

    path = tmp_path / "crafted.zarr"
    shutil.copytree(small_trace, path)
    zarr.open_group(path, mode="a", use_consolidated=False)[name][...] = values
    zarr.consolidate_metadata(path)
    return path


@pytest.mark.parametrize(
    "name, values, shown",
    [
        ("step", np.array([2, 1, 0]), "[2, 1, 0]"),  # steps=0 would select the run's last step
        ("step", np.array([0, 1, 5]), "[0, 1, 5]"),
        ("sample", np.array([7]), "[7]"),
        ("token", np.arange(77)[::-1].copy(), "[76, 75, 74, 73, 72, 71, 70, 69, …]"),
        ("token", np.arange(77) - 1, "[-1, 0, 1"),
    ],
)
def test_an_index_coordinate_other_than_the_writers_is_one_clear_error(small_trace, tmp_path, name, values, shown):
    tr = ats.open_trace(_crafted(small_trace, tmp_path, name, values))
    with pytest.raises(ats.AttnscopeError, match=rf"coordinate '{name}' holds {re.escape(shown)}.*damaged or crafted"):
        ats.stats.dominance(tr, targets=["circle", "square"], steps=0)


def test_the_writers_own_coordinates_read_back(small_trace):
    tr = ats.open_trace(small_trace)
    assert tr.coords["step"].values.tolist() == [0, 1, 2]
    assert tr.coords["sample"].values.tolist() == [0]
    assert tr.coords["token"].values.tolist() == list(range(77))


def test_a_store_being_written_opens_while_files_come_and_go(small_trace, tmp_path):
    """zarr writes each file as ``<name>.<hex>.partial`` and renames it: a file listed by open_trace's walk may be
    gone when it is looked at. That is a running capture, not damage."""
    import threading

    path = tmp_path / "live.zarr"
    shutil.copytree(small_trace, path)
    stop = threading.Event()

    def writes():  # what a running capture's writer does to the store, many files at once, as fast as it can
        temps = [path / "timestep" / "c" / f"0.{i:032x}.partial" for i in range(200)]
        while not stop.is_set():
            for temp in temps:
                temp.write_bytes(b"x")
            for temp in temps:
                temp.unlink()

    writer = threading.Thread(target=writes)
    writer.start()
    try:
        deadline = time.monotonic() + 3
        opened = 0
        while time.monotonic() < deadline:
            ats.open_trace(path)
            opened += 1
    finally:
        stop.set()
        writer.join()
    assert opened > 0


def test_a_link_to_nothing_in_a_store_is_named(small_trace, tmp_path):
    path = tmp_path / "linked.zarr"
    shutil.copytree(small_trace, path)
    os.symlink(tmp_path / "nowhere", path / "timestep" / "c" / "1")
    with pytest.raises(ats.AttnscopeError, match=r"'timestep/c/1' is a link to nothing; the store is damaged"):
        ats.open_trace(path)


@pytest.fixture(scope="module")
def summarised_trace(tmp_path_factory):
    from attnscope.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("summarised") / "a.zarr"
    ats.capture(tiny_sd_pipeline(), "a red circle and a blue square", seed=0, store=path, output_change=True, **RUN)
    return path


def _without(trace, tmp_path, array, complete=True):
    """A copy of ``trace`` that lost every chunk of ``array`` (incomplete: as a run stopped while writing it)."""
    path = tmp_path / "t.zarr"
    shutil.copytree(trace, path)
    shutil.rmtree(path / array / "c")
    if not complete:
        root = json.loads((path / "zarr.json").read_text())
        root["attributes"]["complete"] = False
        del root["consolidated_metadata"]
        (path / "zarr.json").write_text(json.dumps(root))
    return path


@pytest.mark.parametrize("array", ["summaries/output_norm", "summaries/output_change", "summaries/site"])
def test_a_lost_chunk_of_the_output_summaries_is_damage_not_nan_norms(summarised_trace, tmp_path, array):
    tr = ats.open_trace(_without(summarised_trace, tmp_path, array))
    with pytest.raises(ats.AttnscopeError, match=rf"output summaries lost 1 chunk\(s\) \(c/0.* of array '{array}'\)"):
        tr.output_change()
    assert ats.open_trace(summarised_trace).output_change().site.values.tolist() == tr.sites


def test_end_of_run_arrays_a_stopped_run_did_not_finish_writing_read_as_absent(summarised_trace, tmp_path):
    """A capture killed (or still running) while it writes its images or summaries at the end of the run: an
    incomplete trace, whose images and summaries are not there yet, as a trace killed a moment earlier."""
    with pytest.warns(ats.AttnscopeWarning, match="incomplete"):
        tr = ats.open_trace(_without(summarised_trace, tmp_path, "images", complete=False))
    assert tr.images == []
    assert tr.output_change() is not None
    shutil.rmtree(tmp_path / "t.zarr")
    with pytest.warns(ats.AttnscopeWarning, match="incomplete"):
        tr = ats.open_trace(_without(summarised_trace, tmp_path, "summaries/output_change", complete=False))
    assert tr.output_change() is None
    assert len(tr.images) == 1
