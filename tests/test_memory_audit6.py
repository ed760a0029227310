"""Memory features people run big models with, under capture and rerun: layerwise casting (float8 storage),
group offloading, a pipeline in bfloat16/float16, diffusers' attention backends. Expectations come from plain
pipeline calls, from models computing with the same values without the feature, and from float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.store import _manifest
from attnscope.store._manifest import weights_fingerprint
from attnscope.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

from .conftest import AttnInputs, reference_probs
from .test_joint_families import _record_inputs
from .test_joint_families import _reference as joint_reference

PROMPT = "a red circle"
KW = {"sd": dict(num_inference_steps=2, height=32, width=32),
      "flux": dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16),
      "sd3": dict(num_inference_steps=2, height=32, width=32, guidance_scale=2.0, max_sequence_length=16)}
MAKE = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
FP8 = torch.float8_e4m3fn


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _image(pipe, family):
    """A plain pipeline call (no attnscope), as capture stores its image: uint8."""
    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(0), output_type="np", **KW[family])
    return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)


def _capture(pipe, family, path, **kw):
    return ats.capture(pipe, PROMPT, seed=0, store=path, exact=True, heads="all", **{**KW[family], **kw})


def _assert_same_maps(a, b):
    assert a.sites == b.sites
    for site in a.sites:
        np.testing.assert_array_equal(a.attention(site).values, b.attention(site).values, err_msg=site)


def _cast(family):
    """A pipeline in bfloat16 with its denoiser stored in float8 (``enable_layerwise_casting``), and a plain bfloat16
    one computing with the same values: its float8-stored tensors upcast to bfloat16 once, by hand."""
    cast, plain = MAKE[family]().to(torch.bfloat16), MAKE[family]().to(torch.bfloat16)
    _denoiser(cast).enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.bfloat16)
    stored = {k: v.to(torch.bfloat16) for k, v in _denoiser(cast).state_dict().items() if v.dtype == FP8}
    assert stored                                                               # the feature is on
    _denoiser(plain).load_state_dict(stored, strict=False)
    return cast, plain


# ----------------------------------------------------------------------------- layerwise casting
@pytest.mark.parametrize("family", ["sd", "flux", "sd3"])
def test_layerwise_casting_captures_the_maps_of_the_upcast_weights_and_reruns_bit_identically(family, tmp_path):
    cast, plain = _cast(family)
    image = _image(cast, family)
    np.testing.assert_array_equal(image, _image(plain, family))                  # the same computation
    tr = _capture(cast, family, tmp_path / "cast.zarr")
    np.testing.assert_array_equal(np.asarray(tr.images[0]), image)              # exact=True: the plain call's image
    _assert_same_maps(tr, _capture(plain, family, tmp_path / "plain.zarr"))
    assert tr.manifest["dtype"] == "bfloat16"
    assert tr.manifest["model"]["layerwise_casting"] == {_denoiser_name(family): {
        "storage_dtype": "float8_e4m3fn", "compute_dtype": "bfloat16"}}
    again = ats.rerun(tr, pipe=cast, store=tmp_path / "again.zarr")
    np.testing.assert_array_equal(np.asarray(again.images[0]), image)
    _assert_same_maps(tr, again)


def _denoiser_name(family):
    return "unet" if family == "sd" else "transformer"


def test_layerwise_casting_maps_match_a_float64_computation_from_the_upcast_weights(tmp_path):
    """The module's own float8 weights upcast to bfloat16 (what the casting hook computes with), its own bfloat16
    projections, then softmax in float64: the scores are float32 (as in the fused kernel), the maps stored in float16
    (unit roundoff 2⁻¹¹ ≈ 4.9e-4 on probabilities ≤ 1), so atol 1e-3."""
    cast, _ = _cast("sd")
    with AttnInputs(cast) as seen:
        tr = _capture(cast, "sd", tmp_path / "t.zarr", branch="both")
    _assert_unet_maps(cast, tr, seen, STORED_TOL)                              # its hooks upcast to_q/to_k
    assert dict(cast.unet.named_modules())[tr.sites[0]].to_q.weight.dtype == FP8  # float8 again after the run


def test_weights_fingerprint_reads_float8_tensors_and_tells_models_apart():
    a, b = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    for pipe in (a, b):
        pipe.unet.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.float32)
    before = weights_fingerprint(a)["unet"]
    assert before != weights_fingerprint(b)["unet"]
    assert before != weights_fingerprint(tiny_sd_pipeline(seed=0))["unet"]     # float32 storage: another model
    weight = a.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight
    assert weight.dtype == FP8 and weight.numel() <= 4096                      # every value sampled
    with torch.no_grad():
        weight.view(-1)[7] = (weight.view(-1)[7].float() * 2 + 1).to(FP8)       # one float8 value changed
    assert weights_fingerprint(a)["unet"] != before


def test_a_rerun_without_the_layerwise_casting_is_refused_naming_the_setting(tmp_path):
    """The recorded setting is checked apart from the weights: without it the error only said 'the weights of
    transformer differ' (true, but the weights were the same values: the setting was missing)."""
    cast, plain = _cast("flux")
    tr = _capture(cast, "flux", tmp_path / "cast.zarr")
    with pytest.raises(AttnscopeError, match=r"layerwise casting on its transformer \(storage float8_e4m3fn, "
                                             r"compute bfloat16\), this pipe has it off; call "
                                             r"pipe\.transformer\.enable_layerwise_casting\(storage_dtype="
                                             r"torch\.float8_e4m3fn, compute_dtype=torch\.bfloat16\)"):
        _manifest.check_layerwise_casting(plain, tr.manifest, str(tr.path))
    with pytest.raises(AttnscopeError, match=r"captured with layerwise casting on its transformer"):  # rerun says so
        ats.rerun(tr, pipe=plain, store=tmp_path / "off.zarr")
    assert not (tmp_path / "off.zarr").exists()
    _manifest.check_layerwise_casting(cast, tr.manifest, str(tr.path))                    # the same setting: accepted
    off = _capture(plain, "flux", tmp_path / "plain.zarr")
    assert off.manifest["model"]["layerwise_casting"] == {}
    with pytest.raises(AttnscopeError, match="has layerwise casting on .*captured without it"):
        _manifest.check_layerwise_casting(cast, off.manifest, str(off.path))
    old = {**tr.manifest, "model": {k: v for k, v in tr.manifest["model"].items() if k != "layerwise_casting"}}
    _manifest.check_layerwise_casting(plain, old, "old.zarr")                             # written before it was recorded


