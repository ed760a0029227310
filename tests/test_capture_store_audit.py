"""Capture and store audit: what an interrupted run with a step subset says it wrote, images that would make an
unreadable store, a step sent twice to the writer, and other edges a user capturing many traces meets."""

import numpy as np
import pytest
import torch
import zarr

import attnscope as ats
from attnscope.store import SiteLayout, StoreLayout, TraceWriter

from .conftest import RUN

PROMPTS = ["a red circle", "a blue square"]


def stop_after(step):
    """A step-end callback that raises once step ``step``'s denoiser call has returned."""

    def callback(pipe, i, t, kwargs):
        if i == step:
            raise RuntimeError("stopped")
        return kwargs

    return callback


@pytest.mark.parametrize("steps", [[0], [0, 4], None])
def test_a_run_stopped_early_counts_only_the_steps_it_ran(sd_pipe, tmp_path, steps):
    # steps 0, 1, 2 of 5 ran: with steps=[0] the trace used to say "all 5 steps written, the run did not finish",
    # with steps=[0, 4] "4 of 5 steps written"
    path = tmp_path / "a.zarr"
    with pytest.raises(RuntimeError, match="stopped"):
        ats.capture(sd_pipe, "a red circle", seed=0, store=path, steps=steps, callback_on_step_end=stop_after(2),
                    **{**RUN, "num_inference_steps": 5})
    with pytest.warns(ats.AttnscopeWarning, match="3 of 5 steps written"):
        tr = ats.open_trace(path)
    assert not tr.complete and tr.steps_written == 3 and tr.written == "3 of 5 steps written"
    assert tr.attention(tr.sites[0]).step.values.tolist() == ([0] if steps else [0, 1, 2])


def test_a_complete_run_with_a_step_subset_is_written_to_its_end(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "a.zarr", steps=[0], **RUN)
    assert tr.complete and tr.steps_written == 3 and tr.written == "all 3 steps written"


def recorded(pipe, path, images):
    """A two-prompt run inside ``ats.hooks`` whose Recorder gets ``images(out)``; the Recorder."""
    rec = ats.Recorder(path)
    with ats.hooks(pipe, rec):
        out = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **RUN)
        rec.add_images(images(out))
    return rec


@pytest.mark.parametrize("images, message", [
    (lambda out: out.images[:1], r"got 1 images, expected one per sample of the run \(2\)"),
    (lambda out: np.zeros((2, 32, 32, 4), np.uint8), r"got shape \(2, 32, 32, 4\).*expected RGB"),
    (lambda out: np.stack([np.asarray(im) for im in out.images]).astype(np.float32),
     r"float values from \d+\.\d+ to \d+\.\d+, expected \[0, 1\]"),
    (lambda out: [out.images[0], out.images[1].resize((16, 16))], r"2 PIL images of sizes \[\(16, 16\), \(32, 32\)\]"),
])
def test_images_that_would_not_fit_the_trace_are_refused_and_the_trace_stays_readable(sd_pipe, tmp_path, images,
                                                                                       message):
    # these used to be written as given: one image for two samples or four channels made open_trace refuse the whole
    # trace as damaged, floats 0…255 were clipped to a white image
    path = tmp_path / "a.zarr"
    with pytest.raises(ats.AttnscopeError, match=r"^images: " + message):
        recorded(sd_pipe, path, images)
    tr = ats.open_trace(path)  # the run itself ran through: kept, without images
    assert tr.complete and tr.images == [] and tr.attention(tr.sites[0]).sizes["sample"] == 2


def test_images_the_pipeline_gives_are_stored_as_they_are(sd_pipe, tmp_path):
    def as_floats(out):
        return np.stack([np.asarray(im) for im in out.images]).astype(np.float32) / 255

    rec = recorded(sd_pipe, tmp_path / "a.zarr", as_floats)
    out = sd_pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **RUN)
    stored = [np.asarray(im) for im in ats.open_trace(rec.path).images]
    assert [a.tolist() for a in stored] == [np.asarray(im).tolist() for im in out.images]


def tiny_layout(steps):
    return StoreLayout(num_steps=steps, samples=1, prompt_of_sample=(0,), image_of_sample=(0,), token_positions=(0, 1),
                       token_text=[["<sot>", "<eot>"]],
                       sites=[SiteLayout("attn2", {}, heads=1, spatial=(2, 2), branches=("cond",),
                                         steps=tuple(range(steps)))])


