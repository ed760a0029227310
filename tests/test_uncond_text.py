"""The unconditional rows read the negative prompt: their stored maps are labelled with its tokens and roles, on
every family that encodes one (UNets, SD3, Sana), and with no text where no encoder ran for it (SDXL's zeros)."""

from __future__ import annotations

import numpy as np
import pytest

import attnscope as ats
from attnscope.testing import tiny_sana_pipeline, tiny_sd3_pipeline

from .conftest import RUN

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def _clip(words):
    return [SOT, *(f"{w}</w>" for w in words.split()), EOT]


def test_uncond_maps_carry_each_prompts_negative_text(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, ["a red circle", "a blue square"], seed=0, store=tmp_path / "a.zarr", branch="both",
                     negative_prompt=["a big black dog", "a cat"], num_images_per_prompt=2, **RUN)
    cond, uncond = tr.attention(tr.sites[0]), tr.attention(tr.sites[0], "uncond")
    pairs = [("a red circle", "a big black dog")] * 2 + [("a blue square", "a cat")] * 2   # prompt-major samples
    for sample, (prompt, negative) in enumerate(pairs):
        n = len(_clip(negative))
        assert uncond.token_text.values[sample, :n].tolist() == _clip(negative)
        assert uncond.token_role.values[sample, :n + 1].tolist() == ["sot", *["word"] * (n - 2), "eot", "pad"]
        assert cond.token_text.values[sample, :len(_clip(prompt))].tolist() == _clip(prompt)
    assert tr.tokens[:5] == _clip("a red circle")                        # the trace's words stay the prompt's


def test_an_uncond_trace_is_measured_on_its_negative_prompt(sd_pipe, tmp_path):
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "u.zarr", branch="uncond",
                     negative_prompt="a big dog", **RUN)
    ds = ats.stats.dominance(tr, targets=["dog"])
    a = tr.attention(tr.sites[0]).values.astype(np.float64).mean(2).sum((2, 3))   # (step, sample, token) mass
    words = a[..., 1:4]                                                           # a big dog
    np.testing.assert_allclose(ds.target_share.sel(target="dog").isel(site=0).values, words[..., 2] / words.sum(-1),
                               rtol=2e-3)
    with pytest.raises(ats.AttnscopeError, match="target 'circle' is not in the prompt; its words are: a, big, dog"):
        ats.stats.dominance(tr, targets=["circle"])
    # the default negative prompt is empty: start and end of text, then padding
    empty = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "e.zarr", branch="both", **RUN)
    uncond = empty.attention(empty.sites[0], "uncond")
    assert uncond.token_text.values[0, :3].tolist() == [SOT, EOT, EOT]
    assert uncond.token_role.values[0, :3].tolist() == ["sot", "eot", "pad"]


def test_sdxl_zeros_have_no_text_and_a_negative_prompt_has_its_own(sdxl_pipe, tmp_path):
    zeros = ats.capture(sdxl_pipe, "a red circle", seed=0, store=tmp_path / "z.zarr", branch="both", **RUN)
    uncond = zeros.attention(zeros.sites[0], "uncond")               # force_zeros_for_empty_prompt: no encoder ran
    assert set(uncond.token_text.values.ravel()) == {""} and set(uncond.token_role.values.ravel()) == {"pad"}
    given = ats.capture(sdxl_pipe, "a red circle", seed=0, store=tmp_path / "n.zarr", branch="both",
                        negative_prompt="a dog", **RUN)
    assert given.attention(given.sites[0], "uncond").token_text.values[0, :4].tolist() == _clip("a dog")


def test_sd3_keeps_the_positions_of_a_longer_negative_prompt(tmp_path):
    pipe = tiny_sd3_pipeline()
    negative = "a big black dog with glasses"
    tr = ats.capture(pipe, "a cat", seed=1, store=tmp_path / "s.zarr", branch="both", guidance_scale=4.0,
                     negative_prompt=negative, max_sequence_length=16, **RUN)
    assert tr.manifest["capture"]["tokens"] == "prompt"
    uncond, cond = tr.attention(tr.sites[0], "uncond"), tr.attention(tr.sites[0])
    t5 = ["\u2581" + w for w in negative.split()] + ["</s>"]
    assert uncond.token_text.values[0].tolist() == _clip(negative) + t5      # every CLIP and T5 piece of it
    assert cond.token_text.values[0, :4].tolist() == _clip("a cat")
    assert cond.token_role.values[0, 4] == "pad"                              # past the prompt: its padding
    # only the prompt's own positions without an uncond branch
    plain = ats.capture(pipe, "a cat", seed=1, store=tmp_path / "p.zarr", guidance_scale=4.0,
                        negative_prompt=negative, max_sequence_length=16, **RUN)
    assert len(plain.tokens) == 4 + 3


def test_sana_negative_prompt_is_encoded_without_the_instruction(tmp_path):
    tr = ats.capture(tiny_sana_pipeline(), "a red circle", seed=0, store=tmp_path / "n.zarr", branch="both",
                     negative_prompt="a big dog", use_resolution_binning=False, **RUN)
    uncond = tr.attention(tr.sites[0], "uncond")
    assert uncond.token_text.values[0].tolist() == ["<bos>", "a", "\u2581big", "\u2581dog"]
    assert uncond.token_role.values[0].tolist() == ["sot", "word", "word", "word"]
