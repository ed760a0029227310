"""Capture on the transformer families as a demanding user runs it: batches of prompts of different lengths with
several images each, negative prompts, embeddings. Each test checks a sample against an independent expectation
(the same sample captured alone, or the pipeline's own refusal) and failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sana_pipeline

SANA_KW = dict(num_inference_steps=2, height=32, width=32, use_resolution_binning=False)
PIXART_KW = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, use_resolution_binning=False,
                 clean_caption=False)
PROMPTS = ["a red circle", "a blue square"]                       # the same length: the prompts' own masks fit
NEGATIVES = ["a dog", "a big black dog and a cat"]                # 2 and 7 tokens


@pytest.fixture(scope="module")
def sana():
    return tiny_sana_pipeline()


def _uncond_of_sample(tr, sample):
    return tr.attention(tr.sites[0], "uncond").isel(sample=sample).astype(np.float64)


def test_negative_prompts_of_different_lengths_with_several_images_are_refused_on_sana(sana, tmp_path):
    """diffusers' SanaPipeline repeats the negative prompts' text mask per image as [n0, n1, n0, n1] and their
    embeddings as [n0, n0, n1, n1]: the unconditional rows of samples 1 and 2 read another negative prompt's mask.
    The check of the mask covered the conditional rows only, so capture recorded unconditional maps (and an image)
    that a run of each sample alone does not give (max differences 0.25 and 107 grey levels), silently."""
    kw = dict(SANA_KW, negative_prompt=NEGATIVES, branch="both")
    with pytest.raises(AttnscopeError, match=r"text mask \(encoder_attention_mask\) does not fit the negative prompts: "
                                             r"sample 1 \(negative prompt 0\) reads position 3 \('<pad>'\), which is "
                                             r"padding; sample 2 \(negative prompt 1\) masks position 3"):
        ats.capture(sana, PROMPTS, seed=[1, 2, 3, 4], num_images_per_prompt=2, store=tmp_path / "x.zarr", **kw)
    assert not (tmp_path / "x.zarr").exists()
    # the way out the message gives: each prompt (and its negative) repeated, one image each; sample 1 is then the
    # sample captured alone with its own seed and negative prompt
    tr = ats.capture(sana, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, seed=[1, 2, 3, 4], store=tmp_path / "y.zarr",
                     tokens="all", **{**kw, "negative_prompt": [NEGATIVES[0]] * 2 + [NEGATIVES[1]] * 2})
    alone = ats.capture(sana, PROMPTS[0], seed=2, store=tmp_path / "z.zarr", tokens="all",
                        **{**kw, "negative_prompt": NEGATIVES[0]})
    np.testing.assert_allclose(_uncond_of_sample(tr, 1), _uncond_of_sample(alone, 0), atol=1e-3)
    assert np.abs(np.asarray(tr.images[1], int) - np.asarray(alone.images[0], int)).max() <= 1


def test_pixart_negative_prompts_of_different_lengths_with_several_images_keep_their_own_masks(tmp_path):
    """PixArt repeats the negative mask in the order of the embeddings: the same batch is not refused there, and each
    sample's unconditional maps are those of the sample captured alone."""
    pipe = tiny_pixart_pipeline()
    kw = dict(PIXART_KW, negative_prompt=NEGATIVES, branch="both", tokens="all")
    tr = ats.capture(pipe, PROMPTS, seed=[1, 2, 3, 4], num_images_per_prompt=2, store=tmp_path / "a.zarr", **kw)
    for sample, (prompt, negative, seed) in enumerate([(0, 0, 1), (0, 0, 2), (1, 1, 3), (1, 1, 4)]):
        alone = ats.capture(pipe, PROMPTS[prompt], seed=seed, store=tmp_path / f"{sample}.zarr",
                            **{**kw, "negative_prompt": NEGATIVES[negative]})
        np.testing.assert_allclose(_uncond_of_sample(tr, sample), _uncond_of_sample(alone, 0), atol=1e-3)
        assert tr.attention(tr.sites[0], "uncond").token_text.values[sample].tolist() == \
            alone.attention(alone.sites[0], "uncond").token_text.values[0].tolist()


@pytest.mark.parametrize("name", ["prompt_embeds", "pooled_prompt_embeds"])
def test_capture_refuses_prompt_embeddings_with_one_error(name, tmp_path):
    """capture passes ``prompt`` to the pipeline: with ``prompt_embeds`` as well diffusers raised a ValueError that
    printed the whole tensor; ``pooled_prompt_embeds`` without them was silently replaced by the prompt's own."""
    pipe = tiny_flux_pipeline()
    embeds, pooled, _ = pipe.encode_prompt("a red circle", None, max_sequence_length=16)
    given = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled} if name == "prompt_embeds" else {name: pooled}
    with pytest.raises(AttnscopeError, match=rf"{name}: capture runs the pipeline on `prompt`.*ats.Recorder"):
        ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "x.zarr", num_inference_steps=2, height=32,
                    width=32, max_sequence_length=16, **given)
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_a_negative_prompt_the_pipeline_would_not_read_is_refused(family, tmp_path):
    """FLUX.1 reads a negative prompt only with ``true_cfg_scale > 1``, PixArt (and every guided pipeline) only with
    ``guidance_scale > 1``; otherwise diffusers drops it without a word. capture recorded it in the manifest as the
    run's negative prompt, for an image the negative prompt never touched."""
    import torch

    if family == "flux":
        pipe, kw, scale = tiny_flux_pipeline(), dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16), \
            "true_cfg_scale"
    else:
        pipe, kw, scale = tiny_pixart_pipeline(), dict(PIXART_KW, guidance_scale=1.0), "guidance_scale"
    images = [pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **kw, **extra).images
              for extra in ({}, {"negative_prompt": "a big black dog"})]
    assert np.array_equal(*images)                                    # the pipeline ignored the negative prompt
    with pytest.raises(AttnscopeError, match=rf"negative_prompt='a big black dog': {type(pipe).__name__} reads a "
                                             rf"negative prompt only with {scale} > 1"):
        ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "x.zarr", negative_prompt="a big black dog", **kw)
    assert not (tmp_path / "x.zarr").exists()
    ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "y.zarr", negative_prompt="a big black dog",
                **{**kw, scale: 2.0})                                 # guidance on: the negative prompt is read
