"""A capture killed mid-run leaves a readable store whose reported steps are intact."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import attnscope as ats

CHILD = r"""
import sys, time
import attnscope as ats
from attnscope.testing import tiny_sd_pipeline

def slow(pipe, i, t, kwargs):
    print("step", i, flush=True)
    time.sleep(0.05)
    return kwargs

ats.capture(tiny_sd_pipeline(), "a red circle and a blue square", seed=5, store=sys.argv[1],
            num_inference_steps=40, height=32, width=32, callback_on_step_end=slow)
print("finished", flush=True)
"""


def steps_written(path):
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"].get("steps_written", 0)
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_midway_keeps_written_steps(tmp_path, sd_pipe):
    path = tmp_path / "killed.zarr"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in child.stdout:
            if line.strip() == "step 24":
                break
        deadline = time.monotonic() + 60
        while steps_written(path) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    tr = ats.open_trace(path)
    assert not tr.complete and 10 <= tr.steps_written < 40
    assert tr.images == []
    reference = ats.capture(sd_pipe, "a red circle and a blue square", seed=5, store=tmp_path / "ref.zarr",
                            num_inference_steps=40, height=32, width=32)
    for site in tr.sites:
        got = tr.attention(site)
        assert got.step.values.tolist() == list(range(tr.steps_written))
        want = reference.attention(site).isel(step=slice(0, tr.steps_written))
        assert not np.isnan(got.values).any()
        np.testing.assert_allclose(got.values.astype(np.float32), want.values.astype(np.float32), atol=1e-3)
    np.testing.assert_array_equal(tr.timesteps[: tr.steps_written], reference.timesteps[: tr.steps_written])
