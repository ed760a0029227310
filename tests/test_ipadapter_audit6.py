"""Capture with an IP-Adapter loaded (``pipe.load_ip_adapter``): the recorded maps are the text part of each
cross-attention site (the queries against the text keys alone, as ``IPAdapterAttnProcessor2_0`` computes it before
adding the image tokens' attention), checked against a float64 computation from the module's own projections; the
image is the plain call's; the IP-Adapter's scale is recorded; interventions, a rerun and other processors are refused
with one error before anything runs."""

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.testing import tiny_sd_pipeline

from .conftest import AttnInputs
from .test_adapters_audit6 import PROMPT, RUN, image, ip_adapter_state_dict, plain

pytest.importorskip("peft")


def with_ip_adapter(pipe=None):
    """``pipe`` (default: the tiny SD pipeline) with a random IP-Adapter of 4 image tokens loaded."""
    pipe = pipe if pipe is not None else tiny_sd_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)])
    return pipe


def image_embeds(dim=32, seed=1):
    """``ip_adapter_image_embeds`` for one image per prompt with guidance: ``[negative; positive]`` rows."""
    return [torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(seed))]


class TextInputs(AttnInputs):
    """Plain torch forward pre-hooks (independent of attnscope) that keep each attn2 call's queries' input and the
    text states it attends to (the first of the ``(text, image tokens)`` pair the UNet hands an IP-Adapter's site)."""

    def _hook(self, name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            pair = kwargs["encoder_hidden_states"]
            assert isinstance(pair, tuple)  # the IP-Adapter's (text, [image tokens])
            self.calls[name].append((hidden.detach().clone(), pair[0].detach().clone()))
        return hook


def text_probs64(module, hidden, text):
    """softmax(Q Kᵀ · d^-½) over the text keys only, all in float64 from the module's to_q / to_k weights:
    (batch, heads, queries, tokens)."""
    with torch.no_grad():
        q = torch.nn.functional.linear(hidden.double(), module.to_q.weight.double())
        k = torch.nn.functional.linear(text.double(), module.to_k.weight.double())
        b, n, inner = q.shape
        d = inner // module.heads
        q = q.view(b, n, module.heads, d).transpose(1, 2)
        k = k.view(b, -1, module.heads, d).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(d), dim=-1).numpy()


@pytest.mark.parametrize("exact", [True, False])
def test_capture_records_the_text_part_and_the_plain_image(exact, tmp_path):
    """Capture failed (refused) with an IP-Adapter loaded. Now the maps are the text part's softmax and the image is
    the plain call's, bit for bit, with or without ``exact`` (the processor itself makes each site's output)."""
    pipe, embeds = with_ip_adapter(), image_embeds()
    expected = plain(pipe, ip_adapter_image_embeds=embeds)
    pipe.set_ip_adapter_scale(0.0)
    assert np.abs(plain(pipe, ip_adapter_image_embeds=embeds).astype(float) - expected).max() > 0  # it acts
    pipe.set_ip_adapter_scale(1.0)
    with TextInputs(pipe) as calls:
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", heads="all", exact=exact,
                         ip_adapter_image_embeds=embeds, **RUN)
    np.testing.assert_array_equal(image(tr), expected)
    assert len(tr.sites) == 7 and len(tr.tokens) == 77
    worst = 0.0
    for site in tr.sites:
        module = pipe.unet.get_submodule(site)
        assert len(calls.calls[site]) == RUN["num_inference_steps"]
        for step, (hidden, text) in enumerate(calls.calls[site]):
            ref = text_probs64(module, hidden, text)[1]  # rows [uncond, cond]: the cond row
            got = tr.attention(site).sel(step=step).isel(sample=0).values.reshape(ref.shape[0], -1, ref.shape[-1])
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()))
    assert worst < 2e-3  # float16 storage
    assert all(type(p).__name__ == "IPAdapterAttnProcessor2_0" for k, p in pipe.unet.attn_processors.items()
               if "attn2" in k)  # put back


