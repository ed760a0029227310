"""The transformer family adapters as a demanding user drives them: the Flux.1 transformer called with positional
inputs, a FLUX.1 Kontext reference image, and the batch layouts the family table claims (two prompts × two images,
negative prompts, true CFG, a tall image) checked against an independent float64 computation from each module's
own projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.testing import (
    tiny_flux2_dev_pipeline,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

from .family_checks import assert_stored_maps_match_reference, record_cross_inputs
from .test_flux2 import _record_inputs as record_flux2_inputs
from .test_flux2 import _reference as flux2_reference
from .test_joint_families import _record_inputs as record_joint_inputs
from .test_joint_families import _reference as joint_reference

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


class Seen:
    """Keeps, per site, each call's spatial shape, timestep and a copy of its probabilities."""

    def __init__(self):
        self.calls = []

    def stages(self, ctx):
        return ("probs",)

    def on_probs(self, ctx, probs):
        self.calls.append((ctx.site.name, ctx.spatial_shape, ctx.step_context.timestep, probs.clone()))


def _grid_ids(rows, cols):
    """Flux.1's img_ids of a rows × cols packed grid: (0, row, column) per position, row-major."""
    r, c = torch.meshgrid(torch.arange(float(rows)), torch.arange(float(cols)), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3)


# ----------------------------------------------------------------------------- Flux.1 step inputs
def test_flux_transformer_called_with_positional_inputs_reads_its_timestep_and_grid(flux):
    """FluxTransformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, ...)
    called by position: the hooks read the timestep and the 4 × 16 packed grid (not a square guess) from those
    positions, as they do from keywords (before: float(None), a TypeError)."""
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 64, 16, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g),
              torch.tensor([0.5]), _grid_ids(4, 16), torch.zeros(8, 3))
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")
    positional, keywords = Seen(), Seen()
    with torch.no_grad():
        with ats.hooks(flux, positional):
            by_position = flux.transformer(*inputs).sample
        with ats.hooks(flux, keywords):
            by_keyword = flux.transformer(**dict(zip(names, inputs))).sample
    assert torch.equal(by_position, by_keyword)
    sites = [s.name for s in ats.discover_sites(flux)]
    assert [c[0] for c in positional.calls] == sites
    assert {c[1] for c in positional.calls} == {(4, 16)}                       # the grid of img_ids: 4 rows, 16 columns
    assert {c[2] for c in positional.calls} == {500.0}                         # 0.5 on the scheduler's 0…1000 scale
    for (_, _, _, a), (_, shape, _, b) in zip(positional.calls, keywords.calls):
        assert shape == (4, 16) and torch.equal(a, b)


def test_flux_kontext_reference_image_is_refused_with_one_error(tmp_path):
    """FLUX.1 Kontext appends the reference image's tokens (time coordinate 1) to the latent's: one error naming them,
    as on Flux.2, not a mismatch of query counts; the hooks come off and nothing is stored."""
    from diffusers import FluxKontextPipeline
    from PIL import Image

    pipe = FluxKontextPipeline(**tiny_flux_pipeline(guidance_embeds=True).components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=Image.new("RGB", (32, 32), (200, 10, 10)), num_inference_steps=2, height=32, width=32,
              max_sequence_length=16, max_area=32 * 32, _auto_resize=False)
    originals = {s.name: s.module.processor for s in ats.discover_sites(pipe)}
    message = r"reference image \(FluxKontextPipeline's image=\): 64 of the transformer's 128 image tokens"
    with pytest.raises(AttnscopeError, match=message), ats.hooks(pipe, Seen()):
        pipe(prompt="a red circle", **kw)
    assert {s.name: s.module.processor for s in ats.discover_sites(pipe)} == originals
    with pytest.raises(AttnscopeError, match=message):
        ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "k.zarr", **kw)
    assert not (tmp_path / "k.zarr").exists()
    assert pipe(prompt="a red circle", output_type="np", **kw).images.shape == (1, 32, 32, 3)  # the pipeline still runs


