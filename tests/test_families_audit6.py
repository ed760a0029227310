"""Transformer-family pipelines beyond text-to-image (audit 6): FLUX.1 img2img, inpainting, Fill and ControlNet, SD3
img2img, inpainting and ControlNet, built from the tiny pipelines' components. Capture records the transformer calls
actually made (strength < 1: fewer), with maps equal to an independent float64 computation from the modules'
projections, on the right grid, and the image of a plain call; only the transformer's attention is a site (a
ControlNet's is never wrapped); rerun refuses what the manifest cannot hold; interventions edit the steps asked."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import attnscope as ats
from attnscope.testing import tiny_flux_pipeline, tiny_sd3_pipeline

from .family_checks import ProbsRecorder, cross_attention_reference, edits, record_cross_inputs
from .test_joint_families import _record_inputs, _reference

PROMPT = "a red circle and a blue square"
HEIGHT, WIDTH = 32, 48  # non-square: a 16 x 24 latent, an 8 x 12 grid of patches (Flux: of packed positions)
FLUX_KW = dict(height=HEIGHT, width=WIDTH, max_sequence_length=16, num_inference_steps=4)
SD3_KW = dict(FLUX_KW, guidance_scale=2.0)


def picture(seed, height=HEIGHT, width=WIDTH):
    """A random RGB image (an init image, a control image)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def mask(height=HEIGHT, width=WIDTH, box=(24, 4, 44, 20)):
    """A white box (x1, y1, x2, y2) on black: the region to repaint."""
    x1, y1, x2, y2 = box
    m = np.zeros((height, width), np.uint8)
    m[y1:y2, x1:x2] = 255
    return Image.fromarray(m)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _perturbed(model):
    """A ControlNet with its zero-initialised output layers made non-zero (else it adds nothing to the transformer)."""
    noise = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.05)
    return model.eval()


def _from_config(model, **changes):
    """A new module of ``model``'s class from its config with ``changes`` (random weights, seed 0)."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}  # `_use_default_values` would drop them
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return type(model)(**{**config, **changes}).eval()


@functools.cache
def _base(family):
    return tiny_flux_pipeline() if family == "flux" else tiny_sd3_pipeline()


def build(kind):
    """``(pipeline, its inputs, the inputs the manifest cannot hold)`` of one kind of pipeline."""
    import diffusers

    base = _base(kind.split("-")[0])
    parts = dict(base.components)
    if kind == "flux-img2img":
        return (_quiet(diffusers.FluxImg2ImgPipeline(**parts)), dict(FLUX_KW, image=picture(0), strength=0.6),
                ["image"])
    if kind == "flux-inpaint":
        return (_quiet(diffusers.FluxInpaintPipeline(**parts)),
                dict(FLUX_KW, image=picture(0), mask_image=mask(), strength=0.6), ["image", "mask_image"])
    if kind == "flux-fill":  # the masked image's and the mask's packed latents are concatenated on the channels
        latent = base.vae.config.latent_channels * 4
        mask_channels = 4 * (2 ** (len(base.vae.config.block_out_channels) - 1)) ** 2
        transformer = _from_config(base.transformer, in_channels=2 * latent + mask_channels, out_channels=latent)
        parts = {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
        return (_quiet(diffusers.FluxFillPipeline(**{**parts, "transformer": transformer})),
                dict(FLUX_KW, image=picture(0), mask_image=mask()), ["image", "mask_image"])
    if kind == "flux-control":  # FLUX.1 Canny/Depth: the control image's latents concatenated on the channels
        transformer = _from_config(base.transformer, in_channels=2 * base.transformer.config.in_channels,
                                   out_channels=base.transformer.config.in_channels)
        parts = {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
        return (_quiet(diffusers.FluxControlPipeline(**{**parts, "transformer": transformer})),
                dict(FLUX_KW, control_image=picture(3)), ["control_image"])
    if kind == "flux-controlnet-inpaint":
        pipe, kw, missing = build("flux-controlnet")
        parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
        return (_quiet(diffusers.FluxControlNetInpaintPipeline(**parts)),
                dict(kw, image=picture(0), mask_image=mask(), strength=0.6), [*missing, "image", "mask_image"])
    if kind == "sd3-inpaint-33ch":  # an inpainting transformer: mask and masked image latents on the channels
        parts.update(transformer=_from_config(base.transformer, in_channels=33, out_channels=16),
                     vae=_from_config(base.vae, latent_channels=16))
        return (_quiet(diffusers.StableDiffusion3InpaintPipeline(**parts)),
                dict(SD3_KW, image=picture(0), mask_image=mask(), strength=0.6), ["image", "mask_image"])
    if kind == "flux-controlnet":
        keep = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "pooled_projection_dim", "axes_dims_rope")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            controlnet = diffusers.FluxControlNetModel(**{k: base.transformer.config[k] for k in keep}, num_layers=1,
                                                       num_single_layers=1)
        return (_quiet(diffusers.FluxControlNetPipeline(**parts, controlnet=_perturbed(controlnet))),
                dict(FLUX_KW, control_image=picture(3)), ["control_image"])
    if kind == "sd3-img2img":
        return (_quiet(diffusers.StableDiffusion3Img2ImgPipeline(**parts)),
                dict(SD3_KW, image=picture(0), strength=0.6), ["image"])
    if kind == "sd3-inpaint":  # diffusers wants a transformer of 16 (or 33) input channels: a 16-channel VAE
        parts.update(transformer=_from_config(base.transformer, in_channels=16, out_channels=16),
                     vae=_from_config(base.vae, latent_channels=16))
        return (_quiet(diffusers.StableDiffusion3InpaintPipeline(**parts)),
                dict(SD3_KW, image=picture(0), mask_image=mask(), strength=0.6), ["image", "mask_image"])
    assert kind == "sd3-controlnet"
    keep = ("sample_size", "patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        controlnet = diffusers.SD3ControlNetModel(**{k: base.transformer.config[k] for k in keep}, num_layers=1)
    return (_quiet(diffusers.StableDiffusion3ControlNetPipeline(**parts, controlnet=_perturbed(controlnet))),
            dict(SD3_KW, control_image=picture(3)), ["control_image"])


KINDS = ["flux-img2img", "flux-inpaint", "flux-fill", "flux-controlnet", "sd3-img2img", "sd3-inpaint", "sd3-controlnet"]
#: more pipelines of the two families, captured and checked as KINDS (not steered)
MORE = ["flux-control", "flux-controlnet-inpaint", "sd3-inpaint-33ch"]


def seeded(pipe, kw, seed=0):
    """A plain call's inputs. SD3's ControlNet pipeline encodes the control image with a sample of torch's global
    generator (``latent_dist.sample()``, not the call's): it is seeded too, or two plain calls differ."""
    torch.manual_seed(seed)
    return dict(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), **kw)


