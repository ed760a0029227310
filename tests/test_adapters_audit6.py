"""Adapters and pipeline setups users load on SD 1.x / SDXL: LoRA (peft), textual inversion, IP-Adapter, from_pipe,
a schedule given as a torch tensor. Capture records the maps the adapted model computes (against an independent
computation) and its image; what changes the image but no weight (a LoRA's scale, active or disabled adapters,
fusion, textual-inversion tokens) is recorded as ``model.adapters``, so a rerun reproduces the image or refuses with
one error, never silently makes another."""

import inspect

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.rerun._adapters import check_adapters
from attnscope.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

from .conftest import AttnInputs

pytest.importorskip("peft")

PROMPT = "a red circle and a blue square"
RUN = dict(num_inference_steps=2, height=32, width=32)

#: the rerun checks ``model.adapters`` once ``attnscope/rerun/_rerun.py`` calls ``check_adapters`` (a one-line hookup
#: in a file another change owns); until then these tests are expected to fail
def image(tr):
    return np.asarray(tr.images[0])


def plain(pipe, prompt=PROMPT, **kwargs):
    """A plain pipeline call (no attnscope) with capture's generator, as a uint8 array."""
    return np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(0), **{**RUN, **kwargs}).images[0])


# -- LoRA -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA on the tiny SD pipeline's UNet (attention projections) and text encoder, random non-zero weights, saved
    with ``save_lora_weights`` as diffusers' own format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    out = tmp_path_factory.mktemp("lora")
    type(pipe).save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)))
    return out


def with_lora(lora_dir):
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(lora_dir, adapter_name="a")
    return pipe


def lora_linear(layer, x, lora=True):
    """A peft LoRA linear layer computed by hand in float64: base weights plus scaling · B A x of its active adapters
    (``lora=False``: the base weights alone)."""
    base = layer.base_layer
    x = x.double()
    out = x @ base.weight.double().T + (base.bias.double() if base.bias is not None else 0)
    for name in layer.active_adapters if lora else ():
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        out = out + layer.scaling[name] * (x @ a.T @ b.T)
    return out


def lora_probs(module, hidden, text, lora=True):
    """softmax(Q Kᵀ · d^-½) per head, Q and K from :func:`lora_linear`: (batch, heads, queries, tokens)."""
    with torch.no_grad():
        q, k = lora_linear(module.to_q, hidden, lora), lora_linear(module.to_k, text, lora)
        b, n, inner = q.shape
        d = inner // module.heads
        q = q.view(b, n, module.heads, d).transpose(1, 2)
        k = k.view(b, -1, module.heads, d).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(d), dim=-1).numpy()


def test_lora_capture_records_the_maps_the_lora_computes_and_the_plain_image(lora_dir, tmp_path):
    pipe = with_lora(lora_dir)
    assert type(pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2").to_k).__module__ \
        .startswith("peft")
    expected = plain(pipe)
    with AttnInputs(pipe) as calls:
        tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", heads="all", exact=True, **RUN)
    np.testing.assert_array_equal(image(tr), expected)
    assert np.abs(plain(tiny_sd_pipeline()).astype(float) - expected).max() > 0  # the LoRA changes the image
    worst, lora_effect = 0.0, 0.0
    for site in tr.sites:
        module = pipe.unet.get_submodule(site)
        for step, (hidden, text) in enumerate(calls.calls[site]):
            ref = lora_probs(module, hidden, text)[1]  # rows [uncond, cond]
            got = tr.attention(site).sel(step=step).isel(sample=0).values.reshape(ref.shape[0], -1, ref.shape[-1])
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()))
            base = lora_probs(module, hidden, text, lora=False)[1]  # the same inputs, the LoRA left out
            lora_effect = max(lora_effect, float(np.abs(base - ref).max()))
    assert worst < 2e-3 and lora_effect > 1e-2
    assert tr.manifest["model"]["adapters"]["lora"]["unet"]["adapters"] == {"a": [1.0]}  # lora_alpha / r
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))