def test_recorder_in_a_block_sees_the_text_part_with_ip_adapter_masks(tmp_path):
    """A Recorder in the user's own block, the IP-Adapter restricted to the image's left half by
    ``cross_attention_kwargs={"ip_adapter_masks": ...}`` (handed on to the processor): the image is the plain call's
    and the stored image tokens count is the text's."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    pipe, embeds = with_ip_adapter(), image_embeds()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1
    masks = IPAdapterMaskProcessor().preprocess(mask, height=32, width=32)
    masks = [masks.reshape(1, masks.shape[0], masks.shape[2], masks.shape[3])]
    call = dict(ip_adapter_image_embeds=embeds, cross_attention_kwargs={"ip_adapter_masks": masks})
    expected = plain(pipe, **call)
    assert np.abs(plain(pipe, ip_adapter_image_embeds=embeds).astype(float) - expected).max() > 0  # the mask acts
    rec = ats.Recorder(tmp_path / "a.zarr", sites="up_blocks.1.*")
    with ats.hooks(pipe, rec):
        out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **RUN, **call)
    np.testing.assert_array_equal(np.asarray(out.images[0]), expected)
    tr = ats.open_trace(tmp_path / "a.zarr")
    assert tr.attention(tr.sites[0]).sizes["token"] == 77 and tr.manifest["run"]["num_steps"] == 2


def test_ip_adapter_scale_is_recorded(tmp_path):
    """``set_ip_adapter_scale`` changes the image and no weight: the manifest's ``model.adapters`` records it (the
    scale set, per block too), and a pipeline without an IP-Adapter records no such entry."""
    pipe, embeds = with_ip_adapter(), image_embeds()
    pipe.set_ip_adapter_scale(0.5)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", ip_adapter_image_embeds=embeds, **RUN)
    recorded = tr.manifest["model"]["adapters"]["ip_adapter"]
    assert list(recorded) == ["unet"] and recorded["unet"]["scales"] == [[0.5]]
    assert recorded["unet"]["processors"] == 7 and recorded["unet"]["tokens"] == [4]
    pipe.set_ip_adapter_scale({"up": {"block_1": [0.0, 1.0]}})  # InstantStyle's per-block form
    other = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "b.zarr", ip_adapter_image_embeds=embeds, **RUN)
    scales = other.manifest["model"]["adapters"]["ip_adapter"]["unet"]
    assert scales["scales"] == [[0.0], [1.0]] and scales["digest"] != recorded["unet"]["digest"]
    assert "ip_adapter" not in ats.capture(tiny_sd_pipeline(), PROMPT, seed=0, store=tmp_path / "c.zarr",
                                           **RUN).manifest["model"]["adapters"]


def test_weights_fingerprint_sees_the_ip_adapter_weights(tmp_path):
    """The hooks took the IP-Adapter's processors (nn.Modules holding to_k_ip / to_v_ip) out of the UNet's children
    while installed, so the manifest's weights fingerprint (computed then) missed them: two IP-Adapters gave one
    fingerprint. Now it is the fingerprint of the pipeline as loaded."""
    from attnscope.store._manifest import weights_fingerprint

    pipe, embeds = with_ip_adapter(), image_embeds()
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", ip_adapter_image_embeds=embeds, **RUN)
    assert tr.manifest["model"]["weights_fingerprint"] == weights_fingerprint(pipe)
    assert weights_fingerprint(pipe)["unet"] != weights_fingerprint(tiny_sd_pipeline())["unet"]  # it holds them


def test_rerun_is_refused_naming_the_image_embeds(tmp_path):
    """``ip_adapter_image_embeds`` is no JSON: the manifest cannot hold it, so a rerun is one error naming it."""
    pipe, embeds = with_ip_adapter(), image_embeds()
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", ip_adapter_image_embeds=embeds, **RUN)
    assert tr.manifest["run"]["unrecorded_kwargs"] == ["ip_adapter_image_embeds"]
    with pytest.raises(ats.AttnscopeError, match=r"cannot rerun trace .*called with ip_adapter_image_embeds, which "
                                                 r"the manifest cannot hold.*Interventions are refused while an "
                                                 r"IP-Adapter is loaded"):
        ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


def _interventions():
    from attnscope.regulate import AttendAndExcite, AttentionRegulation, Reweight, SpatialTemporal, TGate

    return {"Reweight": lambda: Reweight("circle", 2.0), "AttentionRegulation": lambda: AttentionRegulation(["circle"]),
            "SpatialTemporal": lambda: SpatialTemporal({"circle": (0.0, 0.0, 0.5, 1.0)}), "TGate": lambda: TGate(1),
            "AttendAndExcite": lambda: AttendAndExcite(["circle"])}


@pytest.mark.parametrize("name", ["Reweight", "AttentionRegulation", "SpatialTemporal", "TGate", "AttendAndExcite"])
def test_interventions_are_refused_before_anything_runs(name, tmp_path):
    """Interventions would edit an attention attnscope does not mirror with an IP-Adapter (the image tokens' part
    added to the text's): one error at ``ats.hooks``, before any client is installed or any store made; the
    pipeline is left as it was."""
    pipe, embeds = with_ip_adapter(), image_embeds()
    expected = plain(pipe, ip_adapter_image_embeds=embeds)
    processors = dict(pipe.unet.attn_processors)
    rec = ats.Recorder(tmp_path / "a.zarr")
    with pytest.raises(ats.AttnscopeError, match=rf"interventions \({name}\) with an IP-Adapter loaded "
                                                 r"\(IPAdapterAttnProcessor2_0 at .*pipe\.unload_ip_adapter\(\)"):
        with ats.hooks(pipe, _interventions()[name](), rec):
            pipe(PROMPT, ip_adapter_image_embeds=embeds, **RUN)
    assert not (tmp_path / "a.zarr").exists()
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())
    np.testing.assert_array_equal(plain(pipe, ip_adapter_image_embeds=embeds), expected)


def test_sdxl_capture_records_the_text_part_and_the_plain_image(tmp_path):
    """SDXL's UNet has the same IP-Adapter processors: the maps are the text part, the image the plain call's."""
    from attnscope.testing import tiny_sdxl_pipeline

    pipe = with_ip_adapter(tiny_sdxl_pipeline())
    embeds, run = image_embeds(dim=pipe.unet.config.cross_attention_dim), dict(num_inference_steps=2)
    expected = np.asarray(pipe(PROMPT, generator=torch.Generator().manual_seed(0), ip_adapter_image_embeds=embeds,
                               **run).images[0])
    with TextInputs(pipe) as calls:
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", heads="all", exact=True,
                         ip_adapter_image_embeds=embeds, **run)
    np.testing.assert_array_equal(image(tr), expected)
    worst = 0.0
    for site in tr.sites:
        for step, (hidden, text) in enumerate(calls.calls[site]):
            ref = text_probs64(pipe.unet.get_submodule(site), hidden, text)[1]
            got = tr.attention(site).sel(step=step).isel(sample=0).values.reshape(ref.shape[0], -1, ref.shape[-1])
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()))
    assert worst < 2e-3 and tr.manifest["model"]["adapters"]["ip_adapter"]["unet"]["processors"] == len(tr.sites)


def test_the_processor_without_sdpa_records_the_text_part(tmp_path):
    """``IPAdapterAttnProcessor`` (diffusers' choice without torch's SDPA: ``attn.scale`` and ``bmm``) is observed
    too: the same maps, the plain image."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor

    pipe, embeds = with_ip_adapter(), image_embeds()
    for module in pipe.unet.modules():
        if type(getattr(module, "processor", None)).__name__ == "IPAdapterAttnProcessor2_0":
            old = module.processor
            new = IPAdapterAttnProcessor(old.hidden_size, old.cross_attention_dim, old.num_tokens, old.scale)
            new.load_state_dict(old.state_dict())
            module.set_processor(new)
    expected = plain(pipe, ip_adapter_image_embeds=embeds)
    with TextInputs(pipe) as calls:
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", sites="mid_block.*", heads="all",
                         ip_adapter_image_embeds=embeds, **RUN)
    np.testing.assert_array_equal(image(tr), expected)
    site = tr.sites[0]
    hidden, text = calls.calls[site][1]
    ref = text_probs64(pipe.unet.get_submodule(site), hidden, text)[1]
    got = tr.attention(site).sel(step=1).isel(sample=0).values.reshape(ref.shape[0], -1, ref.shape[-1])
    assert np.abs(got.astype(np.float64) - ref).max() < 2e-3


