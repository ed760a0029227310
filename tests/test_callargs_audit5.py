"""Audit of the arguments a user passes to a text-to-image pipeline call through ``ats.capture`` and of the
schedulers swapped in: each is recorded in the manifest, ``ats.rerun`` reproduces the image bit for bit, and a
rerun with an intervention runs the same generation with only the intervention added.

The independent expectation is a plain pipeline call (no attnscope, or ``ats.hooks`` alone for an intervention)
with the same arguments and a ``torch.Generator`` seeded alike: ``capture(exact=True)`` must give its image, and
so must the rerun, which knows the run only from the manifest.
"""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback, SDXLCFGCutoffCallback

import attnscope as ats

from .conftest import cli

PROMPT = "a red circle and a blue square"


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def plain(pipe, prompt, seed, **kwargs) -> np.ndarray:
    """The pipeline's own image (uint8, as the trace stores it), generated without attnscope."""
    generator = ([torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list)
                 else torch.Generator().manual_seed(seed))
    out = pipe(prompt, generator=generator, **kwargs)
    if kwargs.get("output_type") == "np":
        return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    return pixels(out.images)


def check_reproduced(pipe, tmp_path, prompt=PROMPT, seed=0, **kwargs):
    """capture(exact=True) makes the plain call's image; rerun makes it again from the manifest alone."""
    want = plain(pipe, prompt, seed, **kwargs)
    tr = ats.capture(pipe, prompt, seed=seed, store=tmp_path / "a.zarr", exact=True, **kwargs)
    assert tr.complete and tr.manifest["run"]["reproducible"] is True
    assert np.array_equal(pixels(tr.images), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "could not be recorded" warning
        warnings.filterwarnings("ignore", message="__array__")  # numpy 2 / torch, from the Euler schedulers
        again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    assert np.array_equal(pixels(again.images), want)
    for site in tr.sites[:2]:
        assert np.array_equal(tr.attention(site).values, again.attention(site).values, equal_nan=True)
    return tr, again


@pytest.fixture
def scheduled(shapes):
    """The shapes model with the scheduler a test sets on it; its own scheduler comes back afterwards."""
    original = shapes.scheduler
    yield shapes
    shapes.scheduler = original


# -- the call's arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(negative_prompt="a green triangle"),
    dict(guidance_scale=1.0),
    dict(guidance_scale=3.0, guidance_rescale=0.7),
    dict(eta=0.8),  # the shapes model samples with DDIM, which reads eta
    dict(height=32, width=48),
    dict(output_type="np"),
], ids=["negative", "no-cfg", "rescale", "eta", "non-square", "np"])
def test_call_arguments_are_recorded_and_reproduced(shapes, tmp_path, kwargs):
    tr, _ = check_reproduced(shapes, tmp_path, num_inference_steps=3, **kwargs)
    recorded = tr.manifest["run"]["pipeline_kwargs"]
    assert {k: recorded[k] for k in kwargs} == kwargs
    assert tr.manifest["run"]["guidance"] is (kwargs.get("guidance_scale", 2.5) > 1)


def test_two_prompts_two_images_each_negative_list(shapes, tmp_path):
    tr, _ = check_reproduced(shapes, tmp_path, prompt=["a red circle", "a blue square"], seed=[4, 5, 6, 7],
                             negative_prompt=["a green triangle", "a red square"], num_images_per_prompt=2,
                             num_inference_steps=3)
    run = tr.manifest["run"]
    assert run["samples"] == 4 and run["seed"] == [4, 5, 6, 7]
    assert run["negative_prompt"] == ["a green triangle", "a red square"]


def test_guidance_off_records_the_prompt_rows_as_cond(shapes, tmp_path):
    """guidance_scale=1: the denoiser's batch is the prompt's rows alone; they are the cond branch, and there is
    no uncond branch to ask for."""
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", guidance_scale=1.0, num_inference_steps=2)
    assert tr.manifest["run"]["guidance"] is False and tr.attention(tr.sites[0]).sizes["sample"] == 1
    with pytest.raises(ats.AttnscopeError, match="no unconditional branch"):
        ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "b.zarr", guidance_scale=1.0, branch="both",
                    num_inference_steps=2)