# ----------------------------------------------------------------------------- perturbed-attention guidance
def _pag(family):
    """A PAG pipeline of ``family`` on fresh tiny components (PAG sets processors on the modules it is given)."""
    import diffusers

    base = {"sd": tiny_sd_pipeline, "sd3": tiny_sd3_pipeline, "pixart": lambda: tiny_pixart_pipeline(sigma=True),
            "sana": tiny_sana_pipeline}[family]()
    cls = {"sd": "StableDiffusionPAGPipeline", "sd3": "StableDiffusion3PAGPipeline", "pixart": "PixArtSigmaPAGPipeline",
           "sana": "SanaPAGPipeline"}[family]
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")
                  or family == "sd"}
    layer = "mid" if family == "sd" else "transformer_blocks.1"
    pipe = getattr(diffusers, cls)(**components, pag_applied_layers=[layer])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd", "sd3", "pixart", "sana"])
def test_perturbed_attention_guidance_pipelines_are_refused_before_anything_runs(family, tmp_path):
    """A PAG pipeline stacks [uncond; cond; perturbed] rows: one error naming it and the pipeline to use instead, before
    hooks are installed or the pipeline runs (before: an IndexError from deep in the recorder, mid-call, leaving the
    PAG processors swapped in; SD3: an error about a processor "replaced inside the block"); the pipeline is left as
    it was and still runs."""
    pipe = _pag(family)
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    before = dict(denoiser.attn_processors)
    kw = dict(num_inference_steps=2, height=32, width=32, pag_scale=3.0, guidance_scale=2.0)
    kw.update({"sd3": dict(max_sequence_length=16), "pixart": dict(use_resolution_binning=False),
               "sana": dict(use_resolution_binning=False)}.get(family, {}))
    base = type(pipe).__name__.replace("PAG", "")
    with pytest.raises(AttnscopeError, match=rf"a {type(pipe).__name__} \(perturbed-attention guidance\).*"
                                             rf"use the pipeline without PAG \({base}\(\*\*pipe.components\)\)"):
        ats.capture(pipe, PROMPTS, seed=[1, 2], store=tmp_path / "t.zarr", **kw)
    assert not (tmp_path / "t.zarr").exists()
    with pytest.raises(AttnscopeError, match="perturbed-attention guidance"), ats.hooks(pipe, Seen()):
        pass
    assert dict(denoiser.attn_processors) == before
    assert pipe(PROMPTS, output_type="np", **kw).images.shape == (2, 32, 32, 3)


# ----------------------------------------------------------------------------- batch layouts of the family table
def _assert_joint_maps(pipe, tr, inputs, reference, passes, uncond):
    """Every site and step of ``tr`` against ``reference(module, call)`` on the step's first transformer call (of
    ``passes`` per step); ``uncond``: the CFG batch stacks [uncond; cond] (both halves checked)."""
    for site in ats.discover_sites(pipe):
        for step in range(2):
            ref = reference(site.module, inputs[site.name][passes * step])
            da = tr.attention(site.name, "cond")
            ref = ref.reshape(*ref.shape[:2], da.sizes["y"], da.sizes["x"], ref.shape[-1]).numpy()
            samples = da.sizes["sample"]
            halves = [("uncond", ref[:samples]), ("cond", ref[samples:])] if uncond else [("cond", ref)]
            for branch, expected in halves:
                stored = tr.attention(site.name, branch).isel(step=step).values.astype(np.float64)
                np.testing.assert_allclose(stored, expected, atol=2e-3, err_msg=f"{site.name} step {step} {branch}")
                mass = tr.text_mass(site.name, branch).isel(step=step).values.astype(np.float64)
                np.testing.assert_allclose(mass, expected.sum(-1), atol=2e-3)


