"""The embedded "shapes" model and its world: scenes, captions, a detector, the model, its training.

The world and the detector are plain numpy and load with ``import attnscope``; the model, its
tokenizer builder and its training load diffusers/transformers on first use.

>>> from attnscope.models.shapes import detect, render, sample_scene
>>> scene = sample_scene(0, "two")
>>> sorted((o.colour, o.shape) for o in detect(render(scene))) == sorted((o.colour, o.shape) for o in scene.objects)
True
"""

from ..._lazy import lazy_exports
from ._detector import DetectedObject, detect
from ._tokenizer import learn_bpe_merges, make_clip_tokenizer
from ._world import (
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
    "BACKGROUND", "COLOURS", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "DetectedObject", "IMAGE_SIZE", "KINDS", "RELATIONS",
    "SHAPES", "Scene", "ShapeObject", "ShapesPipeline", "TEXT_LENGTH", "TrainConfig", "VOCABULARY", "WEIGHTS_DIR",
    "assemble", "build_components", "check_vocabulary", "learn_bpe_merges", "detect", "load_shapes_pipeline", "make_clip_tokenizer",
    "parse_prompt", "relation_holds", "render", "sample_scene", "sampling_scheduler", "train_shapes",
]

_MODEL = ("DEFAULT_GUIDANCE", "DEFAULT_STEPS", "ShapesPipeline", "TEXT_LENGTH", "WEIGHTS_DIR", "assemble",
          "build_components", "load_shapes_pipeline", "sampling_scheduler")
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(_MODEL, "._model"), "TrainConfig": "._training", "train_shapes": "._training",
}, globals())