def planned(kw):
    """The steps diffusers' transformer pipelines run at ``strength`` (hand-written from their ``get_timesteps``):
    all but the first ``int(n - n * strength)``."""
    n, strength = kw["num_inference_steps"], kw.get("strength", 1.0)
    return n - int(max(n - min(n * strength, n), 0))


def plain_with_timesteps(pipe, kw):
    """A plain call's image, and the timestep of each transformer call it made (a torch pre-hook, no attnscope)."""
    made = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: made.append(k["timestep"]), with_kwargs=True)
    try:
        return pipe(**seeded(pipe, kw)).images[0], made
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", KINDS + MORE)
def test_capture_records_the_calls_made_independent_maps_on_the_grid_and_the_plain_image(kind, tmp_path):
    pipe, kw, missing = build(kind)
    plain, made = plain_with_timesteps(pipe, kw)
    assert len(made) == planned(kw) and (len(made) < kw["num_inference_steps"]) == ("strength" in kw)
    controlnet = getattr(pipe, "controlnet", None)
    processors = dict(controlnet.attn_processors) if controlnet is not None else {}
    untouched = []
    if controlnet is not None:  # its own attention is never wrapped, at every call in the run
        watch = controlnet.register_forward_pre_hook(lambda m, a, k: untouched.append(
            all(controlnet.attn_processors[n] is p for n, p in processors.items())), with_kwargs=True)
    inputs, handles = _record_inputs(pipe, tmp_path)
    try:
        torch.manual_seed(0)
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", heads="all", tokens="all",
                         branch="both" if kind.startswith("sd3") else "cond", exact=True, **kw)
    finally:
        for h in handles + ([watch] if controlnet is not None else []):
            h.remove()
    np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(plain))
    assert untouched == [True] * (len(made) if controlnet is not None else 0)
    # the steps are the transformer's calls, at the scheduler's last timesteps (exactly: see the test below)
    assert tr.manifest["run"]["num_steps"] == len(made) and tr.manifest["run"]["num_inference_steps"] == 4
    np.testing.assert_allclose(tr.attention(tr.sites[0]).timestep.values, pipe.scheduler.timesteps[-len(made):],
                               rtol=1e-6)
    # only the transformer's sites; the maps on the latent's grid of patches (Fill: channels, not tokens, added)
    sites = ats.discover_sites(pipe)
    assert tr.sites == [s.name for s in sites] and all(s.module in set(pipe.transformer.modules()) for s in sites)
    family = kind.split("-")[0]
    branches = [("uncond", slice(0, 1)), ("cond", slice(1, 2))] if family == "sd3" else [("cond", slice(0, 1))]
    worst = 0.0
    for site, module in ((s.name, s.module) for s in sites):
        assert (tr.attention(site).sizes["y"], tr.attention(site).sizes["x"]) == (HEIGHT // 4, WIDTH // 4)
        assert len(inputs[site]) == len(made)
        for step, call in enumerate(inputs[site]):
            ref = _reference(family, module, call)
            assert ref.shape[0] == len(branches)                                 # [uncond; cond] on SD3
            ref = ref.reshape(*ref.shape[:2], HEIGHT // 4, WIDTH // 4, ref.shape[-1]).numpy()
            for branch, rows in branches:
                got = tr.attention(site, branch).isel(step=step).values.astype(np.float64)
                worst = max(worst, float(np.abs(got - ref[rows]).max()))
    assert worst < 2e-3
    # a rerun is refused before anything is loaded or written, naming the inputs and the way by hand
    assert tr.manifest["run"]["unrecorded_kwargs"] == missing
    for given in (pipe, None):
        with pytest.raises(ats.AttnscopeError, match=rf"cannot rerun trace .*{type(pipe).__name__} was called with "
                                                     rf"{', '.join(missing)}, which the manifest cannot hold.*"
                                                     rf"ats\.Recorder.*ats\.compare"):
            ats.rerun(tr, [ats.regulate.Reweight("square", 2.0)], pipe=given, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


@pytest.mark.parametrize("kind", ["flux-img2img", "flux-inpaint", "flux-fill", "flux-controlnet"])
def test_flux_pipelines_without_current_timestep_store_the_schedulers_timesteps(kind, tmp_path):
    """As on FluxPipeline (test_joint_families.py::test_stored_and_shown_timesteps_are_the_schedulers)."""
    pipe, kw, _ = build(kind)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **{**kw, "num_inference_steps": 2})
    assert tr.timesteps.tolist() == [float(t) for t in pipe.scheduler.timesteps[-tr.timesteps.size:]]


@pytest.mark.parametrize("kind", ["flux-inpaint", "sd3-inpaint"])
def test_padding_mask_crop_records_the_box_diffusers_crops(kind, tmp_path):
    """A 64 px image inpainted with ``padding_mask_crop``: the box is generated at height x width and pasted back;
    the trace records diffusers' own box (run.crop_region) as on UNet inpainting (test_crop_audit5.py)."""
    from diffusers.image_processor import VaeImageProcessor

    pipe, kw, _ = build(kind)
    kw = {**kw, "image": picture(1, 64, 64), "mask_image": mask(64, 64, (36, 8, 60, 24)), "padding_mask_crop": 4,
          "num_inference_steps": 2, "strength": 1.0}
    plain = pipe(**seeded(pipe, kw)).images[0]
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **kw)
    assert tr.manifest["run"]["crop_region"] == list(VaeImageProcessor.get_crop_region(kw["mask_image"], WIDTH, HEIGHT,
                                                                                       pad=4))
    assert tr.images[0].size == plain.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(plain))
    a = tr.attention(tr.sites[0])
    assert (a.sizes["y"], a.sizes["x"]) == (HEIGHT // 4, WIDTH // 4)              # the crop's grid, not the image's
    assert "get_crop_region" not in vars(pipe.mask_processor)                   # the pipeline's own method again


@pytest.mark.parametrize("kind", ["flux-img2img", "flux-inpaint", "flux-fill", "sd3-img2img", "sd3-inpaint"])
def test_a_strength_that_leaves_no_step_is_one_error_before_anything_is_written(kind, tmp_path):
    """diffusers fails inside these pipelines at strength 0 (SD3 img2img: a reshape of 0 elements); capture says so
    first. The smallest strength the message names runs one step."""
    pipe, kw, _ = build(kind)
    kw = {**kw, "strength": 0.0, "num_inference_steps": 2}
    with pytest.raises((ValueError, RuntimeError)):
        pipe(**seeded(pipe, kw))
    with pytest.raises(ats.AttnscopeError, match=rf"strength=0\.0 with num_inference_steps=2: {type(pipe).__name__} "
                                                 r"would run 0 of the 2 steps.*raise strength to 0\.001$"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **kw)
    assert not (tmp_path / "a.zarr").exists()
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **{**kw, "strength": 0.001})
    assert tr.manifest["run"]["num_steps"] == planned({**kw, "strength": 0.001}) == 1


