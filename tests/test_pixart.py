"""PixArt-α/Σ (a flat stack of cross-attention layers with masked T5 padding): sites, stored maps against an
independent float64 computation from each module's own projections, bit-identity, restoration, tokens,
statistics, interventions, rerun, and TGATE against the official ``tgate`` package."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.hooks import discover_self_sites, find_denoiser
from attnscope.testing import tiny_pixart_pipeline

from .family_checks import (
    ProbsRecorder,
    assert_stored_maps_match_reference,
    check_heatmaps_and_compare,
    check_hooks_are_transparent,
    check_regulation,
    check_reweight,
    record_cross_inputs,
)

KW = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, use_resolution_binning=False,
          clean_caption=False)


@pytest.fixture(scope="module")
def alpha():
    return tiny_pixart_pipeline()


@pytest.fixture(scope="module")
def sigma():
    return tiny_pixart_pipeline(sigma=True, num_layers=3)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- sites
def test_sites_are_a_flat_stack_named_by_depth(alpha, sigma):
    sites = ats.discover_sites(sigma)
    assert [(s.name, s.kind, s.block, s.level, s.depth, s.patch) for s in sites] == [
        ("transformer_blocks.0.attn2", "cross", "early", 0, 0, 2),
        ("transformer_blocks.1.attn2", "cross", "middle", 0, 1, 2),
        ("transformer_blocks.2.attn2", "cross", "late", 0, 2, 2),
    ]
    assert (sites[0].heads, sites[0].head_dim, sites[0].token_dim) == (3, 8, 24)
    assert sites[0].spatial_shape((16, 24)) == (8, 12)                       # 32 x 48 px, VAE /2, patch 2
    assert [s.name for s in discover_self_sites(alpha)] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert find_denoiser(alpha)[0] == "pixart"
    # a flat stack's default regulation sites: its late third; a stack too short for one: its last layer
    assert ats.regulate.default_regulation_sites(sites, (16, 16)) == ["transformer_blocks.2.attn2"]
    assert ats.regulate.default_regulation_sites(ats.discover_sites(alpha), (16, 16)) == ["transformer_blocks.1.attn2"]


# ----------------------------------------------------------------------------- stored maps
def test_stored_probs_equal_a_float64_computation_padding_masked(sigma, tmp_path):
    inputs, handles = record_cross_inputs(sigma)
    try:
        tr = ats.capture(sigma, ["a red circle", "a blue elephant"], seed=[1, 2, 3, 4], store=tmp_path / "t.zarr",
                         heads="all", tokens="all", branch="both", num_images_per_prompt=2, **{**KW, "width": 48})
    finally:
        for h in handles:
            h.remove()
    assert_stored_maps_match_reference(sigma, tr, inputs, (8, 12), samples=4)
    stored = tr.attention(tr.sites[0]).values
    assert tr.tokens[5:] == ["<pad>"] * 11                                     # both prompts end by position 4
    assert float(np.abs(stored[..., 5:]).max()) == 0.0                          # masked padding: exactly no mass
    np.testing.assert_allclose(stored.astype(np.float64).sum(-1), 1.0, atol=3e-3)  # rows are a softmax over text
    assert (tr.attention(tr.sites[0]).sizes["y"], tr.attention(tr.sites[0]).sizes["x"]) == (8, 12)
    assert tr.images[0].size == (48, 32)


# ----------------------------------------------------------------------------- bit-identity, restoration
def test_no_client_and_observers_are_bit_identical_and_processors_come_back(alpha):
    observer = check_hooks_are_transparent(
        alpha, lambda: alpha("a red circle", generator=_gen(5), output_type="np", **KW).images, exact=True)
    assert observer.calls == 2 * len(ats.discover_sites(alpha))
    assert all(p.shape[0] == 2 for seen in observer.seen.values() for p in seen)   # [uncond; cond]: guidance read


def test_without_guidance_every_row_is_a_sample(alpha, tmp_path):
    tr = ats.capture(alpha, "a red circle", seed=0, store=tmp_path / "g.zarr", guidance_scale=1.0, **KW)
    assert tr.attention(tr.sites[0]).sizes["sample"] == 1
    with pytest.raises(AttnscopeError, match="guidance"):
        ats.capture(alpha, "a red circle", seed=0, store=tmp_path / "u.zarr", branch="uncond", guidance_scale=1.0, **KW)


# ----------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("variant, length", [("alpha", 120), ("sigma", 300)])
def test_tokens_and_words_as_the_model_saw_them(variant, length, alpha, sigma, tmp_path):
    pipe = alpha if variant == "alpha" else sigma
    kw = {k: v for k, v in KW.items() if k != "max_sequence_length"}         # the pipeline's own default length
    tr = ats.capture(pipe, "a red elephant", seed=0, store=tmp_path / "a.zarr", tokens="all", **kw)
    assert len(tr.tokens) == length
    assert tr.tokens[:6] == ["\u2581a", "\u2581red", "\u2581ele", "phant", "</s>", "<pad>"]
    assert tr.words == {"a": [0], "red": [1], "elephant": [2, 3]}
    assert tr.manifest["run"]["segments"] == [["t5", length]]
    auto = ats.capture(pipe, "a red elephant", seed=0, store=tmp_path / "b.zarr", **kw)
    assert auto.manifest["capture"]["tokens"] == "prompt"                     # T5: the prompt, not the padding
    assert auto.tokens == ["\u2581a", "\u2581red", "\u2581ele", "phant", "</s>"]
    np.testing.assert_array_equal(auto.attention(auto.sites[0]).values, tr.attention(tr.sites[0]).values[..., :5])


def test_dominance_counts_padding_as_padding_and_heatmaps_draw(alpha, tmp_path):
    tr = ats.capture(alpha, "a red circle", seed=0, store=tmp_path / "d.zarr", tokens="all", **KW)
    ds = ats.stats.dominance(tr, targets=["red", "circle"])
    assert list(ds["word"].values) == ["a", "red", "circle"]
    a = tr.attention(tr.sites[0]).values.astype(np.float64).mean(2)              # head mean: (step, sample, y, x, token)
    mass = a.sum((2, 3))                                                          # (step, sample, token)
    share = mass[..., 1:3] / mass[..., :3].sum(-1, keepdims=True)
    np.testing.assert_allclose(ds["target_share"].isel(site=0).values, share, rtol=1e-3)
    eos = tr.tokens.index("</s>")
    np.testing.assert_allclose(ds["sink_share"].isel(site=0).values, mass[..., eos] / mass.sum(-1), rtol=1e-3)
    fig = ats.plot.heatmaps(tr, words=["red", "circle"])
    assert len(fig.axes) >= 2


def test_images_of_prompts_of_different_lengths_keep_their_own_padding(alpha, tmp_path):
    # PixArt repeats mask and embeddings in the same order (Sana does not: tests/test_sana.py); the mask check passes
    tr = ats.capture(alpha, ["a red circle", "a blue square and a dog"], seed=5, num_images_per_prompt=2,
                     store=tmp_path / "m.zarr", tokens="all", **KW)
    m = tr.attention(tr.sites[0]).isel(step=-1).sum(["head", "y", "x"]).compute()
    pad = m.token_role.values == "pad"
    assert pad[0].sum() > pad[2].sum() and float(m.values[pad].max()) == 0.0 and (m.values[~pad] > 0).all()


# ----------------------------------------------------------------------------- interventions
def test_regulation_edits_only_the_target_columns_of_the_late_layers(sigma):
    check_regulation(sigma, lambda: sigma("a red circle", generator=_gen(3), output_type="np", **KW).images,
                     ["circle"], column=2, expected_sites={"transformer_blocks.2.attn2"}, uncond=slice(0, 1))


def test_regulation_gives_back_only_the_end_of_text_column_on_t5(sigma):
    """T5 prompts have no start-of-text token: column 0 is a word and stays regulated when targeted."""
    reg = ats.regulate.AttentionRegulation(["a"], iterations=2, sites="transformer_blocks.1.attn2")
    plain, regulated = ProbsRecorder(), ProbsRecorder()
    with ats.hooks(sigma, plain):
        sigma("a red circle", generator=_gen(3), **KW)
    with ats.hooks(sigma, reg, regulated):
        sigma("a red circle", generator=_gen(3), **KW)
    now, before = regulated.seen["transformer_blocks.1.attn2"][0], plain.seen["transformer_blocks.1.attn2"][0]
    assert not torch.allclose(now[1:, ..., 0], before[1:, ..., 0])              # the target "a" (column 0) moved
    assert torch.equal(now[1:, ..., 3], before[1:, ..., 3])                       # "</s>" given back unedited


def test_reweight_scales_only_its_columns(alpha):
    check_reweight(alpha, lambda: alpha("a red circle", generator=_gen(3), **KW), "circle", column=2,
                   site="transformer_blocks.1.attn2", cond=slice(1, 2))


def test_rerun_is_bit_exact_heatmaps_and_compare_work(alpha, tmp_path):
    tr = ats.capture(alpha, "a red circle and a blue square", seed=4, store=tmp_path / "a.zarr", **KW)
    again = ats.rerun(tr, pipe=alpha, store=tmp_path / "b.zarr")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(tr.images[0]))
    np.testing.assert_array_equal(again.attention(tr.sites[0]).values, tr.attention(tr.sites[0]).values)
    check_heatmaps_and_compare(alpha, tmp_path, ["red", "circle"], **KW)


def test_capture_stats_and_rerun_commands_on_a_saved_pixart_pipeline(alpha, tmp_path):
    from .conftest import cli

    alpha.save_pretrained(tmp_path / "pixart")
    out = tmp_path / "run.zarr"
    done = cli("capture", "--model", str(tmp_path / "pixart"), "--prompt", "a red circle", "--seed", "1", "--steps", "2",
               "--height", "32", "--width", "32", "--max-sequence-length", "16", "--set", "use_resolution_binning=false",
               "--set", "clean_caption=false", "--out", str(out))
    assert done.exit_code == 0, done.stderr
    tr = ats.open_trace(out)
    assert tr.manifest["run"]["pipeline_kwargs"]["use_resolution_binning"] is False
    bad = cli("capture", "--model", str(tmp_path / "pixart"), "--prompt", "a", "--set", "no-equals", "--out",
              str(tmp_path / "bad.zarr"))
    assert bad.exit_code == 2 and "NAME=VALUE" in bad.stderr and not (tmp_path / "bad.zarr").exists()
    bad = cli("capture", "--model", str(tmp_path / "pixart"), "--prompt", "a", "--set", "clean_captoin=false", "--out",
              str(tmp_path / "bad.zarr"))  # PixArt's __call__ swallows unknown keywords: it was run and recorded
    assert bad.exit_code == 2 and not (tmp_path / "bad.zarr").exists()
    assert bad.stderr.strip().splitlines()[-1].startswith("error: pipeline argument 'clean_captoin': PixArtAlphaPipeline does not take "
                                         "it (did you mean clean_caption?)")
    done = cli("stats", str(tr.path), "--targets", "red,circle", "--by", "site")
    assert done.exit_code == 0, done.stderr
    assert "transformer_blocks.1.attn2" in done.stdout
    done = cli("rerun", str(tr.path), "--out", str(tmp_path / "re.zarr"))
    assert done.exit_code == 0, done.stderr
    assert np.array_equal(np.asarray(ats.open_trace(tmp_path / "re.zarr").images[0]), np.asarray(tr.images[0]))


# ----------------------------------------------------------------------------- TGATE
@pytest.mark.parametrize("gate", [2, 4, 6])
def test_tgate_matches_the_official_package(gate):
    """attnscope's TGate through the hook core against the official ``TgatePixArtAlphaLoader`` (V2 schedule)."""
    tgate = pytest.importorskip("tgate")
    kw = {**KW, "num_inference_steps": 8, "output_type": "latent"}
    prompt = "a red circle and a blue square"
    plain = tiny_pixart_pipeline()(prompt, generator=_gen(), **kw).images
    official_pipe = tgate.TgatePixArtAlphaLoader(tiny_pixart_pipeline())  # the official code patches its modules for good
    official = official_pipe.tgate(prompt, generator=_gen(), gate_step=gate, sp_interval=3, fi_interval=1, warm_up=2,
                                   **kw).images
    pipe = tiny_pixart_pipeline()
    gate_client = ats.regulate.TGate(gate, sp_interval=3, fi_interval=1, warm_up=2)
    with ats.hooks(pipe, gate_client):
        ours = pipe(prompt, generator=_gen(), **kw).images
    official_effect = float((official - plain).abs().mean())
    assert official_effect > 1e-4                                                # the gate changes the result
    assert float((ours - official).abs().mean()) <= 0.05 * official_effect
    assert gate_client.gated_steps == list(range(gate, 8))
    assert gate_client.computed["transformer_blocks.0.attn2"] == list(range(gate))


