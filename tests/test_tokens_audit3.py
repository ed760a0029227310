"""Tokens and selection under odd but legal input (a third audit): numpy and xarray values where ints or words are
expected, accents typed decomposed, punctuation in byte-level BPE prompts. Expected values are worked out here by
hand from the token strings, or by the same call with plain Python values."""

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.selection import select_steps
from attnscope.testing import make_qwen_tokenizer
from attnscope.tokens import target_list, target_occurrences, word_occurrences

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def trace(shapes, tmp_path_factory):
    return ats.capture(shapes, PROMPT, seed=3, store=tmp_path_factory.mktemp("tokens3") / "t.zarr",
                       num_inference_steps=5)


# ----------------------------------------------------------------------------- steps given as arrays
def test_steps_of_a_numpy_or_xarray_array_are_those_steps():
    steps = xr.DataArray(np.arange(20), dims="step")
    assert select_steps(steps[-3:], 20) == (17, 18, 19)  # da.step[-3:]: an xarray array of ints
    assert select_steps(steps[-1], 20) == (19,)  # 0-d xarray: one step
    assert select_steps(steps[-1].values, 20) == (19,)  # 0-d numpy
    assert select_steps(np.array([4, 2, 4]), 20) == (2, 4)  # sorted, repeats merged, as a list is
    assert select_steps(slice(np.int64(-2), None), 20) == (18, 19)  # numpy ints in a slice
    assert select_steps(slice(None, np.int32(6), np.int64(3)), 20) == (0, 3)


@pytest.mark.parametrize("spec", [np.array([0.5]), np.array(["a"]), np.zeros((2, 2), int), b"01",
                                  slice(np.bool_(True), None)])
def test_steps_that_are_no_ints_are_one_clear_error(spec):
    with pytest.raises(AttnscopeError, match=r"(?s)steps=.*: expected"):
        select_steps(spec, 20)


def test_a_trace_read_with_its_own_step_coordinate_gives_the_same_maps(trace):
    site = trace.sites[0]
    da = trace.attention(site)
    chosen = ats.stats.dominance(trace, targets=["circle"], steps=da.step[-2:])
    plain = ats.stats.dominance(trace, targets=["circle"], steps=[3, 4])
    xr.testing.assert_identical(chosen, plain)


# ----------------------------------------------------------------------------- targets given as arrays
def test_a_0d_array_is_the_one_target_it_holds(trace):
    assert target_list(np.array(3)) == [3] and target_list(np.int64(3)) == [3]
    assert target_list(xr.DataArray(np.array(["circle", "square"]))[0]) == ["circle"]
    assert target_list([np.array(2), "circle"]) == [2, "circle"]
    da = trace.attention(trace.sites[0])
    word = xr.DataArray(np.array(["red", "circle"]), dims="word")[1]  # a 0-d xarray array of a word
    by_array = ats.stats.dominance(trace, targets=[word, da["token"][2].values])
    plain = ats.stats.dominance(trace, targets=["circle", 2])
    np.testing.assert_array_equal(by_array.target_share.values, plain.target_share.values)
    assert by_array["target"].values.tolist() == plain["target"].values.tolist()


# ----------------------------------------------------------------------------- accents
def test_a_target_typed_with_a_combining_accent_finds_the_word(shapes):
    tok = shapes.tokenizer
    tokens = tok.convert_ids_to_tokens(tok("a red café circle").input_ids)
    # CLIP spells é as two byte-level pieces; the word is café, tokens 3 … 7 (c, a, f, Ã, ©</w>)
    assert dict(word_occurrences(tokens))["café"] == [3, 4, 5, 6, 7]
    for target in ("café", "CAFÉ", "cafe\u0301", "CAFE\u0301"):  # composed and decomposed, any case
        assert target_occurrences(tokens, target) == [[3, 4, 5, 6, 7]], target
    assert target_occurrences(tokens, "cafe") == []  # no accent is another word


# ----------------------------------------------------------------------------- byte-level punctuation (docs claim)
def test_byte_level_bpe_words_keep_punctuation_apart(tmp_path):
    tok = make_qwen_tokenizer(tmp_path)
    tokens = tok.convert_ids_to_tokens(tok("a red circle, a blue square.").input_ids)
    words = [w for w, _ in word_occurrences(tokens)]
    assert words == ["a", "red", "circle", ",", "a", "blue", "square", "."]
    comma = tokens.index(",") if "," in tokens else None
    assert comma is not None and dict(word_occurrences(tokens))[","] == [comma]
    assert len(target_occurrences(tokens, "circle")) == 1


# ----------------------------------------------------------------------------- sentencepiece byte fallback
def _byte_fallback_tokenizer(words):
    """A sentencepiece-style BPE with byte fallback (as Gemma's, Sana's text encoder): ``words`` are pieces, any
    other character is spelled as its UTF-8 bytes, ``<0xC3>`` ``<0xA9>`` for ``é``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    merges = []
    for word in words:
        for c in word:
            vocab.setdefault(c, len(vocab))
        piece = word[0]
        for c in word[1:]:
            merges.append((piece, c))
            piece += c
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(dict.fromkeys(merges)), byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return tok


def test_byte_fallback_pieces_spell_the_character_they_encode():
    # Gemma spells a character outside its vocabulary as bytes: "Café" was the word "Caf<0xC3><0xA9>", not findable
    tok = _byte_fallback_tokenizer(["\u2581a", "\u2581red", "\u2581Caf", "\u2581circle"])
    tokens = ["<bos>", *tok.encode("a red Café circle 🐱").tokens, "<eos>", "<pad>"]
    assert tokens[3:6] == ["\u2581Caf", "<0xC3>", "<0xA9>"]  # the tokenizer did fall back to bytes
    words = word_occurrences(tokens)
    assert [w for w, _ in words] == ["a", "red", "Café", "circle", "🐱"]
    assert dict(words)["Café"] == [3, 4, 5]
    cat = [i for i, t in enumerate(tokens) if t in ("<0xF0>", "<0x9F>", "<0x90>", "<0xB1>")]
    assert len(cat) == 4 and tokens[cat[0] - 1] == "▁"  # its space is a piece of its own, opening the word
    assert dict(words)["🐱"] == [cat[0] - 1, *cat]
    for target in ("café", "CAFE\u0301"):
        assert target_occurrences(tokens, target) == [[3, 4, 5]]
