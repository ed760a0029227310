"""The embedded "shapes" model and its world: scenes, captions, a detector, training and loading.

>>> from attnscope.shapes import detect, render, sample_scene
>>> scene = sample_scene(0, "two")
>>> sorted((o.colour, o.shape) for o in detect(render(scene))) == sorted((o.colour, o.shape) for o in scene.objects)
True
"""

from .detector import DetectedObject, detect
from .world import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    KINDS,
    RELATIONS,
    SHAPES,
    VOCABULARY,
    Scene,
    ShapeObject,
    check_vocabulary,
    parse_prompt,
    relation_holds,
    render,
    sample_scene,
)

__all__ = [
    "BACKGROUND", "COLOURS", "DetectedObject", "IMAGE_SIZE", "KINDS", "RELATIONS", "SHAPES", "Scene",
    "ShapeObject", "VOCABULARY", "check_vocabulary", "detect", "parse_prompt", "relation_holds", "render", "sample_scene",
]
