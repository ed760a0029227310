"""The hook core seen by a user writing their own client (fourth audit): exact mode with the processors a user may
set before the block, the row layout of a prompt given as embeddings, and what a client may hand back."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.attention_processor import AttnProcessor

import attnscope as ats
from attnscope.testing import (
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

from .test_hooks_audit import Steps

RUN = dict(num_inference_steps=2, height=32, width=32, output_type="np")


class Observe:
    """Reads ``probs`` at every call, changes nothing."""

    def __init__(self, stages=("probs",)):
        self._stages, self.calls = stages, 0

    def stages(self, ctx):
        return self._stages

    def on_probs(self, ctx, probs):
        self.calls += 1


def _image(pipe, **kwargs):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **{**RUN, **kwargs}).images


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_exact_is_bit_identical_with_the_non_fused_attn_processor(family):
    """With `AttnProcessor` (the non-SDPA default of older setups) set before the block, `exact=True` ran the fused
    SDPA kernel, which rounds differently: the image was not the one the pipeline makes without hooks (1.5e-6 off)."""
    if family == "sd":
        pipe, extra = tiny_sd_pipeline(), {}
        pipe.unet.set_attn_processor(AttnProcessor())
    else:  # masked text keys (T5 padding): AttnProcessor adds the mask inside its baddbmm
        pipe, extra = tiny_pixart_pipeline(), dict(use_resolution_binning=False)
        pipe.transformer.set_attn_processor(AttnProcessor())
    plain = _image(pipe, **extra)
    seen = Observe()
    with ats.hooks(pipe, seen, exact=True):
        hooked = _image(pipe, **extra)
    assert seen.calls > 0
    np.testing.assert_array_equal(hooked, plain)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_a_prompt_given_as_embeddings_keeps_its_images_together(sd_pipe, guidance):
    """`prompt_embeds` of 2 prompts with `num_images_per_prompt=2` and no negative text (negative embeddings given, or
    no guidance): the core could not count the prompts and labelled every image its own prompt, image 0 —
    `prompt_of_sample` (0, 1, 2, 3) for what the pipeline batches as prompt 0 twice, then prompt 1 twice."""
    embeds, negative = sd_pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, True)
    seen = Steps()
    with ats.hooks(sd_pipe, seen):
        sd_pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            guidance_scale=guidance,
            num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(0),
            **RUN,
        )
    rows = seen.steps[0].rows
    assert (rows.uncond is None) == (guidance == 1.0)
    assert rows.prompt_of_sample == (0, 0, 1, 1)  # diffusers repeats each prompt's embedding per image
    assert rows.image_of_sample == (0, 1, 0, 1)
    assert seen.steps[0].token_text is None  # no ids: no words, as before


class Replace:
    """An intervention returning ``edit(tensor)`` at one stage."""

    role = "intervention"

    def __init__(self, stage, edit):
        self.stage, self.edit = stage, edit

    def stages(self, ctx):
        return (self.stage,)

    def on_logits(self, ctx, t):
        return self.edit(t)

    on_probs = on_output = on_logits


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("stage", ["logits", "probs", "output"])
def test_a_float64_replacement_is_taken_as_the_handed_dtype(sd_pipe, sd3, family, stage):
    """A client computing its edit in float64 (`t.double() * 1`) and returning it: at the output stage the UNet
    crashed in its next layer with torch's "mixed dtype (CPU)"; the value is the handed tensor's, so the image is
    the one of the same edit in float32."""
    pipe = sd_pipe if family == "sd" else sd3
    with ats.hooks(pipe, Replace(stage, lambda t: t * 1.0)):
        same_dtype = _image(pipe)
    with ats.hooks(pipe, Replace(stage, lambda t: t.double() * 1.0)):
        wider = _image(pipe)
    np.testing.assert_array_equal(wider, same_dtype)


@pytest.mark.parametrize("stage", ["probs", "output"])
@pytest.mark.parametrize(
    "edit",
    [lambda t: torch.empty_like(t, device="meta"), lambda t: t > 0.5, lambda t: (t * 100).long()],
    ids=["meta", "bool", "int"],
)
def test_a_replacement_on_another_device_or_not_floating_is_one_error(sd_pipe, stage, edit):
    """A replacement on another device made a NaN image without a word (meta at `probs`) or torch's "not on the
    expected device"; an int or bool map was silently cast. Each is one error naming the client and the stage."""
    client = Replace(stage, edit)
    with pytest.raises(ats.AttnscopeError, match=f"returned a torch.* tensor on .* at stage '{stage}'.*floating-point"):
        with ats.hooks(sd_pipe, client):
            _image(sd_pipe)
    assert not any(type(p).__module__.startswith("attnscope") for p in sd_pipe.unet.attn_processors.values())