def test_user_generator_is_refused_for_seed(shapes, tmp_path):
    for generator in (torch.Generator().manual_seed(0), [torch.Generator().manual_seed(0)]):
        with pytest.raises(ats.AttnscopeError, match="pass `prompt` and `seed` to capture"):
            ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", generator=generator)
    assert not (tmp_path / "a.zarr").exists()


@pytest.mark.parametrize("name", ["latents", "negative_prompt_embeds"])
def test_tensor_inputs_make_a_trace_rerun_refuses(shapes, tmp_path, name):
    """A tensor the manifest cannot hold: the trace says so, and a rerun refuses it in one error rather than make
    another generation."""
    if name == "latents":
        value = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    else:
        value = shapes.encode_prompt("a green triangle", "cpu", 1, True)[0]
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=2, **{name: value})
    assert tr.manifest["run"]["unrecorded_kwargs"] == [name] and tr.manifest["run"]["reproducible"] is False
    with pytest.raises(ats.AttnscopeError, match=f"called with {name}, which the manifest cannot hold"):
        ats.rerun(tr, pipe=shapes, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


def test_interrupted_run_is_an_incomplete_trace(shapes, tmp_path):
    """A step callback that sets ``pipe._interrupt``: diffusers skips the steps left and decodes what it has; the
    trace holds the steps that ran, is marked incomplete, and a rerun refuses it."""
    def stop(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    with pytest.warns(UserWarning, match="incomplete: 2 of 4 steps written"):
        tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=4,
                         callback_on_step_end=stop)
    assert tr.complete is False and tr.steps_written == 2 and len(tr.images) == 1
    with pytest.raises(ats.AttnscopeError, match="is incomplete"):
        ats.rerun(tr, pipe=shapes, store=tmp_path / "b.zarr")


@pytest.mark.parametrize("multi", [False, True], ids=["cutoff", "multi"])
def test_diffusers_cfg_cutoff_callback_is_recorded_and_rebuilt(shapes, tmp_path, multi):
    """diffusers' SDCFGCutoffCallback turns guidance off after a step: it changes the image, so the manifest
    records it (class and config) and the rerun builds it again (it was 'unrecorded': the rerun ran without it and
    made another image, with a warning)."""
    def make():
        cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
        return MultiPipelineCallbacks([cutoff]) if multi else cutoff

    tr, again = check_reproduced(shapes, tmp_path, num_inference_steps=3, callback_on_step_end=make())
    assert not np.array_equal(plain(shapes, PROMPT, 0, num_inference_steps=3), pixels(tr.images))  # it acted
    spec = tr.manifest["run"]["pipeline_kwargs"]["callback_on_step_end"]
    cutoff = {"diffusers_callback": "SDCFGCutoffCallback", "config": {"cutoff_step_ratio": None, "cutoff_step_index": 1}}
    assert spec == ({"diffusers_callback": "MultiPipelineCallbacks", "callbacks": [cutoff]} if multi else cutoff)
    assert again.manifest["run"]["pipeline_kwargs"]["callback_on_step_end"] == spec


def test_sdxl_cfg_cutoff_callback_is_rebuilt(sdxl_pipe, tmp_path):
    check_reproduced(sdxl_pipe, tmp_path, num_inference_steps=3, height=64, width=64,
                     callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5))


def test_both_branches_through_a_cfg_cutoff(shapes, tmp_path):
    """branch='both' with a CFG cutoff: after it the batch has no uncond rows; their maps are NaN there (as at a
    step that runs one guidance half), the cond maps go on, and the run completes with the plain call's image (it
    stopped at the cutoff with 'this batch has no unconditional rows')."""
    kwargs = dict(num_inference_steps=3, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None,
                                                                                 cutoff_step_index=1))
    want = plain(shapes, PROMPT, 0, **kwargs)
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", branch="both", exact=True, **kwargs)
    assert tr.complete and np.array_equal(pixels(tr.images), want)
    site = tr.sites[0]
    uncond = tr.attention(site, branch="uncond").values
    cond = tr.attention(site).values
    assert not np.isnan(uncond[:2]).any() and np.isnan(uncond[2]).all()  # the callback ran after step 1
    assert not np.isnan(cond).any()
    assert np.allclose(cond.sum(-1), 1, atol=2e-3)