# ----------------------------------------------------------------------------- group offloading
@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_on_the_cpu_captures_the_plain_maps(family, offload_type, tmp_path):
    """onload_device = offload_device = cpu is accepted by diffusers; the hooks move nothing, and attnscope reads
    the same maps as without it."""
    plain, offloaded = MAKE[family](), MAKE[family]()
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    _denoiser(offloaded).enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type, **options)
    image = _image(offloaded, family)
    np.testing.assert_array_equal(image, _image(plain, family))
    tr = _capture(offloaded, family, tmp_path / "off.zarr")
    np.testing.assert_array_equal(np.asarray(tr.images[0]), image)
    _assert_same_maps(tr, _capture(plain, family, tmp_path / "plain.zarr"))
    _assert_same_maps(tr, ats.rerun(tr, pipe=offloaded, store=tmp_path / "again.zarr"))


# ----------------------------------------------------------------------------- bfloat16 / float16 pipelines
#: float16 storage of probabilities ≤ 1: unit roundoff 2⁻¹¹ ≈ 4.9e-4, twice
STORED_TOL = 1e-3
#: a float64 reference that also computes Q and K in float64 differs by their rounding in the run's dtype too (unit
#: roundoff 2⁻⁹ bfloat16, 2⁻¹¹ float16, relative, for the scores and the probabilities ≤ 1: four units)
UNIT_TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3}