class StageSpy:
    """Keeps a copy of what it is shown at ``stage``, per (site, step); as an intervention placed first it sees the
    tensors before any edit, as an observer after every edit."""

    def __init__(self, role, stage):
        self.role, self.stage, self.seen = role, stage, {}

    def stages(self, ctx):
        return (self.stage,)

    def _keep(self, ctx, tensor):
        self.seen[(ctx.site.name, ctx.step)] = tensor.clone()

    on_logits = on_probs = _keep


INTERVENTIONS = {  # (the intervention, the stage it edits, the steps it edits of the 3 of 6 that strength 0.5 leaves)
    "reweight-step-1": (lambda: ats.regulate.Reweight("square", 3.0, steps=[1]), "probs", {1}),
    "reweight-last": (lambda: ats.regulate.Reweight("square", 3.0, steps=-1), "probs", {2}),
    "regulation-first-half": (lambda: ats.regulate.AttentionRegulation(["circle", "square"], iterations=3), "logits",
                              {0, 1}),
    "regulation-step-2": (lambda: ats.regulate.AttentionRegulation(["circle", "square"], steps=[2], iterations=3),
                          "logits", {2}),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_interventions_edit_the_steps_of_the_run_asked_and_nothing_before(kind, name):
    """Steps count the transformer calls made (3 here; strength 0.5 leaves 3 of 6): "first_half" is 2 of them, -1 the
    third."""
    make, stage, expected = INTERVENTIONS[name]
    pipe, kw, _ = build(kind)
    kw = {**kw, "num_inference_steps": 6, "strength": 0.5} if "strength" in kw or kind == "flux-fill" else \
        {**kw, "num_inference_steps": 3}
    kw["output_type"] = "np"
    plain = ProbsRecorder()
    with ats.hooks(pipe, plain, exact=True):
        before = pipe(**seeded(pipe, kw)).images
    first, after, watched = StageSpy("intervention", stage), StageSpy("observer", stage), ProbsRecorder()
    with ats.hooks(pipe, first, make(), after, watched, exact=True):
        steered = pipe(**seeded(pipe, kw)).images
    assert np.abs(steered - before).max() > 0
    changed = {key for key, diff in edits(first, after).items() if float(diff.max()) > 0}
    assert {step for _, step in changed} == expected
    if name.startswith("regulation"):  # its default sites: the double-stream blocks (all of SD3's)
        assert {site for site, _ in changed} == {s.name for s in ats.discover_sites(pipe) if s.block == "double"}
    for site, seen in plain.seen.items():
        assert len(seen) == len(watched.seen[site]) == 3
        for step in range(min(expected)):                                       # before the edit: bit for bit
            assert torch.equal(watched.seen[site][step], seen[step]), (site, step)


@pytest.mark.parametrize("kind", KINDS)
def test_tgate_is_refused_on_these_pipelines_too(kind):
    pipe, kw, _ = build(kind)
    processors = dict(pipe.transformer.attn_processors)
    with pytest.raises(ats.AttnscopeError, match=rf"TGate on a '{kind.split('-')[0]}' pipeline: TGATE has no official "
                                                 r"rule for joint attention"):
        with ats.hooks(pipe, ats.regulate.TGate(1)):
            pipe(**seeded(pipe, {**kw, "num_inference_steps": 2}))
    assert all(pipe.transformer.attn_processors[k] is p for k, p in processors.items())


@pytest.mark.parametrize("img2img", [False, True], ids=["text", "img2img"])
def test_sana_sprint_records_its_calls_with_independent_maps_and_the_plain_image(img2img, tmp_path):
    """SanaSprintPipeline (SCM scheduler, guidance embedded, no CFG rows) and SanaSprintImg2ImgPipeline (strength 0.5:
    one step of two) on the tiny Sana's parts, with a transformer of Sprint's kind (guidance embeddings, RMS q/k norms
    across heads). It calls the transformer with SCM's ``sin t / (cos t + sin t)`` of the scheduler's ``t``: that value
    is the step's timestep (docs/model-families.md)."""
    import diffusers

    from attnscope.testing import tiny_sana_pipeline

    base = tiny_sana_pipeline(qk_norm="rms_norm_across_heads")
    transformer = _from_config(base.transformer, guidance_embeds=True)
    cls = diffusers.SanaSprintImg2ImgPipeline if img2img else diffusers.SanaSprintPipeline
    pipe = _quiet(cls(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=transformer,
                      scheduler=diffusers.SCMScheduler()))
    kw = dict(num_inference_steps=2, height=32, width=64, max_sequence_length=16, use_resolution_binning=False)
    if img2img:
        kw.update(image=picture(0, 32, 64), strength=0.5)
    plain, made = plain_with_timesteps(pipe, kw)
    if not img2img:
        scheduled = pipe.scheduler.timesteps[:len(made)].double()
        np.testing.assert_allclose([float(t) for t in made], torch.sin(scheduled) / (torch.cos(scheduled) +
                                                                                    torch.sin(scheduled)), rtol=1e-6)
    inputs, handles = record_cross_inputs(pipe)
    try:
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", heads="all", tokens="all", exact=True, **kw)
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(plain))
    assert tr.manifest["run"]["num_steps"] == len(made) == (1 if img2img else 2)
    assert tr.timesteps.tolist() == [float(t) for t in made]
    modules = {s.name: s.module for s in ats.discover_sites(pipe)}
    assert tr.sites == list(modules) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    if img2img:  # Sana's rule for the steps strength leaves is the transformer pipelines' (planned): 0 is refused
        with pytest.raises(ats.AttnscopeError, match=r"strength=0\.0 with num_inference_steps=2: "
                                                     r"SanaSprintImg2ImgPipeline would run 0 of the 2 steps"):
            ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "b.zarr", **{**kw, "strength": 0.0})
        assert not (tmp_path / "b.zarr").exists() and planned(kw) == 1
    for site in tr.sites:
        assert len(inputs[site]) == len(made)
        for step, call in enumerate(inputs[site]):
            ref = cross_attention_reference(modules[site], call)                  # (1, heads, 16 * 32, tokens)
            ref = ref.reshape(*ref.shape[:2], 16, 32, ref.shape[-1]).numpy()
            np.testing.assert_allclose(tr.attention(site).isel(step=step).values.astype(np.float64), ref, atol=2e-3)