def test_two_ip_adapters_record_their_scales_and_the_plain_image(tmp_path):
    """Two IP-Adapters at once (a list of image embeds, one scale each): the image is the plain call's, the maps
    keep the text's 77 tokens and the manifest has both scales and both adapters' image tokens."""
    pipe = tiny_sd_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet), ip_adapter_state_dict(pipe.unet)])
    pipe.set_ip_adapter_scale([0.5, 1.0])
    embeds = image_embeds(seed=1) + image_embeds(seed=2)
    expected = plain(pipe, ip_adapter_image_embeds=embeds)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, ip_adapter_image_embeds=embeds,
                     **RUN)
    np.testing.assert_array_equal(image(tr), expected)
    assert tr.attention(tr.sites[0]).sizes["token"] == 77
    recorded = tr.manifest["model"]["adapters"]["ip_adapter"]["unet"]
    assert recorded["scales"] == [[0.5, 1.0]] and recorded["tokens"] == [4, 4]


def test_a_sweep_with_an_ip_adapter_resumes_only_with_the_same_scale_and_refuses_workers(tmp_path):
    """A sweep records the IP-Adapter's scale with the other no-weight settings: a resume after
    set_ip_adapter_scale is refused naming it; worker processes (which load the model again, without the adapter)
    are refused before anything runs."""
    pipe, embeds = with_ip_adapter(), image_embeds()
    kw = dict(ip_adapter_image_embeds=embeds, num_inference_steps=2, height=32, width=32, progress=False)
    ats.sweep(pipe, [PROMPT], [0], tmp_path / "sw", **kw)
    pipe.set_ip_adapter_scale(0.25)
    with pytest.raises(ats.AttnscopeError, match=r"other settings.*IP-Adapter of unet .*scales \[\[1\.0\]\] then, "
                                                 r"\[\[0\.25\]\] now"):
        ats.sweep(pipe, [PROMPT], [0, 1], tmp_path / "sw", **kw)
    with pytest.raises(ats.AttnscopeError, match=r"has an IP-Adapter loaded \(in unet\): worker processes"):
        ats.sweep(pipe, [PROMPT], [0], tmp_path / "workers", workers=2, **kw)
    assert not (tmp_path / "workers").exists()