def test_sdxl_lora_capture_is_the_plain_image_and_reruns(tmp_path):
    """SDXL: a LoRA added to the UNet and to both text encoders; the image with exact=True is the plain call's, the
    manifest records the three components' LoRA and the rerun is bit-identical."""
    from peft import LoraConfig

    pipe = tiny_sdxl_pipeline()
    run = dict(num_inference_steps=2)
    before = plain(pipe, **run, height=None, width=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k"]))
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj"]))
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **run)
    np.testing.assert_array_equal(image(tr), plain(pipe, **run, height=None, width=None))
    assert np.abs(image(tr).astype(float) - before).max() > 0
    lora = tr.manifest["model"]["adapters"]["lora"]
    assert {k: v["adapters"] for k, v in lora.items()} == {"unet": {"default": [2.0]}, "text_encoder": {"default": [1.0]},
                                                           "text_encoder_2": {"default": [1.0]}}
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))


def _scaled(pipe):
    pipe.set_adapters(["a"], adapter_weights=[0.3])


def _disabled(pipe):
    pipe.disable_lora()


def _fused(pipe):
    pipe.fuse_lora(lora_scale=0.5)


CHANGES = {"set_adapters": _scaled, "disable_lora": _disabled, "fuse_lora": _fused}


@pytest.mark.parametrize("change", CHANGES)
def test_lora_settings_that_change_no_weight_are_recorded(change, lora_dir, tmp_path):
    """``set_adapters(adapter_weights=)``, ``disable_lora()`` and ``fuse_lora(lora_scale=)`` change the image; the
    first two leave every weight alone (a fused LoRA changes the base weights, which the fingerprint sees): the
    manifest records them, and
    ``check_adapters`` (what rerun runs before its weights check) refuses a pipeline that applies the LoRA otherwise,
    where a rerun ran and made another image."""
    pipe, other = with_lora(lora_dir), with_lora(lora_dir)
    ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "before.zarr", **RUN)  # a capture before the change
    CHANGES[change](pipe)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **RUN)
    np.testing.assert_array_equal(image(tr), plain(pipe))
    assert np.abs(plain(other).astype(float) - image(tr)).max() > 0  # the setting changes the image
    fingerprint = tr.manifest["model"]["weights_fingerprint"]
    if change == "fuse_lora":  # merged into the base weights: the fingerprint sees it (also when written through .data)
        assert {k for k in fingerprint if fingerprint[k] != ats.store.weights_fingerprint(other)[k]} == {"unet", "text_encoder"}
    else:                      # a scale or a switch: no weight changes
        assert ats.store.weights_fingerprint(other) == fingerprint
    lora = tr.manifest["model"]["adapters"]["lora"]
    assert set(lora) == {"unet", "text_encoder"}
    want = {"set_adapters": {"adapters": {"a": [0.3]}, "disabled": False, "merged": []},
            "disable_lora": {"adapters": {"a": [1.0]}, "disabled": True, "merged": []},
            "fuse_lora": {"adapters": {"a": [0.5]}, "disabled": False, "merged": ["a"]}}[change]
    assert {k: lora["unet"][k] for k in want} == want
    with pytest.raises(ats.AttnscopeError, match=r"the LoRA of \w+ is applied otherwise than when it was captured"):
        check_adapters(other, tr.manifest, str(tr.path))
    check_adapters(pipe, tr.manifest, str(tr.path))  # the pipeline it was captured on passes
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))


@pytest.mark.parametrize("change", CHANGES)
def test_rerun_on_a_pipeline_applying_the_lora_otherwise_is_one_error(change, lora_dir, tmp_path):
    pipe, other = with_lora(lora_dir), with_lora(lora_dir)
    CHANGES[change](pipe)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **RUN)
    with pytest.raises(ats.AttnscopeError, match=r"the LoRA of \w+ is applied otherwise"):
        ats.rerun(tr, pipe=other, store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()


def test_rerun_without_the_lora_loaded_is_one_error(lora_dir, tmp_path):
    tr = ats.capture(with_lora(lora_dir), PROMPT, seed=0, store=tmp_path / "a.zarr", **RUN)
    with pytest.raises(ats.AttnscopeError, match="LoRA layers in text_encoder, which this pipeline has none|weights of"):
        ats.rerun(tr, pipe=tiny_sd_pipeline(), store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    with pytest.raises(ats.AttnscopeError, match="captured with LoRA layers in text_encoder, which this pipeline has"):
        check_adapters(tiny_sd_pipeline(), tr.manifest, str(tr.path))


def test_lora_scale_as_cross_attention_kwargs_is_recorded_and_rerun(lora_dir, tmp_path):
    """``cross_attention_kwargs={"scale": s}`` works with peft installed (transformers 5 too) and is a pipeline
    argument: recorded and given again. The call's scaling leaves the LoRA as it was (to the recorded digits)."""
    pipe = with_lora(lora_dir)
    kwargs = {"cross_attention_kwargs": {"scale": 0.4}}
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **kwargs, **RUN)
    np.testing.assert_array_equal(image(tr), plain(pipe, **kwargs))
    assert np.abs(plain(pipe).astype(float) - image(tr)).max() > 0
    assert tr.manifest["run"]["pipeline_kwargs"]["cross_attention_kwargs"] == {"scale": 0.4}
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))
    for site in tr.sites:
        np.testing.assert_array_equal(again.attention(site).values, tr.attention(site).values)


