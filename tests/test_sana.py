"""Sana (linear self-attention, softmax cross-attention to Gemma-2 tokens after an instruction prefix): sites,
stored maps against an independent float64 computation (RMS norms across heads included), the positions
the model saw and their roles, bit-identity, interventions, rerun, TGATE refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.hooks import discover_self_sites, find_denoiser
from attnscope.testing import tiny_sana_pipeline

from .family_checks import (
    assert_stored_maps_match_reference,
    check_heatmaps_and_compare,
    check_hooks_are_transparent,
    check_regulation,
    check_reweight,
    record_cross_inputs,
)

KW = dict(num_inference_steps=2, height=32, width=32, use_resolution_binning=False)


@pytest.fixture(scope="module")
def sana():
    return tiny_sana_pipeline(num_layers=3)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sites_are_the_softmax_cross_attentions(sana):
    sites = ats.discover_sites(sana)
    assert [(s.name, s.kind, s.block, s.depth, s.patch) for s in sites] == [
        ("transformer_blocks.0.attn2", "cross", "early", 0, 1),
        ("transformer_blocks.1.attn2", "cross", "middle", 1, 1),
        ("transformer_blocks.2.attn2", "cross", "late", 2, 1),
    ]
    assert discover_self_sites(sana) == []                                      # attn1 is linear attention: no map
    assert find_denoiser(sana)[0] == "sana"
    assert sites[0].spatial_shape((16, 32)) == (16, 32)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_stored_probs_equal_a_float64_computation(qk_norm, sana, tmp_path):
    pipe = sana if qk_norm is None else tiny_sana_pipeline(qk_norm=qk_norm)
    inputs, handles = record_cross_inputs(pipe)
    try:
        tr = ats.capture(pipe, ["a red circle", "a blue elephant"], seed=[1, 2], store=tmp_path / "t.zarr", heads="all",
                         tokens="all", branch="both", **{**KW, "width": 64})
    finally:
        for h in handles:
            h.remove()
    assert_stored_maps_match_reference(pipe, tr, inputs, (16, 32), samples=2)
    if qk_norm:
        assert ats.discover_sites(pipe)[0].module.norm_q is not None             # the norm path is exercised
    stored = tr.attention(tr.sites[0]).values
    assert len(tr.tokens) == 300 and tr.tokens[6:] == ["<pad>"] * 294
    assert float(np.abs(stored[..., 6:]).max()) == 0.0                          # masked padding: no mass


def test_the_positions_the_model_saw_and_the_instruction_role(sana, tmp_path):
    tok = sana.tokenizer
    tr = ats.capture(sana, "a red elephant", seed=0, store=tmp_path / "a.zarr", tokens="all", **KW)
    # independently: the pipeline's rule, [0] + the last 299 of instruction + prompt padded to len(instruction) + 298
    import inspect

    chi = "\n".join(inspect.signature(type(sana).__call__).parameters["complex_human_instruction"].default)
    n_chi = len(tok(chi).input_ids)
    tok.padding_side = "right"
    ids = tok(chi + "a red elephant", padding="max_length", max_length=n_chi + 298, truncation=True).input_ids
    kept = [ids[0]] + ids[-299:]
    assert tr.manifest["run"]["token_ids"] == [kept]
    assert tr.tokens[:5] == ["<bos>", "\u2581a", "\u2581red", "\u2581ele", "phant"]
    assert tr.token_roles[:6] == ["sot", "word", "word", "word", "word", "pad"]
    assert tr.words == {"a": [1], "red": [2], "elephant": [3, 4]}
    assert tr.manifest["run"]["segments"] == [["gemma", 300]]
    auto = ats.capture(sana, "a red elephant", seed=0, store=tmp_path / "b.zarr", **KW)
    assert auto.manifest["capture"]["tokens"] == "prompt" and len(auto.tokens) == 5

    # an instruction whose last token stays on the text axis: it is the pipeline's, not the prompt's
    custom = ats.capture(sana, "a red circle", seed=0, store=tmp_path / "c.zarr", complex_human_instruction=["Draw the"],
                         **KW)
    assert custom.tokens == ["<bos>", "\u2581the", "a", "\u2581red", "\u2581circle"]
    assert custom.token_roles == ["sot", "instruction", "word", "word", "word"]
    assert custom.words == {"a": [2], "red": [3], "circle": [4]}
    ds = ats.stats.dominance(custom, targets=["red", "circle"])
    assert list(ds["word"].values) == ["a", "red", "circle"]                     # the user's words only
    np.testing.assert_allclose(ds["mass_share"].sum("token").values, 1.0, atol=1e-6)
    with pytest.raises(AttnscopeError, match="not in the prompt"):
        ats.stats.dominance(custom, targets=["the"])
    with pytest.raises(AttnscopeError, match="not in the prompt"), ats.hooks(sana, ats.regulate.Reweight("the", 2.0)):
        sana("a red circle", complex_human_instruction=["Draw the"], **KW)


def test_no_client_and_observers_are_bit_identical_and_processors_come_back(sana):
    observer = check_hooks_are_transparent(
        sana, lambda: sana("a red circle", generator=_gen(5), output_type="np", **KW).images, exact=True)
    assert observer.calls == 2 * len(ats.discover_sites(sana))


def test_regulation_edits_only_the_target_columns_of_the_late_layers(sana):
    check_regulation(sana, lambda: sana("a red circle", generator=_gen(3), output_type="np", **KW).images,
                     ["circle"], column=3, expected_sites={"transformer_blocks.2.attn2"}, uncond=slice(0, 1))


def test_heatmaps_and_compare_of_a_regulated_rerun(sana, tmp_path):
    check_heatmaps_and_compare(sana, tmp_path, ["red", "circle"], **KW)


def test_rerun_is_bit_exact_and_tgate_is_refused(sana, tmp_path):
    tr = ats.capture(sana, "a red circle", seed=4, store=tmp_path / "a.zarr", **KW)
    again = ats.rerun(tr, pipe=sana, store=tmp_path / "b.zarr")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    np.testing.assert_array_equal(again.attention(tr.sites[0]).values, tr.attention(tr.sites[0]).values)
    with pytest.raises(AttnscopeError, match="TGate on a 'sana' pipeline.*linear self-attention"):
        with ats.hooks(sana, ats.regulate.TGate(1)):
            pass


def test_reweight_scales_only_its_columns(sana):
    check_reweight(sana, lambda: sana("a red circle", generator=_gen(3), **KW), "circle", column=3,   # <bos> a red circle
                   site="transformer_blocks.2.attn2", cond=slice(1, 2))


def test_a_prompt_the_pipeline_would_cut_is_refused(sana, tmp_path):
    long = "a red circle and a blue square and a green triangle"                 # 11 Gemma tokens
    with pytest.raises(AttnscopeError, match="11 Gemma tokens, more than the 6 that max_sequence_length=8 leaves"):
        ats.capture(sana, long, seed=0, store=tmp_path / "x.zarr", max_sequence_length=8, **KW)
    assert not (tmp_path / "x.zarr").exists()
    tr = ats.capture(sana, "a red circle", seed=0, store=tmp_path / "y.zarr", max_sequence_length=8, **KW)
    assert tr.tokens == ["<bos>", "\u2581a", "\u2581red", "\u2581circle"]


def test_a_text_mask_that_does_not_fit_the_prompts_is_refused_and_repeating_the_prompts_works(sana, tmp_path):
    # diffusers' SanaPipeline repeats the mask per image as [p0, p1, p0, p1] and the embeddings as [p0, p0, p1, p1]:
    # with prompts of different lengths, sample 1 would read padding and sample 2 lose "and a dog"
    prompts, kw = ["a red circle", "a blue square and a dog"], dict(KW, guidance_scale=1.0, max_sequence_length=16)
    with pytest.raises(AttnscopeError, match=r"text mask \(encoder_attention_mask\) does not fit the prompts: sample 1 "
                                             r"\(prompt 0\) reads position 4 \('<pad>'\), which is padding; sample 2 "
                                             r"\(prompt 1\) masks position 4 \('\u2581and'\) of its prompt.*repeat each "
                                             r"prompt in the prompt list instead, with num_images_per_prompt=1"):
        ats.capture(sana, prompts, seed=5, num_images_per_prompt=2, store=tmp_path / "x.zarr", **kw)
    assert not (tmp_path / "x.zarr").exists()
    # the way out the message gives: the same latents (one generator, four samples), each sample its own mask
    tr = ats.capture(sana, [prompts[0]] * 2 + [prompts[1]] * 2, seed=5, store=tmp_path / "y.zarr", **kw)
    shares = ats.stats.dominance(tr, targets=["dog"]).target_share.sel(target="dog").mean(["step", "site"]).values
    assert np.isnan(shares[:2]).all() and (shares[2:] > 0.05).all()
    m = tr.attention(tr.sites[0]).isel(step=-1).sum(["head", "y", "x"]).compute()
    pad = m.token_role.values == "pad"
    assert float(m.values[pad].max()) == 0.0 and (m.values[~pad] > 0).all()   # padding read by no sample, words by all
    # two images of one prompt (same length everywhere) fit: no error
    ats.capture(sana, prompts[1], seed=5, num_images_per_prompt=2, store=tmp_path / "z.zarr", **kw)


def test_capture_command_on_a_saved_sana_pipeline(sana, tmp_path):
    from .conftest import cli

    sana.save_pretrained(tmp_path / "sana")
    out = tmp_path / "run.zarr"
    done = cli("capture", "--model", str(tmp_path / "sana"), "--prompt", "a red elephant", "--steps", "2", "--height",
               "32", "--width", "64", "--set", "use_resolution_binning=false", "--out", str(out))
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    assert tr.words == {"a": [1], "red": [2], "elephant": [3, 4]} and tr.token_roles[0] == "sot"
    assert tr.attention(tr.sites[0]).sizes["x"] == 32


def test_resolution_binning_records_the_size_of_the_image_the_user_gets(sana, tmp_path):
    """With the pipeline's default resolution binning Sana generates at the nearest bin (704 x 1408 for 32 x 64) and
    resizes its image back. Capture recorded the generated size, so it refused its own trace as damaged (images
    32 x 64, expected 704 x 1408), and heat maps would have been drawn at a size the image does not have."""
    kw = dict(num_inference_steps=2, height=32, width=64)
    tr = ats.capture(sana, "a red circle", seed=0, store=tmp_path / "b.zarr", **kw)
    plain = sana("a red circle", generator=_gen(0), output_type="np", **kw).images[0]
    assert tr.images[0].size == (64, 32)
    assert np.abs(np.asarray(tr.images[0], np.int16) - np.round(plain * 255)).max() <= 1
    run = tr.manifest["run"]
    assert (run["height"], run["width"]) == (32, 64) and run["generated_size"] == [704, 1408]
    assert ats.stats.image_size(tr) == (32, 64)
    da = tr.attention(tr.sites[0])
    assert (da.sizes["y"], da.sizes["x"]) == (352, 704)                        # the maps of the generated latents
    again = ats.rerun(tr, store=tmp_path / "r.zarr", pipe=sana)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    np.testing.assert_array_equal(again.attention(again.sites[0]).values, da.values)