def _assert_unet_maps(pipe, tr, seen, atol):
    """Every site and step of ``tr`` (heads="all", branch="both") against a float64 softmax of the module's own
    projections of the recorded inputs (run by the module, in the pipeline's dtype)."""
    modules = dict(pipe.unet.named_modules())
    for site in tr.sites:
        for step, (hidden, text) in enumerate(seen.calls[site]):
            ref = reference_probs(modules[site], hidden, text)
            sizes = tr.attention(site).sizes
            ref = ref.reshape(*ref.shape[:2], sizes["y"], sizes["x"], -1)
            stored = np.concatenate([tr.attention(site, b).isel(step=step).values for b in ("uncond", "cond")])
            np.testing.assert_allclose(stored.astype(np.float64), ref, atol=atol, err_msg=f"{site} {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_unet_pipeline_is_captured_exactly_and_reruns_bit_identically(dtype, tmp_path):
    pipe = tiny_sd_pipeline().to(dtype)
    image = _image(pipe, "sd")
    with AttnInputs(pipe) as seen:
        tr = _capture(pipe, "sd", tmp_path / "t.zarr", branch="both")
    assert tr.manifest["dtype"] == str(dtype).removeprefix("torch.")
    np.testing.assert_array_equal(np.asarray(tr.images[0]), image)
    assert all(hidden.dtype == dtype for calls in seen.calls.values() for hidden, _ in calls)
    _assert_unet_maps(pipe, tr, seen, STORED_TOL)
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "again.zarr")
    np.testing.assert_array_equal(np.asarray(again.images[0]), image)
    _assert_same_maps(tr, again)
    with pytest.raises(AttnscopeError, match=f"its dtype is float32, the trace was captured in {tr.manifest['dtype']}"):
        ats.rerun(tr, pipe=tiny_sd_pipeline(), store=tmp_path / "f32.zarr")


def _scaled_scores(pipe, factor):
    """Multiply every cross-attention ``to_q`` and ``to_k`` by ``factor``: scores of a real model's size (the tiny
    model's are below 2; ×5 gives about 44, ×60 about 6000)."""
    for site in ats.discover_sites(pipe):
        with torch.no_grad():
            site.module.to_q.weight.mul_(factor)
            site.module.to_k.weight.mul_(factor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_maps_of_large_scores_are_those_of_the_fused_kernel(dtype, tmp_path):
    """Scores of about 44 in a bfloat16 UNet: the hooks computed QKᵀ and the softmax in bfloat16 (spacing 0.25 at
    44), 4e-2 off the probabilities the fused SDPA kernel computes in float32 (the maps as the model computed them);
    now in float32, as the joint sites do: float16 storage only."""
    pipe = tiny_sd_pipeline().to(dtype)
    _scaled_scores(pipe, 5.0)
    with AttnInputs(pipe) as seen:
        tr = _capture(pipe, "sd", tmp_path / "t.zarr", branch="both")
    _assert_unet_maps(pipe, tr, seen, STORED_TOL)


def test_attn_processor_with_upcast_attention_is_mirrored_in_float16(tmp_path):
    """``AttnProcessor`` (``unet.set_default_attn_processor()``) on modules with ``upcast_attention`` (SD 2.x's fp16
    fix) computes the scores and softmax in float32: the hooks did it in float16 (0.5 off at scores of 6000, and the
    image with exact=False 20 levels off); now they mirror it: the maps match, and even without exact=True the image
    is the plain call's."""
    pipe = tiny_sd_pipeline().to(torch.float16)
    pipe.unet.set_default_attn_processor()
    _scaled_scores(pipe, 60.0)
    for site in ats.discover_sites(pipe):
        site.module.upcast_attention = site.module.upcast_softmax = True
    image = _image(pipe, "sd")
    with AttnInputs(pipe) as seen:
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "t.zarr", heads="all", branch="both", **KW["sd"])
    np.testing.assert_array_equal(np.asarray(tr.images[0]), image)
    _assert_unet_maps(pipe, tr, seen, STORED_TOL)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_joint_pipeline_is_captured_exactly_and_reruns_bit_identically(family, dtype, tmp_path):
    """The reference is float64 from the module's weights (its projections, norms and rotary embedding in float64
    from the half-precision inputs), so it also differs by the run's rounding of Q and K (:data:`UNIT_TOL`)."""
    pipe = MAKE[family]().to(dtype)
    image = _image(pipe, family)
    inputs, handles = _record_inputs(pipe, tmp_path)
    try:
        tr = _capture(pipe, family, tmp_path / "t.zarr", tokens="all")
    finally:
        for h in handles:
            h.remove()
    assert tr.manifest["dtype"] == str(dtype).removeprefix("torch.")
    np.testing.assert_array_equal(np.asarray(tr.images[0]), image)
    sites = {s.name: s.module for s in ats.discover_sites(pipe)}
    for site in tr.sites:
        for step in range(2):
            ref = joint_reference(family, sites[site], inputs[site][step]).numpy()
            sizes = tr.attention(site).sizes
            ref = ref.reshape(*ref.shape[:2], sizes["y"], sizes["x"], -1)[-1:]  # the cond rows
            stored = tr.attention(site, "cond").isel(step=step).values.astype(np.float64)
            np.testing.assert_allclose(stored, ref, atol=UNIT_TOL[dtype], err_msg=f"{site} {step}")
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "again.zarr")
    np.testing.assert_array_equal(np.asarray(again.images[0]), image)
    _assert_same_maps(tr, again)