def test_a_step_sent_again_after_its_shard_was_written_keeps_the_shards_other_steps(tmp_path):
    # a tiny site's shard holds all 3 steps; resending step 2 once the shard was on disk used to rewrite steps 0 and
    # 1 as NaN
    w = TraceWriter(tmp_path / "t.zarr")
    w.init(tiny_layout(3))
    for step, value in enumerate([0.25, 0.5, 0.75]):
        w.put("attn2", "cond", step, np.full((1, 1, 2, 2, 2), value, np.float16))
    w.put("attn2", "cond", 2, np.full((1, 1, 2, 2, 2), 1.0, np.float16))
    w.close(complete=True)
    maps = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["sites/attn2/attention"]
    assert maps.shards[0] == 3
    assert maps[:, 0, 0, 0, 0, 0].tolist() == [0.25, 0.5, 1.0]


def test_a_writer_told_how_far_the_run_got_never_counts_past_it(tmp_path):
    layout = tiny_layout(4)
    layout.sites[0].steps, layout.timesteps = (0,), (999.0, 666.0, 333.0, 0.0)  # the plan: known timesteps
    w = TraceWriter(tmp_path / "t.zarr")
    w.init(layout)
    w.steps_done(2)
    w.put("attn2", "cond", 0, np.full((1, 1, 2, 2, 2), 0.5, np.float16))
    w.close(complete=False)
    assert w.steps_written == 2
    w = TraceWriter(tmp_path / "u.zarr")  # never told: the captures alone bound it, as before
    w.init(layout)
    w.put("attn2", "cond", 0, np.full((1, 1, 2, 2, 2), 0.5, np.float16))
    w.close(complete=False)
    assert w.steps_written == 4


@pytest.mark.parametrize("store", [None, 123, b"runs/a.zarr", "", "  "])
def test_a_store_that_is_not_a_path_is_one_clear_error(sd_pipe, tmp_path, monkeypatch, store):
    # None, an int and bytes used to raise a bare TypeError from pathlib; "" was the working directory ("store '.'
    # exists"), and with overwrite=True an empty one would have been taken
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ats.AttnscopeError, match=r"^store=.*expected the path of the trace store to create"):
        ats.capture(sd_pipe, "a red circle", seed=0, store=store, overwrite=True, **RUN)
    with pytest.raises(ats.AttnscopeError, match=r"^store=.*expected the path of the trace store to create"):
        ats.Recorder(store)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_byte_in_the_output_summaries_is_an_error_not_another_norm(sd_pipe, tmp_path):
    # the summaries were stored without a checksum: a flipped byte read back as a different ‖O_t‖
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "a.zarr", output_change=True, **RUN)
    norms = tr.output_change()["output_norm"].values
    assert np.isfinite(norms).all()
    (chunk,) = [p for p in (tmp_path / "a.zarr" / "summaries" / "output_norm").rglob("*")
                if p.is_file() and p.name != "zarr.json"]
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0x40
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ats.AttnscopeError, match="output summaries cannot be read.*the trace is damaged"):
        ats.open_trace(tmp_path / "a.zarr").output_change()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "7.5"])
def test_a_guidance_scale_that_is_not_a_finite_number_is_refused_before_anything_is_written(sd_pipe, tmp_path, value):
    # nan > 1 is false: a NaN scale turned classifier-free guidance off without a word and was recorded as the run's
    with pytest.raises(ats.AttnscopeError, match=r"^guidance_scale=.*expected a finite number"):
        ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "g.zarr", guidance_scale=value, **RUN)
    assert list(tmp_path.iterdir()) == []


def test_a_run_given_its_timesteps_records_their_number_of_steps(tmp_path):
    # with timesteps= diffusers runs exactly those and ignores num_inference_steps: the manifest said the pipeline's
    # default (50) for a 3-step run, and a sweep's catalog showed 50 steps
    from diffusers import EulerDiscreteScheduler

    from attnscope.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    tr = ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "t.zarr", timesteps=[999, 500, 1], height=32,
                     width=32)
    assert tr.manifest["run"]["num_inference_steps"] == tr.manifest["run"]["num_steps"] == 3
    assert tr.timesteps.tolist() == [999.0, 500.0, 1.0]
