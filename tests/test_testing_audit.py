"""Audit of attnscope.testing as a user sees it: saved pipelines load back, building leaves the caller's RNG alone,
tokenizer directories can be shared, and bad arguments are one clear AttnscopeError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import testing as T
from attnscope.errors import AttnscopeError


def _images(pipe, **kwargs):
    out = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), **kwargs)
    return np.stack([np.asarray(image) for image in out.images])


# ----------------------------------------------------------------------------- save and load back
def test_flux2_dev_saved_loads_back_with_the_same_images(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = T.tiny_flux2_dev_pipeline(num_layers=1, num_single_layers=1)
    expected = _images(pipe, max_sequence_length=48)
    pipe.save_pretrained(tmp_path)
    for loaded in (ats.load_pipeline(tmp_path),
                   DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True, use_safetensors=True)):
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded.tokenizer).__name__ == "PixtralTextProcessor"
        assert loaded.tokenizer.chat_template == pipe.tokenizer.chat_template
        assert loaded.tokenizer.tokenizer.padding_side == "left"
        np.testing.assert_array_equal(_images(loaded, max_sequence_length=48), expected)


# ----------------------------------------------------------------------------- RNG
def test_tiny_clip_model_keeps_the_global_rng_and_is_seeded(tmp_path):
    tok = T.make_clip_tokenizer(tmp_path)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, _ = T.tiny_clip_model(tok, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    again, _ = T.tiny_clip_model(tok, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


# ----------------------------------------------------------------------------- tokenizer directories
def _prompt_ids(pipe):
    return pipe.tokenizer("a red elephant and a zebra").input_ids


def test_tokenizer_dir_reused_after_another_family_gives_the_same_tokenizer(tmp_path):
    T.tiny_pixart_pipeline(tokenizer_dir=tmp_path, num_layers=1)  # leaves a T5 tokenizer.json there
    reused = T.tiny_sd_pipeline(tokenizer_dir=tmp_path)
    assert _prompt_ids(reused) == _prompt_ids(T.tiny_sd_pipeline())
    assert reused.tokenizer.convert_ids_to_tokens(reused.tokenizer("a red").input_ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "<|endoftext|>"]


def test_tokenizer_dir_reused_keeps_no_chat_template_of_another_tokenizer(tmp_path):
    T.make_qwen_tokenizer(tmp_path)  # writes chat_template.jinja
    assert T.make_gemma_tokenizer(tmp_path).chat_template is None
    assert T.make_t5_tokenizer(tmp_path).chat_template is None


BUILDERS = {
    "tiny_sd_pipeline": T.tiny_sd_pipeline, "tiny_sdxl_pipeline": T.tiny_sdxl_pipeline,
    "tiny_sd3_pipeline": T.tiny_sd3_pipeline, "tiny_flux_pipeline": T.tiny_flux_pipeline,
    "tiny_flux2_pipeline": T.tiny_flux2_pipeline, "tiny_flux2_dev_pipeline": T.tiny_flux2_dev_pipeline,
    "tiny_pixart_pipeline": T.tiny_pixart_pipeline, "tiny_sana_pipeline": T.tiny_sana_pipeline,
    "sd15_structure_pipeline": T.sd15_structure_pipeline,
}


@pytest.mark.parametrize("name", BUILDERS)
def test_tokenizer_dir_that_is_a_file_is_an_error(name, tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(AttnscopeError, match="tokenizer_dir=.*not-a-dir"):
        BUILDERS[name](tokenizer_dir=path)


@pytest.mark.parametrize("name", BUILDERS)
def test_tokenizer_dir_of_a_wrong_type_is_an_error(name):
    with pytest.raises(AttnscopeError, match="tokenizer_dir=5"):
        BUILDERS[name](tokenizer_dir=5)


@pytest.mark.parametrize("maker", [T.make_clip_tokenizer, T.make_t5_tokenizer, T.make_qwen_tokenizer,
                                   T.make_gemma_tokenizer])
def test_tokenizer_directory_that_is_a_file_is_an_error(maker, tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(AttnscopeError, match="directory=.*file.txt"):
        maker(path)


# ----------------------------------------------------------------------------- bad arguments
BAD = [
    (T.tiny_sd_pipeline, dict(seed="a"), "seed='a'"),
    (T.tiny_sd_pipeline, dict(seed=1.5), "seed=1.5"),
    (T.tiny_sd_pipeline, dict(seed=None), "seed=None"),
    (T.tiny_sd_pipeline, dict(seed=True), "seed=True"),
    (T.tiny_sd_pipeline, dict(scheduler="pndm"), "scheduler='pndm'"),
    (T.tiny_sd_pipeline, dict(linear_projection="no"), "linear_projection='no'"),
    (T.tiny_sdxl_pipeline, dict(seed="x"), "seed='x'"),
    (T.tiny_sd3_pipeline, dict(num_layers=0), "num_layers=0"),
    (T.tiny_sd3_pipeline, dict(num_layers="2"), "num_layers='2'"),
    (T.tiny_sd3_pipeline, dict(dual_attention="yes"), "dual_attention='yes'"),
    (T.tiny_flux_pipeline, dict(num_layers=0), "num_layers=0"),
    (T.tiny_flux_pipeline, dict(num_single_layers=-1), "num_single_layers=-1"),
    (T.tiny_flux_pipeline, dict(guidance_embeds="no"), "guidance_embeds='no'"),
    (T.tiny_flux2_pipeline, dict(num_layers=0), "num_layers=0"),
    (T.tiny_flux2_dev_pipeline, dict(num_layers=0), "num_layers=0"),
    (T.tiny_flux2_dev_pipeline, dict(seed=2.0), "seed=2.0"),
    (T.tiny_pixart_pipeline, dict(num_layers=0), "num_layers=0"),
    (T.tiny_pixart_pipeline, dict(sigma="no"), "sigma='no'"),
    (T.tiny_sana_pipeline, dict(num_layers=0), "num_layers=0"),
    (T.flux_structure_pipeline, dict(num_layers=1, num_single_layers=1, heads=0, head_dim=32), "heads=0"),
    (T.flux_structure_pipeline, dict(num_layers=1, num_single_layers=1, heads=2, head_dim=16), "head_dim=16"),
    (T.flux2_structure_pipeline, dict(num_layers=1, num_single_layers=1, heads=2, head_dim=12), "head_dim=12"),
    (T.flux2_structure_pipeline, dict(num_layers=0, heads=2, head_dim=16), "num_layers=0"),
    (T.sd3_structure_pipeline, dict(num_layers=0, heads=2, head_dim=32), "num_layers=0"),
    (T.sd3_structure_pipeline, dict(num_layers=1, heads=0, head_dim=32), "heads=0"),
    (T.pixart_structure_pipeline, dict(num_layers=0, heads=2, head_dim=8), "num_layers=0"),
    (T.sana_structure_pipeline, dict(num_layers=1, heads=2, head_dim=0), "head_dim=0"),
]


@pytest.mark.parametrize("builder,kwargs,match", BAD, ids=[f"{b.__name__}-{m}" for b, _, m in BAD])
def test_bad_builder_arguments_are_one_clear_error(builder, kwargs, match):
    with pytest.raises(AttnscopeError, match=match.replace("(", r"\(").replace(".", r"\.")):
        builder(**kwargs)


def test_flux_structure_head_dims_it_accepts_run():
    pipe = T.flux_structure_pipeline(num_layers=1, num_single_layers=1, heads=2, head_dim=32)
    assert _images(pipe, max_sequence_length=8).shape == (1, 32, 32, 3)
    pipe = T.flux2_structure_pipeline(num_layers=1, num_single_layers=1, heads=2, head_dim=8)
    assert _images(pipe, max_sequence_length=8).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("maker", [T.make_t5_tokenizer, T.make_qwen_tokenizer, T.make_gemma_tokenizer])
@pytest.mark.parametrize("words,match", [("red", "words='red'"), (["red car"], "red car"), ([""], "''"),
                                         ([3], "3")])
def test_bad_tokenizer_words_are_one_clear_error(maker, words, match, tmp_path):
    with pytest.raises(AttnscopeError, match=match):
        maker(tmp_path, words=words)


@pytest.mark.parametrize("maker", [T.make_t5_tokenizer, T.make_gemma_tokenizer])
def test_bad_split_is_one_clear_error(maker, tmp_path):
    with pytest.raises(AttnscopeError, match="elephant"):
        maker(tmp_path, split={"elephant": 9})


@pytest.mark.parametrize("kwargs,match", [(dict(tokenizer=None), "tokenizer=None"),
                                          (dict(image_size=4), "image_size=4"),
                                          (dict(hidden_size=30), "hidden_size=30"),
                                          (dict(seed="0"), "seed='0'")])
def test_tiny_clip_model_bad_arguments(kwargs, match, tmp_path):
    kwargs = {"tokenizer": T.make_clip_tokenizer(tmp_path), **kwargs}
    with pytest.raises(AttnscopeError, match=match):
        T.tiny_clip_model(**kwargs)
