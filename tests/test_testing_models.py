"""Tests for the tiny offline pipelines in :mod:`attnscope.testing`."""

import numpy as np
import pytest
import torch

from attnscope.testing import (
    DEFAULT_WORDS,
    make_clip_tokenizer,
    sd15_structure_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def run(pipe, prompt="a red circle", height=32, width=32, **kw):
    return pipe(prompt, num_inference_steps=2, height=height, width=width,
                generator=torch.Generator().manual_seed(0), **kw)


def attn2_query_lengths(pipe, height, width):
    """Map every ``attn2`` module name to the query length it sees in a run."""
    seen, handles = {}, []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            def hook(mod, args, kwargs, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                seen[name] = hidden.shape[1]
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run(pipe, height=height, width=width)
    finally:
        for h in handles:
            h.remove()
    return seen


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_known_words_round_trip(tok):
    ids = tok("a red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"


def test_tokenizer_every_default_word_is_one_token(tok):
    for word in DEFAULT_WORDS:
        assert tok.convert_ids_to_tokens(tok(word).input_ids)[1:-1] == [word + "</w>"]


def test_tokenizer_out_of_vocab_word_splits(tok):
    ids = tok("zebra").input_ids
    pieces = tok.convert_ids_to_tokens(ids)[1:-1]
    assert len(pieces) > 1 and pieces[-1].endswith("</w>")
    assert "".join(pieces).replace("</w>", "") == "zebra"
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "zebra"


def test_tokenizer_padding_matches_sd(tok):
    assert tok.model_max_length == 77
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    enc = tok("a red circle", padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (1, 77)
    assert enc.input_ids[0, 5:].eq(tok.pad_token_id).all()
    assert enc.attention_mask[0].sum() == 5


def test_tokenizer_directory_reloads(tok):
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tok.name_or_path)
    assert again("a red circle").input_ids == tok("a red circle").input_ids
    assert again.model_max_length == 77


def test_tokenizer_rejects_non_letter_words(tmp_path):
    with pytest.raises(ValueError):
        make_clip_tokenizer(tmp_path, words=["r2d2"])


# ----------------------------------------------------------------------------- SD
@pytest.mark.parametrize("height,width", [(32, 32), (64, 96)])
def test_tiny_sd_runs(sd, height, width):
    image = run(sd, height=height, width=width).images[0]
    assert image.size == (width, height)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_tiny_sd_schedulers_and_linear_projection(scheduler):
    pipe = tiny_sd_pipeline(linear_projection=True, scheduler=scheduler)
    assert pipe.unet.config.use_linear_projection
    assert run(pipe, output_type="np").images.shape == (1, 32, 32, 3)


def test_tiny_sd_is_seeded():
    a, b = (run(tiny_sd_pipeline(seed=3), output_type="np").images for _ in range(2))
    c = run(tiny_sd_pipeline(seed=4), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_tiny_sd_build_keeps_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny_sd_pipeline(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_bad_scheduler_name():
    with pytest.raises(ValueError):
        tiny_sd_pipeline(scheduler="pndm")


def test_tiny_sd_attn2_at_two_resolutions(sd):
    seen = attn2_query_lengths(sd, 32, 32)  # 16x16 latent
    assert sorted(seen) == sorted(
        [f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2" for i in (0, 1)]
        + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
        + [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2"
           for i in (0, 1) for j in (0, 1)])
    assert set(seen.values()) == {16 * 16, 8 * 8}
    for name in seen:
        attn = sd.unet.get_submodule(name)
        assert attn.heads == 8 and attn.cross_attention_dim == 32


# ----------------------------------------------------------------------------- SDXL
@pytest.mark.parametrize("height,width", [(32, 32), (64, 96)])
def test_tiny_sdxl_runs(sdxl, height, width):
    image = run(sdxl, height=height, width=width).images[0]
    assert image.size == (width, height)


def test_tiny_sdxl_structure(sdxl):
    assert sdxl.config.force_zeros_for_empty_prompt
    assert sdxl.text_encoder_2.config.projection_dim == 32
    seen = attn2_query_lengths(sdxl, 32, 32)
    # Two transformer layers in each attention site; cross-attention lives only in
    # the 64-channel level (8x8 latent for 32 px), as in the diffusers dummy SDXL.
    assert len(seen) == 8
    assert {n.split(".attentions")[0] for n in seen} == {
        "down_blocks.1", "mid_block", "up_blocks.0"}
    assert set(seen.values()) == {8 * 8}
    for name in seen:
        attn = sdxl.unet.get_submodule(name)
        assert attn.heads == 4 and attn.cross_attention_dim == 64


# ----------------------------------------------------------------------------- SD 1.5 shape
@pytest.mark.slow
def test_sd15_structure_builds():
    pipe = sd15_structure_pipeline()
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(names) == 16
    assert pipe.unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert pipe.unet.config.cross_attention_dim == 768
    assert pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae_scale_factor == 8
