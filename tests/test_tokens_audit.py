"""Audit of the word/token alignment, the step and site selection and the `.attn`/region/shape statistics: each test
pins a defect a user met (see the test's docstring), against expectations written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.selection import select_site_names, select_steps
from attnscope.testing import make_clip_tokenizer
from attnscope.tokens import resolve_targets, target_occurrences

DIMS = ("step", "sample", "head", "y", "x", "token")


# ----------------------------------------------------------------------------- steps


def test_a_reversed_slice_selects_the_steps_in_run_order():
    """steps=slice(None, None, -1) gave (19, 18, …, 0): a capture stored its step axis backwards and the convergence
    curve then compared each step with the *next* one."""
    assert select_steps(slice(None, None, -1), 4) == (0, 1, 2, 3)
    assert select_steps(slice(-1, -4, -1), 20) == (17, 18, 19)
    assert select_steps(range(5, 0, -2), 20) == (1, 3, 5)


def test_a_capture_with_a_reversed_slice_keeps_its_steps_in_order(shapes, tmp_path):
    """The same run captured with every step and with a reversed slice must give the same trace and the same
    convergence curve (the reversed one had steps [2, 1, 0] and compared step 1 with step 2)."""
    prompt = "a red circle and a blue square"
    full = ats.capture(shapes, prompt, seed=0, store=tmp_path / "a.zarr", num_inference_steps=3)
    back = ats.capture(
        shapes, prompt, seed=0, store=tmp_path / "b.zarr", num_inference_steps=3, steps=slice(None, None, -1)
    )
    site = full.sites[0]
    assert back.attention(site)["step"].values.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(back.attention(site).values, full.attention(site).values)
    np.testing.assert_allclose(
        ats.stats.convergence(back, of="maps").convergence.values,
        ats.stats.convergence(full, of="maps").convergence.values,
    )


def test_a_zero_dim_array_is_one_step():
    """da.step[-1].values is a 0-d array: select_steps raised a bare TypeError ('iteration over a 0-d array')."""
    assert select_steps(np.array(3), 20) == (3,)
    assert select_steps(np.array(-1), 20) == (19,)
    with pytest.raises(AttnscopeError, match=r"steps=array\(2\.5\)"):
        select_steps(np.array(2.5), 20)


# ----------------------------------------------------------------------------- sites


def test_a_site_predicate_on_bare_names_gives_one_clear_error():
    """capture takes sites=lambda s: s.level == 1 (docs/capture.md); the statistics, which see bare site names, raised
    a raw AttributeError: '_Named' object has no attribute 'level'."""
    with pytest.raises(AttnscopeError, match=r"sites=.*'level'.*name"):
        select_site_names(lambda s: s.level == 1, ["down_blocks.1.attn2", "up_blocks.0.attn2"])
    maps = xr.DataArray(
        np.full((1, 1, 1, 2, 2, 3), 0.25),
        dims=DIMS,
        coords={"token_text": ("token", ["<|startoftext|>", "circle</w>", "<|endoftext|>"])},
    )
    with pytest.raises(AttnscopeError, match=r"sites="):
        ats.stats.map_shape({"up_blocks.0.attn2": maps}, ["circle"], sites=lambda s: s.block == "up")
    # a predicate on the name works there
    ds = ats.stats.map_shape(
        {"up_blocks.0.attn2": maps, "down.attn2": maps}, ["circle"], sites=lambda s: s.name.startswith("up")
    )
    assert ds["site"].values.tolist() == ["up_blocks.0.attn2"]


# ----------------------------------------------------------------------------- words


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip_tokenizer(tmp_path_factory.mktemp("clip"))


def test_clip_numbers_and_contractions_can_be_targeted(clip):
    """CLIP's pre-tokenizer makes every digit a word and keeps "'s" apart: "12" and "dog's" were "not in the prompt"
    on SD 1.x/2.x/XL (the same targets worked on T5 prompts)."""
    tokens = clip.convert_ids_to_tokens(clip("a dog's bone and 12 cats").input_ids)
    # written out by hand: what CLIP makes of the prompt
    assert tokens == [
        "<|startoftext|>",
        "a</w>",
        "dog</w>",
        "'",
        "s</w>",
        "b",
        "o",
        "n",
        "e</w>",
        "and</w>",
        "1</w>",
        "2</w>",
        "c",
        "a",
        "t",
        "s</w>",
        "<|endoftext|>",
    ]
    assert resolve_targets(tokens, ["12", "dog's", "DOG'S bone", "12 cats"]) == {
        "12": [10, 11],
        "dog's": [2, 3, 4],
        "DOG'S bone": [2, 3, 4, 5, 6, 7, 8],
        "12 cats": [10, 11, 12, 13, 14, 15],
    }
    assert target_occurrences(tokens, "12") == [[10, 11]]
    # SD3's axis: CLIP's copy spells "12" as two words, T5's as one; both copies are found
    sd3 = [
        "<|startoftext|>",
        "1</w>",
        "2</w>",
        "dog</w>",
        "'",
        "s</w>",
        "<|endoftext|>",
        "\u258112",
        "\u2581dog",
        "'",
        "s",
        "</s>",
    ]
    assert resolve_targets(sd3, ["12", "dog's"]) == {"12": [1, 2, 7], "dog's": [3, 4, 5, 8, 9, 10]}
    # words CLIP tells apart are still not joined: "dogs" is not "dog" + "'s", "andbone" not "and bone"
    for wrong in ("dogs", "bone12", "2 1"):
        with pytest.raises(AttnscopeError, match="is not in the prompt"):
            resolve_targets(tokens, wrong)


# ----------------------------------------------------------------------------- layout tokens and region share


def test_layout_tokens_drop_leading_article_words_not_word_pieces():
    """A word whose first piece spells an article ("an" + "teater", T5's "▁" + "a") lost that piece: region_share
    and SpatialTemporal then summed half a word, or kept a split article."""
    clip_tokens = ["<|startoftext|>", "a</w>", "an", "teater</w>", "<|endoftext|>"]
    assert ats.stats.layout_tokens(clip_tokens, ["a anteater", "anteater"]) == {
        "a anteater": [2, 3],
        "anteater": [2, 3],
    }
    t5_tokens = ["\u2581an", "te", "ater", "\u2581and", "\u2581", "a", "\u2581cat", "</s>"]
    assert ats.stats.layout_tokens(t5_tokens, ["anteater", "a cat", "a"]) == {
        "anteater": [0, 1, 2],
        "a cat": [6],
        "a": [4, 5],
    }


def test_region_share_sums_every_piece_of_a_word_split_after_an_article_piece():
    """region_share by hand on a 2×2 map: the phrase "an anteater" is "teater" alone in the old rule."""
    tokens = ["<|startoftext|>", "an</w>", "an", "teater</w>", "<|endoftext|>"]
    a = np.zeros((1, 1, 1, 2, 2, 5))
    a[..., 0, 0, 2] = 3.0  # "an" piece: top-left
    a[..., 1, 1, 2] = 1.0  # "an" piece: bottom-right
    a[..., 0, 1, 3] = 2.0  # "teater": top-right
    a[..., 1, 0, 3] = 2.0  # "teater": bottom-left
    maps = xr.DataArray(a, dims=DIMS, coords={"token_text": ("token", tokens)})
    ds = ats.stats.region_share({"s": maps}, {"an anteater": (0.0, 0.0, 1.0, 0.5)})  # the top row
    # the word's mass: top row 3 + 2 = 5 of 3 + 1 + 2 + 2 = 8
    assert ds.region_share.values.ravel().tolist() == [5 / 8]
    assert ds.phrase_tokens.values.tolist() == [["an teater</w>"]]


# ----------------------------------------------------------------------------- map shape functions


def test_histogram_intersection_refuses_maps_of_different_grids():
    """A 1×2 map against a 2×2 map was broadcast to an answer (1.0); a 2×2 against a 3×3 was numpy's bare ValueError."""
    with pytest.raises(AttnscopeError, match=r"a of shape \(1, 2\) and b of shape \(2, 2\)"):
        ats.stats.histogram_intersection(np.ones((1, 2)), np.ones((2, 2)))
    with pytest.raises(AttnscopeError, match=r"\(2, 2\).*\(3, 3\)"):
        ats.stats.histogram_intersection(np.ones((2, 2)), np.ones((3, 3)))
    # leading dims still broadcast: one map against a stack of two, by hand min(.5,.25)+min(.5,.75) = .75 and 1
    out = ats.stats.histogram_intersection(np.array([[1.0, 1.0]]), np.array([[[1.0, 3.0]], [[2.0, 2.0]]]))
    assert out.tolist() == [0.75, 1.0]


def test_top_share_of_a_tiny_fraction_is_the_largest_pixel():
    """⌈fraction · h·w⌉ is 1 for any fraction > 0; a fraction under 5e-10 per pixel took 0 pixels: a share of -0.0."""
    maps = np.array([[4.0, 1.0], [3.0, 2.0]])
    assert ats.stats.top_share(maps, 1e-12).item() == 0.4
