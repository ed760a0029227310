"""Audit of the trace store as a user who streams traces to disk and reads them later, or while they are written."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import attnscope as ats
from attnscope.store import SiteLayout, StoreLayout, TraceWriter

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