def _tall(tr, samples):
    sizes = tr.attention(tr.sites[0]).sizes
    assert (sizes["sample"], sizes["y"], sizes["x"]) == (samples, 12, 8)       # 48 x 32 px: 12 rows of 8 patches
    assert tr.images[0].size == (32, 48)


def test_flux_true_cfg_two_prompts_two_images_tall_record_the_prompt_pass(flux, tmp_path):
    """True CFG runs the negative prompts as a second call per step: the stored maps are the prompt pass's, per
    sample (prompt-major), on a tall grid."""
    inputs, handles = record_joint_inputs(flux, tmp_path)
    try:
        tr = ats.capture(flux, PROMPTS, negative_prompt=["a dog", "red"], true_cfg_scale=2.0, seed=[1, 2, 3, 4],
                         num_images_per_prompt=2, store=tmp_path / "t.zarr", heads="all", tokens="all",
                         num_inference_steps=2, height=48, width=32, max_sequence_length=16)
    finally:
        for h in handles:
            h.remove()
    assert all(len(calls) == 4 for calls in inputs.values())                  # prompt and negative pass, per step
    _assert_joint_maps(flux, tr, inputs, lambda m, call: joint_reference("flux", m, call), passes=2, uncond=False)
    _tall(tr, 4)
    assert tr.manifest["run"]["segments"] == [["t5", 16]]


def test_sd3_negative_prompts_two_images_tall_both_halves(tmp_path):
    """SD3 stacks [uncond; cond]: with negative prompts and two images per prompt both halves, sample by sample."""
    pipe = tiny_sd3_pipeline()
    inputs, handles = record_joint_inputs(pipe, tmp_path)
    try:
        tr = ats.capture(pipe, PROMPTS, negative_prompt=["a dog", "blue"], seed=[1, 2, 3, 4], num_images_per_prompt=2,
                         store=tmp_path / "t.zarr", heads="all", tokens="all", branch="both", num_inference_steps=2,
                         height=48, width=32, guidance_scale=2.0, max_sequence_length=16)
    finally:
        for h in handles:
            h.remove()
    _assert_joint_maps(pipe, tr, inputs, lambda m, call: joint_reference("sd3", m, call), passes=1, uncond=True)
    _tall(tr, 4)


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_flux2_two_prompts_two_images_tall(variant, tmp_path):
    """Flux.2 klein (guidance: a second call per step) and dev (distilled): two prompts × two images on a tall grid."""
    pipe = tiny_flux2_pipeline() if variant == "klein" else tiny_flux2_dev_pipeline()
    inputs, handles = record_flux2_inputs(pipe)
    try:
        tr = ats.capture(pipe, PROMPTS, seed=[1, 2, 3, 4], num_images_per_prompt=2, store=tmp_path / "t.zarr",
                         heads="all", tokens="all", num_inference_steps=2, height=48, width=32, max_sequence_length=48)
    finally:
        for h in handles:
            h.remove()
    passes = 2 if variant == "klein" else 1

    def reference(module, call):
        return flux2_reference(module, call, call["text_length"])

    _assert_joint_maps(pipe, tr, inputs, reference, passes=passes, uncond=False)
    _tall(tr, 4)


def test_sana_two_images_per_prompt_with_a_negative_prompt_tall(tmp_path):
    """Sana with num_images_per_prompt=2 (one prompt: its mask fits) and a negative prompt, on a tall latent."""
    pipe = tiny_sana_pipeline()
    inputs, handles = record_cross_inputs(pipe)
    try:
        tr = ats.capture(pipe, "a red circle", negative_prompt="blue", seed=[1, 2], num_images_per_prompt=2,
                         store=tmp_path / "t.zarr", heads="all", tokens="all", branch="both", num_inference_steps=2,
                         height=64, width=32, use_resolution_binning=False)
    finally:
        for h in handles:
            h.remove()
    assert_stored_maps_match_reference(pipe, tr, inputs, (32, 16), samples=2)
    assert tr.images[0].size == (32, 64)