def test_tgate_drops_guidance_after_the_gate(alpha, tmp_path):
    seen = ProbsRecorder()
    with ats.hooks(alpha, ats.regulate.TGate(2), seen):
        alpha("a red circle", generator=_gen(), **{**KW, "num_inference_steps": 4})
    assert [p.shape[0] for p in seen.seen["transformer_blocks.0.attn2"]] == [2, 2]   # steps 2, 3: cached, no CFG


def test_a_prompt_the_pipeline_would_cut_is_refused(alpha, tmp_path):
    with pytest.raises(AttnscopeError, match="12 T5 tokens"):
        ats.capture(alpha, "a red circle and a blue square and a green triangle", seed=0, store=tmp_path / "x.zarr",
                    **{**KW, "max_sequence_length": 8})
    assert not (tmp_path / "x.zarr").exists()


def test_statistics_by_block_on_a_flat_stack(sigma, tmp_path):
    from attnscope.stats import dominance_table

    tr = ats.capture(sigma, "a red circle", seed=0, store=tmp_path / "b.zarr", **KW)
    ds = ats.stats.dominance(tr, targets=["red", "circle"])
    assert ds["block"].values.tolist() == ["early", "middle", "late"] and ds["depth"].values.tolist() == [0, 1, 2]
    table = dominance_table(ds, by="block")
    rows = [line.split()[0] for line in table.splitlines()[2:]]
    assert rows == ["early", "middle", "late"]                                  # forward order, not alphabetical
    middle = ds.sel(site="transformer_blocks.1.attn2").mean("step")
    assert f"{float(middle.target_share.sel(target='circle')[0]) * 100:.1f}%" in table.splitlines()[3]
