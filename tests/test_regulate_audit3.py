"""Interventions given numpy and xarray values where ints and words are expected (a third audit): the same images as
with plain Python values, and a description a manifest can hold."""

import json

import numpy as np
import pytest
import torch
import xarray as xr

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.regulate import AttentionRegulation, Reweight

PROMPT = "a red circle and a blue square"


def _image(pipe, *interventions):
    with ats.hooks(pipe, *interventions):
        out = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


@pytest.mark.parametrize("steps", [np.arange(2), xr.DataArray(np.arange(4), dims="step")[:2],
                                   slice(np.int64(0), np.int64(2))])
def test_reweight_takes_steps_as_numpy_or_xarray_ints(shapes, steps):
    # an array used to reach `steps == "first_half"`: numpy's elementwise == raised "truth value … ambiguous"
    plain = _image(shapes, Reweight("circle", 3.0, steps=[0, 1]))
    given = Reweight("circle", 3.0, steps=steps)
    np.testing.assert_array_equal(_image(shapes, given), plain)
    assert not np.array_equal(plain, _image(shapes))  # the reweighting did something at those steps
    described = json.loads(json.dumps(given.describe()))["params"]  # a manifest holds it
    assert described["steps"] in ([0, 1], {"start": 0, "stop": 2, "step": None})


def test_regulation_takes_a_word_of_an_xarray_coordinate_and_numpy_steps(shapes):
    words = xr.DataArray(np.array(["circle", "square"]), dims="word")  # e.g. a dominance result's target labels
    given = AttentionRegulation([words[0], words[1]], steps=np.array([0, 1]))
    plain = AttentionRegulation(["circle", "square"], steps=[0, 1])
    np.testing.assert_array_equal(_image(shapes, given), _image(shapes, plain))
    assert json.loads(json.dumps(given.describe())) == json.loads(json.dumps(plain.describe()))
    one = Reweight(words[0], 2.0)  # a 0-d array is one word
    np.testing.assert_array_equal(_image(shapes, one), _image(shapes, Reweight("circle", 2.0)))


@pytest.mark.parametrize("steps", [np.array([0.5, 1.5]), np.zeros((2, 2), int), slice(np.float64(0), 2)])
def test_steps_that_are_not_ints_are_still_one_clear_error(steps):
    with pytest.raises(AttnscopeError, match=r"(?s)steps=.*expected"):
        Reweight("circle", 2.0, steps=steps)


def test_a_layout_reads_relation_words_in_any_case():
    from attnscope.regulate import layout_from_prompt

    # "Below" used to match no relation: one strip for the whole prompt, the objects placed side by side
    lower = layout_from_prompt("a red circle below a blue square")
    upper = layout_from_prompt("A red circle Below a blue square")
    assert list(upper.values()) == list(lower.values())
    assert upper["A red circle"][1] > upper["a blue square"][3]  # the circle's box lies under the square's
    assert layout_from_prompt("a cat AND a dog") == layout_from_prompt("a cat and a dog")
