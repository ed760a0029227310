"""Audit of the shapes world's non-neural parts: the detector and the scene tools, on scenes whose truth is set by hand."""

import numpy as np
import pytest

from attnscope import AttnscopeError
from attnscope.models.shapes import (
    COLOURS,
    Scene,
    ShapeObject,
    check_vocabulary,
    detect,
    relation_holds,
    render,
)


def _scene(*objects, size=32):
    return Scene(tuple(ShapeObject(c, s, b) for c, s, b in objects), "test scene", None, size)


@pytest.mark.parametrize("left,right", [("red", "green"), ("green", "red"), ("blue", "yellow")])
def test_touching_objects_make_no_phantom_object_on_their_border(left, right):
    # Two squares that touch along x = 14.5: column 14 is a blend of both colours and the background, a
    # 1-px line whose hue can be nearest a third palette colour (red + green reads yellowish). Truth: two squares.
    scene = _scene((left, "square", (2.0, 2.0, 14.5, 16.0)), (right, "square", (14.5, 2.0, 28.0, 16.0)))
    found = detect(render(scene))
    assert [(o.colour, o.shape) for o in found] == [(left, "square"), (right, "square")]
    assert np.allclose(found[0].box, (2, 2, 15, 16), atol=1) and np.allclose(found[1].box, (14, 2, 28, 16), atol=1)


def test_a_thin_object_of_two_pixels_is_still_found():
    # the sliver rule drops 1-px lines only: a 2-px wide bar (28 px) is a coloured region like any other
    scene = _scene(("blue", "square", (10.0, 4.0, 12.0, 18.0)))
    assert [(o.colour, o.box) for o in detect(render(scene))] == [("blue", (10, 4, 12, 18))]


@pytest.mark.parametrize("kwargs,match", [
    ({"colour": "purple"}, r"colour='purple': expected one of red, yellow, green, blue"),
    ({"shape": "star"}, r"shape='star': expected one of circle, square, triangle"),
    ({"shape": "Circle"}, r"shape='Circle'"),
    ({"box": (2.0, 2.0, 14.0, 2.0)}, r"box=\(2.0, 2.0, 14.0, 2.0\): expected .*x0 < x1 and y0 < y1"),
    ({"box": (14.0, 2.0, 2.0, 14.0)}, r"box="),
    ({"box": (2.0, 2.0, float("nan"), 14.0)}, r"box="),
    ({"box": (2.0, 2.0, 14.0)}, r"box="),
    ({"box": "2 2 14 14"}, r"box="),
])
def test_shape_object_refuses_what_render_cannot_draw(kwargs, match):
    # before: an unknown shape was drawn as a triangle without a word, an unknown colour failed in render
    # with a KeyError, a flat triangle divided by zero
    args = {"colour": "red", "shape": "circle", "box": (2.0, 2.0, 14.0, 14.0), **kwargs}
    with pytest.raises(AttnscopeError, match=match):
        ShapeObject(**args)


def test_shape_object_takes_numpy_numbers_and_renders_them():
    obj = ShapeObject("green", "square", tuple(np.float32(v) for v in (4, 6, 14, 16)))
    image = render(Scene((obj,), "a green square"))
    assert ((image == COLOURS["green"]).all(-1)).sum() == 100  # the 10x10 pixel-aligned square, as with floats


@pytest.mark.parametrize("size", [0, 20.5, True, "32"])
def test_scene_refuses_a_size_render_cannot_draw(size):
    with pytest.raises(AttnscopeError, match=rf"size={size!r}: expected an int >= 1"):
        Scene((), "", None, size)


def test_scene_refuses_an_unknown_relation():
    with pytest.raises(AttnscopeError, match="relation='left of': expected None or one of to the left of"):
        Scene((), "", "left of")


def test_relation_holds_refuses_an_unknown_relation():
    with pytest.raises(AttnscopeError, match="relation='left of': expected one of to the left of, to the right of"):
        relation_holds("left of", (1.0, 2.0), (3.0, 4.0))
    assert relation_holds("to the left of", (1.0, 2.0), (3.0, 4.0))  # the known ones as before


def test_check_vocabulary_names_whole_words_with_accents():
    # CLIP's tokenizer reads "réd" as one word; the error named its letters 'r', 'é', 'd'
    with pytest.raises(AttnscopeError, match=r"vocabulary: 'réd'; the vocabulary"):
        check_vocabulary("a réd circle")
    with pytest.raises(AttnscopeError, match=r"vocabulary: 'carré', '2'; the vocabulary"):
        check_vocabulary("a red carré 2")
    with pytest.raises(AttnscopeError, match=r"vocabulary: '\.'; the vocabulary"):
        check_vocabulary("A Red Circle.")
    check_vocabulary("A  RED circle\tand a blue square")