def test_crafted_callback_spec_is_one_error(shapes, tmp_path):
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=2,
                     callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    for spec, match in (({"diffusers_callback": "os.system", "config": {}}, "expected one of diffusers' callbacks"),
                        ({"diffusers_callback": "SDCFGCutoffCallback", "config": {"cutoff_step_ratio": 2.0}},
                         "SDCFGCutoffCallback refuses that config")):
        manifest = tr.manifest
        manifest["run"]["pipeline_kwargs"]["callback_on_step_end"] = spec
        crafted = tmp_path / "crafted.zarr"
        if crafted.exists():
            shutil.rmtree(crafted)
        shutil.copytree(tr.path, crafted)
        meta = json.loads((crafted / "zarr.json").read_text())
        meta["attributes"]["manifest"] = manifest
        (crafted / "zarr.json").write_text(json.dumps(meta))
        with pytest.raises(ats.AttnscopeError, match=match):
            ats.rerun(crafted, pipe=shapes, store=tmp_path / "b.zarr")
        assert not (tmp_path / "b.zarr").exists()


# -- schedulers and schedules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, kwargs", [
    # 4 steps: at 3 the shapes model's trailing cosine schedule makes NaN under diffusers alone
    (lambda c: EulerAncestralDiscreteScheduler.from_config(c), dict(num_inference_steps=4)),
    (lambda c: DPMSolverMultistepScheduler.from_config(c, final_sigmas_type="zero"), dict(num_inference_steps=4)),
    (lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="sde-dpmsolver++"),
     dict(num_inference_steps=3)),
    (lambda c: LCMScheduler.from_config(c), dict(num_inference_steps=4, guidance_scale=1.0)),
    (lambda c: DDIMScheduler.from_config(c, timestep_spacing="trailing"), dict(num_inference_steps=3)),
    (lambda c: EulerDiscreteScheduler.from_config(c), dict(timesteps=[901, 600, 300, 10])),
    (lambda c: EulerDiscreteScheduler.from_config(c), dict(sigmas=[10.0, 4.0, 1.0, 0.3])),
    # more denoiser steps than num_inference_steps: Heun 2N-1, PNDM (SD 1.5's default) N+1
    (lambda c: HeunDiscreteScheduler.from_config(c), dict(num_inference_steps=3)),
    (lambda c: PNDMScheduler.from_config(c, skip_prk_steps=True), dict(num_inference_steps=3)),
], ids=["euler-ancestral", "dpm-final-zero", "dpm-sde", "lcm", "ddim-trailing", "timesteps", "sigmas", "heun", "pndm"])
def test_swapped_schedulers_are_reproduced(scheduled, tmp_path, make, kwargs):
    scheduled.scheduler = make(scheduled.scheduler.config)
    tr, again = check_reproduced(scheduled, tmp_path, **kwargs)
    assert tr.manifest["scheduler"]["class"] == type(scheduled.scheduler).__name__
    assert again.manifest["scheduler"] == tr.manifest["scheduler"]
    assert np.array_equal(tr.timesteps, again.timesteps)


def test_steps_count_the_schedulers_steps_not_num_inference_steps(scheduled, tmp_path):
    """Heun runs 5 denoiser steps for num_inference_steps=3: steps=[4] is its last (it was refused as 'outside this
    run's steps 0..2', and so was every rerun of a Heun or PNDM trace)."""
    scheduled.scheduler = HeunDiscreteScheduler.from_config(scheduled.scheduler.config)
    scheduled.scheduler.set_timesteps(3)
    count = len(scheduled.scheduler.timesteps)  # diffusers' own plan
    tr = ats.capture(scheduled, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=3, steps=[count - 1])
    assert count == 5 and tr.manifest["run"]["num_steps"] == count and tr.manifest["capture"]["steps"] == [count - 1]
    with pytest.raises(ats.AttnscopeError, match=r"steps: \[5\] outside this run's steps 0..4 \(5 steps\)"):
        ats.capture(scheduled, PROMPT, seed=0, store=tmp_path / "b.zarr", num_inference_steps=3, steps=[count])
    assert not (tmp_path / "b.zarr").exists()


