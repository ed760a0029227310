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


def test_a_prompt_given_as_embeddings_is_not_labelled_with_its_negative_prompt(sd_pipe, tmp_path):
    """With ``prompt_embeds`` and a text negative prompt the only text encoded is the negative's: the cond maps were
    labelled with its words ("dog" measurable on the prompt's maps). Now they have no text, the uncond maps have
    the negatives', and the next run of the same block is labelled with its own prompt."""
    embeds, _ = sd_pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 1, False)
    store = tmp_path / "e.zarr"
    with ats.hooks(sd_pipe, ats.Recorder(store, branch="both")):
        sd_pipe(prompt_embeds=embeds, negative_prompt=["a big black dog", "a cat"], num_images_per_prompt=2, **RUN)
    assert sd_pipe.encode_prompt.__func__ is type(sd_pipe).encode_prompt  # the method is the class's again
    tr = ats.open_trace(store)
    cond, uncond = tr.attention(tr.sites[0]), tr.attention(tr.sites[0], "uncond")
    assert set(cond.token_text.values.ravel()) == {""}
    for sample, negative in enumerate(["a big black dog"] * 2 + ["a cat"] * 2):
        assert uncond.token_text.values[sample, :len(_clip(negative))].tolist() == _clip(negative)
    with pytest.raises(ats.AttnscopeError, match="not in the prompt"):
        ats.stats.dominance(tr, targets=["dog"])

    class Texts:  # what each run's first step says of its text
        seen: list = []

        def stages(self, ctx):
            return ()

        def on_step(self, ctx):
            if ctx.step == 0:
                self.seen.append((ctx.token_text, ctx.uncond_token_text[0][:3]))

    with ats.hooks(sd_pipe, Texts()):  # embeddings, then text, then embeddings again, in one block
        sd_pipe(prompt_embeds=embeds[:1], negative_prompt="a cat", **RUN)
        sd_pipe("a blue square", negative_prompt="a dog", **RUN)
        sd_pipe(prompt_embeds=embeds[1:], negative_prompt="a red circle", **RUN)
    assert Texts.seen == [(None, tuple(_clip("a cat")[:3])), (((*_clip("a blue square"),) + (EOT,) * 72,),
                                                            tuple(_clip("a dog")[:3])),
                          (None, tuple(_clip("a red circle")[:3]))]


def test_the_watch_on_encode_prompt_goes_after_an_error(sd_pipe):
    mine = sd_pipe.encode_prompt
    with pytest.raises(ValueError), ats.hooks(sd_pipe):
        assert sd_pipe.encode_prompt is not mine
        raise ValueError("mid-run")
    assert "encode_prompt" not in vars(sd_pipe) and sd_pipe.encode_prompt == mine


def test_flux_true_cfg_with_prompt_embeddings_does_not_take_the_negative_as_the_prompt():
    """Flux encodes a true-CFG negative prompt in a second ``encode_prompt`` call: with the prompt given as
    embeddings, the negative's T5 ids were taken as the prompt's."""
    from attnscope.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    run = dict(negative_prompt="a big dog", true_cfg_scale=2.0, max_sequence_length=16, **RUN)
    embeds, pooled, _ = pipe.encode_prompt("a red circle", "a red circle", device="cpu", max_sequence_length=16)

    class Texts:
        seen: list = []

        def stages(self, ctx):
            return ()

        def on_step(self, ctx):
            if ctx.step == 0:
                self.seen.append(ctx.token_text and ctx.token_text[0][:4])

    with ats.hooks(pipe, Texts()):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **run)
        pipe("a blue square", **run)
    assert Texts.seen == [None, ("▁a", "▁blue", "▁square", "</s>")]


def test_one_negative_prompt_serves_several_prompts(sd_pipe, tmp_path):
    """diffusers raises a TypeError for a string negative with a list of prompts: `attnscope capture --prompt A
    --prompt B --negative-prompt N` crashed with a traceback. Now the one negative serves every prompt."""
    tr = ats.capture(sd_pipe, ["a red circle", "a blue square"], seed=0, store=tmp_path / "a.zarr", branch="both",
                     negative_prompt="a dog", **RUN)
    uncond = tr.attention(tr.sites[0], "uncond")
    for sample in range(2):
        assert uncond.token_text.values[sample, :4].tolist() == _clip("a dog")
    assert tr.manifest["run"]["negative_prompt"] == ["a dog", "a dog"]
    with pytest.raises(ats.AttnscopeError, match=r"negative_prompt=\['x'\]: 1 negative prompts for 2 prompts"):
        ats.capture(sd_pipe, ["a red circle", "a blue square"], seed=0, store=tmp_path / "b.zarr",
                    negative_prompt=["x"], **RUN)
    assert not (tmp_path / "b.zarr").exists()
    from .conftest import cli

    done = cli("capture", "--prompt", "a red circle", "--prompt", "a green triangle", "--negative-prompt", "yellow",
               "--seed", "0", "--steps", "2", "--branch", "both", "--out", tmp_path / "c.zarr")
    assert done.exit_code == 0, done.stderr
    assert ats.open_trace(tmp_path / "c.zarr").manifest["run"]["negative_prompt"] == ["yellow", "yellow"]
