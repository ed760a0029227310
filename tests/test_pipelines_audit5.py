"""Pipelines other than plain text-to-image (img2img, inpainting, SDXL img2img, ControlNet) and common pipeline
setups (model CPU offload, fused q/k/v projections, attention slicing, FreeU): capture records the denoiser calls
actually made, with maps equal to an independent computation and the image of a plain call; rerun refuses what its
manifest cannot hold (image inputs, another pipeline class) and sets what is no weight (FreeU)."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import attnscope as ats
from attnscope.regulate import AttentionRegulation, Reweight
from attnscope.testing import tiny_sd_pipeline

from .conftest import AttnInputs, cli, error_line, reference_probs

PROMPT = "a red circle and a blue square"


def picture(seed, size=32):
    """A random RGB image (an init image, a control image)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


MASK = Image.fromarray(((np.arange(32)[None, :] > 16) * np.ones((32, 1))).astype(np.uint8) * 255)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _controlnet(unet):
    """A tiny ControlNet built from the UNet's config, its zero convolutions made non-zero (else it adds nothing)."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()
    noise = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.05)
    return controlnet


def build(kind, sd_pipe, sdxl_pipe):
    """``(pipeline, its image inputs, the names the manifest cannot hold)`` of one kind of pipeline."""
    import diffusers

    if kind == "img2img":
        return (_quiet(diffusers.StableDiffusionImg2ImgPipeline(**sd_pipe.components)),
                dict(image=picture(0), strength=0.5, num_inference_steps=4), ["image"])
    if kind == "inpaint-4ch":
        return (_quiet(diffusers.StableDiffusionInpaintPipeline(**sd_pipe.components)),
                dict(image=picture(0), mask_image=MASK, height=32, width=32, num_inference_steps=3),
                ["image", "mask_image"])
    if kind == "inpaint-9ch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = diffusers.UNet2DConditionModel.from_config({**sd_pipe.unet.config, "in_channels": 9}).eval()
        return (_quiet(diffusers.StableDiffusionInpaintPipeline(**{**sd_pipe.components, "unet": unet})),
                dict(image=picture(0), mask_image=MASK, height=32, width=32, num_inference_steps=3, strength=0.7),
                ["image", "mask_image"])
    if kind == "sdxl-img2img":
        return (_quiet(diffusers.StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)),
                dict(image=picture(0, 64), strength=0.6, num_inference_steps=4), ["image"])
    if kind == "sdxl-denoising-start":  # a refiner's second half: the steps after denoising_start
        return (_quiet(diffusers.StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)),
                dict(image=picture(0, 64), denoising_start=0.5, num_inference_steps=4), ["image"])
    assert kind == "controlnet"
    return (_quiet(diffusers.StableDiffusionControlNetPipeline(**sd_pipe.components,
                                                               controlnet=_controlnet(sd_pipe.unet))),
            dict(image=picture(3), height=32, width=32, num_inference_steps=3), ["image"])


KINDS = ["img2img", "inpaint-4ch", "inpaint-9ch", "sdxl-img2img", "sdxl-denoising-start", "controlnet"]


@contextlib.contextmanager
def denoiser_timesteps(pipe, denoiser="unet"):
    """The timesteps of the denoiser calls made in the block, seen by a plain torch pre-hook."""
    seen = []
    handle = getattr(pipe, denoiser).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(args[1] if len(args) > 1 else kwargs["timestep"])),
        with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_capture_records_the_denoiser_calls_made_with_independent_maps_and_the_plain_image(
        kind, sd_pipe, sdxl_pipe, tmp_path):
    pipe, inputs, _ = build(kind, sd_pipe, sdxl_pipe)
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **inputs).images[0]
    with AttnInputs(pipe) as calls, denoiser_timesteps(pipe) as made:
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", heads="all", exact=True, **inputs)
    tr = ats.open_trace(tmp_path / "a.zarr")
    # the steps are the denoiser's calls (strength < 1: fewer than num_inference_steps), with their timesteps
    assert tr.manifest["run"]["num_steps"] == len(made) and tr.manifest["run"]["num_inference_steps"] == \
        inputs["num_inference_steps"]
    if "strength" in inputs or "denoising_start" in inputs:
        kept = inputs.get("strength", 1 - inputs.get("denoising_start", 0))
        assert len(made) == int(inputs["num_inference_steps"] * kept) < inputs["num_inference_steps"]
    assert tr.attention(tr.sites[0]).timestep.values.tolist() == made
    # only the UNet's sites (a ControlNet's have the same names, so the maps below tell them apart)
    assert tr.sites == [s.name for s in ats.discover_sites(pipe)]
    assert sorted(tr.sites) == sorted(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2"))
    np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(plain))
    worst = 0.0
    for site in tr.sites:
        module = pipe.unet.get_submodule(site)
        assert len(calls.calls[site]) == len(made)
        for step, (hidden, text) in enumerate(calls.calls[site]):
            ref = reference_probs(module, hidden, text)[1]  # rows [uncond, cond]
            got = tr.attention(site).sel(step=step).isel(sample=0).values.reshape(ref.shape[0], -1, ref.shape[-1])
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()))
    assert worst < 2e-3
    ds = ats.stats.dominance(tr, targets=["circle", "square"])
    assert ds.sizes["step"] == len(made) and np.isfinite(ds.target_share.values).all()


@pytest.mark.parametrize("kind", KINDS)
def test_rerun_refuses_inputs_the_manifest_cannot_hold_naming_them(kind, sd_pipe, sdxl_pipe, tmp_path):
    pipe, inputs, missing = build(kind, sd_pipe, sdxl_pipe)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **inputs)
    assert tr.manifest["run"]["unrecorded_kwargs"] == missing
    out = tmp_path / "b.zarr"
    for given in (pipe, None):  # with the pipeline, and without (its manifest names no model to load)
        with pytest.raises(ats.AttnscopeError, match=rf"cannot rerun trace .*{type(pipe).__name__} was called with "
                                                     rf"{', '.join(missing)}, which the manifest cannot hold.*"
                                                     rf"ats\.Recorder.*ats\.compare"):
            ats.rerun(tr, [Reweight("square", 2.0)], pipe=given, store=out)
    assert not out.exists()


def test_the_refusals_way_records_the_intervened_run_and_compares(sd_pipe, tmp_path):
    """What the refusal tells the user to do: a Recorder beside the interventions, the same inputs and seed."""
    import diffusers

    pipe = _quiet(diffusers.StableDiffusionImg2ImgPipeline(**sd_pipe.components))
    inputs = dict(image=picture(0), strength=0.75, num_inference_steps=4)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **inputs)
    rec = ats.Recorder(tmp_path / "b.zarr")
    with ats.hooks(pipe, Reweight("square", 3.0), rec):
        rec.add_images(pipe(PROMPT, generator=torch.Generator().manual_seed(0), **inputs).images)
    c = ats.compare(tr, ats.open_trace(tmp_path / "b.zarr"), ["circle", "square"])
    shares = c.stats.target_share.mean(["step", "site", "sample"])
    assert float(shares.sel(target="square")) > 0.05 and c.image_change() > 0


def test_cli_rerun_of_an_img2img_trace_is_one_error_line(sd_pipe, tmp_path):
    import diffusers

    pipe = _quiet(diffusers.StableDiffusionImg2ImgPipeline(**sd_pipe.components))
    ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", image=picture(0), strength=0.5, num_inference_steps=2)
    line = error_line(cli("rerun", tmp_path / "a.zarr", "-o", tmp_path / "b.zarr", "--reweight", "square=2"))
    assert "StableDiffusionImg2ImgPipeline was called with image" in line
    assert not (tmp_path / "b.zarr").exists()


def test_rerun_of_a_trace_with_only_a_step_callback_still_runs(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, PROMPT, seed=1, store=tmp_path / "a.zarr", num_inference_steps=2, height=32, width=32,
                     callback_on_step_end=lambda pipe, step, t, kw: {})
    with pytest.warns(UserWarning, match="callback_on_step_end"):
        again = ats.rerun(tr, pipe=sd_pipe)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))


def test_steps_count_the_steps_strength_leaves(sd_pipe, tmp_path):
    import diffusers

    pipe = _quiet(diffusers.StableDiffusionImg2ImgPipeline(**sd_pipe.components))
    inputs = dict(image=picture(0), strength=0.5, num_inference_steps=4)  # 2 of the 4 steps run
    last = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", steps=-1, **inputs)
    assert last.attention(last.sites[0]).timestep.values.tolist() == pipe.scheduler.timesteps[-1:].tolist()
    with pytest.raises(ats.AttnscopeError, match=r"steps: \[3\] outside this run's steps 0\.\.1 \(2 steps\)"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "b.zarr", steps=3, **inputs)


@pytest.mark.parametrize("kind", ["img2img", "inpaint-9ch"])
def test_a_strength_that_leaves_no_step_is_one_error_before_anything_is_written(kind, sd_pipe, sdxl_pipe, tmp_path):
    pipe, inputs, _ = build(kind, sd_pipe, sdxl_pipe)
    inputs = {**inputs, "strength": 0.1, "num_inference_steps": 4}  # int(4 * 0.1) = 0 steps
    with pytest.raises(ats.AttnscopeError, match=rf"strength=0\.1 with num_inference_steps=4: {type(pipe).__name__} "
                                                 r"would run 0 of the 4 steps, so nothing would be denoised or "
                                                 r"recorded; raise strength to 0\.25 or num_inference_steps to 10"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **inputs)
    assert not (tmp_path / "a.zarr").exists()
    for fix in ({"num_inference_steps": 10}, {"strength": 0.25}):  # the fixes the message names run one step
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", overwrite=True, **{**inputs, **fix})
        assert tr.manifest["run"]["num_steps"] == 1


def test_a_flux_img2img_strength_that_leaves_a_step_is_not_refused(tmp_path):
    """diffusers' transformer pipelines count the steps a strength leaves otherwise (n - int(n - n * s)): 0.1 of 4
    steps runs one there, none on SD."""
    import diffusers

    from attnscope.testing import tiny_flux_pipeline

    pipe = _quiet(diffusers.FluxImg2ImgPipeline(**tiny_flux_pipeline().components))
    inputs = dict(image=picture(0), strength=0.1, num_inference_steps=4, height=32, width=32)
    with denoiser_timesteps(pipe, "transformer") as made:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **inputs)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **inputs)
    assert tr.manifest["run"]["num_steps"] == len(made) == 1


@pytest.mark.parametrize("kind", ["img2img", "controlnet"])
@pytest.mark.parametrize("client", [Reweight("square", 3.0), AttentionRegulation(targets=["circle", "square"])],
                         ids=["reweight", "regulation"])
def test_interventions_in_hooks_change_the_image_and_restore_the_processors(kind, client, sd_pipe, sdxl_pipe):
    pipe, inputs, _ = build(kind, sd_pipe, sdxl_pipe)
    inputs = {**inputs, "output_type": "np"}
    controlnet = getattr(pipe, "controlnet", None)
    before = {name: dict(m.attn_processors) for name, m in (("unet", pipe.unet), ("controlnet", controlnet)) if m}
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **inputs).images
    steps = []

    class Watch:
        role = "observer"

        def stages(self, ctx):
            return ()

        def on_step(self, ctx):
            steps.append(ctx.step)
            if controlnet is not None:  # the ControlNet's own attention is never wrapped
                assert all(controlnet.attn_processors[k] is p for k, p in before["controlnet"].items())

    with ats.hooks(pipe, client, Watch()):
        steered = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **inputs).images
    assert steps == list(range(len(steps))) and 0 < len(steps) <= inputs["num_inference_steps"]
    assert np.abs(steered - plain).mean() > 1e-4
    for name, processors in before.items():
        module = getattr(pipe, name)
        assert all(module.attn_processors[k] is p for k, p in processors.items()), name
    again = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **inputs).images
    np.testing.assert_array_equal(again, plain)


def test_model_cpu_offload_captures_and_reruns_bit_identically(tmp_path):
    pytest.importorskip("accelerate")
    pipe = tiny_sd_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    run = dict(num_inference_steps=3, height=32, width=32)
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **run).images[0]
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **run)
    np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(plain))
    again = ats.rerun(tr, pipe=pipe)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)


def test_fused_projections_record_the_same_maps_and_image(tmp_path):
    """``pipe.fuse_qkv_projections()`` sets FusedAttnProcessor2_0 (key and value from one ``to_kv``): capture stopped
    at the first recorded call with an error, leaving an incomplete trace; it now records the unfused run's maps."""
    pipe = tiny_sd_pipeline()
    run = dict(num_inference_steps=2, height=32, width=32)
    plain = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "plain.zarr", exact=True, **run)
    pipe.fuse_qkv_projections()
    fused_image = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **run).images[0]
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "fused.zarr", exact=True, **run)
    assert type(pipe.unet.get_submodule(tr.sites[0]).processor).__name__ == "FusedAttnProcessor2_0"
    np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(fused_image))  # exact: the fused run's image
    for site in tr.sites:  # the same weights: the maps of the unfused run, up to the fused product's rounding
        np.testing.assert_allclose(tr.attention(site).values, plain.attention(site).values, rtol=0, atol=1e-3)
    edited = ats.rerun(tr, [ats.regulate.Reweight("circle", 3.0)], pipe=pipe, store=tmp_path / "edited.zarr")
    assert np.abs(np.asarray(edited.images[0], float) - np.asarray(tr.images[0], float)).max() > 0