def test_per_block_lora_weights_are_told_apart(lora_dir, tmp_path):
    """``set_adapters`` with per-block weights gives the layers different scales: the digest over the layers tells
    two such settings apart even where the distinct scales are the same."""
    pipe, other = with_lora(lora_dir), with_lora(lora_dir)
    pipe.set_adapters(["a"], adapter_weights=[{"unet": {"down": 0.5, "up": 1.0}}])
    other.set_adapters(["a"], adapter_weights=[{"unet": {"down": 1.0, "up": 0.5}}])
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **RUN)
    assert tr.manifest["model"]["adapters"]["lora"]["unet"]["adapters"]["a"] == [0.5, 1.0]
    with pytest.raises(ats.AttnscopeError, match="digest"):
        check_adapters(other, tr.manifest, str(tr.path))


def test_a_damaged_adapters_record_is_one_error(tmp_path):
    with pytest.raises(ats.AttnscopeError, match=r"adapters=\[1\] in its manifest's model"):
        check_adapters(tiny_sd_pipeline(), {"model": {"adapters": [1]}}, "a.zarr")
    check_adapters(tiny_sd_pipeline(), {"model": {}}, "a.zarr")  # a trace from before: not checked


# -- textual inversion ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    """A textual-inversion embedding of two vectors for the tiny SD text encoder (width 32), as a safetensors file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ti") / "tok.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}, str(path))
    return path


