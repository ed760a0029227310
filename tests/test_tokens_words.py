"""Words of the prompt across tokenizers: punctuation apart in sentencepiece words (T5, Gemma) as CLIP splits it,
non-ASCII CLIP words decoded, numpy ints as positions; on the tiny T5 pipelines (Flux, PixArt, SD3) a word next to
punctuation is found."""

from __future__ import annotations

import numpy as np
import pytest

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.testing import (
    make_clip_tokenizer,
    make_gemma_tokenizer,
    make_t5_tokenizer,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
)
from attnscope.tokens import resolve_targets, token_words, word_alignment

PUNCTUATED = "a red circle, a blue square."
# the words CLIP's pre-tokenizer makes of PUNCTUATED, written out by hand
WORDS = ["a", "red", "circle", ",", "a", "blue", "square", "."]


@pytest.mark.parametrize("make", [make_clip_tokenizer, make_t5_tokenizer, make_gemma_tokenizer])
def test_punctuation_is_a_word_of_its_own_as_in_clip(make, tmp_path):
    tok = make(tmp_path)
    tokens = tok.convert_ids_to_tokens(tok(PUNCTUATED).input_ids)
    spelled = [w for w in token_words(tokens) if w]
    assert [w for i, w in enumerate(spelled) if i == 0 or w != spelled[i - 1]] == WORDS
    circle = resolve_targets(tokens, "circle")["circle"]
    assert [tokens[p].strip("▁Ġ").removesuffix("</w>") for p in circle] == ["circle"]


def test_t5_pieces_by_hand():
    tokens = ["▁a", "▁circle", ",", "▁ele", "phant", "!", "!", "▁", "(", "x", ")", "</s>"]
    assert word_alignment(tokens) == {"a": [0], "circle": [1], ",": [2], "elephant": [3, 4], "!!": [5, 6],
                                      "(": [7, 8], "x": [9], ")": [10]}


@pytest.mark.parametrize("make", [make_clip_tokenizer, make_t5_tokenizer, make_gemma_tokenizer])
def test_a_target_with_punctuation_matches_the_words_it_splits_into(make, tmp_path):
    tok = make(tmp_path)
    tokens = tok.convert_ids_to_tokens(tok("a well-known circle, a square").input_ids)
    words = token_words(tokens)
    found = resolve_targets(tokens, ["well-known", "circle,"])
    assert list(dict.fromkeys(words[p] for p in found["well-known"])) == ["well", "-", "known"]
    assert list(dict.fromkeys(words[p] for p in found["circle,"])) == ["circle", ","]
    for positions in found.values():  # consecutive pieces
        assert positions == list(range(positions[0], positions[-1] + 1))


def test_clip_words_are_decoded_from_their_bytes(tmp_path):
    tok = make_clip_tokenizer(tmp_path)
    tokens = tok.convert_ids_to_tokens(tok("a café and a naïve circle").input_ids)
    assert "Ã" in "".join(tokens)  # CLIP's byte-level pieces: é is spelled Ã©
    assert list(word_alignment(tokens)) == ["a", "café", "and", "naïve", "circle"]
    found = resolve_targets(tokens, ["café", "naïve"])
    assert "".join(tokens[p] for p in found["café"]).removesuffix("</w>") == "caf" + "é".encode().decode("latin-1")
    assert len(found["naïve"]) > 1


def test_numpy_integers_are_token_positions_but_bools_are_not():
    tokens = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert resolve_targets(tokens, np.int64(3)) == {"3": [3]}
    assert resolve_targets(tokens, ["red", np.int32(3)]) == {"red": [2], "3": [3]}
    assert resolve_targets(tokens, np.arange(1, 3)) == {"1": [1], "2": [2]}
    for bad in (True, np.bool_(True), np.float64(3.0)):
        with pytest.raises(AttnscopeError, match="expected a word, a phrase or a token position"):
            resolve_targets(tokens, [bad])
    with pytest.raises(AttnscopeError, match="expected a word, a phrase or a token position"):
        resolve_targets(tokens, np.float64(3.0))


KW = {"flux": dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16),
      "pixart": dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                     use_resolution_binning=False, clean_caption=False),
      "sd3": dict(num_inference_steps=2, height=32, width=32, guidance_scale=2.0, max_sequence_length=16)}
PIPES = {"flux": tiny_flux_pipeline, "pixart": tiny_pixart_pipeline, "sd3": tiny_sd3_pipeline}


@pytest.mark.parametrize("family", ["flux", "pixart", "sd3"])
def test_a_word_before_punctuation_is_found_on_t5_pipelines(family, tmp_path):
    """T5 spelled "circle," as one word: "circle" was not in the prompt (Flux, PixArt), or on SD3 matched only the
    CLIP copy."""
    tr = ats.capture(PIPES[family](), PUNCTUATED, seed=0, store=tmp_path / "a.zarr", **KW[family])
    ds = ats.stats.dominance(tr, ["circle", "square"])
    marked = ds.target_tokens.isel(sample=0).sel(target="circle").values
    texts = ds.token_text.values[marked].tolist()
    expected = ["circle</w>", "▁circle"] if family == "sd3" else ["▁circle"]  # SD3: the CLIP and the T5 copy
    assert texts == expected
    if family == "sd3":
        assert ds.token.values[marked][1] >= 77  # the T5 segment starts after CLIP's 77 positions
    assert np.isfinite(ds.target_share.sel(target="circle")).all()


def test_targets_given_as_a_mapping_are_refused():
    """`report(tr, words={"circle": 2.0})` and `dominance(tr, targets={...})` used the dict's keys and dropped its
    values silently (a user may mean weights); a mapping is not a list of targets."""
    toks = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    with pytest.raises(AttnscopeError, match=r"targets=\{'circle': 2.0\}: a mapping; expected a word, a phrase, a "
                                             r"token position or a list of them"):
        resolve_targets(toks, {"circle": 2.0})
    assert resolve_targets(toks, ("circle", 2)) == {"circle": [3], "2": [2]}