def test_a_stage_named_twice_is_run_once(sd_pipe):
    """`stages()` answering `["probs", "probs"]` (a list built from two conditions) ran `on_probs` twice per call:
    an intervention's edit was applied twice (here: probs scaled by 0.25 instead of 0.5)."""

    class Halve:
        role = "intervention"

        def __init__(self, stages):
            self._stages = stages

        def stages(self, ctx):
            return self._stages

        def on_probs(self, ctx, probs):
            return probs * 0.5

    with ats.hooks(sd_pipe, Halve(["probs"])):
        once = _image(sd_pipe)
    with ats.hooks(sd_pipe, Halve(["probs", "probs"])):
        twice = _image(sd_pipe)
    np.testing.assert_array_equal(twice, once)
    seen = Observe(stages=("probs", "probs"))
    with ats.hooks(sd_pipe, seen):
        _image(sd_pipe)
    assert seen.calls == 2 * len(ats.discover_sites(sd_pipe))  # 2 steps, each site once


@pytest.mark.parametrize("make", [tiny_flux_pipeline, tiny_flux2_pipeline], ids=["flux", "flux2"])
def test_exact_is_bit_identical_at_joint_sites_with_another_attention_backend(make):
    """`transformer.set_attention_backend(...)` before the block: observed joint calls ran torch's fused kernel
    instead of the chosen backend, and `exact=True` did nothing at joint sites, so the image was 3e-7 off the
    pipeline's own; now `exact=True` runs the processor's own attention call where nothing was edited."""
    pipe = make()
    active = _AttentionBackendRegistry._active_backend  # set_attention_backend also sets diffusers' global one
    pipe.transformer.set_attention_backend("_native_math")
    try:
        _compare_exact(pipe)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


def _compare_exact(pipe):
    """Observed with exact=True: the image without hooks; edited: another image."""

    def image():
        return pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **RUN).images

    plain = image()
    seen = Observe()
    with ats.hooks(pipe, seen, exact=True):
        hooked = image()
    assert seen.calls > 0
    np.testing.assert_array_equal(hooked, plain)
    with ats.hooks(pipe, Replace("probs", lambda t: t * 0.5), exact=True):  # an edit still acts
        edited = image()
    assert np.abs(edited - plain).max() > 1e-3


def test_a_bypass_output_of_another_shape_is_one_error_naming_the_client(sd_pipe):
    """A cache keyed by site alone, filled by a run of 1 image and replayed in a run of 2 images: torch's "size of
    tensor a (2) must match ..." from deep in the UNet, naming neither the client nor the site."""

    class SiteCache:
        role = "intervention"

        def __init__(self):
            self.cache = {}

        def stages(self, ctx):
            return ("output",)

        def bypass(self, ctx):
            return self.cache.get(ctx.site.name) if ctx.step_context.run > 0 else None

        def on_output(self, ctx, output):
            self.cache[ctx.site.name] = output

    cache = SiteCache()
    with ats.hooks(sd_pipe, cache):
        _image(sd_pipe)
        _image(sd_pipe)  # the same batch: the cache is replayed
        with pytest.raises(
            ats.AttnscopeError,
            match=r"bypass\(\) returned shape \(2, 256, 32\) at down_blocks.0.* "
            r"expected None or the module.s output, shape \(4, 256, 32\)",
        ):
            _image(sd_pipe, num_images_per_prompt=2)


def test_a_client_class_given_instead_of_an_instance_is_refused_before_the_run(sd_pipe):
    """`ats.hooks(pipe, Counter)` (the class, not `Counter()`): accepted, then torch's pipeline stopped at the first
    attention call with "Counter.stages() missing 1 required positional argument: 'ctx'"."""
    before = dict(sd_pipe.unet.attn_processors)
    with pytest.raises(ats.AttnscopeError, match=r"client Observe: expected an instance .* give Observe\(\.\.\.\)"):
        with ats.hooks(sd_pipe, Observe):
            _image(sd_pipe)
    assert all(sd_pipe.unet.attn_processors[name] is p for name, p in before.items())


@pytest.mark.parametrize(
    "make", [tiny_sd3_pipeline, tiny_flux_pipeline, tiny_flux2_pipeline], ids=["sd3", "flux", "flux2"]
)
def test_encode_text_gives_the_text_the_transformer_reads(make):
    """`session.encode_text` (documented for clients that need extra prompts) called `encode_prompt` with SD's
    arguments: SD3 raised "missing 2 required positional arguments: 'prompt_2' and 'prompt_3'", Flux.1 and Flux.2
    "unexpected keyword argument 'do_classifier_free_guidance'"."""
    pipe = make()
    read = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )

    class Encode:
        def stages(self, ctx):
            return ()

        def on_install(self, session):
            self.session = session

    client = Encode()
    try:
        with ats.hooks(pipe, client):
            pipe(prompt="a red circle", guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **RUN)
            encoded = client.session.encode_text(["a blue square", "a red circle"])
    finally:
        handle.remove()
    assert encoded.shape[0] == 2
    torch.testing.assert_close(encoded[1:], read[0], rtol=0, atol=0)