def test_flux_kontext_inpainting_is_refused_saying_which_pipelines_work(tmp_path):
    """FluxKontextInpaintPipeline appends the image's tokens as a reference, as FluxKontextPipeline: one error, nothing
    written. The message said "attnscope supports text-to-image only", which FluxInpaintPipeline & co. contradict."""
    import diffusers

    pipe = _quiet(diffusers.FluxKontextInpaintPipeline(**_base("flux").components))
    kw = dict(FLUX_KW, image=picture(0), mask_image=mask(), strength=0.6, max_area=HEIGHT * WIDTH, _auto_resize=False)
    processors = dict(pipe.transformer.attn_processors)
    with pytest.raises(ats.AttnscopeError, match=r"reference image \(FluxKontextPipeline's image=\): 96 of the "
                                                 r"transformer's 192 image tokens are reference-image tokens.*records "
                                                 r"pipelines whose transformer sees the latent's own tokens only "
                                                 r"\(text-to-image, img2img, inpainting, Fill, ControlNet"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **kw)
    assert not (tmp_path / "a.zarr").exists()
    assert all(pipe.transformer.attn_processors[k] is p for k, p in processors.items())


@pytest.mark.parametrize("kind", ["flux-inpaint", "sd3-controlnet"])
def test_the_before_after_by_hand_with_a_recorder_and_compare(kind, tmp_path):
    """What the rerun refusal tells the user to do (docs/rerun.md): a Recorder beside the intervention, the same
    inputs and seed; the steps pair up with the capture's (SD3's ControlNet: the global generator seeded too)."""
    pipe, kw, _ = build(kind)
    torch.manual_seed(0)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **kw)
    rec = ats.Recorder(tmp_path / "b.zarr")
    with ats.hooks(pipe, rec, exact=True):
        rec.add_images(pipe(**seeded(pipe, kw)).images)
    same = ats.open_trace(tmp_path / "b.zarr")
    np.testing.assert_array_equal(np.asarray(same.images[0]), np.asarray(tr.images[0]))   # the same generation
    np.testing.assert_array_equal(same.attention(tr.sites[0]).values, tr.attention(tr.sites[0]).values)
    rec = ats.Recorder(tmp_path / "c.zarr")
    with ats.hooks(pipe, ats.regulate.Reweight("square", 3.0), rec):
        rec.add_images(pipe(**seeded(pipe, kw)).images)
    c = ats.compare(tr, ats.open_trace(tmp_path / "c.zarr"), ["circle", "square"])
    assert c.image_change() > 0
    assert c.stats.sizes["step"] == tr.manifest["run"]["num_steps"]
