"""The shapes world and its detector, against scenes whose contents are known exactly."""

import numpy as np
import pytest

from attnscope import AttnscopeError
from attnscope.models.shapes import (
    BACKGROUND,
    COLOURS,
    RELATIONS,
    detect,
    parse_prompt,
    relation_holds,
    render,
    sample_scene,
)


def test_same_seed_same_scene_and_pixels():
    for seed in range(20):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b
        assert np.array_equal(render(a), render(b))
    assert len({sample_scene(seed).caption for seed in range(20)}) > 10


@pytest.mark.parametrize("kind,n", [("single", 1), ("two", 2), ("relation", 2), ("three", 3)])
def test_scene_kinds_objects_and_captions(kind, n):
    for seed in range(30):
        scene = sample_scene(seed, kind)
        assert len(scene.objects) == n
        assert len({(o.colour, o.shape) for o in scene.objects}) == n
        objects, relation = parse_prompt(scene.caption)
        assert objects == [(o.colour, o.shape) for o in scene.objects]
        assert relation == scene.relation
        assert (relation is not None) == (kind == "relation")
        for o in scene.objects:  # inside the image
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= scene.size and 0 <= y0 < y1 <= scene.size
        if relation:
            a, b = scene.objects
            assert relation_holds(relation, a.centre, b.centre)


def test_objects_do_not_overlap():
    for seed in range(50):
        scene = sample_scene(seed, "three")
        mask = np.zeros((scene.size, scene.size), int)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] += 1
        assert mask.max() == 1


def test_render_draws_known_pixels():
    from attnscope.models.shapes import Scene, ShapeObject

    scene = Scene((ShapeObject("red", "square", (4.0, 6.0, 14.0, 16.0)),), "a red square")
    image = render(scene)
    assert tuple(image[10, 8]) == COLOURS["red"]  # inside
    assert tuple(image[2, 2]) == BACKGROUND  # outside
    assert tuple(image[10, 20]) == BACKGROUND
    covered = (image != BACKGROUND).any(-1)
    assert covered.sum() == 100  # exactly the 10x10 pixel-aligned square


def test_relation_semantics():
    assert relation_holds("to the left of", (3.0, 10.0), (20.0, 12.0))
    assert not relation_holds("to the right of", (3.0, 10.0), (20.0, 12.0))
    assert relation_holds("below", (3.0, 25.0), (4.0, 5.0))
    assert set(RELATIONS) == {"to the left of", "to the right of", "above", "below"}


def test_detector_accuracy_on_rendered_scenes():
    exact = 0
    for seed in range(400):
        scene = sample_scene(seed + 10_000)
        found = detect(render(scene))
        exact += sorted((o.colour, o.shape) for o in found) == sorted((o.colour, o.shape) for o in scene.objects)
    assert exact / 400 >= 0.98


def test_detector_boxes_and_pil_input():
    from PIL import Image

    from attnscope.models.shapes import Scene, ShapeObject

    scene = Scene((ShapeObject("blue", "circle", (2.0, 2.0, 14.0, 14.0)),
                   ShapeObject("yellow", "triangle", (18.0, 16.0, 30.0, 28.0))), "a blue circle and a yellow triangle")
    found = detect(Image.fromarray(render(scene)))
    assert [(o.colour, o.shape) for o in found] == [("blue", "circle"), ("yellow", "triangle")]
    for o, truth in zip(found, scene.objects):
        assert np.allclose(o.box, truth.box, atol=1.0)


def test_detector_ignores_background_and_specks():
    image = np.full((32, 32, 3), BACKGROUND, np.uint8)
    assert detect(image) == []
    image[5:7, 5:7] = COLOURS["green"]  # 4 px: a smudge, not an object
    assert detect(image) == []


def test_detector_bad_input():
    with pytest.raises(AttnscopeError, match=r"shape \(32, 32\)"):
        detect(np.zeros((32, 32), np.uint8))


def test_parse_prompt_refuses_other_text():
    with pytest.raises(AttnscopeError, match="vocabulary: 'photo', 'cat'"):
        parse_prompt("a photo of a cat")
    with pytest.raises(AttnscopeError, match="not a shapes-world prompt"):
        parse_prompt("a red circle above a blue square and a green triangle")
