"""Tests for the tiny offline diffusion-transformer pipelines (SD3, Flux.1) and the T5 tokenizer in
:mod:`attnscope.testing`."""

import pytest
import torch

from attnscope.testing import make_t5_tokenizer, tiny_flux_pipeline, tiny_sd3_pipeline

RUN = dict(num_inference_steps=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return make_t5_tokenizer(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def run(pipe, prompt="a red circle", height=32, width=32, **kw):
    return pipe(prompt, height=height, width=width, generator=torch.Generator().manual_seed(0), **{**RUN, **kw})


def attention_inputs(pipe, **kw):
    """Map every attention module of the transformer to (image or joint length, text length or None)."""
    seen, handles = {}, []
    for name, module in pipe.transformer.named_modules():
        if name.rpartition(".")[2] in ("attn", "attn2"):
            def hook(mod, args, kwargs, name=name):
                hidden = args[0] if args else kwargs["hidden_states"]
                text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                seen[name] = (hidden.shape[1], None if text is None else text.shape[1])
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run(pipe, **kw)
    finally:
        for h in handles:
            h.remove()
    return seen


# ----------------------------------------------------------------------------- T5 tokenizer
def test_t5_tokenizer_pieces_eos_and_padding(t5):
    enc = t5("a red elephant", padding="max_length", max_length=8)
    assert t5.convert_ids_to_tokens(enc.input_ids) == [
        "▁a", "▁red", "▁ele", "phant", "</s>", "<pad>", "<pad>", "<pad>"]
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert enc.input_ids[4] == t5.eos_token_id and enc.input_ids[5:] == [0, 0, 0]
    assert enc.attention_mask == [1] * 5 + [0] * 3
    assert t5.decode(enc.input_ids, skip_special_tokens=True) == "a red elephant"


def test_t5_tokenizer_every_other_word_is_one_piece(t5):
    from attnscope.testing import DEFAULT_WORDS

    for word in DEFAULT_WORDS:
        pieces = t5.convert_ids_to_tokens(t5(word).input_ids)
        assert pieces == (["▁ele", "phant", "</s>"] if word == "elephant" else [f"▁{word}", "</s>"]), word


def test_t5_tokenizer_unknown_words_split_into_characters(t5):
    assert t5.convert_ids_to_tokens(t5("zebra é").input_ids) == ["▁", "z", "e", "b", "r", "a", "▁", "<unk>", "</s>"]


def test_t5_tokenizer_truncation_keeps_eos(t5):
    ids = t5("a red circle and a blue square", max_length=4, truncation=True).input_ids
    assert t5.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁circle", "</s>"]


def test_t5_tokenizer_reloads_and_options(t5, tmp_path):
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(t5.name_or_path)
    assert again("a red elephant").input_ids == t5("a red elephant").input_ids
    assert len(again) == len(t5) and t5.model_max_length == 512
    plain = make_t5_tokenizer(tmp_path / "plain", words=["a", "elephant"], split={}, model_max_length=16)
    assert plain.convert_ids_to_tokens(plain("a elephant").input_ids) == ["▁a", "▁elephant", "</s>"]
    assert plain.model_max_length == 16
    with pytest.raises(ValueError):
        make_t5_tokenizer(tmp_path / "bad", words=["red car"])


# ----------------------------------------------------------------------------- SD3
def test_sd3_runs_and_image_size(sd3):
    out = run(sd3, guidance_scale=2.0)
    assert out.images[0].size == (32, 32)
    assert run(sd3, width=48, guidance_scale=2.0).images[0].size == (48, 32)


def test_sd3_last_block_is_context_pre_only(sd3):
    blocks = sd3.transformer.transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False, True]
    assert [b.attn2 is None for b in blocks] == [True, True]


def test_sd3_joint_attention_sees_clip_and_t5_tokens(sd3):
    # 32x48 px -> 16x24 latent -> 8x12 patches of 2; text = 77 CLIP + 16 T5 tokens.
    seen = attention_inputs(sd3, width=48, guidance_scale=2.0)
    assert seen == {"transformer_blocks.0.attn": (96, 93), "transformer_blocks.1.attn": (96, 93)}


def test_sd3_dual_attention():
    pipe = tiny_sd3_pipeline(dual_attention=True)
    block0, block1 = pipe.transformer.transformer_blocks
    assert block0.attn2 is not None and block1.attn2 is None
    assert pipe.transformer.config.qk_norm == "rms_norm" and block0.attn.norm_q is not None
    seen = attention_inputs(pipe, guidance_scale=2.0)
    assert seen["transformer_blocks.0.attn2"] == (64, None)  # image-only self-attention
    assert run(pipe, guidance_scale=2.0).images[0].size == (32, 32)


def test_sd3_seeded_and_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = tiny_sd3_pipeline(seed=1), tiny_sd3_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        pa, pb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(pa[k], pb[k]) for k in pa), name
    assert not torch.equal(a.text_encoder.text_model.embeddings.token_embedding.weight,
                           a.text_encoder_2.text_model.embeddings.token_embedding.weight)


# ----------------------------------------------------------------------------- Flux
@pytest.mark.parametrize("height,width", [(32, 32), (32, 64), (48, 32)])
def test_flux_runs_and_image_size(flux, height, width):
    assert run(flux, height=height, width=width).images[0].size == (width, height)


def test_flux_batches_and_true_cfg(flux):
    out = run(flux, prompt=["a red circle", "a blue square"], num_images_per_prompt=2)
    assert len(out.images) == 4
    plain = run(flux, output_type="np").images
    cfg = run(flux, negative_prompt="blue", true_cfg_scale=2.0, output_type="np").images
    assert cfg.shape == plain.shape == (1, 32, 32, 3) and abs(cfg - plain).max() > 0


def test_flux_attention_layout(flux):
    # 32x48 px -> 16x24 latent -> 8x12 packed 2x2 tokens; 16 T5 tokens (text first in every attention).
    seen = attention_inputs(flux, width=48)
    assert seen == {
        "transformer_blocks.0.attn": (96, 16), "transformer_blocks.1.attn": (96, 16),
        "single_transformer_blocks.0.attn": (112, None), "single_transformer_blocks.1.attn": (112, None),
    }


def test_flux_guidance_embeds_and_tokenizer_dir(tmp_path):
    pipe = tiny_flux_pipeline(tokenizer_dir=tmp_path, num_layers=1, num_single_layers=1, guidance_embeds=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "t5"]
    assert pipe.transformer.config.guidance_embeds
    assert run(pipe, guidance_scale=3.5).images[0].size == (32, 32)