# ----------------------------------------------------------------------------- attention backends
@pytest.mark.parametrize("backend", ["_native_math", "native"])
def test_an_attention_backend_keeps_the_maps_gives_its_own_image_and_stays_set(backend, tmp_path):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    plain, chosen = tiny_flux_pipeline(), tiny_flux_pipeline()
    active = _AttentionBackendRegistry._active_backend  # set_attention_backend also sets diffusers' global one
    try:
        chosen.transformer.set_attention_backend(backend)
        image = _image(chosen, "flux")
        tr = _capture(chosen, "flux", tmp_path / "chosen.zarr")
        np.testing.assert_array_equal(np.asarray(tr.images[0]), image)          # exact=True: the backend's image
        backends = {str(s.module.processor._attention_backend) for s in ats.discover_sites(chosen)}
        assert backends == {f"AttentionBackendName.{backend.upper()}"}         # still set after the capture
        _assert_same_maps(tr, ats.rerun(tr, pipe=chosen, store=tmp_path / "again.zarr"))
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
    other = _capture(plain, "flux", tmp_path / "plain.zarr")                 # diffusers' default backend
    for site in tr.sites:  # the maps do not depend on it: step 0 bit for bit; later steps see latents that the
        a, b = tr.attention(site).values, other.attention(site).values       # backend's rounding moved a little
        np.testing.assert_array_equal(a[0], b[0], err_msg=site)
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=site)


def test_a_rerun_from_the_model_reference_turns_the_recorded_casting_on_again(tmp_path):
    """Layerwise casting is a setting of the loaded model: a rerun that loads the model itself (no pipe=) sets it
    again, so the image and every map are those of the captured run, bit for bit."""
    pipe = ats.load_pipeline("shapes")
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    tr = ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "a.zarr", num_inference_steps=2, exact=True)
    assert tr.manifest["model"]["layerwise_casting"] == {"unet": {"storage_dtype": "float8_e4m3fn",
                                                                  "compute_dtype": "float32"}}
    again = ats.rerun(tr, store=tmp_path / "b.zarr", exact=True)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)
    plain = ats.load_pipeline("shapes")
    assert np.abs(np.asarray(plain("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
                             .images[0], float) - np.asarray(tr.images[0], float)).max() > 0  # the casting acts