def test_textual_inversion_token_is_one_word_with_its_vectors(embedding, tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(str(embedding), token="<tok>")
    prompt = "a red <tok> circle"
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids  # what the model reads
    tok_ids = pipe.tokenizer.convert_tokens_to_ids(["<tok>", "<tok>_1"])
    where = [i for i, t in enumerate(ids) if t in tok_ids]
    tr = ats.capture(pipe, prompt, seed=0, store=tmp_path / "a.zarr", exact=True, **RUN)
    np.testing.assert_array_equal(image(tr), plain(pipe, prompt))
    assert tr.manifest["run"]["token_ids"][0][:len(ids)] == ids
    assert tr.words == {"a": [1], "red": [2], "<tok>": where, "circle": [where[-1] + 1]} and where == [3, 4]
    assert tr.manifest["model"]["adapters"]["textual_inversion"] == {"tokenizer": ["<tok>", "<tok>_1"]}
    ds = ats.stats.dominance(tr, targets=["<tok>", "circle"])
    mass = tr.attention(tr.sites[0]).isel(sample=0, head=0).astype("float64").sum(["y", "x"])  # by hand
    words = mass.isel(token=slice(1, where[-1] + 2)).sum("token")  # the prompt's word pieces: a red <tok> circle
    np.testing.assert_allclose(ds.target_share.sel(site=tr.sites[0], target="<tok>").isel(sample=0),
                               mass.isel(token=where).sum("token") / words, rtol=1e-3)


def test_sdxl_textual_inversion_token_is_one_word(tmp_path):
    pipe = tiny_sdxl_pipeline()
    pipe.load_textual_inversion(torch.randn(1, 32), token="<tok>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(torch.randn(1, 32), token="<tok>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    tr = ats.capture(pipe, "a red <tok> circle", seed=0, store=tmp_path / "a.zarr", num_inference_steps=2)
    assert tr.words == {"a": [1], "red": [2], "<tok>": [3], "circle": [4]}


def test_rerun_of_a_textual_inversion_trace_without_the_token_is_one_error(embedding, tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(str(embedding), token="<tok>")
    tr = ats.capture(pipe, "a red <tok> circle", seed=0, store=tmp_path / "a.zarr", **RUN)
    with pytest.raises(ats.AttnscopeError):  # the weights check or the adapters check: one error, no image
        ats.rerun(tr, pipe=tiny_sd_pipeline(), store=tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    with pytest.raises(ats.AttnscopeError, match=r"textual-inversion token\(s\) '<tok>', '<tok>_1' in tokenizer, "
                                                 r"which this pipeline lacks; .*load_textual_inversion"):
        check_adapters(tiny_sd_pipeline(), tr.manifest, str(tr.path))
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "c.zarr")
    np.testing.assert_array_equal(image(again), image(tr))


def test_rerun_names_the_missing_textual_inversion_token(embedding, tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(str(embedding), token="<tok>")
    tr = ats.capture(pipe, "a red <tok> circle", seed=0, store=tmp_path / "a.zarr", **RUN)
    with pytest.raises(ats.AttnscopeError, match=r"textual-inversion token\(s\) '<tok>', '<tok>_1'"):
        ats.rerun(tr, pipe=tiny_sd_pipeline(), store=tmp_path / "b.zarr")


# -- IP-Adapter -----------------------------------------------------------------------------------------------------
def ip_adapter_state_dict(unet, tokens=4):
    """A tiny IP-Adapter for ``unet`` (as diffusers' own tests build one): an image projection to ``tokens`` image
    tokens and to_k_ip/to_v_ip for each cross-attention processor, random weights."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    dim, channels = unet.config.cross_attention_dim, unet.config.block_out_channels
    layers, key = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            block = name.split(".")[0]
            hidden = (channels[-1] if block == "mid_block" else list(reversed(channels))[int(name.split(".")[1])]
                      if block == "up_blocks" else channels[int(name.split(".")[1])])
            sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=dim, scale=1.0).state_dict()
            layers.update({f"{key}.to_k_ip.weight": sd["to_k_ip.0.weight"], f"{key}.to_v_ip.weight": sd["to_v_ip.0.weight"]})
            key += 2
    sd = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=tokens).state_dict()
    proj = {"proj.weight": sd["image_embeds.weight"], "proj.bias": sd["image_embeds.bias"],
            "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    return {"image_proj": proj, "ip_adapter": layers}


def test_ip_adapter_is_refused_before_anything_is_written(tmp_path):
    """Its processors attend to the text and, apart, to image tokens handed with it: capture failed at the first
    recorded call (an AttributeError on the tuple of text and image tokens). The UNet's own IP-Adapter processors are
    recorded now (tests/test_ipadapter_audit6.py); one whose text part attnscope does not mirror (xFormers') is still
    one error before the store is made."""
    from diffusers.models.attention_processor import IPAdapterXFormersAttnProcessor

    pipe = tiny_sd_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)])
    embeds = [torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(1))]  # [negative; positive] image embeds
    for module in pipe.unet.modules():
        if type(getattr(module, "processor", None)).__name__ == "IPAdapterAttnProcessor2_0":
            old = module.processor
            new = IPAdapterXFormersAttnProcessor(old.hidden_size, old.cross_attention_dim, old.num_tokens, old.scale)
            new.load_state_dict(old.state_dict())
            module.set_processor(new)
    processors = dict(pipe.unet.attn_processors)
    with pytest.raises(ats.AttnscopeError, match=r"an IP-Adapter is loaded \(IPAdapterXFormersAttnProcessor.*"
                                                 r"pipe\.unload_ip_adapter\(\)"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", ip_adapter_image_embeds=embeds, **RUN)
    assert not (tmp_path / "a.zarr").exists()
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())  # nothing left installed


# -- other setups ---------------------------------------------------------------------------------------------------
def test_from_pipe_captures_the_same_generation_and_reruns_on_either(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = tiny_sd_pipeline()
    derived = StableDiffusionPipeline.from_pipe(base)
    derived.set_progress_bar_config(disable=True)
    a = ats.capture(base, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **RUN)
    b = ats.capture(derived, PROMPT, seed=0, store=tmp_path / "b.zarr", exact=True, **RUN)
    np.testing.assert_array_equal(image(b), image(a))
    for site in a.sites:
        np.testing.assert_array_equal(b.attention(site).values, a.attention(site).values)
    again = ats.rerun(b, pipe=base, store=tmp_path / "c.zarr")
    np.testing.assert_array_equal(image(again), image(b))


@pytest.mark.parametrize("name", ["sigmas", "timesteps"])
def test_a_schedule_given_as_a_torch_tensor_is_recorded_and_rerun(name, tmp_path):
    """A 1-d tensor as ``sigmas=``/``timesteps=`` was not recorded (``unrecorded_kwargs``) and the rerun refused the
    trace; it is recorded as a list, like a numpy array, and the rerun makes the same image."""
    pipe = tiny_sd_pipeline(scheduler="euler")
    values = [14.6, 5.0, 1.0, 0.0] if name == "sigmas" else [999, 600, 300, 1]
    given = torch.tensor(values, dtype=torch.float32 if name == "sigmas" else torch.int64)
    run = dict(height=32, width=32)
    tr = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", exact=True, **{name: given}, **run)
    assert tr.manifest["run"]["unrecorded_kwargs"] == [] and tr.manifest["run"]["reproducible"]
    assert tr.manifest["run"]["pipeline_kwargs"][name] == given.tolist()
    np.testing.assert_array_equal(image(tr), np.asarray(pipe(PROMPT, generator=torch.Generator().manual_seed(0),
                                                             **{name: given}, **run).images[0]))
    as_numpy = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "n.zarr", exact=True, **{name: given.numpy()}, **run)
    np.testing.assert_array_equal(image(as_numpy), image(tr))
    again = ats.rerun(tr, pipe=pipe, store=tmp_path / "b.zarr")
    np.testing.assert_array_equal(image(again), image(tr))


def test_a_prompt_a_multi_vector_token_makes_too_long_is_refused(tmp_path):
    """diffusers writes a textual-inversion token of n vectors as n tokens before tokenizing (``maybe_convert_prompt``):
    the length check counted it as one, so a prompt the pipeline cuts passed."""
    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), token="<tok>")
    prompt = "a red circle and " * 17 + "a <tok>"  # 72 tokens as written, 79 as the pipeline reads it
    read = len(pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids)
    assert len(pipe.tokenizer(prompt).input_ids) <= 77 < read
    with pytest.raises(ats.AttnscopeError, match=rf"{read} CLIP tokens .* would cut the last {read - 77}"):
        ats.capture(pipe, prompt, seed=0, store=tmp_path / "a.zarr", **RUN)
    assert not (tmp_path / "a.zarr").exists()


def test_clip_skip_the_pipeline_would_fail_on_is_one_error(tmp_path):
    """With transformers 5, SD 1.x's encode_prompt fails on clip_skip (it reads ``text_encoder.text_model``); capture
    says so before anything runs. SDXL's clip_skip works and is captured."""
    pipe = tiny_sd_pipeline()
    if hasattr(pipe.text_encoder, "text_model"):
        pytest.skip("this transformers' CLIPTextModel has text_model: clip_skip works")
    with pytest.raises(AttributeError, match="text_model"):  # the plain call, without attnscope
        plain(pipe, clip_skip=1)
    with pytest.raises(ats.AttnscopeError, match=r"clip_skip=1: StableDiffusionPipeline's encode_prompt reads "
                                                 r"text_encoder\.text_model.*leave clip_skip out"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", clip_skip=1, **RUN)
    assert not (tmp_path / "a.zarr").exists()
    xl = tiny_sdxl_pipeline()
    tr = ats.capture(xl, PROMPT, seed=0, store=tmp_path / "xl.zarr", clip_skip=1, num_inference_steps=2, exact=True)
    np.testing.assert_array_equal(image(tr), plain(xl, clip_skip=1, num_inference_steps=2, height=None, width=None))


def test_lora_scale_without_peft_is_one_error(monkeypatch, tmp_path):
    """Without peft, SD 1.x's encode_prompt adjusts a LoRA scale through ``text_encoder.text_model`` and fails."""
    pipe = tiny_sd_pipeline()
    if hasattr(pipe.text_encoder, "text_model"):
        pytest.skip("this transformers' CLIPTextModel has text_model")
    monkeypatch.setattr(inspect.getmodule(type(pipe).encode_prompt), "USE_PEFT_BACKEND", False)  # as without peft
    kwargs = {"cross_attention_kwargs": {"scale": 0.5}}
    with pytest.raises(AttributeError, match="text_model"):
        plain(pipe, **kwargs)
    with pytest.raises(ats.AttnscopeError, match=r"cross_attention_kwargs=\{'scale': 0\.5\}: .* install peft"):
        ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", **kwargs, **RUN)
    assert not (tmp_path / "a.zarr").exists()