@pytest.mark.parametrize("other", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_rerun_with_another_pipeline_on_the_same_modules_is_refused(other, sd_pipe, tmp_path):
    """The weights check passes (the same modules), but the text-to-image trace holds no image for it."""
    import diffusers

    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=2, height=32, width=32)
    pipe = _quiet(getattr(diffusers, other)(**sd_pipe.components))
    with pytest.raises(ats.AttnscopeError, match=rf"with a {other}: it was captured with a StableDiffusionPipeline.*"
                                                 rf"diffusers\.StableDiffusionPipeline\(\*\*pipe\.components\)"):
        ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()

    class Mine(diffusers.StableDiffusionPipeline):  # a subclass makes the same call
        pass

    again = ats.rerun(tr, pipe=_quiet(Mine(**sd_pipe.components)), store=tmp_path / "c.zarr")
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))


def test_rerun_of_a_text_to_image_trace_from_given_latents_is_refused(sd_pipe, tmp_path):
    """Given start latents are not in the manifest either: the rerun would draw others from the seed."""
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(9))
    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", latents=latents, num_inference_steps=2,
                     height=32, width=32)
    with pytest.raises(ats.AttnscopeError, match="StableDiffusionPipeline was called with latents, which the "
                                                 "manifest cannot hold"):
        ats.rerun(tr, pipe=sd_pipe, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


def test_attention_slicing_is_refused_by_capture_before_a_store_is_made(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.enable_attention_slicing()
    with pytest.raises(ats.AttnscopeError, match=r"attention slicing is on .*pipe\.disable_attention_slicing\(\)"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=2, height=32, width=32)
    assert not (tmp_path / "a.zarr").exists()


FREEU = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)


def test_rerun_runs_with_the_freeu_the_trace_was_captured_with_and_puts_the_pipe_back(tmp_path):
    """FreeU is no weight: a pipeline loaded again (or another with the same weights) has it off, and the rerun made
    another image while the weights check passed. The trace records it; the rerun sets it for the run."""
    with_freeu, without = tiny_sd_pipeline(), tiny_sd_pipeline()  # the same weights
    run = dict(num_inference_steps=3, height=32, width=32)
    plain = without(PROMPT, generator=torch.Generator().manual_seed(0), **run).images[0]
    with_freeu.enable_freeu(**FREEU)
    tr = ats.capture(with_freeu, PROMPT, seed=0, store=tmp_path / "a.zarr", **run)
    assert tr.manifest["model"]["freeu"] == FREEU
    assert not np.array_equal(np.asarray(tr.images[0]), np.asarray(plain))  # FreeU changes the image
    again = ats.rerun(tr, pipe=without, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    assert again.manifest["model"]["freeu"] == FREEU
    assert all(getattr(block, "b1", None) is None for block in without.unet.up_blocks)  # put back: off
    # and the other way: a trace without FreeU, rerun on a pipe that has it on
    off = ats.capture(without, PROMPT, seed=0, store=tmp_path / "c.zarr", **run)
    assert off.manifest["model"]["freeu"] is None
    same = ats.rerun(off, pipe=with_freeu, store=tmp_path / "d.zarr")
    np.testing.assert_array_equal(np.asarray(same.images[0]), np.asarray(plain))
    assert all(getattr(block, k) == v for block in with_freeu.unet.up_blocks for k, v in FREEU.items())


@pytest.mark.parametrize("freeu", [{"s1": 0.9}, "on", {"s1": 0.9, "s2": 0.2, "b1": True, "b2": 1.6}])
def test_a_damaged_freeu_in_the_manifest_is_one_error(freeu, sd_pipe, tmp_path):
    import shutil

    import zarr

    tr = ats.capture(sd_pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=1, height=32, width=32)
    shutil.copytree(tr.path, tmp_path / "x.zarr")
    root = zarr.open_group(str(tmp_path / "x.zarr"), mode="r+")
    manifest = dict(root.attrs["manifest"])
    manifest["model"] = {**manifest["model"], "freeu": freeu}
    root.attrs["manifest"] = manifest
    with pytest.raises(ats.AttnscopeError, match=r"freeu=.* in its manifest's model; expected null or the non-zero "
                                                 r"numbers s1, s2, b1, b2"):
        ats.rerun(tmp_path / "x.zarr", pipe=sd_pipe, store=tmp_path / "y.zarr")
    assert not (tmp_path / "y.zarr").exists()


def test_instruct_pix2pix_is_refused_before_anything_runs(sd_pipe, tmp_path):
    """Its guided batch is [prompt + image; image only; neither]: recorded as three samples per image, the run then
    failed at its end (one image per sample expected), leaving a trace of mislabelled maps."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel.from_config({**sd_pipe.unet.config, "in_channels": 8}).eval()
    pipe = _quiet(diffusers.StableDiffusionInstructPix2PixPipeline(**{**sd_pipe.components, "unet": unet}))
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ats.AttnscopeError, match=r"a StableDiffusionInstructPix2PixPipeline \(text and image "
                                                 r"guidance\); its denoiser batch stacks three copies"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", image=picture(0), num_inference_steps=2)
    assert not (tmp_path / "a.zarr").exists()
    with pytest.raises(ats.AttnscopeError, match="InstructPix2Pix"):
        with ats.hooks(pipe, Reweight("square", 2.0)):
            pass
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())


@pytest.mark.parametrize("kind", ["img2img", "inpaint-4ch"])
def test_attend_and_excite_on_a_pipeline_starting_from_an_image_is_one_error(kind, sd_pipe, sdxl_pipe):
    """It gave diffusers' raw ValueError (img2img) or AttributeError (inpainting) from inside its preparation."""
    pipe, inputs, _ = build(kind, sd_pipe, sdxl_pipe)
    excite = ats.regulate.AttendAndExcite(["circle", "square"])
    call = dict(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **inputs)
    with pytest.raises(ats.AttnscopeError, match=rf"AttendAndExcite on {type(pipe).__name__}: expected a text-to-image "
                                                 r"pipeline \(ControlNet's included\)"):
        excite.prepare(pipe, call)


def test_attend_and_excite_still_runs_on_controlnet(sd_pipe, sdxl_pipe):
    pipe, inputs, _ = build("controlnet", sd_pipe, sdxl_pipe)
    excite = ats.regulate.AttendAndExcite(["circle", "square"], steps=[0])
    call = dict(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **inputs)
    plain = pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).images[0]
    excite.prepare(pipe, call)
    with ats.hooks(pipe, excite):
        moved = pipe(**call).images[0]
    assert np.abs(np.asarray(moved, float) - np.asarray(plain, float)).max() > 0