@pytest.mark.parametrize("name, value", [
    ("sigmas", np.linspace(10.0, 0.3, 4, dtype=np.float32)),
    ("timesteps", np.array([901, 650, 333, 10])),
])
def test_numpy_schedules_are_recorded(scheduled, tmp_path, name, value):
    """``sigmas=np.linspace(...)``: recorded as the list of its values (it was 'unrecorded', and the rerun ran the
    default schedule: another number of steps and another image)."""
    scheduled.scheduler = EulerDiscreteScheduler.from_config(scheduled.scheduler.config)
    tr, _ = check_reproduced(scheduled, tmp_path, **{name: value})
    assert tr.manifest["run"]["pipeline_kwargs"][name] == value.tolist()
    assert tr.manifest["run"]["unrecorded_kwargs"] == []


# -- SDXL ---------------------------------------------------------------------------------------------------------
def test_sdxl_micro_conditioning_and_denoising_end(sdxl_pipe, tmp_path):
    kwargs = dict(original_size=(128, 96), target_size=(64, 64), crops_coords_top_left=(4, 8),
                  negative_original_size=(32, 32), negative_crops_coords_top_left=(0, 2), denoising_end=0.5,
                  num_inference_steps=4, height=64, width=64)
    tr, _ = check_reproduced(sdxl_pipe, tmp_path, **kwargs)
    recorded = tr.manifest["run"]["pipeline_kwargs"]
    assert recorded["original_size"] == [128, 96] and recorded["denoising_end"] == 0.5
    assert tr.manifest["run"]["num_steps"] == 2  # denoising_end=0.5 of 4 steps


# -- with an intervention ----------------------------------------------------------------------------------------
def test_rerun_with_reweight_is_the_same_call_with_the_intervention(scheduled, tmp_path):
    """The rerun's image is the one the user's own call makes with the same intervention in ``ats.hooks``."""
    scheduled.scheduler = EulerAncestralDiscreteScheduler.from_config(scheduled.scheduler.config)
    kwargs = dict(negative_prompt="a green triangle", guidance_scale=3.0, guidance_rescale=0.5, height=32, width=48,
                  num_inference_steps=4)
    tr = ats.capture(scheduled, PROMPT, seed=2, store=tmp_path / "a.zarr", exact=True, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__")
        steered = ats.rerun(tr, [ats.regulate.Reweight("square", 3.0)], pipe=scheduled, store=tmp_path / "b.zarr")
        with ats.hooks(scheduled, ats.regulate.Reweight("square", 3.0), exact=True):
            want = plain(scheduled, PROMPT, 2, **kwargs)
    assert np.array_equal(pixels(steered.images), want)
    assert not np.array_equal(pixels(steered.images), pixels(tr.images))
    assert steered.manifest["run"]["pipeline_kwargs"] == {**tr.manifest["run"]["pipeline_kwargs"],
                                                          "num_images_per_prompt": 1}


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_capture_set_arguments_rerun_bit_exact(tmp_path):
    out = tmp_path / "a.zarr"
    done = cli("capture", "--prompt", "a red circle", "--prompt", "a blue square", "--negative-prompt",
               "a green triangle", "--steps", "3", "--guidance", "3", "--width", "48", "--images-per-prompt", "2",
               "--set", "eta=0.5", "--set", "guidance_rescale=0.7", "--out", out)
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    recorded = tr.manifest["run"]["pipeline_kwargs"]
    assert recorded["eta"] == 0.5 and recorded["guidance_rescale"] == 0.7 and recorded["guidance_scale"] == 3.0
    assert cli("rerun", out).exit_code == 0
    again = ats.open_trace(tmp_path / "a-rerun.zarr")
    assert np.array_equal(pixels(again.images), pixels(tr.images)) and len(tr.images) == 4
